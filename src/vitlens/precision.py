"""Reduced precision, compiled forwards and out-of-memory handling for the forward-heavy paths.

Every perturbation method (TIS token subsets, RISE / occlusion / Score-CAM / ViT-CX masked images)
and every perturbation metric (insertion / deletion / perturbation curves) spends nearly all its time
in batched forward passes of perturbed inputs. They all run those passes through
:func:`perturbed_forward` / :func:`perturbed_subset`, the one place that applies the run's settings:

* **precision** (``"fp32"`` | ``"bf16"`` | ``"fp16"``): the perturbed forward passes run under
  ``torch.autocast`` at that dtype (matrix products in bf16/fp16 with fp32 accumulation; LayerNorm
  and softmax inside the model stay fp32 by autocast's own op lists). The outputs are cast to float32
  *before* scoring, so softmax, the scores, K-Means (which runs on the fp32 clean pass), the
  weighted sums of masks and every accumulation stay float32. Clean passes (the target, TIS's
  activations, ViT-CX's features) always run at the model's own dtype.
* **default**: ``None`` / ``"auto"`` means fp32 on the CPU and :data:`CUDA_DEFAULT` (bf16) on CUDA.
  CPU: fp32 because bf16 only pays off with native bf16 matrix units (AVX-512 BF16 / AMX); on a CPU
  without them (e.g. the project's AVX2 machines) autocast bf16 runs the linear layers 4-5x
  *slower* than fp32 (see ``docs/precision.md``), so requesting it on such a CPU warns once.
  CUDA: bf16, because every GPU with bf16 tensor cores runs it at 2x or more the fp32 (TF32) rate, it
  keeps fp32's exponent range (no overflow of logits, unlike fp16), and the measured fidelity
  (``docs/precision.md``: map correlations and AUC changes of TIS, RISE and ViT-CX) is within the
  bounds stated there. Pass ``precision="fp32"`` for bit-for-bit reproducible fp32 tables.
* **compile** (``True``): the adapter's batched forward and token-subset paths are wrapped once per
  adapter in ``torch.compile(dynamic=False)`` (:meth:`ViTAdapter.compiled_path`); each batch is padded
  to the path's batch size (repeating its last row, outputs of the padding dropped) so a run compiles
  one static shape. If compilation or a compiled call fails, a warning names the error and the
  eager path is used from then on.
* **out of memory**: a batch that raises ``torch.OutOfMemoryError`` is split in halves and retried
  (recursively, down to one input; one input that does not fit raises a clear error); the halved size
  is remembered for the rest of the run so later batches are pre-split.

The settings come from the innermost :func:`runtime` context; :func:`vitlens.explain`, the metrics and
the bench open one from their ``precision=`` / ``compile=`` arguments. Gradient methods do not use
these helpers: they stay fp32 unless ``explain(..., precision=...)`` is given explicitly, which runs
the whole method under autocast.
"""
from __future__ import annotations

import contextlib
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from .errors import InputError, VitlensError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32",
            "bf16": "bf16", "bfloat16": "bf16",
            "fp16": "fp16", "float16": "fp16", "half": "fp16", "16": "fp16"}
#: precision of the perturbed forward passes when none is given, per device type
CPU_DEFAULT = "fp32"
CUDA_DEFAULT = "bf16"

PrecisionLike = Union[str, torch.dtype, None]


class OutOfMemory(VitlensError, RuntimeError):
    """Even a single input does not fit in the device's memory."""


@dataclass
class Runtime:
    """Settings of the forward-heavy paths (see the module docstring); ``None`` = inherit / default."""

    precision: Optional[str] = None
    compile: Optional[bool] = None
    #: largest batch known to fit, per (path, input shape without the batch): set after an OOM
    oom_caps: dict = field(default_factory=dict)


_CURRENT: ContextVar[Runtime] = ContextVar("vitlens_runtime", default=Runtime())
_WARNED: set = set()


def check_precision(precision: PrecisionLike) -> Optional[str]:
    """Canonical name (``"fp32"``, ``"bf16"``, ``"fp16"``) or ``None`` for ``None`` / ``"auto"``."""
    if precision is None:
        return None
    if isinstance(precision, torch.dtype):
        for k, v in DTYPES.items():
            if v == precision:
                return k
        raise InputError(f"precision {precision} is not supported; choose one of {', '.join(PRECISIONS)}.")
    if not isinstance(precision, str):
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)} or 'auto', got {precision!r}.")
    key = precision.strip().lower()
    if key == "auto":
        return None
    if key not in _ALIASES:
        raise InputError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)} or 'auto'.")
    return _ALIASES[key]


def default_precision(device: Union[torch.device, str]) -> str:
    """The precision used when none is given: :data:`CUDA_DEFAULT` on CUDA, fp32 elsewhere."""
    return CUDA_DEFAULT if torch.device(device).type == "cuda" else CPU_DEFAULT


def resolve_precision(precision: PrecisionLike, device: Union[torch.device, str]) -> str:
    p = check_precision(precision)
    return default_precision(device) if p is None else p


def current() -> Runtime:
    """The innermost :func:`runtime` settings."""
    return _CURRENT.get()


