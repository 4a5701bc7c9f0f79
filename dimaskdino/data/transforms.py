"""Geometry shared by the DALI pipeline and the PyTorch fallback: LSJ and test-time resize
parameters, the targets (masks, boxes, labels) of an augmented image, and the sample schedule.

The random parameters of an image are drawn in Python from a generator seeded by
(seed, epoch, dataset index), so they do not depend on sharding, batch size or the loader: both
loaders apply the same parameters, DALI to the image, this module to the annotations.

LSJ follows Detectron2's RandomFlip + ResizeScale + FixedSizeCrop (what MaskDINO uses):
- flip with probability 0.5;
- scale ~ U(min_scale, max_scale); the image is resized by
  s = min(scale * S / h, scale * S / w) to (round(h * s), round(w * s)), i.e. it fits in a
  (scale * S) square keeping its aspect ratio;
- crop: offset = round((max(rh - S, 0), max(rw - S, 0)) * u) with ONE u ~ U(0, 1) for both axes
  (as FixedSizeCrop does), then pad bottom/right to S x S.
Test time follows ResizeShortestEdge: short side -> `short_side` unless the long side would pass
`max_size`; sizes rounded with int(x + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dimaskdino._optional import LazyModule
from dimaskdino.data.coco import ImageRecord
from dimaskdino.data.rasterize import masks_to_boxes, rasterize_polygons, xyxy_to_normalized_cxcywh

mask_utils = LazyModule("pycocotools.mask", "decoding RLE masks")  # extra "data"


TRAIN_PAD_VALUE = 128.0  # Detectron2 FixedSizeCrop's pad value (raw pixels)
EVAL_PAD_VALUE = (123.675, 116.28, 103.53)  # pixel mean: zero after normalization, like ImageList


def pad_fill(pad_value) -> list[float]:
    """A pad value (one number or one per RGB channel) as 3 floats."""
    if isinstance(pad_value, (int, float)):
        return [float(pad_value)] * 3
    values = [float(v) for v in pad_value]
    if len(values) != 3:
        raise ValueError(f"pad_value must be a number or 3 numbers, got {pad_value!r}")
    return values


@dataclass(frozen=True)
class Geometry:
    """How an output image is made from a source image of size src_hw.

    The source is resized to resized_hw (x scales by rw / w, y by rh / h), flipped horizontally if
    `flip`, and the window [crop_y, crop_y + vh) x [crop_x, crop_x + vw) of that result (vh, vw =
    valid_hw) lands at the top-left of the output canvas; the rest of the canvas is padding.
    """

    src_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    flip: bool
    crop_yx: tuple[int, int]
    valid_hw: tuple[int, int]

    @property
    def scale_yx(self) -> tuple[float, float]:
        return self.resized_hw[0] / self.src_hw[0], self.resized_hw[1] / self.src_hw[1]

    def source_roi(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(start_yx, end_yx) of the source region that becomes the valid window, before the flip
        (DALI resizes only this region: with scale 2 that is 4x less work than resizing it all)."""
        sy, sx = self.scale_yx
        rw = self.resized_hw[1]
        (oy, ox), (vh, vw) = self.crop_yx, self.valid_hw
        x0 = (rw - ox - vw) if self.flip else ox  # window position in the unflipped resized image
        return (oy / sy, x0 / sx), ((oy + vh) / sy, (x0 + vw) / sx)

    def transform_points(self, xy: np.ndarray) -> np.ndarray:
        """Source pixel coordinates (K, 2) of (x, y) -> output canvas coordinates."""
        sy, sx = self.scale_yx
        x = xy[:, 0] * sx
        if self.flip:
            x = self.resized_hw[1] - x
        return np.stack([x - self.crop_yx[1], xy[:, 1] * sy - self.crop_yx[0]], axis=1)

    def source_pixel_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """For every valid output row / column, the source pixel whose area holds its centre
        (nearest-neighbour resampling of bitmasks, consistent with pixel-centre rasterization)."""
        sy, sx = self.scale_yx
        (h, w), (oy, ox), (vh, vw) = self.src_hw, self.crop_yx, self.valid_hw
        y = (np.arange(vh) + oy + 0.5) / sy
        x = np.arange(vw) + ox + 0.5
        if self.flip:
            x = self.resized_hw[1] - x
        x = x / sx
        rows = np.clip(np.floor(y).astype(np.int64), 0, h - 1)
        cols = np.clip(np.floor(x).astype(np.int64), 0, w - 1)
        return rows, cols


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def resize_scale_size(height: int, width: int, image_size: int, scale: float) -> tuple[int, int]:
    """Detectron2 ResizeScale: fit (scale * image_size) square, keep aspect ratio, np.round."""
    s = min(scale * image_size / height, scale * image_size / width)
    return max(1, int(np.round(height * s))), max(1, int(np.round(width * s)))


