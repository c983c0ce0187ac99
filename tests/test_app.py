"""``vitlens app``: parameter controls from the registry, the explorer's caches and checks, the read-only bench
view, the command line, and the page itself driven in a real headless Chromium (Playwright).

Browser tests need Gradio (``pip install "vitlens[app]"``), Playwright's Python package
(``pip install "playwright>=1.40,<2"``; no browser download: Debian's ``chromium`` is driven) and Chromium
(``apt-get install -y chromium``); each missing piece skips them with that command. The page's maps, AUCs and
table values are compared with ``vitlens.explain``, ``vitlens.metrics.deletion`` and the bench database read
directly. ``VITLENS_UPDATE_SCREENSHOT=1`` also writes ``docs/app.png`` (the README's screenshot).
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REAL_MODEL, SHARED

DATA = SHARED / "data" / "imagenet-val-sample"
IMAGE = DATA / "images" / "ILSVRC2012_val_00000001.JPEG"
needs_shared = pytest.mark.skipif(not (DATA.is_dir() and (SHARED / "models").is_dir()),
                                  reason=f"shared model and images not found at {SHARED}")
REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ============================================================================ controls from the registry
def test_every_parameter_gets_the_control_its_declared_type_asks_for():
    """Literal -> dropdown of exactly its values (None added when Optional), bool -> checkbox, Optional[bool]
    -> None/True/False, int/float -> number, other text-expressible types -> text; tensors are skipped."""
    from vitlens._params import type_hints
    from vitlens.app.params import NONE_CHOICE, controls_for, has_text_form
    from vitlens.methods import method_infos

    seen_kinds = set()
    for info in method_infos():
        hints = type_hints(info.fn)
        ctl = {c.name: c for c in controls_for(info)}
        for name, default in info.defaults.items():
            hint = hints[name]
            if not has_text_form(hint):
                assert name not in ctl
                assert "Tensor" in str(hint) or "Callable" in str(hint), (info.name, name, hint)
                continue
            c = ctl[name]
            seen_kinds.add(c.kind)
            args = typing.get_args(hint)
            lits = [a for a in (args if typing.get_origin(hint) is typing.Union else (hint,))
                    if typing.get_origin(a) is typing.Literal]
            members = set(args) if typing.get_origin(hint) is typing.Union else {hint}
            if lits and members - {type(None)} == {lits[0]}:
                want = [str(v) for v in typing.get_args(lits[0])]
                assert list(c.choices) == ([NONE_CHOICE] if type(None) in members else []) + want, (info.name, name)
            elif hint is bool:
                assert c.kind == "bool" and c.value is default
            elif members == {bool, type(None)}:
                assert c.kind == "choice" and set(c.choices) == {NONE_CHOICE, "True", "False"}
            elif hint in (int, float):
                assert c.kind == hint.__name__ and c.value == default
            else:
                assert c.kind == "text" and c.optional == (type(None) in members), (info.name, name)
    assert seen_kinds == {"choice", "bool", "int", "float", "text"}


def test_controls_at_their_initial_values_give_the_method_defaults():
    """What the page shows at first parses back to no explicit parameter at all, for every method: the
    text form of each default (``0.4``, ``None`` -> empty, sequences) round-trips exactly."""
    from vitlens.app.params import controls_for, parse_values
    from vitlens.methods import method_infos

    for info in method_infos():
        cs = controls_for(info)
        assert parse_values(info, cs, [c.value for c in cs]) == {}, info.name


def test_page_values_are_converted_and_checked_by_the_registry():
    from vitlens.app.params import controls_for, parse_values
    from vitlens.errors import InputError
    from vitlens.methods import get_method

    def parse(method, **changes):
        info = get_method(method)
        cs = controls_for(info)
        return parse_values(info, cs, [changes.get(c.name, c.value) for c in cs])

    assert parse("tis", n_masks=32.0, ratio=0.25) == {"n_masks": 32, "ratio": 0.25}  # a number box sends floats
    assert parse("legrad", layers="") == {"layers": None}                            # empty = None
    assert parse("legrad", layers="2,5") == {"layers": [2, 5]}
    assert parse("legrad", correction="True") == {"correction": True}
    assert parse("occlusion", window="16,16") == {"window": (16, 16)}
    assert parse("integrated_gradients", baseline="0.5") == {"baseline": 0.5}
    with pytest.raises(InputError, match="parameter 'layers' of method 'legrad' takes"):
        parse("legrad", layers="abc")
    with pytest.raises(InputError, match="'n_masks' of method 'tis' takes an integer"):
        parse("tis", n_masks=2.5)
    with pytest.raises(InputError, match="'ratio' of method 'tis' is empty"):
        parse("tis", ratio=None)


# ============================================================================ explorer (no browser)
@pytest.fixture
def tiny_explorer(tmp_path):
    from vitlens.app.core import Explorer

    from tiny_models import tiny_torchvision  # its preprocess gives its own 64 x 64 input (timm's: 224)

    return Explorer(tiny_torchvision(), out_dir=tmp_path / "out", max_bytes=200_000, max_pixels=1_000_000)


def _png(path: Path, w: int, h: int, mode: str = "RGB", seed: int = 0) -> Path:
    from PIL import Image

    a = np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path)
    return path


def test_one_preprocessing_and_one_clean_forward_per_image_whatever_the_methods(tiny_explorer, tmp_path):
    """Counted on the adapter itself: opening an image preprocesses it and runs the model once; opening the
    same bytes again (another file name) and running three methods (twice, the second time from the cache)
    adds no preprocessing and no forward beyond what ``vitlens.explain`` with a class index does inside the
    methods (measured alone first)."""
    import vitlens

    ex = tiny_explorer
    a = ex.adapter
    calls = {"forward": 0, "preprocess": 0}
    orig_f, orig_p = a.forward, a.preprocess

    def forward(*args, **kw):
        calls["forward"] += 1
        return orig_f(*args, **kw)

    def preprocess(*args, **kw):
        calls["preprocess"] += 1
        return orig_p(*args, **kw)

    a.forward, a.preprocess = forward, preprocess
    methods = {"legrad": {}, "rise": {"n_masks": 8}, "tis": {"n_masks": 8}}
    x = orig_p([str(_png(tmp_path / "a.png", 80, 70))])
    inside = 0
    for m, p in methods.items():
        before = calls["forward"]
        vitlens.explain(a, x, m, target=3, seed=0, **p)
        inside += calls["forward"] - before
    calls.update(forward=0, preprocess=0)
    e1 = ex.open_upload(tmp_path / "a.png")
    assert calls == {"forward": 1, "preprocess": 1} and ex.clean_forwards == 1
    shutil.copy(tmp_path / "a.png", tmp_path / "same-bytes.png")
    e2 = ex.open_upload(tmp_path / "same-bytes.png")
    assert e2 is e1 and calls == {"forward": 1, "preprocess": 1}
    assert torch.equal(e1.x, x)
    for _ in range(2):
        for m, p in methods.items():
            target, idx, _ = ex.resolve_target(e1, "3: class 3")
            ex.explain(e1, m, p, target, seed=0)
    assert calls == {"forward": 1 + inside, "preprocess": 1} and ex.clean_forwards == 1
    del a.forward, a.preprocess


def test_uploads_are_checked_before_decoding(tiny_explorer, tmp_path):
    from vitlens.errors import InputError

    ex = tiny_explorer
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="notes.txt is not an image file"):
        ex.open_upload(tmp_path / "notes.txt")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        ex.open_upload(tmp_path / "empty.png")
    with pytest.raises(InputError, match=r"accepts images up to 0 MB"):  # 200 kB cap, a ~300 kB noise PNG
        ex.open_upload(_png(tmp_path / "heavy.png", 330, 330))
    from PIL import Image

    Image.new("L", (1200, 1000), 7).save(tmp_path / "wide.png")  # small file, 1.2 megapixels: refused by header
    with pytest.raises(InputError, match=r"1200 x 1000 = 1.2 megapixels; the app accepts up to 1 megapixels"):
        ex.open_upload(tmp_path / "wide.png")
    assert ex.clean_forwards == 0


def test_targets_from_the_class_box_and_their_errors(tiny_explorer, tmp_path):
    from vitlens.errors import TargetError

    ex = tiny_explorer
    e = ex.open_upload(_png(tmp_path / "a.png", 64, 64))
    top = e.top5[0][0]
    assert e.top5[0][2] == pytest.approx(float(e.probs.max()))
    assert ex.resolve_target(e, "") == (top, top, f"class {top}")
    assert ex.resolve_target(e, "7: class 7")[:2] == (7, 7)
    assert ex.resolve_target(e, "class 4")[:2] == (4, 4)
    with pytest.raises(TargetError, match="out of range"):
        ex.resolve_target(e, "12: nope")
    with pytest.raises(TargetError, match="Did you mean 'class 1'.*class box"):
        ex.resolve_target(e, "clas 1")


def test_clip_models_get_a_prompt_box_and_prompts_as_targets(tmp_path):
    """A CLIP-style model without a class vocabulary: the page shows the prompt box instead of the top-5 and the
    class box, lists only the methods whose declared needs the model meets, and a prompt is the explained target."""
    _need_gradio()
    import vitlens
    from vitlens.app.core import Explorer
    from vitlens.app.ui import build_app
    from vitlens.errors import TargetError

    from tiny_models import tiny_open_clip

    ex = Explorer(tiny_open_clip(), out_dir=tmp_path / "out")
    assert ex.supports_text and not ex.class_names
    e = ex.open_upload(_png(tmp_path / "a.png", 64, 64))
    assert e.top5 == [] and e.probs is None
    with pytest.raises(TargetError, match="text prompt"):
        ex.resolve_target(e, "")
    assert ex.resolve_target(e, "", "a photo of a cat") == ("a photo of a cat", -1, "a photo of a cat")
    res, _ = ex.explain(e, "legrad", {}, "a photo of a cat")
    want = vitlens.explain(ex.adapter, e.x, "legrad", target="a photo of a cat").maps[0].numpy()
    assert res.target_index == -1 and np.array_equal(res.map, want)
    ok, not_ok = ex.available_methods()
    from vitlens.methods import get_method

    assert set(ok) | set(not_ok) == set(vitlens.methods()) and not set(ok) & set(not_ok)
    for m in vitlens.methods():
        assert (m in ok) == all(ex.adapter.provides(c) for c in get_method(m).needs), m
    demo = build_app(ex)
    cfg = {c["props"].get("elem_id"): c["props"] for c in demo.get_config_file()["components"]
           if c["props"].get("elem_id")}
    assert cfg["prompt"]["visible"] is True
    assert cfg["top5"]["visible"] is False and cfg["class-box"]["visible"] is False
    assert [c[0] for c in cfg["methods"]["choices"]] == ok


def test_overlay_is_the_colour_map_blended_at_the_chosen_opacity():
    import matplotlib

    from vitlens.app.core import overlay_rgb

    rng = np.random.RandomState(0)
    img, m = rng.rand(5, 6, 3).astype(np.float32), rng.rand(5, 6).astype(np.float32)
    lut = matplotlib.colormaps["jet"](np.arange(256) / 255.0)[:, :3]
    for alpha in (0.0, 0.3, 1.0):
        want = np.clip(np.rint(((1 - alpha) * img + alpha * lut[np.rint(m * 255).astype(int)]) * 255), 0, 255)
        assert np.abs(overlay_rgb(img, m, alpha).astype(int) - want.astype(int)).max() <= 1  # float32 rounding


# ============================================================================ bench folder (read-only, confined)
@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A real bench folder: 3 shared images, legrad and rollout, deletion (4 steps) and the pointing game."""
    if not (DATA.is_dir() and (SHARED / "models").is_dir()):
        pytest.skip(f"shared model and images not found at {SHARED}")
    from vitlens.cli import main

    out = tmp_path_factory.mktemp("bench") / "run"
    rc = main(["bench", "--data", str(DATA), "--model", REAL_MODEL, "--weights", str(SHARED / "models"),
               "--methods", "legrad,rollout", "--metrics", "deletion,pointing_game", "--metric-param",
               "deletion.n_steps=4", "--limit", "3", "--out", str(out), "--no-progress", "--no-report"])
    assert rc == 0
    return out


