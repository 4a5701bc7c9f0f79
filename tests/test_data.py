"""Data layer: rasterizer vs pycocotools, LSJ geometry, DALI CPU pipeline (flip, crop, tight boxes),
PyTorch fallback parity, sharding, and a hostile dataset that must load without crashing."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from dimaskdino._optional import LazyModule
from dimaskdino.data import problems as P
from dimaskdino.data.dali import DaliEvalLoader, DaliTrainLoader
from dimaskdino.data.loader import TorchEvalLoader, TorchTrainLoader, build_train_loader
from dimaskdino.data.synthetic import make_synthetic_coco
from dimaskdino.data.coco import load_coco
from dimaskdino.data.rasterize import masks_to_boxes, polygon_area, rasterize_polygons
from dimaskdino.data.transforms import (
    Schedule,
    eval_resize_size,
    lsj_geometry,
    resize_scale_size,
    sample_lsj_geometry,
)

# pycocotools calls np.array(copy=False) on numpy 2: harmless, noisy.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

# Optional packages, imported by the tests that use them (a missing one skips those tests only).
mask_utils = LazyModule("pycocotools.mask", "this test")
Image = LazyModule("PIL.Image", "this test")



# ---------------------------------------------------------------------------------------------
# Rasterizer
# ---------------------------------------------------------------------------------------------


def _coco_mask(parts, h, w):
    rles = mask_utils.frPyObjects([p.ravel().tolist() for p in parts], h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _star(cx, cy, r_out, r_in, n, angle=0.0):
    t = angle + np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _polygon_set():
    """Realistic object polygons: convex, concave, multi-part, partly outside the image."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(60):
        cx, cy = rng.uniform(40, 216, 2)
        r = rng.uniform(40, 110)
        kind = k % 6
        if kind == 0:  # convex random polygon
            n = int(rng.integers(5, 12))
            t = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
            parts = [np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)]
        elif kind == 1:  # concave star
            parts = [_star(cx, cy, r, r * rng.uniform(0.45, 0.6), int(rng.integers(4, 7)), rng.uniform(0, 6))]
        elif kind == 2:  # star-shaped blob with radial jitter (concave)
            t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
            rad = r * rng.uniform(0.7, 1.0, 40)
            parts = [np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1)]
        elif kind == 3:  # L shape
            a = r
            parts = [np.array([[0, 0], [a, 0], [a, a / 3], [a / 3, a / 3], [a / 3, a], [0, a]]) + [cx - a / 2, cy - a / 2]]
        elif kind == 4:  # two parts (an occluded object split in two)
            parts = [_star(cx - r / 2, cy, r / 2, r * 0.3, 5), np.array([[cx, cy], [cx + r, cy + 5], [cx + r / 3, cy + r]])]
        else:  # partly outside the image
            t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            parts = [np.stack([rng.choice([0.0, 256.0]) + r * np.cos(t), cy + r * np.sin(t)], 1)]
        out.append([p + rng.uniform(-0.5, 0.5, p.shape) for p in parts])
    return out


def test_rasterizer_matches_pycocotools():
    h = w = 256
    ious, inter, union = [], 0, 0
    for parts in _polygon_set():
        a = rasterize_polygons(parts, h, w)
        b = _coco_mask(parts, h, w)
        i, u = (a & b).sum(), (a | b).sum()
        assert u > 0
        ious.append(i / u)
        inter, union = inter + i, union + u
    assert min(ious) >= 0.99, min(ious)
    assert inter / union >= 0.995


def _point_in_polygon_reference(parts, h, w):
    """Independent brute force: even-odd ray test of every pixel centre against every edge."""
    yc, xc = np.mgrid[0:h, 0:w] + 0.5
    out = np.zeros((h, w), bool)
    for xy in parts:
        inside = np.zeros((h, w), bool)
        for (x0, y0), (x1, y1) in zip(xy, np.roll(xy, -1, 0)):
            if y0 == y1:
                continue
            crosses = (np.minimum(y0, y1) <= yc) & (yc < np.maximum(y0, y1))
            x = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (xc < x)
        out |= inside
    return out


