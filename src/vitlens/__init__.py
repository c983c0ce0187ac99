"""vitlens: exact, fast, batched explanations for Vision Transformers.

    import vitlens
    model = vitlens.load_model("vit_tiny_patch16_224", weights=None)
    x = model.preprocess(["cat.jpg"])
    exp = vitlens.explain(model, x, method="tis")
"""
from __future__ import annotations

from .api import explain, methods
from .errors import InputError, TargetError, UnknownMethodError, UnsupportedModelError, VitlensError, WeightsError
from .explanation import Explanation
from .models import DEFAULT_MODEL, Target, ViTAdapter, load_model, wrap_model

__version__ = "0.1.0"

__all__ = ["explain", "methods", "load_model", "wrap_model", "Explanation", "ViTAdapter", "Target",
           "DEFAULT_MODEL", "VitlensError", "InputError", "TargetError", "UnknownMethodError",
           "UnsupportedModelError", "WeightsError", "__version__"]
