"""Model adapters: one uniform view of ViT, DeiT, CLIP and friends for every method."""
from .base import Trace, ViTAdapter
from .blocks import BlockSpec, run_block
from .loading import DEFAULT_MODEL, WEIGHTS_ENV, find_weights, load_model, wrap_model
from .targets import Target

__all__ = ["ViTAdapter", "Trace", "BlockSpec", "run_block", "Target", "load_model", "wrap_model",
           "find_weights", "DEFAULT_MODEL", "WEIGHTS_ENV"]
