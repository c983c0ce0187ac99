"""Evaluation metrics: ``vitlens.metrics.<name>(model, x, maps, targets, **protocol) -> MetricResult``.

Every metric follows its paper's protocol by default (documented in its module); ``get_metric(name)``
gives the registered function with ``higher_is_better``, ``needs`` (ground truth it takes as keyword
arguments, e.g. ``boxes``) and its protocol ``defaults``; ``available_metrics()`` lists them.
"""
from .base import MetricInfo, MetricResult, available_metrics, get_metric, register_metric
from .causal import deletion, insertion
from .grid_pointing_game import cell_masks, grid_pointing_game, make_grids
from .open_vocab import open_vocab, open_vocab_scores
from .perturbation import perturbation, perturbation_negative, perturbation_positive
from .pointing_game import pointing_energy, pointing_game, pointing_hits
from .segmentation import average_precision, segmentation, segmentation_scores
from .sensitivity import max_sensitivity
from .sparseness import sparseness

__all__ = ["insertion", "deletion", "perturbation", "perturbation_positive", "perturbation_negative",
           "pointing_game", "pointing_hits", "pointing_energy", "grid_pointing_game", "max_sensitivity",
           "sparseness", "segmentation", "segmentation_scores", "average_precision", "make_grids",
           "cell_masks", "open_vocab", "open_vocab_scores", "MetricResult", "MetricInfo", "get_metric",
           "available_metrics", "register_metric"]