def test_rasterizer_exact_pixel_centre_rule():
    rng = np.random.default_rng(1)
    for _ in range(30):
        h, w = rng.integers(5, 60, 2)
        parts = [rng.uniform(-10, 70, (rng.integers(3, 10), 2)) for _ in range(rng.integers(1, 3))]
        np.testing.assert_array_equal(rasterize_polygons(parts, h, w), _point_in_polygon_reference(parts, h, w))


def test_rasterizer_degenerate_and_area():
    assert not rasterize_polygons([np.array([[1.0, 1.0], [5.0, 5.0]])], 8, 8).any()  # 2 points
    assert not rasterize_polygons([np.array([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])], 8, 8).any()  # collinear
    square = np.array([[2.0, 3.0], [7.0, 3.0], [7.0, 9.0], [2.0, 9.0]])
    m = rasterize_polygons([square], 12, 12)
    assert m.sum() == polygon_area(square) == 30
    assert masks_to_boxes(m[None]).tolist() == [[2.0, 3.0, 7.0, 9.0]]
    assert masks_to_boxes(np.zeros((1, 4, 4), bool)).tolist() == [[0.0, 0.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------------------------
# Geometry (Detectron2 ResizeScale + FixedSizeCrop, ResizeShortestEdge)
# ---------------------------------------------------------------------------------------------


def test_lsj_geometry_follows_detectron2():
    # ResizeScale: fits in a (scale * S) square keeping the aspect ratio, np.round.
    assert resize_scale_size(480, 640, 1024, 1.0) == (768, 1024)
    assert resize_scale_size(480, 640, 1024, 0.5) == (384, 512)
    assert resize_scale_size(640, 480, 1024, 2.0) == (2048, 1536)
    # FixedSizeCrop: one uniform number positions the crop on both axes.
    g = lsj_geometry(640, 480, 1024, flip=False, scale=2.0, crop_u=0.5)
    assert g.resized_hw == (2048, 1536) and g.crop_yx == (512, 256) and g.valid_hw == (1024, 1024)
    g = lsj_geometry(480, 640, 1024, flip=True, scale=0.5, crop_u=0.9)
    assert g.crop_yx == (0, 0) and g.valid_hw == (384, 512)
    rng = np.random.default_rng(0)
    scales = [sample_lsj_geometry(rng, 480, 640, 1024, 0.1, 2.0).resized_hw[1] / 1024 for _ in range(200)]
    assert 0.1 <= min(scales) < 0.3 and 1.8 < max(scales) <= 2.0


def test_eval_resize_follows_detectron2():
    assert eval_resize_size(480, 640, 800, 1333) == (800, 1067)
    assert eval_resize_size(640, 480, 800, 1333) == (1067, 800)
    assert eval_resize_size(400, 2000, 800, 1333) == (267, 1333)  # long side capped


def test_schedule_shards_are_disjoint_and_deterministic():
    n, b, shards = 103, 4, 3
    seen = []
    for r in range(shards):
        s = Schedule(n, b, r, shards, seed=5)
        assert s.batches_per_epoch == 34 // 4
        seen.append(s.shard_indices(2))
        np.testing.assert_array_equal(s.shard_indices(2), Schedule(n, b, r, shards, seed=5).shard_indices(2))
    allidx = np.concatenate(seen)
    assert len(allidx) == 105 and set(allidx.tolist()) == set(range(n))  # 2 wrapped repeats only
    assert not np.array_equal(Schedule(n, b, 0, 1, seed=5).shard_indices(0), Schedule(n, b, 0, 1, seed=5).shard_indices(1))
    ev = [Schedule(10, 3, r, 3, shuffle=False).shard_indices(0).tolist() for r in range(3)]
    assert ev == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


# ---------------------------------------------------------------------------------------------
# DALI on the CPU
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_coco(str(root), seed=3, num_train=16, num_val=6, height=96, width=128)


@pytest.fixture(scope="module")
def train_set(synthetic):
    return load_coco(synthetic.train_json, synthetic.train_images)


def _tight_normalized_boxes(masks: torch.Tensor, size: int) -> torch.Tensor:
    xyxy = torch.from_numpy(masks_to_boxes(masks.numpy()))
    return torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                        xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1) / size


def test_dali_train_batch_format_and_tight_boxes(train_set):
    S = 160
    loader = DaliTrainLoader(train_set, batch_size=4, image_size=S, min_scale=0.3, max_scale=2.0, seed=0)
    assert len(loader) == 4
    n_instances = 0
    for batch in loader:
        assert batch["images"].shape == (4, 3, S, S) and batch["images"].dtype == torch.float32
        assert 0 <= batch["images"].min() and batch["images"].max() <= 255
        for (h, w), t in zip(batch["image_sizes"], batch["targets"]):
            assert 0 < h <= S and 0 < w <= S
            assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
            assert t["masks"].dtype == torch.bool and t["masks"].shape[1:] == (S, S)
            assert t["orig_size"] == (96, 128) and isinstance(t["image_id"], int)
            assert t["masks"].flatten(1).any(1).all()  # no empty instance survives
            assert not t["masks"][:, h:].any() and not t["masks"][:, :, w:].any()  # nothing in the padding
            torch.testing.assert_close(t["boxes"], _tight_normalized_boxes(t["masks"], S), rtol=0, atol=1e-6)
            n_instances += len(t["labels"])
    assert n_instances > 0
    assert loader.epoch == 1


def _forced(flip: bool, scale: float, crop_u: float, image_size: int):
    def geometry(record, rng):
        return lsj_geometry(record.height, record.width, image_size, flip, scale, crop_u)

    return geometry


def test_dali_flip_flips_image_masks_and_boxes_together(train_set):
    S = 128
    batches = {}
    for flip in (False, True):
        loader = DaliTrainLoader(train_set, batch_size=2, image_size=S, min_scale=1, max_scale=1, seed=0,
                                 geometry_fn=_forced(flip, 0.75, 0.3, S))
        batches[flip] = next(iter(loader))
    a, b = batches[False], batches[True]
    assert a["image_sizes"] == b["image_sizes"]
    for i, (h, w) in enumerate(a["image_sizes"]):
        diff = (a["images"][i, :, :h, :w].flip(-1) - b["images"][i, :, :h, :w]).abs()
        assert diff.max() <= 1.0  # resampling of a mirrored image: rounding only
        assert (b["images"][i, :, :, w:] == 128).all()  # padding stays bottom/right
        ta, tb = a["targets"][i], b["targets"][i]
        assert torch.equal(ta["labels"], tb["labels"])
        assert torch.equal(ta["masks"][:, :h, :w].flip(-1), tb["masks"][:, :h, :w])
        mirrored = ta["boxes"].clone()
        mirrored[:, 0] = w / S - ta["boxes"][:, 0]
        torch.testing.assert_close(tb["boxes"], mirrored, rtol=0, atol=1e-6)


def _two_square_dataset(root) -> str:
    """One 64x64 image with a square top-left (label 0) and one bottom-right (label 1)."""
    img = np.full((64, 64, 3), 40, np.uint8)
    img[4:20, 4:20] = (250, 0, 0)
    img[44:60, 44:60] = (0, 250, 0)
    os.makedirs(root / "img", exist_ok=True)
    Image.fromarray(img).save(root / "img" / "a.png")
    sq = lambda x, y: [[x, y, x + 16, y, x + 16, y + 16, x, y + 16]]  # noqa: E731
    data = {
        "images": [{"id": 7, "file_name": "a.png", "height": 64, "width": 64}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 10, "bbox": [4, 4, 16, 16], "segmentation": sq(4, 4)},
            {"id": 2, "image_id": 7, "category_id": 20, "bbox": [44, 44, 16, 16], "segmentation": sq(44, 44)},
        ],
        "categories": [{"id": 10, "name": "red"}, {"id": 20, "name": "green"}],
    }
    path = root / "a.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("crop_u, kept_label, box", [(0.0, 0, (8, 8, 40, 40)), (1.0, 1, (24, 24, 56, 56))])
