"""What the app computes, without any web framework: images, their clean forward, maps and curves.

:class:`Explorer` owns the model. Per image (keyed by a hash of the uploaded file's bytes, or the sample's
name) it preprocesses once and runs the clean forward once (:attr:`Explorer.clean_forwards` counts them):
the top-5 classes, the predicted target and the probability captions all come from that cached pass.
Maps are :func:`vitlens.explain` with the same arguments a Python user would give (same preprocessing,
seed, parameters), cached per (image, method, parameters, target, seed); the insertion/deletion curves are
:func:`vitlens.metrics.insertion` / :func:`vitlens.metrics.deletion` on that map, cached likewise.

Uploads are checked before they are decoded: a size cap in bytes (:attr:`Explorer.max_bytes`) and in
pixels (:attr:`Explorer.max_pixels`, read from the file header), then :func:`vitlens.models.preprocess.load_image`'s
own checks (not an image, a decompression bomb): each a one-line :class:`~vitlens.errors.InputError`.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import InputError, TargetError
from ..models.preprocess import load_image
from . import MAX_PIXELS, MAX_UPLOAD_MB

CMAP = "jet"


@dataclass
class ImageEntry:
    """One image as the model sees it, with its clean forward's results."""

    key: str
    name: str
    x: torch.Tensor                 # (1, 3, H, W) in the model's normalised space
    pixels: np.ndarray              # (H, W, 3) float in [0, 1]: what the overlays are drawn on
    probs: Optional[torch.Tensor]   # (C,) softmax of the clean class logits (None: no class vocabulary)
    top5: list = field(default_factory=list)  # [(index, label, probability)]
    size: tuple = (0, 0)            # the original file's (width, height)


@dataclass
class MapResult:
    """One method's map of one image."""

    key: str
    image_key: str
    image_name: str
    method: str
    params: dict                    # the explicit parameters given to vitlens.explain
    target: Any                     # what was given as target (class index or prompt)
    target_index: int               # -1 for prompts
    label: str
    seed: Optional[int]
    map: np.ndarray                 # (H, W) float32, exactly vitlens.explain(...).maps[0]
    seconds: float
    score: Optional[float] = None   # probability of the target class on the clean image
    full_params: dict = field(default_factory=dict)

    def title(self) -> str:
        p = "" if self.score is None else f" p={self.score:.3f}"
        return f"{self.method} · {self.seconds:.2f} s · {self.label.split(',')[0]}{p}"


@dataclass
class Curves:
    """Insertion and deletion curves of one map (protocol ``"paper"``)."""

    key: str
    map_key: str
    substrate: str
    n_steps: int
    seed: Optional[int]
    xs: np.ndarray
    insertion: np.ndarray
    deletion: np.ndarray
    insertion_auc: float
    deletion_auc: float
    seconds: float

    def as_json(self) -> dict:
        return dict(map=self.map_key, substrate=self.substrate, n_steps=self.n_steps, seed=self.seed,
                    xs=self.xs.tolist(), insertion=self.insertion.tolist(), deletion=self.deletion.tolist(),
                    insertion_auc=self.insertion_auc, deletion_auc=self.deletion_auc, protocol="paper")


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, k, v):
        self[k] = v
        self.move_to_end(k)
        while len(self) > self.size:
            self.popitem(last=False)
        return v

    def get_(self, k):
        v = self.get(k)
        if v is not None:
            self.move_to_end(k)
        return v


