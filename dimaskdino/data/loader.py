"""Loader selection and the plain-PyTorch fallback.

    loader = build_train_loader(dataset, backend="dali", batch_size=..., image_size=..., ...)
    loader = build_eval_loader(dataset, backend="dali", batch_size=..., short_side=..., max_size=...)

backend "dali" (default) is `dali.DaliTrainLoader` / `dali.DaliEvalLoader`. backend "torch" is a
documented fallback for machines where DALI cannot run: a torch.utils.data loader over the same
batch plans (same images, same random geometry, same targets; `transforms.BatchPlanner`), with
Pillow decoding and `F.interpolate(bilinear, antialias=True)` resizing. Targets are identical to
DALI's; pixels differ by decoder and resampler rounding (a few levels at edges). It is selected
explicitly only, and says so once in the log.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dimaskdino._optional import MissingOptionalDependency, import_optional
from dimaskdino.data import problems as P
from dimaskdino.data.coco import CocoDataset
from dimaskdino.data.problems import DataProblems
from dimaskdino.data.transforms import (
    BatchPlanner,
    GeometryFn,
    Geometry,
    PlannedSample,
    Schedule,
    EVAL_PAD_VALUE,
    TRAIN_PAD_VALUE,
    build_target,
    lsj_sampler,
    pad_fill,
    target_to_torch,
)

logger = logging.getLogger("dimaskdino.data")

BACKENDS = ("dali", "torch")
_fallback_reported = False


def _report_fallback() -> None:
    global _fallback_reported
    if not _fallback_reported:
        _fallback_reported = True
        logger.warning("data: using the PyTorch fallback loader (backend='torch'), not DALI: "
                       "same augmentation and targets, slower decoding and resizing")


def decode_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) with Pillow, EXIF orientation applied (as DALI's decoder does)."""
    image_ops = import_optional("PIL.ImageOps", "the PyTorch fallback loader (image decoding)")  # Pillow
    Image, ImageOps = image_ops.Image, image_ops
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.array(im.convert("RGB"))


