"""Datasets and sample images."""
from .imagenet import ImageNetBoxes, ImageNetSample, load_imagenet_boxes, transform_boxes
from .openimages import OpenImagesPoints, transform_points
from .samples import sample_images
from .segmentation import ImageNetSegmentation

__all__ = ["ImageNetBoxes", "ImageNetSample", "load_imagenet_boxes", "transform_boxes", "sample_images",
           "ImageNetSegmentation", "OpenImagesPoints", "transform_points"]
