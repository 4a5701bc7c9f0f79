"""Embedded synthetic dataset: deterministic, valid COCO, occlusion-consistent annotations."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest

from dimaskdino._optional import LazyModule
from dimaskdino.data import synthetic
from dimaskdino.data.coco import load_coco
from dimaskdino.data.rasterize import masks_to_boxes, rasterize_polygons


# pycocotools calls np.array(copy=False) on numpy 2: harmless, noisy.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

# Optional packages, imported by the tests that use them (a missing one skips those tests only).
mask_utils = LazyModule("pycocotools.mask", "this test")
coco_api = LazyModule("pycocotools.coco", "this test")

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    paths = synthetic.make_synthetic_coco(str(root / "a"), seed=4, num_train=24, num_val=6, height=128, width=160,
                                          image_format="png")
    return root, paths


def test_same_seed_gives_identical_files(generated, tmp_path):
    root, paths = generated
    again = synthetic.make_synthetic_coco(str(tmp_path / "b"), seed=4, num_train=24, num_val=6, height=128,
                                          width=160, image_format="png")
    for split in ("train", "val"):
        a = os.path.join(paths.root, "annotations", f"instances_{split}.json")
        b = os.path.join(again.root, "annotations", f"instances_{split}.json")
        assert open(a, "rb").read() == open(b, "rb").read()
    cmp = filecmp.dircmp(paths.train_images, again.train_images)
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    other = synthetic.make_synthetic_coco(str(tmp_path / "c"), seed=5, num_train=3, num_val=0, height=128,
                                          width=160, image_format="png")
    first = lambda p: json.load(open(p))["annotations"][:3]  # noqa: E731
    assert first(other.train_json) != first(paths.train_json)


def test_valid_coco_with_consistent_visible_masks(generated):
    _, paths = generated
    coco = coco_api.COCO(paths.train_json)
    assert len(coco.imgs) == 24 and len(coco.cats) >= 5
    used = {a["category_id"] for a in coco.anns.values()}
    assert used == set(coco.cats)  # every class appears in 24 images
    kinds = {"polygon": 0, "rle": 0}
    areas = []
    for image_id in coco.imgs:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        union = np.zeros((128, 160), np.int32)
        for a in anns:
            assert coco.annToMask(a).sum() > 0  # pycocotools decodes every annotation
            if isinstance(a["segmentation"], list):  # rendered with the project rasterizer
                m = rasterize_polygons([np.reshape(p, (-1, 2)) for p in a["segmentation"]], 128, 160)
            else:
                m = coco.annToMask(a).astype(bool)
            assert a["area"] == m.sum() >= synthetic.MIN_VISIBLE_PIXELS
            x0, y0, x1, y1 = masks_to_boxes(m[None])[0]
            np.testing.assert_allclose(a["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-6)
            kinds["polygon" if isinstance(a["segmentation"], list) else "rle"] += 1
            union += m
            areas.append(m.sum())
        assert union.max() <= 1  # visible parts never overlap: occlusion is accounted for
    assert kinds["polygon"] > 0 and kinds["rle"] > 0
    assert min(areas) < 200 and max(areas) > 2000  # small to large


def test_loads_through_the_project_loader(generated):
    _, paths = generated
    ds = load_coco(paths.train_json, paths.train_images)
    assert len(ds) == 24 and len(ds.problems) == 0
    assert ds.categories.coco_ids == (1, 2, 4, 5, 7, 9)


def test_jpeg_cli(tmp_path, capsys):
    pytest.importorskip("PIL")
    synthetic.main([str(tmp_path), "--seed", "1", "--train", "3", "--val", "2", "--size", "64x80"])
    assert "wrote 3 train + 2 val" in capsys.readouterr().out
    coco = coco_api.COCO(str(tmp_path / "annotations" / "instances_val.json"))
    assert len(coco.imgs) == 2
    image = coco.imgs[1]
    assert (image["height"], image["width"]) == (64, 80)
    data = (tmp_path / "val" / image["file_name"]).read_bytes()
    assert data[:3] == b"\xff\xd8\xff"
    for a in coco.anns.values():
        assert mask_utils.area(coco.annToRLE(a)) > 0


def test_default_size_is_quick(tmp_path):
    import time

    pytest.importorskip("PIL")
    t0 = time.perf_counter()
    synthetic.make_synthetic_coco(str(tmp_path), seed=0, num_train=10, num_val=0)  # 320x320 JPEG
    assert (time.perf_counter() - t0) / 10 < 0.5  # seconds per image, with a wide margin