@contextlib.contextmanager
def runtime(precision: PrecisionLike = None, compile: Optional[bool] = None) -> Iterator[Runtime]:
    """Settings for the forward-heavy paths inside the ``with`` block; ``None`` inherits the enclosing
    block's value (at the top level: the device default precision, no compilation). A fresh
    out-of-memory record is kept per block."""
    outer = _CURRENT.get()
    p = check_precision(precision)
    rt = Runtime(precision=outer.precision if p is None else p,
                 compile=outer.compile if compile is None else bool(compile))
    token = _CURRENT.set(rt)
    try:
        yield rt
    finally:
        _CURRENT.reset(token)


def native_reduced_precision(device: Union[torch.device, str], precision: str) -> bool:
    """Whether ``device`` has native matrix units for ``precision`` (CUDA: assumed; CPU: oneDNN's check
    for AVX-512 BF16 / AMX / AVX-512 FP16)."""
    dev = torch.device(device)
    if precision == "fp32" or dev.type != "cpu":
        return True
    try:
        if precision == "bf16":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # private API absent in some builds: do not guess
        return True


def autocast(device: Union[torch.device, str], precision: PrecisionLike) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``precision`` on ``device`` (a no-op context for fp32)."""
    dev = torch.device(device)
    p = resolve_precision(precision, dev)
    if p == "fp32":
        return contextlib.nullcontext()
    if not native_reduced_precision(dev, p) and ("slow", p) not in _WARNED:
        _WARNED.add(("slow", p))
        warnings.warn(f"precision='{p}' on a CPU without native {p} matrix units (no AVX-512 BF16/AMX): "
                      "the results are those of reduced precision but the forward passes are slower than fp32.",
                      RuntimeWarning, stacklevel=3)
    return torch.autocast(dev.type, dtype=DTYPES[p])


def element_bytes(adapter) -> int:
    """Bytes per activation element of the perturbed forward passes under the current settings."""
    p = resolve_precision(current().precision, adapter.device)
    if p != "fp32":
        return 2
    return torch.finfo(adapter.dtype).bits // 8


# ------------------------------------------------------------------------------ the forward helpers
def perturbed_forward(adapter, x: Tensor) -> Tensor:
    """Model outputs (float32) for a batch of perturbed images under the current :func:`runtime`."""
    return _run(adapter, "forward", lambda inp: adapter.forward(inp), x)


def perturbed_subset(adapter, embedded: Tensor, keep: Tensor, image_index: Tensor) -> Tensor:
    """Model outputs (float32) for token subsets (TIS eq. 3, :meth:`ViTAdapter.forward_subset`) under the
    current :func:`runtime`. ``keep`` must be valid indices (not re-checked here, to keep the loop free of
    device-to-host synchronisation)."""
    from .models.base import ViTAdapter

    if type(adapter).forward_subset is not ViTAdapter.forward_subset:  # an adapter with its own subset path
        return _run(adapter, "subset", lambda rows: adapter.forward_subset(embedded, keep[rows], image_index[rows]),
                    torch.arange(keep.shape[0], device=keep.device), compilable=False)
    tokens = adapter.subset_tokens(embedded, keep, image_index)
    return _run(adapter, "encode", adapter.encode_tokens, tokens)


def _run(adapter, path: str, eager: Callable[[Tensor], Tensor], inputs: Tensor, compilable: bool = True) -> Tensor:
    rt = current()
    dev = inputs.device
    precision = resolve_precision(rt.precision, dev)

    def call(batch: Tensor) -> Tensor:
        with autocast(dev, precision):
            if rt.compile and compilable:
                out = _compiled_call(adapter, path, batch)
                if out is not None:
                    return out.float()
            return eager(batch).float()

    return _split_on_oom(call, inputs, rt, (path, tuple(inputs.shape[1:]), precision))


def _compiled_call(adapter, path: str, batch: Tensor) -> Optional[Tensor]:
    """The compiled path's outputs, padding the batch to the path's static batch size; ``None`` (after a
    warning) when compilation is unavailable or fails."""
    fn = adapter.compiled_path(path)
    if fn is None:
        return None
    n = batch.shape[0]
    size = adapter._compile_batch.get(path)
    if size is None or n > size:
        size = adapter._compile_batch[path] = n
    if n < size:  # pad with copies of the last row: one static shape per run
        batch = torch.cat([batch, batch[-1:].expand(size - n, *batch.shape[1:])])
    try:
        return fn(batch)[:n]
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # compiler missing, unsupported op, ...: eager from now on
        adapter.disable_compile(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def _split_on_oom(call: Callable[[Tensor], Tensor], inputs: Tensor, rt: Runtime, key) -> Tensor:
    """``call(inputs)``, split in halves (recursively) when it runs out of memory."""
    n = inputs.shape[0]
    cap = rt.oom_caps.get(key)
    if cap is not None and n > cap:
        return torch.cat([_split_on_oom(call, part, rt, key) for part in inputs.split(cap)])
    try:
        return call(inputs)
    except torch.OutOfMemoryError:
        if inputs.is_cuda:
            torch.cuda.empty_cache()
        if n == 1:
            raise OutOfMemory("out of device memory for a single input of shape "
                              f"{tuple(inputs.shape[1:])}; use a smaller model/input or precision='bf16'.") from None
        half = (n + 1) // 2
        rt.oom_caps[key] = min(half, rt.oom_caps.get(key, half))
        if ("oom", key) not in _WARNED:
            _WARNED.add(("oom", key))
            warnings.warn(f"out of memory with a batch of {n}; retrying in batches of {half}.", RuntimeWarning,
                          stacklevel=4)
        return torch.cat([_split_on_oom(call, part, rt, key) for part in inputs.split(half)])
