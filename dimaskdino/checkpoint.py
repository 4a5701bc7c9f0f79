"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A checkpoint is a folder `step_XXXXXXXX` holding the DCP shards of the model and optimizer state
and `meta.json` (step, epoch, position in the epoch, the config, the category mapping). It is
written under `step_XXXXXXXX.tmp` and renamed only when every rank has finished and meta.json is
on disk, so a crash at any moment leaves either the previous checkpoint or the new one, never a
half-written folder that resume would pick. DCP reshards on load, so a run resumes on a different
world size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dimaskdino.dist import barrier

_NAME = re.compile(r"step_(\d{8})")
META_FILE = "meta.json"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durably(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (unfinished `.tmp` folders are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / META_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the latest one in a checkpoints folder or a training output
    folder (which keeps them in `checkpoints/`)."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    for directory in (path, path / "checkpoints"):
        latest = latest_checkpoint(directory)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at {path} (expected a step_XXXXXXXX folder with {META_FILE}, or a folder containing them)")


def save_checkpoint(directory: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], keep: int = 2, extra: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final folder. extra: further training state
    (tensors, the same on every rank, e.g. the inter-scene queue) saved with the weights."""
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    staging = directory / f"step_{step:08d}.tmp"
    if _is_main():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left over from a crash
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if extra:
        state["extra"] = extra
    dcp.save(state, checkpoint_id=str(staging))
    barrier()
    if _is_main():
        _write_json_durably(staging / META_FILE, dict(meta, step=step))
        _fsync_dir(staging)
        if final.exists():  # the same step saved again (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(directory)
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    with open(path / META_FILE) as f:
        return json.load(f)


def load_checkpoint_extra(path: str | os.PathLike, extra: dict[str, Any]) -> None:
    """Loads the `extra` state of save_checkpoint in place (tensors of the shapes saved)."""
    path = resolve_checkpoint(path)
    try:
        dcp.load({"extra": extra}, checkpoint_id=str(path))
    except Exception as error:  # e.g. a checkpoint saved with the switch off, or another queue size
        raise ValueError(f"checkpoint {path}: cannot restore its {', '.join(extra)} state: {error}") from error


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Collective when distributed. Loads model (and optimizer) state in place, resharding as
    needed; returns meta.json. A weights-only checkpoint (meta "weights_only", e.g. one written by
    `python -m dimaskdino.convert`) loads into the model and leaves the optimizer fresh: resuming
    from it fine-tunes from step 0."""
    path = resolve_checkpoint(path)
    if optimizer is None or read_meta(path).get("weights_only", False):
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return read_meta(path)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, config, CategoryMap) from a checkpoint, in one process."""
    from dimaskdino.config import config_from_dict
    from dimaskdino.data.coco import CategoryMap
    from dimaskdino.model import build_model

    path = resolve_checkpoint(path)
    meta = read_meta(path)
    cfg = config_from_dict(meta["config"])
    # The training-only extras (hybrid heads, instance-unique querying) are not built: inference
    # never runs them, and loading a subset of the saved weights is what DCP does anyway.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, hybrid_heads=(), hybrid_masks=False, inter_scene=False, equivariance=False))
    model = build_model(cfg)
    state = {"model": get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    category_map = CategoryMap.from_state_dict(meta["categories"])
    return model.to(device).eval(), cfg, category_map
