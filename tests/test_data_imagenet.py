"""ImageNet validation boxes: the CSV and XML layouts, boxes through the eval transform, exact union area."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.data import ImageNetBoxes, transform_boxes
from vitlens.data.imagenet import boxes_to_mask, union_area
from vitlens.errors import InputError

SYNSETS = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus", "n01484850 great white shark"]
ITEMS = {  # image id -> (size (w, h), [(synset, x0, y0, x1, y1), ...])
    "ILSVRC2012_val_00000002": ((300, 200), [("n01443537", 10, 20, 120, 150), ("n01443537", 100, 30, 250, 90)]),
    "ILSVRC2012_val_00000001": ((180, 240), [("n01484850", 40, 50, 160, 200)]),
}


def _folder(tmp_path, xml=False):
    (tmp_path / "images").mkdir()
    (tmp_path / "LOC_synset_mapping.txt").write_text("\n".join(SYNSETS) + "\n")
    rows = ["ImageId,PredictionString"]
    for iid, ((w, h), boxes) in ITEMS.items():
        Image.new("RGB", (w, h), (90, 20, 200)).save(tmp_path / "images" / f"{iid}.JPEG")
        rows.append(f"{iid}," + " ".join(f"{s} {x0} {y0} {x1} {y1}" for s, x0, y0, x1, y1 in boxes) + " ")
        if xml:
            (tmp_path / "ann").mkdir(exist_ok=True)
            objs = "".join(f"<object><name>{s}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                           f"<ymax>{y1}</ymax></bndbox></object>" for s, x0, y0, x1, y1 in boxes)
            (tmp_path / "ann" / f"{iid}.xml").write_text(
                f"<annotation><filename>{iid}</filename><size><width>{w}</width><height>{h}</height></size>{objs}</annotation>")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.mark.parametrize("xml", [False, True])
def test_layouts_load_the_same_samples(tmp_path, xml):
    root = _folder(tmp_path, xml)
    ds = ImageNetBoxes(root, annotations=root / "ann" if xml else None)
    assert [s.image_id for s in ds.samples] == sorted(ITEMS)
    assert [s.label for s in ds.samples] == [2, 1]
    np.testing.assert_array_equal(ds[1].boxes, np.array([b[1:] for b in ITEMS[ds[1].image_id][1]], dtype=float))
    assert ds.class_names[1].startswith("goldfish")


def _transform_box_by_pixels(size_wh, box, out, crop_pct):
    """Paint the box white, run torchvision's Resize(int) + CenterCrop, find the white pixels' extent."""
    from torchvision import transforms as T

    im = np.zeros((size_wh[1], size_wh[0]), np.uint8)
    x0, y0, x1, y1 = box
    im[y0:y1, x0:x1] = 255
    tf = T.Compose([T.Resize(int(out / crop_pct), interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(out)])
    arr = np.array(tf(Image.fromarray(im)))
    ys, xs = np.nonzero(arr > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


@pytest.mark.parametrize("size_wh,box", [((300, 200), (40, 30, 200, 150)), ((180, 240), (10, 60, 170, 230)),
                                         ((500, 375), (0, 0, 500, 375))])
def test_transform_boxes_follows_the_eval_transform(size_wh, box):
    out, crop = 64, 0.875
    got = transform_boxes(np.array([box], float), size_wh, (out, out), crop)[0]
    ref = _transform_box_by_pixels(size_wh, box, out, crop)
    assert np.abs(got - ref).max() <= 1.0  # nearest resampling moves edges by under a pixel


def test_boxes_outside_the_crop_are_dropped():
    got = transform_boxes(np.array([[0, 0, 10, 10], [100, 50, 200, 150]], float), (400, 200), (64, 64), 0.875)
    assert len(got) == 1


def test_union_area_and_coverage(tmp_path):
    boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 12.5], [20, 0, 21, 1], [2, 2, 3, 3]])
    # slow: count cells of a fine grid
    s = 0.25
    xs = np.arange(0, 25, s) + s / 2
    ys = np.arange(0, 15, s) + s / 2
    inside = np.zeros((len(ys), len(xs)), bool)
    for x0, y0, x1, y1 in boxes:
        inside |= ((xs >= x0) & (xs <= x1))[None] & ((ys >= y0) & (ys <= y1))[:, None]
    assert abs(union_area(boxes) - inside.sum() * s * s) < 1e-9
    assert union_area(np.zeros((0, 4))) == 0.0
    m = boxes_to_mask(np.array([[1, 1, 3, 2]]), (4, 5))
    assert m.sum() == 2 and m[1, 1] and m[1, 2]
    root = _folder(tmp_path)
    ds = ImageNetBoxes(root)
    cov = ds.box_coverage([0, 1], (64, 64), 0.875)
    masks = ds.box_masks([0, 1], (64, 64), 0.875)
    assert torch.allclose(cov, masks.flatten(1).double().mean(1), atol=0.05)


def test_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ImageNetBoxes(tmp_path / "nope")
    root = _folder(tmp_path)
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3\n")
    with pytest.raises(InputError, match="malformed"):
        ImageNetBoxes(root)


# inverse of the PIL method exif_transpose applies for each EXIF orientation (those are involutions
# except the two quarter turns)
_STORE_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def _red_box(a: np.ndarray) -> list:
    ys, xs = np.nonzero((a[..., 0] > 200) & (a[..., 1] < 50))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # continuous pixel edges


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_the_exif_orientation(orientation, tmp_path):
    """A file stored rotated/mirrored with an EXIF orientation tag: the box found on the *stored* pixels,
    mapped by ``orient_boxes``, is where the object is in the image ``load_image`` returns (both read from
    pixels, so the reference does not use the formulas under test)."""
    from vitlens.models.preprocess import exif_orientation, image_size, load_image, orient_boxes

    shown = np.zeros((24, 40, 3), np.uint8)
    shown[3:11, 5:17] = (255, 0, 0)  # the object as a viewer shows it
    img = Image.fromarray(shown)
    stored = img if orientation == 1 else img.transpose(_STORE_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "x.png"
    stored.save(path, exif=exif.tobytes())
    size, tag = exif_orientation(path)
    assert tag == orientation and size == stored.size
    loaded = np.asarray(load_image(path))
    assert _red_box(loaded) == [5, 3, 17, 11]  # load_image shows it upright
    assert image_size(path) == (40, 24)
    mapped = orient_boxes(np.array([_red_box(np.asarray(stored))], float), stored.size, orientation)
    np.testing.assert_array_equal(mapped, [[5, 3, 17, 11]])