def _db_rows(folder: Path) -> list[tuple]:
    con = sqlite3.connect(folder / "results.sqlite")
    try:
        return con.execute("SELECT r.label, x.image_id, x.metric, x.value FROM results x JOIN runs r "
                           "ON r.run_key = x.run_key").fetchall()
    finally:
        con.close()


@needs_shared
def test_bench_rows_filter_and_sort_as_the_database_says(bench_dir):
    from vitlens.app.bench_view import BenchView

    v = BenchView(bench_dir)
    db = _db_rows(bench_dir)
    dele = {(m, i): val for m, i, k, val in db if k == "deletion"}
    assert v.methods == ["legrad", "rollout"] and v.metrics == ["deletion", "pointing_game"]
    head, rows, n = v.rows(sort="deletion", descending=True)
    assert n == len(dele) == 6 and head[4] == "deletion ↓"
    want = sorted(dele.items(), key=lambda kv: -kv[1])
    assert [(r[2], r[0]) for r in rows] == [k for k, _ in want]
    assert [r[4] for r in rows] == [f"{val:.4f}" for _, val in want]
    _, rows, n = v.rows(method="rollout", search="00003")
    assert n == 1 and rows[0][0] == "ILSVRC2012_val_00000003" and rows[0][4] == f"{dele[('rollout', rows[0][0])]:.4f}"
    label = sqlite3.connect(bench_dir / "results.sqlite").execute(
        "SELECT label FROM images WHERE image_id='ILSVRC2012_val_00000005'").fetchone()[0]
    cls = next(c for c in v.classes() if c.startswith(f"{label}:"))
    _, rows, n = v.rows(cls=cls)
    assert n == 2 and {r[0] for r in rows} == {"ILSVRC2012_val_00000005"}
    head, summ = v.summary()
    legrad = [r for r in summ if r[0] == "legrad"][0]
    mean = np.mean([val for (m, _), val in dele.items() if m == "legrad"])
    assert legrad[1].startswith(f"{mean:.4f} [")


