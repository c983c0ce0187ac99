"""The command line: explain writes an overlay and the map; clear errors instead of tracebacks."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitlens.cli import main


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(path)
    return path


def test_explain_writes_overlay_and_map(image_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["explain", str(image_file), "--method", "rollout", "--weights", "random", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    m = np.load(out / "img_rollout.npy")
    assert m.shape == (224, 224) and m.min() == 0.0 and m.max() == 1.0
    assert (out / "img_rollout.png").stat().st_size > 1000
    assert "img_rollout.png" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["explain", "/no/such/file.jpg"], "image file not found"),
    (["explain", "IMG", "--method", "nope"], "unknown method 'nope'"),
    (["explain", "IMG", "--target", "5000"], "out of range"),
    (["explain", "IMG", "--param", "n_mask=3"], "unknown parameter"),
])
def test_clear_errors(args, message, image_file, capsys):
    args = [str(image_file) if a == "IMG" else a for a in args] + ["--weights", "random", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["explain", str(bad), "--weights", "random", "--device", "cpu"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_methods_lists_every_registered_method(capsys):
    import vitlens

    assert main(["methods"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert listed == vitlens.methods()
