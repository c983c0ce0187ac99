"""``load_model``: from a model name or an ``nn.Module`` to a :class:`ViTAdapter`.

Weights (for named models), in order:

1. ``weights=`` argument: a weights file (``.safetensors``, ``.pth``, ``.bin``, ``.npz``), a folder
   holding one whose name starts with the model name, or ``"random"`` for random initialisation;
2. the ``VITLENS_WEIGHTS`` environment variable (file or folder, same rules);
3. the library's own hub download (timm / Hugging Face / open_clip pretrained tags), which needs internet.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..errors import UnsupportedModelError, WeightsError
from .base import ViTAdapter

DEFAULT_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
WEIGHTS_ENV = "VITLENS_WEIGHTS"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def find_weights(name: str, location: Union[str, os.PathLike]) -> Path:
    """A weights file for model ``name`` at ``location`` (a file, or a folder searched by name)."""
    p = Path(location).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise WeightsError(f"weights path does not exist: {p}")
    base = name.split(":")[-1]
    arch = base.split(".")[0]
    files = sorted(f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
    for key in (base, arch):
        hits = [f for f in files if f.name.startswith(key + ".") or f.stem == key]
        if hits:
            # prefer the exact tag, then the first match
            exact = [f for f in hits if f.stem == base]
            return (exact or hits)[0]
    raise WeightsError(f"no weights file for '{name}' in {p} (looked for {base}.* or {arch}.* with a suffix in "
                       f"{', '.join(_WEIGHT_SUFFIXES)}).")


def _resolve_weights(name: str, weights: Optional[str]) -> Optional[Union[str, Path]]:
    if weights is None and Path(name).is_dir():  # a saved Hugging Face folder given as the name
        return Path(name)
    if weights is not None and str(weights) != "random" and (Path(weights) / "config.json").is_file():
        return Path(weights)  # a save_pretrained folder (Hugging Face)
    if weights is None:
        env = os.environ.get(WEIGHTS_ENV)
        if env:
            return find_weights(name, env)
        return None
    if str(weights) == "random":
        return "random"
    if isinstance(weights, (str, os.PathLike)) and (os.sep in str(weights) or Path(weights).exists()
                                                    or str(weights).endswith(_WEIGHT_SUFFIXES)):
        return find_weights(name, weights)
    return weights  # a library-specific tag (open_clip pretrained name, torchvision weights enum name)


def _hub_error(name: str, err: Exception) -> WeightsError:
    return WeightsError(
        f"could not download pretrained weights for '{name}' ({type(err).__name__}: {err}). Offline, point "
        f"vitlens at a local weights file or folder with --weights PATH or the {WEIGHTS_ENV} environment variable "
        "(e.g. VITLENS_WEIGHTS=../shared/models), or use weights='random' for an untrained model.")


def _known_names(lib: str) -> Optional[list[str]]:
    """Model names the library knows without a network (None: cannot tell offline, e.g. Hugging Face)."""
    if lib == "timm":
        import timm

        return sorted(set(timm.list_models()) | set(timm.list_pretrained()))
    if lib == "torchvision":
        import torchvision

        return list(torchvision.models.list_models())
    if lib == "open_clip":
        import open_clip

        return list(open_clip.list_models())
    return None


def check_model_name(lib: str, name: str) -> None:
    """Raise :class:`UnsupportedModelError` with close matches when ``name`` is not a model of ``lib``.

    Runs before any weights lookup, so a typo is reported as such (not as a missing weights file or a
    failed download). Hugging Face names (and ``hf-hub:`` names) cannot be checked offline."""
    if name.startswith(("hf-hub:", "hf_hub:")):  # hub repositories (timm, open_clip): not listed offline
        return
    if lib == "timm":
        import timm

        if timm.is_model(name) and "." not in name:  # the common case, without listing every model
            return
    known = _known_names(lib)
    if known is None or (lib != "timm" and name in known):
        return
    from ..errors import did_you_mean

    if lib == "timm":
        import timm

        if timm.is_model(name) and ("." not in name or name in known):
            return
        if timm.is_model(name):  # the architecture exists, the pretrained tag does not
            arch = name.split(".")[0]
            tags = [k for k in known if k.startswith(arch + ".")]
            raise UnsupportedModelError(f"unknown pretrained tag in model '{name}'.{did_you_mean(name, tags)} "
                                        f"Tags of {arch}: {', '.join(t.split('.', 1)[1] for t in tags) or 'none'}.")
        hint = "see timm.list_models(); prefix torchvision:, hf: or open_clip: for other libraries"
    else:
        hint = {"torchvision": "see torchvision.models.list_models()",
                "open_clip": "see open_clip.list_models()"}[lib]
    raise UnsupportedModelError(f"unknown {lib} model '{name}'.{did_you_mean(name, known)} ({hint}).")


def check_device(device: Union[str, torch.device, None]) -> Optional[torch.device]:
    """The ``torch.device`` for ``device`` after checking it exists here (before any model is loaded)."""
    from ..errors import InputError

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"device '{device}' is not a torch device; use cpu, cuda, cuda:1, mps...") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"device '{device}': no CUDA GPU is available here (torch.cuda.is_available() is "
                             "False); use --device cpu (or install a CUDA build of torch).")
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device '{device}': only {n} CUDA device(s) here (cuda:0..cuda:{n - 1}).")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"device '{device}': Apple MPS is not available here; use --device cpu.")
    elif dev.type != "cpu":
        raise InputError(f"device '{device}' is not supported here; use cpu or cuda.")
    return dev


def load_model(model: Union[str, nn.Module] = DEFAULT_MODEL, weights: Optional[str] = None,
               device: Union[str, torch.device, None] = None, **kwargs) -> ViTAdapter:
    """Load a named model (or wrap an ``nn.Module``) and return its adapter.

    Names are timm names by default; prefix ``torchvision:``, ``hf:`` or ``open_clip:`` for the other
    libraries (``open_clip:ViT-B-32`` with ``weights="laion2b_s34b_b79k"`` or a checkpoint path).
    ``kwargs`` go to the library's constructor (e.g. ``num_classes``, ``depth`` for timm).
    """
    check_device(device)
    if isinstance(model, nn.Module):
        adapter = wrap_model(model, **kwargs)
    elif isinstance(model, str):
        lib, _, name = model.partition(":") if ":" in model else ("timm", "", model)
        loaders = {"timm": _load_timm, "torchvision": _load_torchvision, "hf": _load_hf, "open_clip": _load_open_clip}
        if lib not in loaders:
            raise UnsupportedModelError(f"unknown model library prefix '{lib}:'; use one of {', '.join(loaders)}.")
        check_model_name(lib, name)
        adapter = loaders[lib](name, _resolve_weights(name, weights), **kwargs)
    else:
        raise UnsupportedModelError(f"model must be a name or an nn.Module, got {type(model).__name__}.")
    if device is not None:
        adapter.module.to(device)
    return adapter


def wrap_model(module: nn.Module, **kwargs) -> ViTAdapter:
    """The adapter for an already-built model (timm, torchvision, Hugging Face or open_clip)."""
    if isinstance(module, ViTAdapter):
        return module
    mod = type(module).__module__
    if mod.startswith("timm.") and hasattr(module, "blocks") and hasattr(module, "_pos_embed"):
        from .timm_vit import TimmViTAdapter
        return TimmViTAdapter(module, **kwargs)
    if mod.startswith("torchvision.") and hasattr(module, "conv_proj"):
        from .torchvision_vit import TorchvisionViTAdapter
        return TorchvisionViTAdapter(module, **kwargs)
    if mod.startswith("transformers.") and hasattr(module, "deit"):
        from .hf_deit import HFDeiTAdapter
        return HFDeiTAdapter(module, **kwargs)
    if mod.startswith("transformers.") and hasattr(module, "vit"):
        from .hf_vit import HFViTAdapter
        return HFViTAdapter(module, **kwargs)
    if mod.startswith("transformers.") and hasattr(module, "vision_model") and hasattr(module, "get_text_features"):
        from .hf_clip import HFCLIPAdapter, HFSiglipAdapter
        return (HFCLIPAdapter if hasattr(module, "visual_projection") else HFSiglipAdapter)(module, **kwargs)
    if mod.startswith("open_clip.") and hasattr(module, "visual"):
        if hasattr(module.visual, "trunk"):
            from .open_clip_timm import OpenCLIPTimmAdapter
            return OpenCLIPTimmAdapter(module, **kwargs)
        from .open_clip_vit import OpenCLIPAdapter
        return OpenCLIPAdapter(module, **kwargs)
    if mod.startswith("timm.") and type(module).__name__.startswith("SwinTransformer"):
        try:
            from .timm_swin import TimmSwinAdapter  # added by the ViT-CX work
        except ImportError:  # pragma: no cover
            pass
        else:
            return TimmSwinAdapter(module, **kwargs)
    have = [n for n in ("blocks", "patch_embed", "cls_token", "encoder", "visual", "vit") if hasattr(module, n)]
    raise UnsupportedModelError(
        f"unsupported model {type(module).__module__}.{type(module).__name__}: vitlens needs a timm "
        "VisionTransformer, a torchvision VisionTransformer, a Hugging Face ViTForImageClassification or an "
        f"open_clip CLIP model with a ViT image tower (found attributes: {', '.join(have) or 'none of blocks/patch_embed/encoder/visual/vit'}).")


def _load_timm(name: str, weights, **kwargs) -> ViTAdapter:
    import timm

    if weights == "random":
        m = timm.create_model(name, pretrained=False, **kwargs)
    elif weights is None:
        try:
            m = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # network / hub errors
            raise _hub_error(name, e) from None
    else:
        path = Path(weights)
        try:
            m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        except Exception as e:
            raise WeightsError(f"could not load timm weights for '{name}' from {path}: {e}") from None
    return wrap_model(m)


def _load_torchvision(name: str, weights, **kwargs) -> ViTAdapter:
    import torchvision

    if weights in (None, "random"):
        tv_weights = None if weights == "random" else "DEFAULT"
        try:
            m = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
        except Exception as e:
            raise _hub_error(name, e) from None
    elif isinstance(weights, Path):
        m = torchvision.models.get_model(name, weights=None, **kwargs)
        m.load_state_dict(_read_state_dict(weights))
    else:
        m = torchvision.models.get_model(name, weights=weights, **kwargs)
    return wrap_model(m)


def _load_hf(name: str, weights, **kwargs) -> ViTAdapter:
    """Hugging Face: the architecture named in the config (``CLIPModel``, ``SiglipModel``,
    ``DeiTForImageClassificationWithTeacher``, ...; image classifiers otherwise), plus the tokenizer for
    the dual encoders (loaded from the same folder / hub id; without one, prompts give a clear error)."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageClassification

    src = str(weights) if isinstance(weights, Path) else name
    if isinstance(weights, Path) and weights.is_file():
        src = str(weights.parent)
    try:
        cfg = AutoConfig.from_pretrained(src if weights != "random" else name)
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None or getattr(cfg, "model_type", "") in ("clip", "siglip", "siglip2") and not arch.endswith("Model"):
            cls = transformers.AutoModel if getattr(cfg, "model_type", "") in ("clip", "siglip", "siglip2") \
                else AutoModelForImageClassification
        if weights == "random":
            m = cls.from_config(cfg, **kwargs) if hasattr(cls, "from_config") else cls._from_config(cfg, **kwargs)
        else:
            m = cls.from_pretrained(src, **kwargs)
    except Exception as e:
        raise _hub_error(name, e) from None
    if hasattr(m, "get_text_features"):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src if weights != "random" else name)
        except Exception:  # no tokenizer files: prompts will raise a clear TargetError
            tok = None
        return wrap_model(m, tokenizer=tok)
    return wrap_model(m)


def _load_open_clip(name: str, weights, **kwargs) -> ViTAdapter:
    """open_clip: ``open_clip:ViT-B-16`` (``weights`` a pretrained tag or a checkpoint), including the
    timm-tower models (``open_clip:ViT-B-16-SigLIP`` with ``weights="webli"``)."""
    import open_clip

    pretrained = None if weights == "random" else (str(weights) if weights is not None else None)
    try:
        m = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        raise _hub_error(name, e) from None
    try:
        tok = open_clip.get_tokenizer(name)
    except Exception:  # e.g. a Hugging Face tokenizer that is not cached offline
        tok = False
    adapter = wrap_model(m, tokenizer=tok)
    adapter.name = f"open_clip:{name}"
    return adapter


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)
