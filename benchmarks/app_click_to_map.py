"""Time from a click on "Explain" in ``vitlens app`` to the map in the page, in headless Chromium.

Starts the app in this process on the default model (offline weights: ``--weights`` or ``VITLENS_WEIGHTS``),
uploads one image, and for each method clicks "Explain" ``--repeats`` times with a new seed each time (so that
no map comes from the app's cache), timing the click until the page shows the new map's status line and its
download links. Also prints the method's own run time as the page reports it (``vitlens.explain`` inside the
app), so the difference is what the app adds (rendering the overlays, writing the downloads, the page update).

    python benchmarks/app_click_to_map.py --weights ../shared/models --methods tis,legrad --repeats 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=os.environ.get("VITLENS_WEIGHTS"))
    ap.add_argument("--image", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"
                                           / "imagenet-val-sample" / "images" / "ILSVRC2012_val_00000001.JPEG"))
    ap.add_argument("--methods", default="tis,legrad")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import socket

    import torch
    from playwright.sync_api import sync_playwright

    import vitlens
    from vitlens.app.core import Explorer
    from vitlens.app.ui import launch
    from vitlens.models import DEFAULT_MODEL

    if args.threads:
        torch.set_num_threads(args.threads)
    model = vitlens.load_model(DEFAULT_MODEL, weights=args.weights)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = launch(Explorer(model), None, host="127.0.0.1", port=port, block=False, quiet=True)
    print(f"model {DEFAULT_MODEL}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, image {args.image}")
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            pg = b.new_page(viewport={"width": 1400, "height": 1800})
            pg.goto(url, wait_until="load")
            pg.set_input_files("#upload input[type=file]", args.image)
            pg.wait_for_function("document.querySelector('#status').innerText.includes('Loaded')", timeout=120_000)
            seed = 100
            for method in args.methods.split(","):
                for label in pg.locator("#methods label").all():
                    if label.locator("input").is_checked() != (label.inner_text().strip() == method):
                        label.click()
                wall, inner = [], []
                for _ in range(args.repeats):
                    seed += 1
                    pg.fill("#seed input", str(seed))
                    s0 = pg.evaluate("Math.max(0, ...Array.from(document.querySelectorAll('#status [data-seq]'))"
                                     ".map(e => Number(e.dataset.seq)))")
                    t0 = time.perf_counter()
                    pg.click("#run")
                    pg.wait_for_function(
                        "([s0, m]) => Array.from(document.querySelectorAll('#status [data-seq]'))"
                        ".some(e => Number(e.dataset.seq) > s0) && document.querySelector('#status').innerText"
                        ".includes('Explained') && document.querySelector(`#downloads a[href$='_${m}.npy']`)",
                        arg=[s0, method], timeout=900_000)
                    wall.append(time.perf_counter() - t0)
                    row = [ln for ln in pg.inner_text("#timings").splitlines() if ln.startswith(method)][0]
                    inner.append(float(row.split("\t")[1].split()[0]))
                print(f"{method}: click to map {', '.join(f'{w:.2f}' for w in wall)} s (median "
                      f"{statistics.median(wall):.2f} s); vitlens.explain inside the app "
                      f"{', '.join(f'{v:.2f}' for v in inner)} s (median {statistics.median(inner):.2f} s)")
            b.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