def test_dali_crop_drops_instances_that_leave_the_image(tmp_path, crop_u, kept_label, box):
    ds = load_coco(_two_square_dataset(tmp_path), str(tmp_path / "img"))
    # scale 2 of a 64 canvas: the 64x64 image becomes 128x128, cropped to a 64x64 corner.
    loader = DaliTrainLoader(ds, batch_size=1, image_size=64, min_scale=2, max_scale=2,
                             geometry_fn=_forced(False, 2.0, crop_u, 64))
    batch = next(iter(loader))
    t = batch["targets"][0]
    assert t["labels"].tolist() == [kept_label]
    assert t["masks"].shape == (1, 64, 64)
    ys, xs = torch.nonzero(t["masks"][0], as_tuple=True)
    assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == box
    torch.testing.assert_close(t["boxes"], _tight_normalized_boxes(t["masks"], 64), rtol=0, atol=1e-6)
    colour = batch["images"][0, :, box[1] + 4, box[0] + 4]
    assert colour.argmax().item() == kept_label  # the pixels moved with the mask (red / green)


def test_torch_fallback_matches_dali(train_set, caplog):
    kw = dict(batch_size=4, image_size=128, min_scale=0.3, max_scale=2.0, seed=7, start_epoch=1)
    with caplog.at_level(logging.WARNING, logger="dimaskdino.data"):
        fallback = build_train_loader(train_set, backend="torch", **kw)
        build_train_loader(train_set, backend="torch", **kw)
    assert sum("fallback" in r.message for r in caplog.records) <= 1  # reported once per process
    for a, b in zip(DaliTrainLoader(train_set, **kw), fallback):
        assert a["image_sizes"] == b["image_sizes"]
        per_image = (a["images"] - b["images"]).abs().mean(dim=(1, 2, 3))
        assert (per_image < 0.5).all()  # decoder / resampler rounding only
        for ta, tb in zip(a["targets"], b["targets"]):
            assert torch.equal(ta["labels"], tb["labels"]) and torch.equal(ta["masks"], tb["masks"])
            assert torch.equal(ta["boxes"], tb["boxes"]) and ta["image_id"] == tb["image_id"]


