"""A ``vitlens bench`` output folder, read-only, for the app's Bench view.

Everything the app reads from a bench folder goes through this module: the store's database
(``DIR/results.sqlite``, opened read-only; unmerged shard files are reported, never merged, since merging
writes), the report's table builder, and the images the database names.

Confinement: the app reads nothing outside the folder it was given (``--bench DIR``), plus, only when asked,
one images folder (``--bench-images ROOT``, typically the bench's ``--data``). The page only ever sends
image ids, method labels and metric labels; paths come from the database and are resolved (symlinks
followed) and refused unless they lie inside those folders, so a database naming ``/etc/passwd`` or
``../../x`` shows "image not shown" instead of reading it.
"""
from __future__ import annotations

import json
import math
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..bench.store import connect, decode_map
from ..errors import InputError

try:  # the report's table builder (moving to vitlens.bench.tables); imported here only
    from ..bench.tables import build_table  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - depends on the bench package's layout
    from ..bench.report import build_table

DB_NAME = "results.sqlite"
MAX_ROWS = 500


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    try:
        p = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return any(p == r or r in p.parents for r in roots)


def fmt(v: Optional[float]) -> str:
    """A metric value as the table shows it (4 decimals, "–" for an excluded / missing value)."""
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.4f}"


class BenchView:
    """Read-only view of one bench folder (see the module docstring)."""

    def __init__(self, folder, images_root=None, max_pixels: int = 50_000_000, max_bytes: int = 50 * 2**20):
        folder = Path(folder)
        if not folder.exists():
            raise InputError(f"--bench {folder}: no such folder (give the --out folder of a vitlens bench run).")
        if not folder.is_dir():
            raise InputError(f"--bench {folder} is a file, not a folder (give the --out folder of a vitlens bench "
                             "run).")
        self.folder = folder.resolve()
        db = self.folder / DB_NAME
        if not db.is_file():
            raise InputError(f"--bench {folder}: no {DB_NAME} in it (give the --out folder of a vitlens bench run).")
        if not _inside(db, [self.folder]):
            raise InputError(f"--bench {folder}: {DB_NAME} points outside the folder; refusing to read it.")
        self.db = db.resolve()
        self.roots = [self.folder]
        if images_root is not None:
            r = Path(images_root)
            if not r.is_dir():
                raise InputError(f"--bench-images {r}: no such folder.")
            self.roots.append(r.resolve())
        self.max_pixels, self.max_bytes = int(max_pixels), int(max_bytes)
        self.shards = sorted((self.folder / "shards").glob("*.sqlite")) if (self.folder / "shards").is_dir() else []
        with self._con() as con:
            try:
                self.table = build_table(con)
            except sqlite3.Error as e:
                raise InputError(f"--bench {folder}: {DB_NAME} cannot be read ({e}).") from None
            self.class_names = self._meta(con, "class_names") or None
            self.images = {r[0]: dict(path=r[1], label=r[2], synset=r[3]) for r in
                           con.execute("SELECT image_id, path, label, synset FROM images")}
            self.model_info = {}
            for rk in self.table.row_keys.values():
                row = con.execute("SELECT model_info FROM runs WHERE run_key=?", (rk,)).fetchone()
                if row and row[0]:
                    self.model_info[rk] = json.loads(row[0])
            self._values = {}
            keys = set(self.table.row_keys.values())
            pks = set(self.table.col_keys.values())
            q = "SELECT run_key, image_id, protocol_key, value, target FROM results"
            for rk, iid, pk, v, tgt in con.execute(q):
                if rk in keys and pk in pks:
                    self._values[(rk, iid, pk)] = (float("nan") if v is None else float(v), tgt)
            self._targets = {(r[0], r[1]): r[2] for r in con.execute("SELECT run_key, image_id, target FROM maps")}

    # ------------------------------------------------------------------ database
    @contextmanager
    def _con(self) -> Iterator[sqlite3.Connection]:
        con = connect(self.db, readonly=True)  # a connection per call: the app's handlers run in worker threads
        try:
            yield con
        finally:
            con.close()

    @staticmethod
    def _meta(con: sqlite3.Connection, key: str):
        row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    # ------------------------------------------------------------------ vocabulary
    def class_label(self, index: Optional[int]) -> str:
        if index is None or index < 0:
            return "–"
        if self.class_names and index < len(self.class_names):
            return f"{index}: {self.class_names[index].split(',')[0].strip()}"
        return f"{index}"

    @property
    def methods(self) -> list[str]:
        return list(self.table.rows)

    @property
    def metrics(self) -> list[str]:
        return list(self.table.cols)

    def classes(self) -> list[str]:
        """The classes of the images that have results (``"index: name"``), by index."""
        used = {iid for (_, iid, _) in self._values}
        labels = sorted({self.images[i]["label"] for i in used if i in self.images
                         and self.images[i]["label"] is not None and self.images[i]["label"] >= 0})
        return [self.class_label(k) for k in labels]

    def notes(self) -> str:
        out = [f"{len(self.images)} images, {len(self.methods)} method entries, {len(self.metrics)} metric columns, "
               f"model {', '.join(self.table.models) or '?'}."]
        if self.shards:
            out.append(f"{len(self.shards)} unmerged shard file(s) in shards/ are not shown: the app opens the folder "
                       f"read-only; `vitlens report {self.folder}` merges them.")
        return " ".join(out)

    # ------------------------------------------------------------------ tables
    def summary(self) -> tuple[list[str], list[list[str]]]:
        """The report's table: one row per method entry, ``mean [95 % interval] (n)`` per metric column."""
        t = self.table
        head = ["method"] + [f"{c} {'↑' if t.better[c] else '↓'}" for c in t.cols]
        rows = []
        for r in t.rows:
            row = [r]
            for c in t.cols:
                cell = t.cells.get((r, c))
                if cell is None:
                    row.append("–")
                elif math.isfinite(cell.lo):
                    row.append(f"{cell.mean:.4f} [{cell.lo:.4f}, {cell.hi:.4f}] (n={cell.n})")
                else:
                    row.append(f"{cell.mean:.4f} (n={cell.n})")
            rows.append(row)
        return head, rows

    def rows(self, cls: Optional[str] = None, method: Optional[str] = None, search: str = "",
             sort: Optional[str] = None, descending: bool = False,
             limit: int = MAX_ROWS) -> tuple[list[str], list[list], int]:
        """Per (image, method entry): image id, class, method, explained class, one value per metric column.

        Filtered by class (``"index: name"`` as :meth:`classes` gives, or ``None``/"all"), method entry and a
        substring of the image id; sorted by a metric column (excluded values last whatever the order),
        then by image id. Returns (header, at most ``limit`` rows, number of matching rows)."""
        t = self.table
        if method and method not in ("all", *t.rows):
            raise InputError(f"unknown method entry '{method}'; choose one of {', '.join(t.rows)}.")
        if sort and sort not in t.cols:
            raise InputError(f"unknown metric column '{sort}'; choose one of {', '.join(t.cols)}.")
        want_cls = None
        if cls and cls != "all":
            index = cls.split(":", 1)[0].strip()
            if not index.isdigit():
                raise InputError(f"class filter '{cls}' is not one of the classes listed.")
            want_cls = int(index)
        search = (search or "").strip().lower()
        entries = [r for r in t.rows if not method or method == "all" or r == method]
        image_ids = sorted({iid for (_, iid, _) in self._values})
        out = []
        for r in entries:
            rk = t.row_keys[r]
            for iid in image_ids:
                vals = [self._values.get((rk, iid, t.col_keys[c])) for c in t.cols]
                if all(v is None for v in vals):
                    continue
                info = self.images.get(iid, {})
                label = info.get("label")
                if want_cls is not None and label != want_cls:
                    continue
                if search and search not in iid.lower():
                    continue
                tgt = self._targets.get((rk, iid))
                if tgt is None:
                    tgt = next((v[1] for v in vals if v is not None), None)
                out.append([iid, self.class_label(label), r, self.class_label(tgt)]
                           + [float("nan") if v is None else v[0] for v in vals])
        n = len(out)
        if sort:
            j = 4 + t.cols.index(sort)
            finite = [row for row in out if math.isfinite(row[j])]
            rest = [row for row in out if not math.isfinite(row[j])]
            finite.sort(key=lambda row: (row[j], row[0], row[2]), reverse=bool(descending))
            out = finite + sorted(rest, key=lambda row: (row[0], row[2]))
        head = ["image", "class", "method", "explained"] + [f"{c} {'↑' if t.better[c] else '↓'}" for c in t.cols]
        shown = [row[:4] + [fmt(v) for v in row[4:]] for row in out[:limit]]
        return head, shown, n

    def image_ids(self) -> list[str]:
        return sorted({iid for (_, iid, _) in self._values})

    # ------------------------------------------------------------------ one image
    def image_pixels(self, image_id: str, run_key: str) -> tuple[Optional[np.ndarray], str]:
        """The image as the run's model saw it (H, W, 3 in [0, 1]), or (None, why not)."""
        info = self.images.get(image_id)
        if info is None or not info.get("path"):
            return None, "no image path recorded"
        raw = Path(info["path"])
        path = raw if raw.is_absolute() else self.folder / raw
        if not _inside(path, self.roots):
            where = " or ".join(str(r) for r in self.roots)
            return None, (f"image not shown: {raw} is outside {where} (the app reads only inside the folders it was "
                          "given; pass --bench-images ROOT to show images from ROOT)")
        from .core import check_image_file

        try:
            check_image_file(path, self.max_bytes, self.max_pixels, raw.name)
            mi = self.model_info.get(run_key) or {}
            from ..models.preprocess import load_image

            if mi.get("transform") == "tis":
                from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, tis_image
                from ..models.preprocess import denormalise

                t = denormalise(tis_image(load_image(path))[None], IMAGENET_MEAN, IMAGENET_STD)[0]
            else:
                from ..models.preprocess import eval_transform

                tf = eval_transform(tuple(mi.get("input_size", (224, 224))), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                    mi.get("crop_pct", 0.875), mi.get("interpolation", "bicubic"))
                t = tf(load_image(path))
            return t.permute(1, 2, 0).clamp(0, 1).numpy(), ""
        except InputError as e:
            return None, f"image not shown: {e}"

    def image_maps(self, image_id: str) -> tuple[list[tuple[str, np.ndarray, Optional[np.ndarray], str]], str]:
        """Every method entry's map of ``image_id``: [(method label, map, image pixels or None, caption)] and
        a note (why the image is not shown, if it is not)."""
        if image_id not in self.images and image_id not in self.image_ids():
            raise InputError(f"no image '{image_id}' in this bench folder.")
        t = self.table
        out, note = [], ""
        label = self.images.get(image_id, {}).get("label")
        with self._con() as con:
            for r in t.rows:
                rk = t.row_keys[r]
                row = con.execute("SELECT map, shape, target FROM maps WHERE run_key=? AND image_id=?",
                                  (rk, image_id)).fetchone()
                if row is None:
                    continue
                m = decode_map(row[0], row[1])
                if m.ndim != 2:
                    continue
                pixels, why = self.image_pixels(image_id, rk)
                if pixels is not None and pixels.shape[:2] != m.shape:
                    why = f"image not shown: its size {pixels.shape[:2]} differs from the map's {m.shape}"
                    pixels = None
                note = note or why
                vals = ", ".join(f"{c}={fmt(self._values.get((rk, image_id, t.col_keys[c]), (None,))[0])}"
                                 for c in t.cols)
                explained = ""
                if row[2] is not None and label is not None and int(row[2]) != int(label):
                    explained = f" · explains {self.class_label(int(row[2]))}"
                out.append((r, m, pixels, f"{r}: {vals}{explained}"))
        if not out:
            raise InputError(f"no maps stored for image '{image_id}'.")
        return out, note
