"""DALI loaders: training (LSJ) and evaluation (test-time resize) batches for DI-MaskDINO.

    loader = DaliTrainLoader(dataset, batch_size=16, image_size=1024, min_scale=0.1, max_scale=2.0,
                             seed=0, shard_id=rank, num_shards=world)  # device_id="auto"
    for epoch in range(epochs):
        for batch in loader:            # one epoch: len(loader) batches
            batch["images"]             # float32 (B, 3, S, S) RGB 0..255, on the GPU when decoding there
            batch["image_sizes"]        # [(h, w)] valid region of each image
            batch["targets"]            # [{"labels", "boxes", "masks", "image_id", "orig_size"}] (CPU)

Why an external source rather than `fn.readers.coco`: the masks must be rasterized in project
code at the augmented resolution (DALI has no polygon-to-mask operator), bad files must be
reported and skipped rather than fail the pipeline, and the PyTorch fallback must apply the very
same augmentation. So the random parameters and the targets are made in Python
(`transforms.BatchPlanner`, `transforms.build_target`) and DALI does the pixel work: decode
(nvJPEG "mixed" on a GPU, CPU otherwise), resize of just the source region that survives the crop
(linear, antialiased), flip, pad to the canvas, HWC uint8 -> CHW float32. The targets travel
through the pipeline beside the encoded image, which keeps them aligned with their image whatever
DALI prefetches.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np
import torch

from dimaskdino._optional import import_optional
from dimaskdino.data import problems as P
from dimaskdino.data.coco import CocoDataset
from dimaskdino.data.problems import DataProblems
from dimaskdino.data.transforms import (
    EVAL_PAD_VALUE,
    TRAIN_PAD_VALUE,
    BatchPlanner,
    GeometryFn,
    PlannedBatch,
    Schedule,
    build_target,
    lsj_sampler,
    pad_fill,
    target_to_torch,
)

logger = logging.getLogger("dimaskdino.data")

_META = 7  # position, epoch, image_id, orig_h, orig_w, valid_h, valid_w


def resolve_device_id(device_id) -> int | None:
    """"auto": the current CUDA device when there is one (decode with nvJPEG, images come out on
    it; under torchrun call torch.cuda.set_device(local_rank) first), else None (CPU)."""
    if device_id == "auto":
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if device_id is not None and not isinstance(device_id, int):
        raise ValueError(f"device_id must be 'auto', None (CPU) or a CUDA device index, got {device_id!r}")
    return device_id


class _Source:
    """External-source callable: one planned batch per call, stream positions g, g + 1, ..."""

    def __init__(self, planner: BatchPlanner, start: int, problems: DataProblems):
        self.planner, self.problems = planner, problems
        self.position = start
        self.files: dict[int, list[tuple[int, str]]] = {}  # position -> (index, file) for errors

    def _read(self, position: int) -> tuple[PlannedBatch, list[np.ndarray]]:
        """The plan and its encoded files; a file that became unreadable since loading is
        reported and replaced (the plan is made again without it)."""
        while True:
            plan = self.planner.plan(position)
            try:
                return plan, [np.fromfile(s.record.path, dtype=np.uint8) for s in plan.samples]
            except OSError:
                gone = [s for s in plan.samples if not os.access(s.record.path, os.R_OK)]
                if not gone:
                    raise
                for s in gone:
                    self.planner.bad.add(s.index)
                    self.problems.add(P.MISSING_IMAGE, s.record.file_name, f"{s.record.path} unreadable; skipped")

    def __call__(self):
        plan, encoded = self._read(self.position)
        self.files[plan.position] = [(s.index, s.record.path) for s in plan.samples]
        self.files.pop(plan.position - 16, None)
        self.position += 1
        return _encode_plan(plan, encoded)


def _encode_plan(plan: PlannedBatch, encoded: list[np.ndarray]) -> tuple[list, ...]:
    """The external source's 11 columns (see _build_pipeline) for one planned batch."""
    cols: tuple[list, ...] = tuple([] for _ in range(11))
    for s, data in zip(plan.samples, encoded):
        g = s.geom
        target = build_target(s.record, g, plan.canvas_hw)
        roi_start, roi_end = g.source_roi()
        values = (
            data,
            np.asarray(g.valid_hw, np.float32),
            np.asarray(roi_start, np.float32),
            np.asarray(roi_end, np.float32),
            np.asarray(int(g.flip), np.int32),
            np.asarray(plan.canvas_hw[0], np.float32),
            np.asarray(plan.canvas_hw[1], np.float32),
            target["masks"].view(np.uint8),
            target["labels"],
            target["boxes"],
            np.asarray([plan.position, plan.epoch, s.record.image_id, s.record.height, s.record.width,
                        *g.valid_hw], np.int64),
        )
        for col, v in zip(cols, values):
            col.append(v)
    return cols