def test_flip_with_crop_matches_fallback(train_set):
    """DALI resizes only the source window of the crop, then flips: same pixels as the fallback's
    resize-all, flip, crop."""
    kw = dict(batch_size=4, image_size=96, min_scale=1, max_scale=1, geometry_fn=_forced(True, 1.7, 0.8, 96))
    a = next(iter(DaliTrainLoader(train_set, **kw)))
    b = next(iter(TorchTrainLoader(train_set, **kw)))
    assert a["image_sizes"] == [(96, 96)] * 4
    assert ((a["images"] - b["images"]).abs().mean(dim=(1, 2, 3)) < 0.5).all()
    assert all(torch.equal(x["masks"], y["masks"]) for x, y in zip(a["targets"], b["targets"]))


def test_train_stream_is_deterministic_and_resumable(train_set):
    kw = dict(batch_size=2, image_size=96, min_scale=0.5, max_scale=1.5, seed=11)
    full = DaliTrainLoader(train_set, **kw)
    first = [b["targets"][0]["image_id"] for b in full]
    second = [b for b in full]  # epoch 1
    resumed = DaliTrainLoader(train_set, **kw, start_epoch=1, start_batch=3)
    rest = list(resumed)
    assert len(rest) == len(second) - 3
    for a, b in zip(second[3:], rest):
        assert [t["image_id"] for t in a["targets"]] == [t["image_id"] for t in b["targets"]]
        assert torch.equal(a["images"], b["images"])
    assert first != [b["targets"][0]["image_id"] for b in second]  # epochs are reshuffled


