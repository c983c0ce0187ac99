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
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip() and line[0] != " "]
    assert listed == vitlens.methods()


def test_output_names_never_collide():
    from pathlib import Path

    from vitlens.cli import output_stems

    assert output_stems([Path("x/a.jpg"), Path("y/b.png")]) == ["a", "b"]  # unique stems: kept short
    assert output_stems([Path("/d/x/img.jpg"), Path("/d/y/z/img.jpg")]) == ["x/img", "y/z/img"]
    same_folder = output_stems([Path("/d/img.jpg"), Path("/d/img.png")])
    assert len(set(same_folder)) == 2 and all(s.startswith("img-") for s in same_folder)


def test_same_file_names_in_two_folders_and_overwrite(tmp_path, capsys):
    rng = np.random.default_rng(1)
    paths = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        p = tmp_path / sub / "img.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    args = ["explain", *paths, "--method", "rollout", "--weights", "random", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    a, b = np.load(out / "a" / "img_rollout.npy"), np.load(out / "b" / "img_rollout.npy")
    assert not np.array_equal(a, b)  # two images, two maps: the second did not replace the first
    before = (out / "a" / "img_rollout.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2  # a second run refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert (out / "a" / "img_rollout.png").stat().st_mtime_ns == before
    assert main(args + ["--overwrite"]) == 0
