"""Datasets and sample images."""
from .imagenet import ImageNetBoxes, ImageNetSample, load_imagenet_boxes, transform_boxes
from .samples import sample_images

__all__ = ["ImageNetBoxes", "ImageNetSample", "load_imagenet_boxes", "transform_boxes", "sample_images"]