def check_image_file(path, max_bytes: int, max_pixels: int, name: Optional[str] = None) -> None:
    """Refuse, before decoding, a file that is too large in bytes or (by its header) in pixels."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    shown = name or p.name
    if not p.is_file():
        raise InputError(f"upload {shown} was not received; upload it again.")
    n = p.stat().st_size
    if n > max_bytes:
        raise InputError(f"{shown} is {n / 2**20:.1f} MB; the app accepts images up to {max_bytes / 2**20:.0f} MB "
                         "(vitlens app --max-upload-mb).")
    if n == 0:
        raise InputError(f"{shown} is empty (0 bytes): upload an image file.")
    try:
        with Image.open(p) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        raise InputError(f"{shown} has too many pixels to decode safely; the app accepts up to "
                         f"{max_pixels / 1e6:.0f} megapixels (vitlens app --max-pixels).") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"{shown} is not an image file PIL can open (PNG, JPEG, WebP, TIFF, BMP, GIF...).") from None
    if w * h > max_pixels:
        raise InputError(f"{shown} is {w} x {h} = {w * h / 1e6:.1f} megapixels; the app accepts up to "
                         f"{max_pixels / 1e6:.0f} megapixels (vitlens app --max-pixels).")


class Explorer:
    """The model, its per-image cache and the computations of the app's views (thread-safe: one lock)."""

    def __init__(self, adapter, *, max_bytes: int = MAX_UPLOAD_MB * 2**20, max_pixels: int = MAX_PIXELS,
                 max_images: int = 16, max_maps: int = 128, out_dir: Optional[Path] = None, model_name: str = ""):
        import tempfile

        from ..models import wrap_model

        self.adapter = wrap_model(adapter)
        self.model_name = model_name or getattr(self.adapter, "name", "") or type(adapter).__name__
        self.max_bytes = int(max_bytes)
        self.max_pixels = int(max_pixels)
        self.images: _LRU = _LRU(max_images)
        self.maps: _LRU = _LRU(max_maps)
        self.curves: _LRU = _LRU(max_maps)
        self.lock = threading.RLock()        # the caches (held briefly: an overlay redraw never waits for a method)
        self.model_lock = threading.RLock()  # the model (one computation at a time)
        self.clean_forwards = 0
        self._own_dir = out_dir is None
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="vitlens-app-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Remove the download files (the folder, when the explorer created it)."""
        import shutil

        if self._own_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    # ------------------------------------------------------------------ model facts
    @property
    def class_names(self) -> Optional[list]:
        return getattr(self.adapter, "class_names", None)

    @property
    def supports_text(self) -> bool:
        return bool(getattr(self.adapter, "supports_text", False))

    def available_methods(self) -> tuple[list[str], dict[str, str]]:
        """(methods this model can run, {method: why not} for the others), from the declared ``needs``."""
        from ..methods import method_infos
        from ..models.capabilities import describe_need

        ok, not_ok = [], {}
        for info in method_infos():
            missing = [c for c in info.needs if not self.adapter.provides(c)]
            if missing:
                not_ok[info.name] = "needs " + ", ".join(describe_need(c) for c in missing)
            else:
                ok.append(info.name)
        return ok, not_ok

    # ------------------------------------------------------------------ images
    def open_upload(self, path, name: Optional[str] = None) -> ImageEntry:
        """An uploaded file: size checks, then decoded once per distinct content."""
        p = Path(path)
        name = name or p.name
        check_image_file(p, self.max_bytes, self.max_pixels, name)
        key = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()[:24]
        with self.lock:
            hit = self.images.get_(key)
            if hit is not None:
                return hit
        img = load_image(p)  # one-line InputError for what PIL cannot read
        return self._add(key, Path(name).stem or "image", img, img.size)

    def open_sample(self, name: str) -> ImageEntry:
        from ..data.samples import SAMPLE_NAMES, sample_images

        if name not in SAMPLE_NAMES:
            raise InputError(f"unknown sample '{name}'; choose one of {', '.join(SAMPLE_NAMES)}.")
        key = "sample:" + name
        with self.lock:
            hit = self.images.get_(key)
            if hit is not None:
                return hit
        img = sample_images((name,))[name]
        return self._add(key, name, img, img.size)

    def image(self, key: Optional[str]) -> ImageEntry:
        if not key:
            raise InputError("no image yet: upload an image or pick a sample first.")
        with self.lock:
            e = self.images.get_(key)
        if e is None:
            raise InputError("that image is no longer in the app's cache; upload it or pick it again.")
        return e

    def _add(self, key: str, name: str, img, size) -> ImageEntry:
        from ..viz import to_pixels

        a = self.adapter
        with self.model_lock:
            x = a.preprocess([img])
            with torch.no_grad():
                out = a.forward(x)
            self.clean_forwards += 1
            probs, top5 = None, []
            if self.class_names:
                probs = a.class_logits(out.detach()).float().softmax(-1)[0].cpu()
                p, i = probs.topk(min(5, probs.numel()))
                top5 = [(int(k), self.class_names[int(k)], float(v)) for v, k in zip(p, i)]
            entry = ImageEntry(key, name, x, to_pixels(x[0], a.mean, a.std), probs, top5, tuple(size))
        with self.lock:
            return self.images.put(key, entry)

    # ------------------------------------------------------------------ targets
    def resolve_target(self, entry: ImageEntry, text: Optional[str], prompt: Optional[str] = None):
        """(target for vitlens.explain, class index or -1, label). ``prompt`` (CLIP-style models) wins over
        ``text``: a class box value ``"N: name"``, a class index, or a class name; empty: the predicted class."""
        a = self.adapter
        prompt = (prompt or "").strip()
        if prompt:
            if not self.supports_text:
                raise TargetError(f"{a.describe()} is not a CLIP-style model: text prompts cannot be targets.")
            t = a.resolve_target(prompt, batch=1)
            idx = int(t.index[0])
            return (idx if idx >= 0 else prompt), idx, t.labels[0]
        s = (text or "").strip()
        if not s:
            if not entry.top5:
                raise TargetError(f"{a.describe()} has no class vocabulary: give a text prompt to explain.")
            i, label, _ = entry.top5[0]
            return i, i, label
        head = s.split(":", 1)[0].strip()
        if head.lstrip("+-").isdigit():
            i = int(head)
            t = a.resolve_target(i, batch=1)  # range check, one line
            return i, i, t.labels[0]
        try:
            t = a.resolve_target(s, batch=1)  # class name (close matches on a typo) or, for CLIP, a prompt
        except TargetError as e:  # the Python hint becomes the page's
            raise TargetError(str(e).replace("(class names: model.class_names)",
                                             "(type part of a name in the class box to see the matches)")) from None
        idx = int(t.index[0])
        return (idx if idx >= 0 else s), idx, t.labels[0]

    # ------------------------------------------------------------------ maps
    def explain(self, entry: ImageEntry, method: str, params: dict, target, seed: Optional[int] = 0,
                progress: Optional[bool] = None) -> tuple[MapResult, bool]:
        """``vitlens.explain(model, x, method, target, seed=seed, **params)`` for the image; (result, cached)."""
        from .. import explain
        from ..methods import get_method

        info = get_method(method)
        key = _key(["map", entry.key, method, params, target, seed])
        with self.lock:
            hit = self.maps.get_(key)
        if hit is not None:
            return hit, True
        with self.model_lock:
            t0 = time.perf_counter()
            exp = explain(self.adapter, entry.x, method=method, target=target, seed=seed, progress=progress, **params)
            seconds = time.perf_counter() - t0
        idx = int(exp.targets[0])
        score = float(entry.probs[idx]) if (entry.probs is not None and idx >= 0) else None
        full = dict(info.defaults)
        full.update(params)
        res = MapResult(key, entry.key, entry.name, method, dict(params), target, idx, exp.labels[0], seed,
                        exp.maps[0].detach().float().cpu().numpy().astype(np.float32), seconds, score, full)
        with self.lock:
            self.maps.put(key, res)
        return res, False

    def result(self, key: str) -> MapResult:
        with self.lock:
            r = self.maps.get_(key)
        if r is None:
            raise InputError("that map is no longer in the app's cache; run the method again.")
        return r

    def curve(self, key: Optional[str]) -> Optional[Curves]:
        """The cached curves ``key`` (None when absent)."""
        with self.lock:
            return self.curves.get_(key) if key else None

    # ------------------------------------------------------------------ faithfulness
    def faithfulness(self, res: MapResult, substrate: str, n_steps: int, progress: Optional[bool] = None) -> Curves:
        """Insertion and deletion (protocol ``"paper"``) of the map: ``vitlens.metrics.insertion/deletion``."""
        from ..metrics import deletion, insertion

        n_steps = int(n_steps)
        if n_steps < 1:
            raise InputError(f"steps must be >= 1, got {n_steps}.")
        entry = self.image(res.image_key)
        h, w = entry.x.shape[-2:]
        if n_steps > h * w:
            raise InputError(f"steps must be at most the number of pixels ({h * w}), got {n_steps}.")
        key = _key(["curves", res.key, substrate, n_steps, res.seed])
        with self.lock:
            hit = self.curves.get_(key)
        if hit is not None:
            return hit
        with self.model_lock:
            t0 = time.perf_counter()
            m = torch.from_numpy(res.map)[None].to(entry.x.device)
            kw = dict(substrate=substrate, n_steps=n_steps, seed=res.seed, progress=progress)
            ins = insertion(self.adapter, entry.x, m, res.target, **kw)
            dele = deletion(self.adapter, entry.x, m, res.target, **kw)
            seconds = time.perf_counter() - t0
        c = Curves(key, res.key, substrate, n_steps, res.seed, ins.xs.numpy().astype(np.float32),
                   ins.curves[0].numpy().astype(np.float32), dele.curves[0].numpy().astype(np.float32),
                   float(ins.values[0]), float(dele.values[0]), seconds)
        with self.lock:
            self.curves.put(key, c)
        return c

    def step_images(self, res: MapResult, curves: Curves, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The deletion and insertion images (H, W, 3 in [0, 1]) after ``step`` steps, exactly as the metric
        builds them (same ranking, ties, pixel counts and substrate), and the number of pixels changed."""
        from ..metrics.causal import PROTOCOLS, make_substrate, saliency_rank, step_counts
        from ..viz import to_pixels

        entry = self.image(res.image_key)
        x = entry.x
        h, w = x.shape[-2:]
        step = int(min(max(int(step), 0), curves.n_steps))
        proto = PROTOCOLS["paper"]  # the protocol faithfulness() runs
        counts = step_counts(h * w, curves.n_steps, bool(proto["start_point"]))
        n = int(counts[step])
        with torch.no_grad():  # pixels only (the model's mean/std): no need to wait for a running method
            sub = make_substrate(self.adapter, x, curves.substrate, seed=curves.seed, space=str(proto["space"]))
        rank = saliency_rank(torch.from_numpy(res.map)[None], str(proto["ties"])).to(x.device)
        changed = (rank < n).reshape(1, 1, h, w)
        deleted = torch.where(changed, sub, x)
        inserted = torch.where(changed, x, sub)
        a = self.adapter
        return to_pixels(deleted[0], a.mean, a.std), to_pixels(inserted[0], a.mean, a.std), n


# ---------------------------------------------------------------------------------------------- drawing
def _lut(cmap: str = CMAP) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)


def overlay_rgb(pixels: np.ndarray, saliency: np.ndarray, alpha: float = 0.5, cmap: str = CMAP) -> np.ndarray:
    """(H, W, 3) uint8: the map in ``cmap`` blended over the image with opacity ``alpha`` (one vectorised
    lookup, as matplotlib's ``imshow(..., alpha)`` over the image)."""
    alpha = float(min(max(alpha, 0.0), 1.0))
    idx = np.clip(np.rint(np.asarray(saliency, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    heat = _lut(cmap)[idx]
    out = (1.0 - alpha) * np.asarray(pixels, dtype=np.float32) + alpha * heat
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def heat_rgb(saliency: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """(H, W, 3) uint8: the map alone in ``cmap`` (where no image can be shown under it)."""
    idx = np.clip(np.rint(np.asarray(saliency, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return to_uint8(_lut(cmap)[idx])


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(pixels, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def write_downloads(explorer: Explorer, res: MapResult, alpha: float) -> list[str]:
    """``<image>_<method>.npy`` (the map, float32, as ``vitlens explain`` writes it) and the overlay PNG at
    the chosen opacity, in a folder of their own (one per map), under the app's output folder."""
    from PIL import Image

    entry = explorer.image(res.image_key)
    folder = explorer.out_dir / res.key
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{_safe(res.image_name)}_{res.method}"
    npy = folder / f"{stem}.npy"
    if not npy.exists():
        np.save(npy, res.map.astype(np.float32))
    png = folder / f"{stem}.png"
    Image.fromarray(overlay_rgb(entry.pixels, res.map, alpha)).save(png)
    return [str(png), str(npy)]


def _safe(name: str) -> str:
    keep = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in name)[:60].strip("._")
    return keep or "image"


def curves_figure(c: Curves, step: Optional[int] = None, title: str = "") -> np.ndarray:
    """(H, W, 3) uint8 plot of the insertion and deletion curves with their AUCs (and the chosen step)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=100)
    ax.plot(c.xs, c.insertion, color="tab:green", lw=2,
            label=f"insertion  AUC = {c.insertion_auc:.4f} (higher is better)")
    ax.plot(c.xs, c.deletion, color="tab:red", lw=2, label=f"deletion  AUC = {c.deletion_auc:.4f} (lower is better)")
    ax.fill_between(c.xs, c.insertion, color="tab:green", alpha=0.08)
    ax.fill_between(c.xs, c.deletion, color="tab:red", alpha=0.08)
    if step is not None:
        ax.axvline(float(c.xs[min(max(int(step), 0), len(c.xs) - 1)]), color="black", lw=1, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(1.0, float(np.nanmax([c.insertion.max(), c.deletion.max()])) * 1.05))
    ax.set_xlabel("fraction of pixels inserted / deleted (most salient first)")
    ax.set_ylabel("score of the target")
    ax.set_title(title or f"substrate {c.substrate}, {c.n_steps} steps", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def guard(fn: Callable, on_error: Callable[[str], Any]):
    """``fn`` whose :class:`~vitlens.errors.VitlensError` (and any other exception, as "unexpected") becomes
    ``on_error(one-line message)`` instead of propagating: the app keeps serving."""
    import functools

    from ..errors import VitlensError

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VitlensError as e:
            return on_error(" ".join(str(e).split()))
        except Exception as e:  # a bug: still a message in the page, and the server goes on
            return on_error(f"unexpected {type(e).__name__}: {' '.join(str(e).split())} (please report it)")

    return wrapped