DALI_FEATURE = "the DALI data pipeline (data.loader=dali)"


def _dali():
    """nvidia.dali's fn and types modules and its Pipeline class (the optional extra "dali")."""
    fn = import_optional("nvidia.dali.fn", DALI_FEATURE)
    types = import_optional("nvidia.dali.types", DALI_FEATURE)
    return fn, types, import_optional("nvidia.dali.pipeline", DALI_FEATURE).Pipeline


def _build_pipeline(source: _Source, *, batch_size: int, device_id: int | None, num_threads: int,
                    pad_value, prefetch: int, seed: int):
    fn, types, Pipeline = _dali()

    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    prefetch_queue_depth=prefetch, seed=seed)
    with pipe:
        (encoded, size, roi_start, roi_end, flip, canvas_h, canvas_w, masks, labels, boxes, meta) = (
            fn.external_source(
                source=source, num_outputs=11, batch=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT,
                       types.FLOAT, types.UINT8, types.INT64, types.FLOAT, types.INT64],
                ndim=[1, 1, 1, 1, 0, 0, 0, 3, 1, 2, 1],
            )
        )
        image = fn.decoders.image(encoded, device="mixed" if device_id is not None else "cpu",
                                  output_type=types.RGB)
        image = fn.resize(image, size=size, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                          interp_type=types.INTERP_LINEAR, antialias=True)
        image = fn.flip(image, horizontal=flip)
        # Pads bottom/right to the canvas (crop window at 0, 0 larger than the image).
        image = fn.crop_mirror_normalize(
            image, crop_h=canvas_h, crop_w=canvas_w, crop_pos_x=0.0, crop_pos_y=0.0,
            out_of_bounds_policy="pad", fill_values=pad_fill(pad_value),
            output_layout="CHW", dtype=types.FLOAT,
        )
        pipe.set_outputs(image, masks, labels, boxes, meta)
    pipe.build()
    return pipe


def _images_to_torch(images, device_id: int | None) -> torch.Tensor:
    feed_ndarray = import_optional("nvidia.dali.plugin.pytorch", DALI_FEATURE).feed_ndarray

    dense = images.as_tensor()
    shape = tuple(dense.shape())
    if device_id is None:
        out = torch.empty(shape, dtype=torch.float32)
        feed_ndarray(dense, out)
    else:
        out = torch.empty(shape, dtype=torch.float32, device=torch.device("cuda", device_id))
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device))
    return out


def _sample(tensor_list, i: int) -> np.ndarray:
    return np.array(tensor_list[i])  # copy: DALI reuses its output buffers


class _DaliLoader:
    """Shared machinery: pipeline around a planner, position checks, bad-file recovery."""

    def __init__(self, dataset: CocoDataset, planner: BatchPlanner, *, batch_size: int,
                 device_id: int | None, num_threads: int, pad_value, prefetch: int, seed: int):
        self.dataset, self.planner = dataset, planner
        self.problems = dataset.problems
        self.batch_size, self.device_id = batch_size, resolve_device_id(device_id)
        self.num_threads, self.pad_value = num_threads, pad_value
        self.prefetch, self.seed = prefetch, seed
        self._pipe = None
        self._source: _Source | None = None

    def __len__(self) -> int:
        return self.planner.schedule.batches_per_epoch

    def _start(self, position: int) -> None:
        self._source = _Source(self.planner, position, self.problems)
        self._pipe = _build_pipeline(self._source, batch_size=self.batch_size, device_id=self.device_id,
                                     num_threads=self.num_threads, pad_value=self.pad_value,
                                     prefetch=self.prefetch, seed=self.seed)

    def _run(self, position: int):
        """Outputs of stream position `position`; (re)starts the pipeline when it is elsewhere."""
        for attempt in range(self.batch_size + 2):
            if self._pipe is None:
                self._start(position)
            try:
                outputs = self._pipe.run()
            except RuntimeError as e:
                self._recover(position, e)
                continue
            got = int(np.array(outputs[4][0])[0])
            if got == position:
                return outputs
            self._pipe = None  # the stream was left mid-way (e.g. an abandoned evaluation)
        raise RuntimeError(f"DALI pipeline could not produce batch {position}")

    def _recover(self, position: int, error: RuntimeError) -> None:
        """A decode failure invalidates the pipeline: find the bad file(s) of the batches in
        flight, report them, exclude them from the plans, restart at `position`."""
        files = [f for g in sorted(self._source.files) if g >= position for f in self._source.files[g]]
        bad = [(i, path) for i, path in files if not _decodes(path)]
        self._pipe = None
        if not bad:
            names = ", ".join(path for _, path in files)
            raise RuntimeError(f"DALI pipeline failed on a batch of files [{names}]: {error}") from error
        for i, path in bad:
            self.planner.bad.add(i)
            self.problems.add(P.CORRUPT_IMAGE, self.dataset.records[i].file_name,
                              f"DALI could not decode {path}; skipped")

    def _batch(self, position: int) -> dict:
        images, masks, labels, boxes, meta = self._run(position)
        plan_train = self.planner.train
        image_tensor = _images_to_torch(images, self.device_id)
        image_sizes, targets = [], []
        for i in range(len(meta)):
            m = _sample(meta, i)
            valid = (int(m[5]), int(m[6]))
            image_sizes.append(valid)
            target = {
                "labels": _sample(labels, i),
                "boxes": _sample(boxes, i),
                "masks": _sample(masks, i).view(bool),
                "image_id": int(m[2]),
                "orig_size": (int(m[3]), int(m[4])),
            }
            # Eval has no crop: the valid region is the whole resized image.
            targets.append(target_to_torch(target, None if plan_train else valid))
        return {"images": image_tensor, "image_sizes": image_sizes, "targets": targets}


