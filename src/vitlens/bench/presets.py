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
``legrad-clip`` (and ``legrad-clip-l14``, ``legrad-clip-h14``, ``legrad-clip-bigg14``)
    LeGrad (Bousselham et al., 2024), main paper Tables 1-3 on OpenCLIP; see :data:`LEGRAD_DOCS`.
``legrad-siglip``
    LeGrad, Table 4: SigLIP-B/16 (webli); see :data:`LEGRAD_DOCS`.
``legrad-vit``
    LeGrad, supplementary Table 7: ImageNet-1k ViT-B/16; see :data:`LEGRAD_DOCS`.

The model tags are timm's ImageNet-1k fine-tuned weights of those architectures (pass ``--weights``
offline). The paper-specific metric settings (number of steps, substrate) are the defaults of the metric
implementations in :mod:`vitlens.metrics`, which document them.
"""
from __future__ import annotations

from ..errors import InputError

DEFAULT_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
_TIS_BASELINES = ["rise", "gradcam", "rollout", "chefer1", "chefer2", "bt_token", "bt_head", "tam", "vitcx"]
_VITCX_BASELINES = ["rollout", "chefer1", "gradcam", "scorecam", "rise", "integrated_gradients", "tis"]
# LeGrad's comparison (Tables 1-4, 7): raw attention, rollout, Grad-CAM, AttentionCAM, Chefer et al.'s
# Transformer Attribution (chefer1) and generic attention explainability (chefer2), full LRP (lrp) and
# partial LRP (partial_lrp); TextSpan only for CLIP models (it decomposes onto text directions).
_LEGRAD_BASELINES = ["raw_attention", "rollout", "gradcam", "attention_cam", "chefer1", "chefer2", "lrp",
                     "partial_lrp"]
#: metrics of the LeGrad presets per dataset kind (``vitlens.bench.datasets``): Table 1 ImageNet-Segmentation
#: (threshold 0.5, Sec. 4.1), Table 2 OpenImages V7 p-mIoU, Tables 3/4/7 ImageNet perturbation.
_LEGRAD_METRICS = {"imagenet-seg": ["segmentation"], "openimages": ["open_vocab"],
                   "imagenet": ["perturbation_positive", "perturbation_negative"]}
_LEGRAD_METRIC_PARAMS = {"segmentation": {"threshold": 0.5}, "open_vocab": {"threshold": 0.5}}
#: OpenCLIP backbones of LeGrad (the open_clip LAION-2B checkpoints; ViT-B/16's tag is the one of the released
#: code's README/playground.py, the others are open_clip's LAION-2B tags of those architectures).
LEGRAD_CLIP_MODELS = {
    "legrad-clip": ("open_clip:ViT-B-16", "laion2b_s34b_b88k"),
    "legrad-clip-l14": ("open_clip:ViT-L-14", "laion2b_s32b_b82k"),
    "legrad-clip-h14": ("open_clip:ViT-H-14", "laion2b_s32b_b79k"),
    "legrad-clip-bigg14": ("open_clip:ViT-bigG-14", "laion2b_s39b_b160k"),
}


def _legrad_clip(model: str, weights: str) -> dict:
    return dict(model=model, weights=weights,
                methods={m: {} for m in ["legrad", *_LEGRAD_BASELINES, "textspan"]},
                metrics={k: list(v) for k, v in _LEGRAD_METRICS.items()},
                metric_params={k: dict(v) for k, v in _LEGRAD_METRIC_PARAMS.items()}, target="predicted")


LEGRAD_DOCS = {
    "legrad-clip": """OpenCLIP ViT-B/16 (``laion2b_s34b_b88k``), LeGrad main paper:

    * Table 1, ImageNet-Segmentation (``--data .../gtsegs_ijcv.mat``): pixel accuracy, mIoU, mAP with the
      map binarised at 0.5 (Sec. 4.1); the bench rows hold per-image AP (``vitlens.metrics.segmentation``);
    * Table 2, OpenImages V7 (``--data`` a points folder): p-mIoU, one map per (image, class present) from
      the prompt "a photo of a {class}";
    * Table 3, ImageNet perturbation (``--data`` an ImageNet folder): positive / negative AUC, correctness
      against the label; ``--target predicted`` (the preset) gives the "predicted" column, ``--target label``
      the "target" column.

    Rows: LeGrad against raw attention, rollout, Grad-CAM, AttentionCAM, Chefer et al.'s two methods, LRP,
    partial LRP and TextSpan. Published numbers: see paper Tables 1, 2 and 3 (the released code and its
    README publish none, and vitlens has no copy of the paper to quote them from). The other backbones of
    the tables: ``legrad-clip-l14`` (ViT-L/14, ``laion2b_s32b_b82k``), ``legrad-clip-h14`` (ViT-H/14,
    ``laion2b_s32b_b79k``), ``legrad-clip-bigg14`` (ViT-bigG/14, ``laion2b_s39b_b160k``): the paper's Sec. 9.1
    names its checkpoints; these tags are open_clip's LAION-2B checkpoints of those architectures, to be
    checked against Sec. 9.1 (only ViT-B/16's tag is confirmed, by the released code's README).""",
    "legrad-siglip": """SigLIP-B/16 (``open_clip:ViT-B-16-SigLIP``, ``webli``), LeGrad Table 4: ImageNet
    perturbation, positive and negative AUC, "predicted" column with this preset, "target" column with
    ``--target label``. LeGrad on SigLIP goes through the attentional pooler (paper: "Adaptation to
    Attentional Pooler"). Only methods that need no [CLS] attention row are listed (SigLIP has no class
    token); published numbers: see paper Table 4. Segmentation and OpenImages data also work.""",
    "legrad-vit": """ImageNet-1k ViT-B/16 of Chefer et al.'s code (``jx_vit_base_p16_224-80ecf9dd.pth``,
    timm ``vit_base_patch16_224.orig_in21k_ft_in1k``), LeGrad supplementary Table 7: ImageNet perturbation
    with Chefer et al.'s protocol (``pertubation_eval_from_hdf5.py``): positive / negative AUC over 0-90 %
    removed, top-1 correctness against the label; the "predicted" column with this preset, the "target"
    column with ``--target label``. Rows: raw attention, rollout, Grad-CAM, AttentionCAM, Chefer et al.'s
    Transformer Attribution (chefer1) and generic attention (chefer2), LRP, partial LRP, LeGrad (TextSpan
    does not apply to a classifier). Published numbers: see supplementary Table 7. The checkpoint is the
    one of the protocol's reference code (vitlens has no copy of the paper to confirm the table's own);
    the previous ``augreg2`` tag is reachable with ``--model vit_base_patch16_224.augreg2_in21k_ft_in1k``.
    Chefer's script resizes images to 224 x 224 without cropping; the bench uses the model's eval
    transform (resize + centre crop) for ImageNet folders.""",
}

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
    "legrad-vit": dict(model="vit_base_patch16_224.orig_in21k_ft_in1k",
                       methods={m: {} for m in ["legrad", *_LEGRAD_BASELINES]},
                       metrics=["perturbation_positive", "perturbation_negative"], target="predicted"),
    **{name: _legrad_clip(model, tag) for name, (model, tag) in LEGRAD_CLIP_MODELS.items()},
    "legrad-siglip": dict(model="open_clip:ViT-B-16-SigLIP", weights="webli",
                          methods={m: {} for m in ["legrad", "gradcam"]},
                          metrics={k: list(v) for k, v in _LEGRAD_METRICS.items()},
                          metric_params={k: dict(v) for k, v in _LEGRAD_METRIC_PARAMS.items()}, target="predicted"),
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
