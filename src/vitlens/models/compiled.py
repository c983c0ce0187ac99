"""``torch.compile`` of an adapter's batched forward paths, created once per adapter and path
(the ``compile=`` option of :mod:`vitlens.precision`); a mixin of :class:`vitlens.models.base.ViTAdapter`."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import InputError


class CompiledPaths:
    """Compiled versions of :meth:`forward` and :meth:`encode_tokens`, cached on the adapter."""

    name: str
    forward: Callable[..., Tensor]
    encode_tokens: Callable[[Tensor], Tensor]

    #: paths :meth:`compiled_path` can compile: the batched image forward and the token-sequence encoder
    COMPILE_PATHS = ("forward", "encode")
    #: keyword arguments of ``torch.compile`` (static shapes: each batch is padded to one size)
    COMPILE_OPTIONS: dict = {"dynamic": False}

    @property
    def _compile_batch(self) -> dict:
        """Static batch size of each compiled path (set by the first call, see :mod:`vitlens.precision`)."""
        d = self.__dict__.get("_compile_batch_sizes")
        if d is None:
            d = self.__dict__["_compile_batch_sizes"] = {}
        return d

    def compiled_path(self, path: str) -> Optional[Callable[[Tensor], Tensor]]:
        """``torch.compile(dynamic=False)`` of :meth:`forward` (``"forward"``) or :meth:`encode_tokens`
        (``"encode"``), created once per adapter and path; ``None`` (after one warning) when compilation
        is unavailable or has failed for this adapter."""
        if path not in self.COMPILE_PATHS:
            raise InputError(f"unknown compile path '{path}'; choose one of {', '.join(self.COMPILE_PATHS)}.")
        if self.__dict__.get("_compile_failed"):
            return None
        cache = self.__dict__.setdefault("_compiled", {})
        if path not in cache:
            fn = (lambda x: self.forward(x)) if path == "forward" else self.encode_tokens
            try:
                cache[path] = torch.compile(fn, **self.COMPILE_OPTIONS)
            except Exception as e:  # e.g. no compiler backend on this platform
                self.disable_compile(f"{type(e).__name__}: {e}")
                return None
        return cache[path]

    def disable_compile(self, reason: str) -> None:
        """Stop using compiled paths on this adapter (warns once with ``reason``)."""
        import warnings

        if not self.__dict__.get("_compile_failed"):
            warnings.warn(f"torch.compile failed for {self.name} ({reason}); running the eager model instead.",
                          RuntimeWarning, stacklevel=3)
        self.__dict__["_compile_failed"] = True
        self.__dict__.pop("_compiled", None)