def lsj_geometry(
    height: int, width: int, image_size: int, flip: bool, scale: float, crop_u: float
) -> Geometry:
    """LSJ geometry from its three random numbers (see the module docstring)."""
    rh, rw = resize_scale_size(height, width, image_size, scale)
    oy = int(np.round(max(rh - image_size, 0) * crop_u))
    ox = int(np.round(max(rw - image_size, 0) * crop_u))
    valid = (min(rh - oy, image_size), min(rw - ox, image_size))
    return Geometry((height, width), (rh, rw), bool(flip), (oy, ox), valid)


def sample_lsj_geometry(
    rng: np.random.Generator, height: int, width: int, image_size: int, min_scale: float, max_scale: float
) -> Geometry:
    """Draw flip, scale and crop position in Detectron2's order (flip, resize, crop)."""
    flip = rng.random() < 0.5
    scale = rng.uniform(min_scale, max_scale)
    crop_u = rng.random()
    return lsj_geometry(height, width, image_size, flip, scale, crop_u)


def eval_resize_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """Detectron2 ResizeShortestEdge.get_output_shape."""
    scale = short_side / min(height, width)
    if height < width:
        newh, neww = short_side, scale * width
    else:
        newh, neww = scale * height, short_side
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def eval_geometry(height: int, width: int, short_side: int, max_size: int) -> Geometry:
    rh, rw = eval_resize_size(height, width, short_side, max_size)
    return Geometry((height, width), (rh, rw), False, (0, 0), (rh, rw))


