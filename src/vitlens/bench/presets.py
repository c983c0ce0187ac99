"""Benchmark presets: the evaluation protocols of the papers whose methods vitlens implements.

Each preset fills in models, methods, method parameters and metrics; the user still gives ``--data``
(an ImageNet validation folder with boxes) and, offline, ``--weights``. Command-line options and
config files override any preset value. Method entries whose method is not (yet) registered are
reported by the runner with the list of available methods.

``default``
    Runs offline: the built-in default model (ViT-Ti/16 AugReg, weights from ``--weights`` or
    ``VITLENS_WEIGHTS``), every registered method with its default parameters, insertion, deletion
    and the pointing game (images whose boxes cover more than half of the crop are excluded from the
    pointing game by the metric itself), ground-truth class as target.
``tis-vit`` / ``tis-deit``
    TIS (Englebert et al., ICCV-W 2023): ViT-B/16 (``vit_base_patch16_224``) resp. DeiT-B
    (``deit_base_patch16_224``) on ImageNet validation images, TIS with N_m = 1024 masks and a keep
    ratio of 0.5 against the paper's baselines that vitlens implements (RISE, Grad-CAM, rollout,
    Chefer et al.'s two methods, the bidirectional explanations, TAM, ViT-CX), insertion and deletion
    (the paper's main table), plus the pointing game, sparseness and max-sensitivity.
``vitcx``
    ViT-CX (Xie et al., KDD 2023): ViT-B/16 on ImageNet validation, explaining the predicted class,
    ViT-CX against rollout, Chefer et al. (2021a), Grad-CAM, Score-CAM, RISE, integrated gradients and
    TIS; deletion AUC, insertion AUC and the pointing game (boxes covering more than half excluded).
``legrad-vit``
    LeGrad (Bousselham et al., 2024): ViT-B/16 on ImageNet validation, explaining the predicted class,
    LeGrad against attention, rollout, Grad-CAM, AttentionCAM, Chefer et al.'s two methods, AttnLRP and
    TAM; perturbation tests (positive: remove the most relevant pixels first, lower AUC is better;
    negative: remove the least relevant first, higher is better).

The model tags are timm's ImageNet-1k fine-tuned weights of those architectures (pass ``--weights``
offline). The paper-specific metric settings (number of steps, substrate) are the defaults of the metric
implementations in :mod:`vitlens.metrics`, which document them.
"""
from __future__ import annotations

from ..errors import InputError

DEFAULT_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
_TIS_BASELINES = ["rise", "gradcam", "rollout", "chefer1", "chefer2", "bt_token", "bt_head", "tam", "vitcx"]
_VITCX_BASELINES = ["rollout", "chefer1", "gradcam", "scorecam", "rise", "integrated_gradients", "tis"]
_LEGRAD_BASELINES = ["raw_attention", "rollout", "gradcam", "attention_cam", "chefer1", "chefer2", "attnlrp", "tam"]

PRESETS: dict[str, dict] = {
    "default": dict(model=DEFAULT_MODEL, methods="*", metrics=["insertion", "deletion", "pointing_game"],
                    target="label"),
    "tis-vit": dict(model="vit_base_patch16_224.augreg2_in21k_ft_in1k",
                    methods={"tis": {"n_masks": 1024, "ratio": 0.5}, **{m: {} for m in _TIS_BASELINES}},
                    metrics=["insertion", "deletion", "pointing_game", "sparseness", "max_sensitivity"],
                    target="label"),
    "tis-deit": dict(model="deit_base_patch16_224.fb_in1k",
                     methods={"tis": {"n_masks": 1024, "ratio": 0.5}, **{m: {} for m in _TIS_BASELINES}},
                     metrics=["insertion", "deletion", "pointing_game", "sparseness", "max_sensitivity"],
                     target="label"),
    "vitcx": dict(model="vit_base_patch16_224.augreg2_in21k_ft_in1k",
                  methods={m: {} for m in ["vitcx", *_VITCX_BASELINES]},
                  metrics=["deletion", "insertion", "pointing_game"], target="predicted"),
    "legrad-vit": dict(model="vit_base_patch16_224.augreg2_in21k_ft_in1k",
                       methods={m: {} for m in ["legrad", *_LEGRAD_BASELINES]},
                       metrics=["perturbation_positive", "perturbation_negative"], target="predicted"),
}


def get_preset(name: str) -> dict:
    """A copy of preset ``name`` (``methods="*"`` expands to every registered method)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}'; available: {', '.join(sorted(PRESETS))}.")
    p = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in PRESETS[name].items()}
    if p.get("methods") == "*":
        from ..api import methods

        p["methods"] = methods()
    return p
