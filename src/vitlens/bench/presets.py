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
    TIS (Englebert, Stassin, Nanfack, Mahmoudi, Siebert, Cornu & De Vleeschouwer, "Explaining Through
    Transformer Input Sampling", ICCV Workshops 2023), exactly as the authors' evaluation code
    (aenglebert/Transformer_Input_Sampling: ``config/``, ``comparison_methods/``, ``metrics/``,
    ``evaluate.py``, ``datasets/``) ran it:

    * model (``config/model/vit.yaml``, ``deit.yaml``): ``vit_base_patch16_224.orig_in21k_ft_in1k`` resp.
      ``deit_base_patch16_224.fb_in1k``. The repository's ``config/model/`` also has ``vit_32.yaml`` and
      ``vit_8.yaml`` (``vit_base_patch32_224`` / ``vit_base_patch8_224`` with ``pretrained_cfg:
      augreg_in21k``, i.e. ImageNet-21k heads of 21843 classes, on which ImageNet-1k labels do not
      index the right class); no config, README or script ties them to a metric table, so they are not
      presets (``--preset tis-vit --model vit_base_patch32_224.augreg_in21k_ft_in1k`` runs the same
      protocol on a 1k-class B/32);
    * data: ``transform="tis"`` (ImageNet mean/std, resize 256 x 256, centre crop 224:
      ``config/transform/ilsvrc2012_albumentations.yaml``; boxes through the same geometry) and
      ``subset="tis5000"`` (``config/dataset/indices/sub5000.yaml``); ground-truth class;
    * methods with the wrappers' parameters (``config/method/*.yaml``, ``comparison_methods/*.py``):
      TIS N_m = 1024, keep ratio 0.5, the reference K-Means (random init, empty clusters zeroed) and its
      min-max normalised output (``normalise=True``); RISE N = 4000, s = 8, p = 0.1 on the logits (the wrapped model has
      no softmax), masking towards the normalised zero; rollout as vit-explain (discard 0.9, mean heads,
      ``variant="vit_explain"``); Chefer 1 (``generate_LRP``, transformer attribution, start layer 0)
      and Chefer 2 (all blocks, logits); BT-H / BT-T with the wrapper's ``start_layer=1``, which the BT
      code's ``nb < start_layer - 1`` skip maps to every block (``layers=None``); TAM every block, 20
      steps; ViT-CX on ``blocks[-1].norm1`` (its default); IG with Captum's defaults as wrapped: 50
      Gauss-Legendre steps, zero baseline of the normalised tensor, logits, signed channel sum
      (``.sum((0, 1))``); SmoothGrad = Captum ``NoiseTunnel(Saliency)`` defaults: 50 samples, absolute
      sigma 1.0 in normalised units, mean of |gradient|, logits, channel sum. Grad-CAM is not in the
      TIS tables;
    * metrics (``config/metric/*.yaml``): insertion and deletion with the four substrates (blur, black,
      mean, random) under ``protocol="tis_code"`` (224 steps, softmax of the target, substrates on the
      normalised tensor, the code's tie order, AUC = mean of the 224 per-step scores; curves stored);
      pointing game ``tis_code`` (first maximum, boxes by integer slices, kept when coverage < 0.5);
      sparseness ``tis_code`` (raw map upsampled, shifted, + 1e-7); max-sensitivity ``tis_code``
      (Captum's 10 samples of radius 0.02 on the raw native map).

    ================================  ====================================  ==========================
    paper table / row                 what this preset computes             published number
    ================================  ====================================  ==========================
    TIS Tables 1-2, ViT-B/16 rows     insertion/deletion, 4 substrates,     not transcribed (no
    (``tis-vit``), DeiT-B rows        every method above                    excerpt of the tables
    (``tis-deit``)                                                          found; see source below)
    TIS Tables 3-4                    pointing game, sparseness,            not transcribed (likewise)
                                      max-sensitivity
    ================================  ====================================  ==========================

    The tables' numbers are means over the 5000 subset images; insertion/deletion per substrate.
    Source searched for the published values (stored public pages, 2026-12-01): the paper's CVF page
    https://openaccess.thecvf.com/content/ICCV2023W/NIVT/html/Englebert_Explaining_Through_Transformer_Input_Sampling_ICCVW_2023_paper.html
    (abstract and links only in the stored copy); no stored excerpt shows any row of Tables 1-4, so no
    number is quoted here.
``vitcx`` / ``vitcx-deit`` / ``vitcx-swin``
    ViT-CX (Weiyan Xie, Xiao-Hui Li, Caleb Chen Cao & Nevin L. Zhang, "ViT-CX: Causal Explanation of
    Vision Transformers", IJCAI 2023), Table 1: ViT-B/16 (``vit_base_patch16_224.augreg_in21k_ft_in1k``,
    what ``timm.create_model("vit_base_patch16_224", pretrained=True)`` loaded in the timm 0.6 releases of
    the paper's time, as in the authors' ``Usage_Example.ipynb``), DeiT-B/16 distilled
    (``deit_base_distilled_patch16_224.fb_in1k``) and Swin-B (``swin_base_patch4_window7_224``, ViT-CX
    delta 0.05, the method's own Swin default); ImageNet validation images with the model's transform,
    the predicted class; ViT-CX with its defaults (``site="norm1"``, delta 0.1 for ViT/DeiT) against
    rollout, Chefer et al. 2021a (CGW1) and 2021b (CGW2), TAM, Grad-CAM, Score-CAM and RISE (the rows
    CGW1, CGW2, TAM and Score-CAM are confirmed by the paper's figures; the remaining rows follow the
    paper's baseline list as read here); deletion and insertion as RISE's evaluation code
    (``protocol="rise_code"``: deletion to the normalised zero, insertion from the blur, trapezoid over
    the 225 points) and the pointing game (boxes covering more than half excluded).

    ================================  ====================================  ==========================
    paper table / row                 what this preset computes             published number
    ================================  ====================================  ==========================
    ViT-CX Table 1, ViT-B/16 block    deletion AUC, insertion AUC,          not transcribed (no
    (``vitcx``), DeiT-B block         pointing game per method              excerpt of Table 1
    (``vitcx-deit``), Swin-B block                                          found; see source below)
    (``vitcx-swin``)
    ================================  ====================================  ==========================

    Source searched for the published values (stored public pages, 2026-12-01): the paper's HTML
    https://ar5iv.labs.arxiv.org/html/2211.03064 (also its LaTeX text in SPIQA). The stored excerpts
    end before Table 1; the only numbers they show are Figure 1's per-image Del/Ins values for four
    example images, which are not Table 1 averages and are not quoted here.
``legrad-clip`` (and ``legrad-clip-l14``, ``legrad-clip-h14``, ``legrad-clip-bigg14``)
    LeGrad (Bousselham et al., 2024), main paper Tables 1-3 on OpenCLIP; see :data:`LEGRAD_DOCS`.
``legrad-siglip``
    LeGrad, Table 4: SigLIP-B/16 (webli); see :data:`LEGRAD_DOCS`.
``legrad-vit``
    LeGrad, supplementary Table 7: ImageNet-1k ViT-B/16; see :data:`LEGRAD_DOCS`.

The model tags are timm's ImageNet-1k fine-tuned weights of those architectures (pass ``--weights``
offline). Method defaults stay each method's own paper; a preset sets the parameters the reproduced
experiment used. ``vitlens bench --preset X --print-config`` prints the fully resolved run.
"""
from __future__ import annotations

from ..errors import InputError

DEFAULT_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
_TIS_METHODS = {
    "tis": {"n_masks": 1024, "ratio": 0.5, "kmeans_init": "random", "empty_clusters": "zero",
            "normalise_output": True},
    "rise": {"n_masks": 4000, "s": 8, "p": 0.1, "score": "logit", "baseline": "zero"},
    "rollout": {"discard_ratio": 0.9, "head_fusion": "mean", "variant": "vit_explain"},
    "chefer1": {},
    "chefer2": {"layers": None},
    "bt_token": {"layers": None, "steps": 20},
    "bt_head": {"layers": None, "steps": 20},
    "tam": {"layers": None, "steps": 20},
    "vitcx": {"site": "norm1"},
    "integrated_gradients": {"n_steps": 50, "ig_method": "gausslegendre", "baseline": "zero", "reduce": "sum",
                             "score": "logit"},
    "smoothgrad": {"n_samples": 50, "noise_sigma": 1.0, "average": "abs_grad", "reduce": "abs_sum",
                   "score": "logit"},
}
TIS_SUBSTRATES = ("blur", "black", "mean", "random")
_TIS_METRIC_PARAMS = {
    **{f"{mode}_{sub}": {"metric": mode, "protocol": "tis_code", "substrate": sub, "n_steps": 224, "score": "prob"}
       for mode in ("insertion", "deletion") for sub in TIS_SUBSTRATES},
    "pointing_game": {"protocol": "tis_code", "max_box_fraction": 0.5},
    "sparseness": {"protocol": "tis_code"},
    "max_sensitivity": {"protocol": "tis_code", "radius": 0.02, "n_samples": 10},
}
_VITCX_BASELINES = ["rollout", "chefer1", "chefer2", "tam", "gradcam", "scorecam", "rise"]
_VITCX_METRIC_PARAMS = {"deletion": {"protocol": "rise_code"}, "insertion": {"protocol": "rise_code"},
                        "pointing_game": {"max_box_fraction": 0.5}}


def _tis(model: str) -> dict:
    return dict(model=model, transform="tis", subset="tis5000", target="label",
                methods={k: dict(v) for k, v in _TIS_METHODS.items()}, metrics=list(_TIS_METRIC_PARAMS),
                metric_params={k: dict(v) for k, v in _TIS_METRIC_PARAMS.items()})


def _vitcx(model: str, delta=None) -> dict:
    return dict(model=model, target="predicted",
                methods={"vitcx": {} if delta is None else {"delta": delta}, **{m: {} for m in _VITCX_BASELINES}},
                metrics=["deletion", "insertion", "pointing_game"],
                metric_params={k: dict(v) for k, v in _VITCX_METRIC_PARAMS.items()})


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
#: baselines run as LeGrad's supplement defines them: Grad-CAM eq. 9 and AttentionCAM eq. 10
#: (``variant="legrad"`` of each method); every other method with its own defaults.
_LEGRAD_METHOD_PARAMS = {"gradcam": {"variant": "legrad"}, "attention_cam": {"variant": "legrad"}}


def _legrad_methods(names: list) -> dict:
    return {m: dict(_LEGRAD_METHOD_PARAMS.get(m, {})) for m in names}
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
                methods=_legrad_methods(["legrad", *_LEGRAD_BASELINES, "textspan"]),
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
    partial LRP and TextSpan. Published numbers:

    ====================================  ==========================  ==========================
    paper table / row                     metric                      published value
    ====================================  ==========================  ==========================
    Table 1, every row (ViT-B/16)         pixel acc., mIoU, mAP       not transcribed
    Table 2, every row                    p-mIoU                      not transcribed
    Table 3, every row                    negative / positive AUC     not transcribed
    ====================================  ==========================  ==========================

    Source searched (stored public pages, 2026-12-01): https://arxiv.org/html/2404.03214v2 (and v1);
    the stored excerpts hold the paper's opening only, no row of Tables 1-3, so no number is quoted
    (the released code and its README publish none). The other backbones of
    the tables: ``legrad-clip-l14`` (ViT-L/14, ``laion2b_s32b_b82k``), ``legrad-clip-h14`` (ViT-H/14,
    ``laion2b_s32b_b79k``), ``legrad-clip-bigg14`` (ViT-bigG/14, ``laion2b_s39b_b160k``): the paper's Sec. 9.1
    names its checkpoints; these tags are open_clip's LAION-2B checkpoints of those architectures, to be
    checked against Sec. 9.1 (only ViT-B/16's tag is confirmed, by the released code's README).""",
    "legrad-siglip": """SigLIP-B/16 (``open_clip:ViT-B-16-SigLIP``, ``webli``), LeGrad Table 4: ImageNet
    perturbation, positive and negative AUC, "predicted" column with this preset, "target" column with
    ``--target label``. LeGrad on SigLIP goes through the attentional pooler (paper: "Adaptation to
    Attentional Pooler"). Only methods that need no [CLS] attention row are listed (SigLIP has no class
    token). Segmentation and OpenImages data also work. Published numbers:

    ====================================  ==========================  ==========================
    paper table / row                     metric                      published value
    ====================================  ==========================  ==========================
    Table 4, every row (SigLIP-B/16)      negative / positive AUC     not transcribed
    ====================================  ==========================  ==========================

    Source searched (stored public pages, 2026-12-01): https://arxiv.org/html/2404.03214v2; no stored
    excerpt shows Table 4, so no number is quoted.""",
    "legrad-vit": """ImageNet-1k ViT-B/16 of Chefer et al.'s code (``jx_vit_base_p16_224-80ecf9dd.pth``,
    timm ``vit_base_patch16_224.orig_in21k_ft_in1k``), LeGrad supplementary Table 7: ImageNet perturbation
    with Chefer et al.'s protocol (``pertubation_eval_from_hdf5.py``): positive / negative AUC over 0-90 %
    removed, top-1 correctness against the label; the "predicted" column with this preset, the "target"
    column with ``--target label``. Rows: raw attention, rollout, Grad-CAM, AttentionCAM, Chefer et al.'s
    Transformer Attribution (chefer1) and generic attention (chefer2), LRP, partial LRP, LeGrad (TextSpan
    does not apply to a classifier). Published numbers:

    ====================================  ==========================  ==========================
    paper table / row                     metric                      published value
    ====================================  ==========================  ==========================
    Supp. Table 7, every row (ViT-B/16)   negative / positive AUC     not transcribed
    ====================================  ==========================  ==========================

    Source searched (stored public pages, 2026-12-01): https://arxiv.org/html/2404.03214v2; no stored
    excerpt shows the supplementary tables, so no number is quoted. The checkpoint is the
    one of the protocol's reference code (vitlens has no copy of the paper to confirm the table's own);
    the previous ``augreg2`` tag is reachable with ``--model vit_base_patch16_224.augreg2_in21k_ft_in1k``.
    Chefer's script resizes images to 224 x 224 without cropping; the bench uses the model's eval
    transform (resize + centre crop) for ImageNet folders.""",
}

PRESETS: dict[str, dict] = {
    "default": dict(model=DEFAULT_MODEL, methods="*", metrics=["insertion", "deletion", "pointing_game"],
                    target="label"),
    "tis-vit": _tis("vit_base_patch16_224.orig_in21k_ft_in1k"),
    "tis-deit": _tis("deit_base_patch16_224.fb_in1k"),
    "vitcx": _vitcx("vit_base_patch16_224.augreg_in21k_ft_in1k"),
    "vitcx-deit": _vitcx("deit_base_distilled_patch16_224.fb_in1k"),
    "vitcx-swin": _vitcx("swin_base_patch4_window7_224.ms_in22k_ft_in1k", delta=0.05),
    "legrad-vit": dict(model="vit_base_patch16_224.orig_in21k_ft_in1k",
                       methods=_legrad_methods(["legrad", *_LEGRAD_BASELINES]),
                       metrics=["perturbation_positive", "perturbation_negative"], target="predicted"),
    **{name: _legrad_clip(model, tag) for name, (model, tag) in LEGRAD_CLIP_MODELS.items()},
    "legrad-siglip": dict(model="open_clip:ViT-B-16-SigLIP", weights="webli",
                          methods=_legrad_methods(["legrad", "gradcam"]),
                          metrics={k: list(v) for k, v in _LEGRAD_METRICS.items()},
                          metric_params={k: dict(v) for k, v in _LEGRAD_METRIC_PARAMS.items()}, target="predicted"),
}


def get_preset(name: str) -> dict:
    """A copy of preset ``name`` (``methods="*"`` expands to every registered method)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}'; available: {', '.join(sorted(PRESETS))}.")
    import copy

    p = copy.deepcopy(PRESETS[name])
    if p.get("methods") == "*":
        from ..api import methods

        p["methods"] = methods()
    return p