def padded_size(sizes: list[tuple[int, int]], divisibility: int) -> tuple[int, int]:
    """Batch canvas: the largest valid size rounded up to a multiple of `divisibility`."""
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    d = max(1, divisibility)
    return int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def instance_masks(record: ImageRecord, geom: Geometry, canvas_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Masks (N, H, W) bool on the output canvas and labels (N,) of the non-crowd instances.

    Polygons are transformed and rasterized at the output resolution; RLE masks are decoded at
    the source resolution and resampled nearest-neighbour through the same geometry.
    """
    anns = [a for a in record.annotations if not a.iscrowd]
    H, W = canvas_hw
    vh, vw = geom.valid_hw
    masks = np.zeros((len(anns), H, W), dtype=bool)
    rle_index = None
    for i, a in enumerate(anns):
        if a.polygons is not None:
            parts = [geom.transform_points(xy) for xy in a.polygons]
            masks[i, :vh, :vw] = rasterize_polygons(parts, vh, vw)
        else:
            if rle_index is None:
                rle_index = geom.source_pixel_indices()
            src = mask_utils.decode(a.rle).astype(bool)
            masks[i, :vh, :vw] = src[np.ix_(rle_index[0], rle_index[1])]
    labels = np.array([a.label for a in anns], dtype=np.int64)
    return masks, labels


def build_target(record: ImageRecord, geom: Geometry, canvas_hw: tuple[int, int]) -> dict:
    """Training/eval target of one image on a canvas (the padded image size).

    Instances whose mask is empty after the augmentation (cropped away, or too small to cover a
    pixel centre) are dropped; boxes are the tight boxes of the remaining masks, normalized cxcywh
    relative to the canvas.
    """
    masks, labels = instance_masks(record, geom, canvas_hw)
    keep = masks.reshape(len(masks), -1).any(axis=1) if len(masks) else np.zeros(0, bool)
    masks, labels = masks[keep], labels[keep]
    boxes = xyxy_to_normalized_cxcywh(masks_to_boxes(masks), canvas_hw[0], canvas_hw[1])
    return {
        "labels": labels,
        "boxes": boxes,
        "masks": masks,
        "image_id": record.image_id,
        "orig_size": (record.height, record.width),
    }


# ---------------------------------------------------------------------------------------------
# Schedule: which dataset indices each rank reads, batch by batch
# ---------------------------------------------------------------------------------------------


class Schedule:
    """Deterministic epochs of batches for one shard.

    shuffle=True (training): epoch e is a permutation seeded by (seed, e), wrapped to a multiple
    of num_shards so every rank gets the same number of samples, then strided by rank; the last
    incomplete batch is dropped so every rank runs the same number of steps. Every rank must pass
    the same seed (the permutation is shared; the shards are its strides).
    shuffle=False (evaluation): rank r reads indices r, r + n, ...; the last batch may be short.
    """

    def __init__(self, num_items: int, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_items, self.batch_size = num_items, batch_size
        self.shard_id, self.num_shards = shard_id, num_shards
        self.seed, self.shuffle = seed, shuffle
        if shuffle:
            per_shard = math.ceil(num_items / num_shards)
            self.batches_per_epoch = per_shard // batch_size
            if self.batches_per_epoch == 0:
                raise ValueError(
                    f"{num_items} usable images are fewer than batch_size ({batch_size}) x "
                    f"num_shards ({num_shards}): no full training batch"
                )
        else:
            per_shard = len(range(shard_id, num_items, num_shards))
            self.batches_per_epoch = math.ceil(per_shard / batch_size)

    def shard_indices(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.shard_id, self.num_items, self.num_shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        total = math.ceil(self.num_items / self.num_shards) * self.num_shards
        order = np.resize(order, total)  # wraps around: repeats the first few
        return order[self.shard_id :: self.num_shards]

    def batch(self, epoch: int, index: int) -> np.ndarray:
        idx = self.shard_indices(epoch)
        return idx[index * self.batch_size : (index + 1) * self.batch_size]

    def sample_rng(self, epoch: int, dataset_index: int) -> np.random.Generator:
        """Generator of one sample's augmentation: independent of shard, batch and loader."""
        return np.random.default_rng([self.seed, epoch, int(dataset_index), 0x15A])


# Tests and experiments may force the geometry of a sample: fn(record, rng) -> Geometry.
GeometryFn = Callable[[ImageRecord, np.random.Generator], Geometry]


@dataclass(frozen=True)
class lsj_sampler:  # noqa: N801 (a picklable function object: DataLoader workers may be spawned)
    """GeometryFn drawing LSJ parameters for a record."""

    image_size: int
    min_scale: float
    max_scale: float

    def __call__(self, record: ImageRecord, rng: np.random.Generator) -> Geometry:
        return sample_lsj_geometry(rng, record.height, record.width, self.image_size, self.min_scale, self.max_scale)


# ---------------------------------------------------------------------------------------------
# Batch plans: everything about a batch except pixels, shared by both loaders
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedSample:
    index: int  # dataset index
    record: ImageRecord
    geom: Geometry


@dataclass(frozen=True)
class PlannedBatch:
    position: int  # global batch counter of the stream: epoch * batches_per_epoch + batch
    epoch: int
    samples: tuple[PlannedSample, ...]
    canvas_hw: tuple[int, int]


class BatchPlanner:
    """Which images, with which geometry, on which canvas, for stream position g.

    Training (geometry_fn given): LSJ geometry per sample, canvas image_size x image_size.
    Evaluation (geometry_fn None): test-time resize, canvas = batch maximum rounded up to
    size_divisibility. `bad` holds dataset indices found undecodable while running; each is
    replaced by the next good index (deterministically), so a bad file costs no crash.
    """

    def __init__(self, records: list[ImageRecord], schedule: Schedule, *,
                 geometry_fn: GeometryFn | None = None, image_size: int | None = None,
                 short_side: int = 800, max_size: int = 1333, size_divisibility: int = 32):
        if geometry_fn is not None and image_size is None:
            raise ValueError("training plans need image_size")
        self.records, self.schedule = records, schedule
        self.geometry_fn, self.image_size = geometry_fn, image_size
        self.short_side, self.max_size = short_side, max_size
        self.size_divisibility = size_divisibility
        self.bad: set[int] = set()

    @property
    def train(self) -> bool:
        return self.geometry_fn is not None

    def substitute(self, index: int) -> int:
        """`index`, or the next good one when it was found undecodable."""
        n = len(self.records)
        for step in range(n):
            j = (index + step) % n
            if j not in self.bad:
                return j
        raise RuntimeError("every image of the dataset failed to decode")

    def planned_sample(self, index: int, epoch: int) -> PlannedSample:
        r = self.records[index]
        if self.train:
            geom = self.geometry_fn(r, self.schedule.sample_rng(epoch, index))
        else:
            geom = eval_geometry(r.height, r.width, self.short_side, self.max_size)
        return PlannedSample(index, r, geom)

    def plan(self, position: int) -> PlannedBatch:
        epoch, b = divmod(position, self.schedule.batches_per_epoch)
        samples = [self.planned_sample(self.substitute(int(i)), epoch) for i in self.schedule.batch(epoch, b)]
        if self.train:
            canvas = (self.image_size, self.image_size)
        else:
            canvas = padded_size([s.geom.valid_hw for s in samples], self.size_divisibility)
        return PlannedBatch(position, epoch, tuple(samples), canvas)


def target_to_torch(target: dict, resized_size: tuple[int, int] | None = None) -> dict:
    """numpy target -> the format the model and criterion expect. Evaluation targets also get
    "resized_size": predictions on the canvas map back to original pixels by cropping to
    resized_size and scaling by orig_size / resized_size."""
    import torch

    out = {
        "labels": torch.from_numpy(np.ascontiguousarray(target["labels"], dtype=np.int64)),
        "boxes": torch.from_numpy(np.ascontiguousarray(target["boxes"], dtype=np.float32)),
        "masks": torch.from_numpy(np.ascontiguousarray(target["masks"], dtype=bool)),
        "image_id": int(target["image_id"]),
        "orig_size": tuple(int(v) for v in target["orig_size"]),
    }
    if resized_size is not None:
        out["resized_size"] = tuple(int(v) for v in resized_size)
    return out