def _write(folder: Path, sql: str, args: tuple) -> None:
    """A change to the test's copy of the database, checkpointed into the main file (WAL emptied)."""
    con = sqlite3.connect(folder / "results.sqlite")
    with con:
        con.execute(sql, args)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


@needs_shared
def test_bench_view_reads_nothing_outside_its_folder(bench_dir, tmp_path):
    """Image paths come from the database: outside the folder (absolute, ``..``, or a symlink inside pointing
    out) they are not read; inside, or under an explicitly given ``--bench-images`` root, they are. The
    database itself is opened read-only (unchanged bytes, no WAL written)."""
    from vitlens.app.bench_view import BenchView
    from vitlens.errors import InputError

    folder = tmp_path / "bench"
    con = sqlite3.connect(bench_dir / "results.sqlite")  # everything into the main file, then copy it alone
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    shutil.copytree(bench_dir, folder, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(IMAGE, outside / "o.jpeg")
    (folder / "imgs").mkdir()
    shutil.copy(IMAGE, folder / "imgs" / "in.jpeg")
    (folder / "imgs" / "link.jpeg").symlink_to(outside / "o.jpeg")
    ids = [r[0] for r in sqlite3.connect(folder / "results.sqlite").execute("SELECT image_id FROM images ORDER BY 1")]
    paths = {ids[0]: str(outside / "o.jpeg"), ids[1]: "../outside/o.jpeg", ids[2]: "imgs/link.jpeg"}
    for i, p in paths.items():
        _write(folder, "UPDATE images SET path=? WHERE image_id=?", (p, i))
    v = BenchView(folder)
    rk = v.table.row_keys["legrad"]
    for i in ids:
        pixels, why = v.image_pixels(i, rk)
        assert pixels is None and "outside" in why, (i, why)
        maps, note = v.image_maps(i)
        assert len(maps) == 2 and all(p is None for _, _, p, _ in maps) and "outside" in note
    _write(folder, "UPDATE images SET path='imgs/in.jpeg' WHERE image_id=?", (ids[0],))
    before = (folder / "results.sqlite").read_bytes()
    files = sorted(p.name for p in folder.iterdir())
    v = BenchView(folder)
    pixels, why = v.image_pixels(ids[0], rk)
    assert pixels is not None and pixels.shape == (224, 224, 3) and why == ""
    assert v.image_pixels(ids[1], rk)[0] is None
    v2 = BenchView(folder, images_root=outside)  # the outside folder, given explicitly
    assert v2.image_pixels(ids[1], rk)[0] is not None
    assert np.array_equal(v2.image_pixels(ids[1], rk)[0], pixels)  # the same image, the same transform
    with pytest.raises(InputError, match="no image 'nope'"):
        v.image_maps("nope")
    # read-only: the database's bytes are unchanged and nothing was committed (SQLite may create its empty
    # -wal/-shm companions for a reader of a WAL database; nothing else appears)
    assert (folder / "results.sqlite").read_bytes() == before
    wal = Path(str(folder / "results.sqlite") + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm"))) == \
        [f for f in files if not f.endswith(("-wal", "-shm"))]
    with pytest.raises(InputError, match="no results.sqlite"):
        BenchView(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        BenchView(tmp_path / "missing")


# ============================================================================ command line
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "vitlens", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _need_gradio():
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.skip('Gradio not installed: pip install "vitlens[app]"')


def test_cli_refuses_bad_options_in_one_line_before_loading_the_model(tmp_path, capsys):
    _need_gradio()
    from vitlens.cli import main

    assert main(["app", "--bench", str(tmp_path / "missing"), "--weights", "/nonexistent/weights"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bench" in err and "no such folder" in err, err  # not a weights error
    assert main(["app", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--port 70000" in err, err


def _non_loopback_address():
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return next((a for a in out if "." in a and not a.startswith("127.")), None)


@needs_shared
def test_cli_serves_the_page_on_loopback_only_and_offline():
    _need_gradio()
    import urllib.request

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", VITLENS_WEIGHTS=str(SHARED / "models"))
    proc = subprocess.Popen([sys.executable, "-m", "vitlens", "app", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, line = time.time() + 180, ""
        while time.time() < deadline:
            line = proc.stdout.readline()
            if "serving" in line or not line:
                break
        assert f"at http://127.0.0.1:{port}" in line, line
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "<title>vitlens</title>" in html or "vitlens" in html
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=3).close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ============================================================================ the page in headless Chromium
@pytest.fixture(scope="module")
def browser():
    _need_gradio()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip('Playwright not installed: pip install "playwright>=1.40,<2" (no browser download needed)')
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def app(real_model, bench_dir, tmp_path_factory):
    """The app in this process (so that the test can count forward passes), on a free loopback port."""
    _need_gradio()
    from vitlens.app.bench_view import BenchView
    from vitlens.app.core import Explorer
    from vitlens.app.ui import launch

    ex = Explorer(real_model, out_dir=tmp_path_factory.mktemp("app-out"), max_bytes=3 * 2**20)
    demo, url = launch(ex, BenchView(bench_dir), host="127.0.0.1", port=_free_port(), block=False, quiet=True)
    try:
        yield url, ex
    finally:
        demo.close()


@pytest.fixture
def page(browser, app):
    url, _ = app
    ctx = browser.new_context(viewport={"width": 1400, "height": 1800})
    pg = ctx.new_page()
    external = []
    pg.on("request", lambda r: external.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
          else None)
    pg.goto(url, wait_until="load")
    pg.wait_for_selector("#upload input[type=file]", state="attached", timeout=60_000)
    yield pg
    ctx.close()
    assert external == [], f"the page fetched from outside: {external[:5]}"


def _seq(pg) -> int:
    return pg.evaluate("Math.max(0, ...Array.from(document.querySelectorAll('#status [data-seq]'))"
                       ".map(e => Number(e.dataset.seq)))")


def act(pg, action, needle: str, timeout: float = 120_000) -> str:
    """Do ``action`` and wait for a *new* status message (the page numbers them) that contains ``needle``."""
    s0 = _seq(pg)
    action()
    pg.wait_for_function("([s0, n]) => { const e = Array.from(document.querySelectorAll('#status [data-seq]'));"
                         " return e.some(x => Number(x.dataset.seq) > s0)"
                         " && document.querySelector('#status').innerText.includes(n); }", arg=[s0, needle],
                         timeout=timeout)
    return pg.inner_text("#status")


def set_file(pg, path) -> None:
    pg.locator("#upload input[type=file]").wait_for(state="attached")  # the app empties the box after each upload
    pg.set_input_files("#upload input[type=file]", str(path))


def upload(pg, path, needle=None) -> str:
    return act(pg, lambda: set_file(pg, path), needle or f"Loaded {Path(path).stem}")


def set_methods(pg, wanted):
    for label in pg.locator("#methods label").all():
        name = label.inner_text().strip()
        box = label.locator("input")
        if box.is_checked() != (name in wanted):
            label.click()
    for m in wanted:
        pg.wait_for_selector(f"#params-{m}", state="visible")


def download(pg, href) -> bytes:
    r = pg.request.get(href)
    assert r.ok, href
    return r.body()


def npy_of(pg, method) -> np.ndarray:
    a = pg.locator(f"#downloads a[href$='_{method}.npy']")
    a.first.wait_for(state="attached")
    return np.load(io.BytesIO(download(pg, a.first.get_attribute("href"))))


def run_and_wait(pg, needle="Explained") -> str:
    return act(pg, lambda: pg.click("#run"), needle)


@needs_shared
def test_maps_shown_are_vitlens_explain_and_follow_a_parameter(page, app, real_model):
    """Upload a shared image, run TIS and LeGrad: the downloaded .npy maps equal ``vitlens.explain`` on the same
    file with the same parameters bit for bit; the top-5 are the model's; progress is shown while TIS runs;
    changing TIS's ratio changes its map (to explain's for the new ratio) and reuses LeGrad's; one clean
    forward for the image throughout."""
    import vitlens

    pg = page
    _, ex = app
    before = ex.clean_forwards
    upload(pg, IMAGE)
    x = real_model.preprocess([str(IMAGE)])
    with torch.no_grad():
        probs = real_model.forward(x).softmax(-1)[0]
    p, i = probs.topk(5)
    shown = pg.inner_text("#top5")
    for k, v in zip(i.tolist(), p.tolist()):
        assert f"{real_model.class_names[k].split(',')[0]} — {v * 100:.1f} %" in shown
    set_methods(pg, ["tis", "legrad"])
    pg.fill("#p-tis-n_masks input", "32")
    pg.evaluate("""() => { window.__progress = new Set();  // every progress text shown while the methods run
        new MutationObserver(() => document.querySelectorAll('#maps .progress-level, #maps .progress-text')
            .forEach(e => window.__progress.add(e.textContent))).observe(document.body,
            {subtree: true, childList: true, characterData: true}); }""")
    run_and_wait(pg)
    seen = set(pg.evaluate("Array.from(window.__progress)"))
    assert any("TIS masks" in s or "tis (" in s for s in seen), seen
    captions = pg.inner_text("#maps")
    assert "tis ·" in captions and "legrad ·" in captions
    assert pg.locator("#maps img").count() >= 2
    for method, params in (("tis", {"n_masks": 32}), ("legrad", {})):
        want = vitlens.explain(real_model, x, method, seed=0, **params).maps[0].cpu().numpy()
        got = npy_of(pg, method)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got, want), (method, np.abs(got - want).max())
    tis_before = npy_of(pg, "tis")
    pg.fill("#p-tis-ratio input", "0.25")
    run_and_wait(pg)
    assert "(cached)" in [ln for ln in pg.inner_text("#timings").splitlines() if ln.startswith("legrad")][0]
    tis_after = npy_of(pg, "tis")
    assert not np.array_equal(tis_after, tis_before)
    assert np.array_equal(tis_after, vitlens.explain(real_model, x, "tis", seed=0, n_masks=32, ratio=0.25)
                          .maps[0].cpu().numpy())
    assert ex.clean_forwards == before + 1
    # the opacity control redraws the overlays (no recomputation): the PNG is the map blended at that opacity
    from PIL import Image

    from vitlens.app.core import overlay_rgb
    from vitlens.viz import to_pixels

    png = pg.locator("#downloads a[href$='_legrad.png']").first
    old_href = png.get_attribute("href")
    pg.fill("#opacity input[type=number]", "0.9")
    pg.keyboard.press("Enter")
    pg.wait_for_function("(h) => { const a = document.querySelector(\"#downloads a[href$='_legrad.png']\");"
                         " return a && a.getAttribute('href') != h; }", arg=old_href, timeout=60_000)
    shown = np.asarray(Image.open(io.BytesIO(download(pg, png.get_attribute("href")))).convert("RGB"))
    legrad = vitlens.explain(real_model, x, "legrad", seed=0).maps[0].cpu().numpy()
    assert np.array_equal(shown, overlay_rgb(to_pixels(x[0], real_model.mean, real_model.std), legrad, 0.9))
    assert ex.clean_forwards == before + 1
    pg.fill("#opacity input[type=number]", "0.5")
    pg.keyboard.press("Enter")
    if os.environ.get("VITLENS_UPDATE_SCREENSHOT") == "1":
        _screenshot(pg)


def _screenshot(pg):
    """docs/app.png: four methods on the shared image (TIS with 256 masks), parameter panels folded but TIS's."""
    set_methods(pg, ["tis", "legrad", "rollout", "chefer2"])
    pg.fill("#p-tis-n_masks input", "256")
    pg.fill("#p-tis-ratio input", "0.5")
    run_and_wait(pg)
    for m in ("legrad", "rollout", "chefer2"):
        pg.click(f"#params-{m} button.label-wrap")
    pg.wait_for_timeout(1000)
    box = pg.locator("#timings").bounding_box()
    out = REPO / "docs" / "app.png"
    out.parent.mkdir(exist_ok=True)
    pg.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1400, "height": box["y"] + box["height"] + 16},
                  full_page=True)


@needs_shared
def test_deletion_curve_auc_is_vitlens_metrics_deletion(page, app, real_model):
    import vitlens
    from vitlens.metrics import deletion, insertion

    pg = page
    upload(pg, IMAGE)
    set_methods(pg, ["legrad"])
    run_and_wait(pg)
    pg.get_by_role("tab", name="Faithfulness").click()
    pg.fill("#steps input", "16")
    pg.click("#substrate input")
    pg.locator("ul[role=listbox] li", has_text="black").first.click()
    pg.click("#plot")
    pg.wait_for_selector("#del-auc", timeout=120_000)
    x = real_model.preprocess([str(IMAGE)])
    exp = vitlens.explain(real_model, x, "legrad", seed=0)
    d = deletion(real_model, x, exp.maps, exp.targets, substrate="black", n_steps=16)
    ins = insertion(real_model, x, exp.maps, exp.targets, substrate="black", n_steps=16)
    assert pg.inner_text("#del-auc") == f"{float(d.values[0]):.6f}"
    assert pg.inner_text("#ins-auc") == f"{float(ins.values[0]):.6f}"
    link = pg.locator("#curves-file a[href$='.json']").first
    got = json.loads(download(pg, link.get_attribute("href")))
    assert got["substrate"] == "black" and got["n_steps"] == 16
    assert got["deletion_auc"] == float(d.values[0]) and got["insertion_auc"] == float(ins.values[0])
    assert np.array_equal(np.float32(got["deletion"]), d.curves[0].numpy())
    assert np.array_equal(np.float32(got["xs"]), d.xs.numpy())
    pg.fill("#step input[type=number]", "8")
    pg.keyboard.press("Enter")
    pg.wait_for_function("document.querySelector('#del-img').innerText.includes('after 8 steps')", timeout=60_000)
    assert f"score {float(d.curves[0, 8]):.4f}" in pg.inner_text("#del-img")


@needs_shared
def test_bench_view_finds_an_image_row_and_its_maps(page, bench_dir):
    pg = page
    pg.get_by_role("tab", name="Bench").click()
    pg.wait_for_selector("#bench-rows [data-testid=cell-0-0]")
    db = {(m, i, k): v for m, i, k, v in _db_rows(bench_dir)}
    summary = pg.inner_text("#bench-summary")
    assert "legrad" in summary and "rollout" in summary and "deletion ↓" in summary
    pg.fill("#bench-search input", "00000003")
    pg.keyboard.press("Enter")
    pg.wait_for_function("document.querySelector('#bench-count').innerText.startsWith('2 rows')")
    cells = [[pg.inner_text(f"#bench-rows [data-testid=cell-{r}-{c}]") for c in range(6)] for r in range(2)]
    for image, _, method, _, dele, _ in cells:
        assert image == "ILSVRC2012_val_00000003"
        assert dele == f"{db[(method, image, 'deletion')]:.4f}"
    pg.fill("#bench-search input", "")
    pg.keyboard.press("Enter")
    pg.wait_for_function("document.querySelector('#bench-count').innerText.startsWith('6 rows')")
    pg.click("#bench-sort input")
    pg.locator("ul[role=listbox] li", has_text="deletion").first.click()
    pg.locator("#bench-order label", has_text="descending").click()
    worst = max((v, m, i) for (m, i, k), v in db.items() if k == "deletion")
    pg.wait_for_function("(v) => document.querySelector('#bench-rows [data-testid=cell-0-4]').innerText == v",
                         arg=f"{worst[0]:.4f}", timeout=30_000)
    assert pg.inner_text("#bench-rows [data-testid=cell-0-0]") == worst[2]
    pg.click("#bench-rows [data-testid=cell-0-1]")
    pg.wait_for_function("document.querySelector('#bench-note').innerText.includes('outside')", timeout=60_000)
    assert pg.locator("#bench-maps img").count() >= 2
    assert "legrad: deletion=" in pg.inner_text("#bench-maps") or pg.locator("#bench-maps img").count() == 2


@needs_shared
def test_bad_inputs_give_a_message_and_the_app_keeps_serving(page, app, tmp_path):
    pg = page
    _, ex = app
    (tmp_path / "notes.txt").write_text("hello, not an image")
    shutil.copy(tmp_path / "notes.txt", tmp_path / "fake.jpg")
    for name in ("notes.txt", "fake.jpg"):
        assert f"{name} is not an image file" in upload(pg, tmp_path / name, "⚠")
    from PIL import Image

    Image.new("L", (1500, 1000), 9).save(tmp_path / "wide.png")
    old = ex.max_pixels
    ex.max_pixels = 1_000_000
    try:
        assert "1500 x 1000 = 1.5 megapixels" in upload(pg, tmp_path / "wide.png", "⚠")
    finally:
        ex.max_pixels = old
    _png(tmp_path / "heavy.png", 1100, 1100)  # ~3.6 MB of noise: over the 3 MB cap, refused by the upload itself
    set_file(pg, tmp_path / "heavy.png")
    pg.wait_for_function("document.body.innerText.includes('exceed the maximum allowed size')", timeout=30_000)
    upload(pg, IMAGE)
    set_methods(pg, ["tis", "legrad"])
    pg.fill("#class-box input", "tabby kat")
    pg.keyboard.press("Enter")
    assert "Did you mean 'tabby cat'" in run_and_wait(pg, "⚠")
    pg.fill("#class-box input", "")
    pg.click("#class-box input")
    pg.keyboard.type("tabb", delay=30)
    pg.locator("ul[role=listbox] li", has_text="281: tabby").first.click()  # completion
    pg.fill("#p-tis-n_masks input", "0")
    status = run_and_wait(pg, "⚠")
    assert "n_masks must be >= 1, got 0" in status and "Explained tabby with legrad" in status  # the rest still runs
    pg.fill("#p-tis-n_masks input", "16")
    assert "Explained tabby with legrad, tis." in run_and_wait(pg)
    assert math.isfinite(float(npy_of(pg, "tis").sum()))