def test_dali_eval_batches(synthetic):
    ds = load_coco(synthetic.val_json, synthetic.val_images, for_training=False)
    loader = DaliEvalLoader(ds, batch_size=4, short_side=72, max_size=90)
    batches = list(loader)
    assert [len(b["targets"]) for b in batches] == [4, 2]
    for b in batches:
        H, W = b["images"].shape[-2:]
        assert H % 32 == 0 and W % 32 == 0
        for (h, w), t in zip(b["image_sizes"], b["targets"]):
            assert (h, w) == t["resized_size"] == (68, 90)  # 96x128 -> short 72 -> long 96 > 90
            assert t["orig_size"] == (96, 128)
            assert t["masks"].shape[1:] == (H, W)
            assert (b["images"][:, 0, :, w:] == 123.675).all()  # padded with the pixel mean
    assert [len(b["targets"]) for b in loader] == [4, 2]  # a second pass works
    fallback = list(TorchEvalLoader(ds, batch_size=4, short_side=72, max_size=90))
    for a, b in zip(batches, fallback):
        assert (a["images"] - b["images"]).abs().mean() < 0.5
        assert all(torch.equal(x["masks"], y["masks"]) for x, y in zip(a["targets"], b["targets"]))


# ---------------------------------------------------------------------------------------------
# Hostile dataset
# ---------------------------------------------------------------------------------------------


