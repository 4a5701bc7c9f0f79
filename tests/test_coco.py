"""COCO annotations: schema errors name file and field, category mapping, polygons and RLE,
crowd handling, data repairs, image headers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from dimaskdino._optional import LazyModule
from dimaskdino.data import problems as P
from dimaskdino.data.coco import (
    CategoryMap,
    CocoFormatError,
    ImageFileError,
    load_coco,
    read_image_header,
)
from dimaskdino.data.synthetic import encode_png
from dimaskdino.data.transforms import Geometry, build_target

# pycocotools calls np.array(copy=False) on numpy 2: harmless, noisy.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

# Optional packages, imported by the tests that use them (a missing one skips those tests only).
mask_utils = LazyModule("pycocotools.mask", "this test")
coco_api = LazyModule("pycocotools.coco", "this test")

H, W = 40, 50


def _base() -> dict:
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((8, 9), np.uint8), ((20, 12), (30, 11)))))
    return {
        "images": [{"id": 5, "file_name": "a.png", "height": H, "width": W},
                   {"id": 6, "file_name": "b.png", "height": H, "width": W}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 90, "bbox": [2, 3, 20, 10],
             "segmentation": [[2, 3, 22, 3, 22, 13, 12, 8, 2, 13]]},  # concave
            {"id": 2, "image_id": 5, "category_id": 7, "bbox": [30, 20, 9, 8],
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},  # compressed RLE
            {"id": 3, "image_id": 5, "category_id": 7, "bbox": [0, 20, 10, 10], "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": [20 * H + 20, 10, H * W - 20 * H - 30]}},
            {"id": 4, "image_id": 6, "category_id": 90, "bbox": [1, 1, 5, 5], "iscrowd": 1,
             "segmentation": [[1, 1, 6, 1, 6, 6]]},
        ],
        "categories": [{"id": 90, "name": "z"}, {"id": 7, "name": "y"}],
    }


def _write(tmp_path, data, images=True) -> str:
    if images:
        for name in ("a.png", "b.png"):
            (tmp_path / name).write_bytes(encode_png(np.zeros((H, W, 3), np.uint8)))
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), "annotations[1].bbox: expected 4 numbers, got 3"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, "x", 4]), "annotations[0].bbox: expected finite numbers"),
        (lambda d: d["annotations"][0].pop("image_id"), "annotations[0].image_id: missing"),
        (lambda d: d["annotations"][0].update(image_id=99), "annotations[0].image_id: no image with id 99"),
        (lambda d: d["annotations"][0].update(category_id=8), "annotations[0].category_id: no category with id 8"),
        (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5]]),
         "annotations[0].segmentation[0]: expected an even number of coordinates, got 5"),
        (lambda d: d["annotations"][0].update(segmentation="abc"),
         "annotations[0].segmentation: expected a list of polygons or an RLE object"),
        (lambda d: d["annotations"][1]["segmentation"].pop("counts"), "annotations[1].segmentation.counts: missing"),
        (lambda d: d["annotations"][0].update(iscrowd=2), "annotations[0].iscrowd: expected 0 or 1"),
        (lambda d: d["annotations"][2].update(id=1), "annotations[2].id: duplicate annotation id 1"),
        (lambda d: d["images"][1].update(id=5), "images[1].id: duplicate image id 5"),
        (lambda d: d["images"][0].pop("file_name"), "images[0].file_name: missing"),
        (lambda d: d["images"][0].update(height=-3), "images[0].height: expected a positive size"),
        (lambda d: d.pop("annotations"), "annotations: missing"),
        (lambda d: d.update(categories=[]), "categories: empty"),
        (lambda d: d["categories"].append({"id": 7, "name": "again"}), "categories: duplicate category id 7"),
    ],
)
def test_malformed_json_names_file_and_field(tmp_path, edit, message):
    data = _base()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(CocoFormatError) as err:
        load_coco(path, str(tmp_path))
    assert str(err.value).startswith(message), str(err.value)
    assert str(err.value).endswith(f" in {path}")


def test_exact_message_for_short_bbox(tmp_path):
    data = _base()
    data["annotations"][1]["bbox"] = [1, 2, 3]
    path = _write(tmp_path, data)
    with pytest.raises(CocoFormatError, match=r"^annotations\[1\]\.bbox: expected 4 numbers, got 3 in "):
        load_coco(path, str(tmp_path))


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(CocoFormatError, match="not valid json"):
        load_coco(str(path), str(tmp_path))


def test_category_map_is_contiguous_and_restorable(tmp_path):
    ds = load_coco(_write(tmp_path, _base()), str(tmp_path), for_training=False)
    cats = ds.categories
    assert cats.coco_ids == (7, 90) and cats.names == ("y", "z") and cats.num_classes == 2
    assert cats.label(90) == 1 and cats.coco_id(0) == 7
    assert cats.labels_to_coco_ids([1, 0, 1]).tolist() == [90, 7, 90]
    restored = CategoryMap.from_state_dict(json.loads(json.dumps(cats.state_dict())))
    assert restored == cats and restored.label(7) == 0


def _identity(record) -> Geometry:
    return Geometry((record.height, record.width), (record.height, record.width), False, (0, 0),
                    (record.height, record.width))


def test_polygons_and_rle_decode_like_pycocotools(tmp_path):
    path = _write(tmp_path, _base())
    ds = load_coco(path, str(tmp_path), for_training=False)
    record = next(r for r in ds.records if r.image_id == 5)
    target = build_target(record, _identity(record), (H, W))
    coco = coco_api.COCO(path)
    expected = [coco.annToMask(coco.anns[i]).astype(bool) for i in (1, 2)]  # crowd (3) left out
    assert target["labels"].tolist() == [1, 0]
    poly, rle = target["masks"]
    assert (poly & expected[0]).sum() / (poly | expected[0]).sum() >= 0.95  # tiny polygon: edge rounding
    np.testing.assert_array_equal(rle, expected[1])
    # Boxes are the tight boxes of the masks (normalized cxcywh).
    np.testing.assert_allclose(target["boxes"][1], [34.5 / W, 24 / H, 9 / W, 8 / H], atol=1e-6)


def test_crowd_is_ignored_in_training(tmp_path):
    path = _write(tmp_path, _base())
    train = load_coco(path, str(tmp_path))
    # image 6 has only a crowd annotation: left out of training, reported once.
    assert [r.image_id for r in train.records] == [5]
    assert train.problems.files(P.NO_ANNOTATIONS) == {"b.png"}
    assert [a.iscrowd for a in train.records[0].annotations] == [False, False, True]
    evaluation = load_coco(path, str(tmp_path), for_training=False)
    assert [r.image_id for r in evaluation.records] == [5, 6]
    assert len(evaluation.problems) == 0


def test_repairs(tmp_path):
    data = _base()
    data["annotations"][0].pop("segmentation")  # box becomes the mask
    data["annotations"][1]["segmentation"]["size"] = [H + 1, W]  # wrong RLE size: dropped
    data["annotations"].append({"id": 9, "image_id": 5, "category_id": 7, "bbox": [1, 1, 0, 4],
                                "segmentation": [[1, 1, 3, 3]]})  # zero-area box + degenerate polygon
    ds = load_coco(_write(tmp_path, data), str(tmp_path))
    counts = ds.problems.counts()
    assert counts == {P.NO_SEGMENTATION: 1, P.BAD_RLE: 1, P.DEGENERATE_POLYGON: 1, P.NO_ANNOTATIONS: 1}
    record = ds.records[0]
    target = build_target(record, _identity(record), (H, W))
    assert target["labels"].tolist() == [1]
    assert target["masks"][0].sum() == 20 * 10  # the xywh box [2, 3, 20, 10] as mask


def test_image_files_are_checked(tmp_path):
    data = _base()
    data["images"][1].pop("height")
    data["images"][1].pop("width")  # taken from the PNG header
    data["images"].append({"id": 8, "file_name": "c.png", "height": H, "width": W})
    data["annotations"].append(copy.deepcopy(data["annotations"][0]) | {"id": 20, "image_id": 8})
    path = _write(tmp_path, data)
    (tmp_path / "c.png").write_bytes(encode_png(np.zeros((H + 2, W, 3), np.uint8)))  # wrong size
    ds = load_coco(path, str(tmp_path), for_training=False)
    assert [r.image_id for r in ds.records] == [5, 6]
    assert (ds.records[1].height, ds.records[1].width) == (H, W)
    assert ds.problems.files(P.SIZE_MISMATCH) == {"c.png"}


def test_read_image_header(tmp_path):
    png = encode_png(np.zeros((7, 9, 3), np.uint8))
    (tmp_path / "a.png").write_bytes(png)
    header = read_image_header(str(tmp_path / "a.png"))
    assert (header.format, header.height, header.width) == ("png", 7, 9)
    (tmp_path / "t.png").write_bytes(png[:-12])
    (tmp_path / "junk.jpg").write_bytes(b"\x00" * 100)
    (tmp_path / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    for name in ("t.png", "junk.jpg", "trunc.jpg"):
        with pytest.raises(ImageFileError):
            read_image_header(str(tmp_path / name))
    PIL = pytest.importorskip("PIL.Image")
    PIL.fromarray(np.zeros((11, 13), np.uint8)).save(tmp_path / "g.jpg")
    header = read_image_header(str(tmp_path / "g.jpg"))
    assert (header.format, header.height, header.width) == ("jpeg", 11, 13)