def _decodes(path: str) -> bool:
    """Whether DALI's CPU decoder can decode one file (used only after a pipeline failure)."""
    fn, types, Pipeline = _dali()

    try:
        data = np.fromfile(path, dtype=np.uint8)
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
        with pipe:
            enc = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8, ndim=1)
            pipe.set_outputs(fn.decoders.image(enc, device="cpu", output_type=types.RGB))
        pipe.build()
        pipe.run()
        return True
    except Exception:
        return False


class DaliTrainLoader(_DaliLoader):
    """Training batches with LSJ, one epoch per `iter()`, sharded by rank.

    The stream is deterministic in (seed, epoch, dataset index): a run resumed with
    start_epoch / start_batch sees the batches it would have seen. `geometry_fn` (tests) forces
    the augmentation: fn(record, rng) -> transforms.Geometry.
    """

    def __init__(self, dataset: CocoDataset, *, batch_size: int, image_size: int, min_scale: float,
                 max_scale: float, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 device_id: int | str | None = "auto", num_threads: int = 2, pad_value=TRAIN_PAD_VALUE,
                 start_epoch: int = 0, start_batch: int = 0, prefetch: int = 2,
                 geometry_fn: GeometryFn | None = None):
        schedule = Schedule(len(dataset.records), batch_size, shard_id, num_shards, seed, shuffle=True)
        planner = BatchPlanner(dataset.records, schedule,
                               geometry_fn=geometry_fn or lsj_sampler(image_size, min_scale, max_scale),
                               image_size=image_size)
        super().__init__(dataset, planner, batch_size=batch_size, device_id=device_id,
                         num_threads=num_threads, pad_value=pad_value, prefetch=prefetch, seed=seed)
        self.position = start_epoch * len(self) + start_batch

    @property
    def epoch(self) -> int:
        return self.position // len(self)

    def __iter__(self) -> Iterator[dict]:
        end = (self.epoch + 1) * len(self)
        while self.position < end:
            batch = self._batch(self.position)
            self.position += 1
            yield batch


class DaliEvalLoader(_DaliLoader):
    """Evaluation batches: test-time resize (short side `short_side`, long side at most
    `max_size`), no augmentation, images padded to a multiple of `size_divisibility`.

    Each target also has "resized_size" (h, w): predictions on the canvas map back to original
    pixels by cropping to resized_size and scaling by orig_size / resized_size.
    Rank r of n reads images r, r + n, ...; every `iter()` is one full pass.
    """

    def __init__(self, dataset: CocoDataset, *, batch_size: int, short_side: int, max_size: int,
                 size_divisibility: int = 32, shard_id: int = 0, num_shards: int = 1,
                 device_id: int | str | None = "auto", num_threads: int = 2, pad_value=EVAL_PAD_VALUE,
                 prefetch: int = 2):
        schedule = Schedule(len(dataset.records), batch_size, shard_id, num_shards, 0, shuffle=False)
        planner = BatchPlanner(dataset.records, schedule, short_side=short_side, max_size=max_size,
                               size_divisibility=size_divisibility)
        super().__init__(dataset, planner, batch_size=batch_size, device_id=device_id,
                         num_threads=num_threads, pad_value=pad_value, prefetch=prefetch, seed=0)
        self._passes = 0

    def __iter__(self) -> Iterator[dict]:
        if len(self) == 0:
            return
        start = self._passes * len(self)
        self._passes += 1
        for b in range(len(self)):
            yield self._batch(start + b)