def _write_hostile(root) -> tuple[str, str]:
    img_dir = root / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)

    def jpeg(name, h=48, w=64, gray=False):
        arr = rng.integers(0, 255, (h, w) if gray else (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / name, format="JPEG")

    for name in ("good1.jpg", "good2.jpg", "noann.jpg", "zero.jpg", "degen.jpg"):
        jpeg(name)
    jpeg("gray.jpg", gray=True)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img_dir / "pic.png")
    data = (img_dir / "good1.jpg").read_bytes()
    (img_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (img_dir / "junk.jpg").write_bytes(rng.bytes(3000))
    sos = data.index(b"\xff\xda")
    (img_dir / "noscan.jpg").write_bytes(data[:sos] + b"\xff\xd9")  # header fine, no image data
    names = ["good1.jpg", "good2.jpg", "noann.jpg", "zero.jpg", "degen.jpg", "gray.jpg", "pic.png",
             "truncated.jpg", "junk.jpg", "noscan.jpg", "missing.jpg"]
    images = [{"id": 100 + i, "file_name": n, "height": 48, "width": 64} for i, n in enumerate(names)]
    square = [[10, 10, 40, 10, 40, 40, 10, 40]]
    anns = []

    def ann(image, cat, segm, bbox=(10, 10, 30, 30), **extra):
        anns.append({"id": len(anns) + 1, "image_id": 100 + names.index(image), "category_id": cat,
                     "bbox": list(bbox), "segmentation": segm, **extra})

    for n in names:
        if n not in ("noann.jpg", "zero.jpg", "degen.jpg"):
            ann(n, 17, square)
    ann("good2.jpg", 42, {"size": [48, 64], "counts": [48 * 5 + 3, 10, 38, 10, 48 * 64 - 48 * 5 - 61]})  # RLE
    ann("good2.jpg", 3, square, iscrowd=1)
    ann("zero.jpg", 3, [], bbox=(5, 5, 0, 0))  # zero-area box, no segmentation: dropped
    ann("zero.jpg", 3, square, bbox=(5, 5, 0, 7))  # zero-area box, valid mask: box recomputed
    ann("degen.jpg", 42, [[1, 1, 5, 5]])  # < 3 points
    ann("degen.jpg", 42, [[1, 1, 5, 5, 9, 9]])  # zero area
    ann("degen.jpg", 3, [[1, 1, 5, 5], [20, 20, 30, 20, 30, 30]])  # one bad part, one good
    path = root / "hostile.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 42, "name": "b"}, {"id": 3, "name": "a"}, {"id": 17, "name": "c"}]}))
    return str(path), str(img_dir)


def test_hostile_dataset_is_reported_and_skipped(tmp_path, caplog):
    json_path, img_dir = _write_hostile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dimaskdino.data"):
        ds = load_coco(json_path, img_dir)
    assert ds.categories.coco_ids == (3, 17, 42)  # non-contiguous ids -> labels 0, 1, 2
    counts = ds.problems.counts()
    assert ds.problems.files(P.MISSING_IMAGE) == {"missing.jpg"}
    assert ds.problems.files(P.CORRUPT_IMAGE) == {"truncated.jpg", "junk.jpg"}
    assert ds.problems.files(P.NO_ANNOTATIONS) == {"noann.jpg"}
    assert ds.problems.files(P.ZERO_AREA_BOX) == {"zero.jpg"}
    assert ds.problems.files(P.DEGENERATE_POLYGON) == {"degen.jpg"}
    assert counts[P.DEGENERATE_POLYGON] == 1  # reported once per file
    for name in ("missing.jpg", "truncated.jpg", "junk.jpg", "noann.jpg", "zero.jpg", "degen.jpg"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1
    by_name = {r.file_name: r for r in ds.records}
    assert set(by_name) == {"good1.jpg", "good2.jpg", "zero.jpg", "degen.jpg", "gray.jpg", "pic.png", "noscan.jpg"}
    assert len(by_name["zero.jpg"].annotations) == 1 and len(by_name["degen.jpg"].annotations) == 1
    assert len(by_name["degen.jpg"].annotations[0].polygons) == 1
    assert "data problems:" in ds.problems.summary()

    # The DALI pipeline runs over it: the undecodable "noscan.jpg" is found, reported and replaced,
    # and so is a file deleted after loading.
    os.remove(os.path.join(img_dir, "good1.jpg"))
    loader = DaliTrainLoader(ds, batch_size=2, image_size=64, min_scale=0.5, max_scale=1.5, seed=0)
    seen = set()
    for _ in range(2):
        for batch in loader:
            assert batch["images"].shape == (2, 3, 64, 64)
            seen |= {t["image_id"] for t in batch["targets"]}
            for t in batch["targets"]:
                assert t["labels"].max() < 3 and len(t["labels"]) == len(t["masks"]) == len(t["boxes"])
    assert ds.problems.files(P.CORRUPT_IMAGE) == {"truncated.jpg", "junk.jpg", "noscan.jpg"}
    assert ds.problems.files(P.MISSING_IMAGE) == {"missing.jpg", "good1.jpg"}
    assert not {100 + 0, 100 + 9} & seen  # good1.jpg and noscan.jpg never reach a batch
    assert {100 + 5, 100 + 6} <= seen  # grayscale JPEG and PNG do
    n = len(ds.problems)

    # The fallback too, and the same problems are not reported twice.
    for batch in TorchTrainLoader(ds, batch_size=2, image_size=64, min_scale=0.5, max_scale=1.5, seed=1):
        assert batch["images"].shape == (2, 3, 64, 64)
    assert len(ds.problems) == n


def test_grayscale_image_becomes_rgb(tmp_path):
    json_path, img_dir = _write_hostile(tmp_path)
    ds = load_coco(json_path, img_dir)
    ds.records = [r for r in ds.records if r.file_name == "gray.jpg"]
    batch = next(iter(DaliEvalLoader(ds, batch_size=1, short_side=48, max_size=64)))
    img = batch["images"][0, :, :48, :64]
    assert img.shape[0] == 3 and torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