def render_image(image: np.ndarray, geom: Geometry, canvas_hw: tuple[int, int], fill) -> torch.Tensor:
    """uint8 HWC source -> float32 (3, H, W) canvas: resize, flip, crop, pad (as the DALI graph)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) != geom.resized_hw:
        x = F.interpolate(x, size=geom.resized_hw, mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp_(0, 255)  # DALI resizes to uint8
    if geom.flip:
        x = x.flip(-1)
    (oy, ox), (vh, vw) = geom.crop_yx, geom.valid_hw
    out = torch.empty((3, *canvas_hw), dtype=torch.float32)
    out[:] = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1)
    out[:, :vh, :vw] = x[0, :, oy : oy + vh, ox : ox + vw]
    return out


class _BatchDataset(torch.utils.data.Dataset):
    """Item g = the whole batch at stream position g (decoded in the worker)."""

    def __init__(self, planner: BatchPlanner, fill: list[float]):
        self.planner, self.fill = planner, fill

    def __len__(self) -> int:  # positions are unbounded; the sampler decides
        return 1 << 62

    def _decode_or_substitute(self, sample: PlannedSample, problems: DataProblems, epoch: int):
        planner = self.planner
        for _ in range(len(planner.records)):
            try:
                return sample, decode_image(sample.record.path)
            except FileNotFoundError as e:
                problems.add(P.MISSING_IMAGE, sample.record.file_name, f"{e}; skipped")
            except Exception as e:  # Pillow raises several types for bad files
                problems.add(P.CORRUPT_IMAGE, sample.record.file_name, f"could not decode ({e}); skipped")
            planner.bad.add(sample.index)
            sample = planner.planned_sample(planner.substitute(sample.index), epoch)
        raise RuntimeError("no image of the dataset could be decoded")

    def __getitem__(self, position: int) -> dict:
        plan = self.planner.plan(position)
        problems = DataProblems(log=P.SILENT)  # the loader merges them into the dataset's (and logs)
        images, image_sizes, targets = [], [], []
        for s in plan.samples:
            s, image = self._decode_or_substitute(s, problems, plan.epoch)
            canvas = plan.canvas_hw
            if not self.planner.train:  # a substitute may be larger than the planned canvas
                canvas = (max(canvas[0], s.geom.valid_hw[0]), max(canvas[1], s.geom.valid_hw[1]))
            images.append(render_image(image, s.geom, canvas, self.fill))
            image_sizes.append(tuple(s.geom.valid_hw))
            target = build_target(s.record, s.geom, canvas)
            targets.append(target_to_torch(target, None if self.planner.train else s.geom.resized_hw))
        shape = (max(i.shape[1] for i in images), max(i.shape[2] for i in images))
        if any(tuple(i.shape[1:]) != shape for i in images):  # only after a substitution
            images, targets = _pad_all(images, targets, shape, self.fill)
        return {"images": torch.stack(images), "image_sizes": image_sizes, "targets": targets,
                "_problems": problems.problems()}


def _pad_all(images, targets, shape, fill):
    out_images, out_targets = [], []
    for img, t in zip(images, targets):
        canvas = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1).expand(3, *shape).clone()
        canvas[:, : img.shape[1], : img.shape[2]] = img
        masks = torch.zeros((len(t["masks"]), *shape), dtype=torch.bool)
        masks[:, : img.shape[1], : img.shape[2]] = t["masks"]
        boxes = t["boxes"].clone()
        boxes[:, 0::2] *= img.shape[2] / shape[1]
        boxes[:, 1::2] *= img.shape[1] / shape[0]
        out_images.append(canvas)
        out_targets.append({**t, "masks": masks, "boxes": boxes})
    return out_images, out_targets


def _as_is(batch: dict) -> dict:
    return batch  # items are whole batches already; default_convert would turn tuples into lists


class _TorchLoader:
    def __init__(self, dataset: CocoDataset, planner: BatchPlanner, pad_value, num_workers: int):
        _report_fallback()
        self.dataset, self.planner, self.problems = dataset, planner, dataset.problems
        self._data = _BatchDataset(planner, pad_fill(pad_value))
        self.num_workers = num_workers

    def __len__(self) -> int:
        return self.planner.schedule.batches_per_epoch

    def _batches(self, positions: list[int]) -> Iterator[dict]:
        loader = torch.utils.data.DataLoader(self._data, batch_size=None, sampler=positions,
                                             num_workers=self.num_workers, collate_fn=_as_is)
        for batch in loader:
            for p in batch.pop("_problems"):
                self.problems.add(p.kind, p.file, p.detail)
                self._mark_bad(p.file)
            yield batch

    def _mark_bad(self, file_name: str) -> None:
        """Keep the main process's plans in step with a worker's substitution."""
        for i, r in enumerate(self.planner.records):
            if r.file_name == file_name:
                self.planner.bad.add(i)


class TorchTrainLoader(_TorchLoader):
    """Fallback twin of `dali.DaliTrainLoader` (same arguments, plus num_workers)."""

    def __init__(self, dataset: CocoDataset, *, batch_size: int, image_size: int, min_scale: float,
                 max_scale: float, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 pad_value=TRAIN_PAD_VALUE, start_epoch: int = 0, start_batch: int = 0,
                 geometry_fn: GeometryFn | None = None, num_workers: int = 0, **_ignored):
        schedule = Schedule(len(dataset.records), batch_size, shard_id, num_shards, seed, shuffle=True)
        planner = BatchPlanner(dataset.records, schedule,
                               geometry_fn=geometry_fn or lsj_sampler(image_size, min_scale, max_scale),
                               image_size=image_size)
        super().__init__(dataset, planner, pad_value, num_workers)
        self.position = start_epoch * len(self) + start_batch

    @property
    def epoch(self) -> int:
        return self.position // len(self)

    def __iter__(self) -> Iterator[dict]:
        end = (self.epoch + 1) * len(self)
        for batch in self._batches(list(range(self.position, end))):
            self.position += 1
            yield batch


class TorchEvalLoader(_TorchLoader):
    """Fallback twin of `dali.DaliEvalLoader`."""

    def __init__(self, dataset: CocoDataset, *, batch_size: int, short_side: int, max_size: int,
                 size_divisibility: int = 32, shard_id: int = 0, num_shards: int = 1,
                 pad_value=EVAL_PAD_VALUE, num_workers: int = 0, **_ignored):
        schedule = Schedule(len(dataset.records), batch_size, shard_id, num_shards, 0, shuffle=False)
        planner = BatchPlanner(dataset.records, schedule, short_side=short_side, max_size=max_size,
                               size_divisibility=size_divisibility)
        super().__init__(dataset, planner, pad_value, num_workers)

    def __iter__(self) -> Iterator[dict]:
        yield from self._batches(list(range(len(self))))


@functools.lru_cache(maxsize=None)
def dali_missing() -> str | None:
    """None when NVIDIA DALI imports, else why not (it is the optional extra "dali")."""
    try:
        import_optional("nvidia.dali.pipeline", "the DALI data pipeline (data.loader=dali)")
    except MissingOptionalDependency as error:
        return str(error)
    return None


def _available_backend(backend: str) -> str:
    """`backend`, or "torch" with one warning where "dali" was asked for but DALI is not installed
    (a CPU user need not download DALI's CUDA libraries to run the demo)."""
    if backend == "dali" and dali_missing() is not None:
        _warn_dali_missing_once()
        return "torch"
    return backend


@functools.lru_cache(maxsize=None)
def _warn_dali_missing_once() -> None:
    logger.warning("data: %s; using the PyTorch fallback loader (data.loader=torch)", dali_missing())


def build_train_loader(dataset: CocoDataset, *, backend: str = "dali", **kwargs):
    """Training loader; kwargs as `dali.DaliTrainLoader` (device_id and num_threads are DALI's,
    num_workers the fallback's)."""
    backend = _available_backend(backend)
    if backend == "dali":
        from dimaskdino.data.dali import DaliTrainLoader

        kwargs.pop("num_workers", None)
        return DaliTrainLoader(dataset, **kwargs)
    if backend == "torch":
        return TorchTrainLoader(dataset, **kwargs)
    raise ValueError(f"data backend must be one of {BACKENDS}, got {backend!r}")


def build_eval_loader(dataset: CocoDataset, *, backend: str = "dali", **kwargs):
    """Evaluation loader; kwargs as `dali.DaliEvalLoader`."""
    backend = _available_backend(backend)
    if backend == "dali":
        from dimaskdino.data.dali import DaliEvalLoader

        kwargs.pop("num_workers", None)
        return DaliEvalLoader(dataset, **kwargs)
    if backend == "torch":
        return TorchEvalLoader(dataset, **kwargs)
    raise ValueError(f"data backend must be one of {BACKENDS}, got {backend!r}")
