"""Evaluation metrics: ``vitlens.metrics.<name>(model, x, maps, targets, **protocol)``."""
from .pointing_game import pointing_game, pointing_hits

__all__ = ["pointing_game", "pointing_hits"]
