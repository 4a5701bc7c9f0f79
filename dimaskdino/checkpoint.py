"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically and verified.

A checkpoint is a folder `step_XXXXXXXX` holding the DCP shards of the model and optimizer state,
`manifest.json` (size and CRC-32 of every other file) and `meta.json` (step, epoch, position in
the epoch, the config, the category mapping). It is written under `step_XXXXXXXX.tmp` and renamed
only when every rank has finished and meta.json is on disk, so a crash at any moment leaves either
the previous checkpoint or the new one, never a half-written folder that resume would pick. DCP
reshards on load, so a run resumes on a different world size.

Before loading, the files are checked against the manifest (a truncated or damaged shard is found
before DCP reads it); `find_resumable` falls back to the newest checkpoint that verifies and says
so. A state with a non-finite number is never written (`save_checkpoint` returns None). DCP's
errors (its CheckpointException is a BaseException, not an Exception) become one-line
`CheckpointError`s.

DCP's reader unpickles the `.metadata` file: load training checkpoints only from trusted sources.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dimaskdino.cli import CliError
from dimaskdino.dist import barrier

logger = logging.getLogger("dimaskdino.checkpoint")

_NAME = re.compile(r"step_(\d{8})(\.old)?")
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"


class CheckpointError(CliError):
    """A checkpoint that cannot be read or written; the message names it and says why."""


@contextmanager
def _dcp_errors(action: str, path: Path):
    """DCP failures as one line: its CheckpointException (a BaseException) holds each rank's
    exception with a traceback; the first rank's exception is the message."""
    try:
        yield
    except CheckpointException as error:
        rank, (cause, _) = next(iter(sorted(error.failures.items())))
        raise CheckpointError(f"cannot {action} checkpoint {path}: {type(cause).__name__}: {cause} (rank {rank})") from None
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot {action} checkpoint {path}: {type(error).__name__}: {error}") from None


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


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(folder: Path) -> None:
    """Size and CRC-32 of every file of a checkpoint being written (zlib's CRC runs at GB/s)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST_FILE, META_FILE))
    manifest = {str(p.relative_to(folder)): {"size": p.stat().st_size, "crc32": _file_crc32(p)} for p in files}
    _write_json_durably(folder / MANIFEST_FILE, {"files": manifest})


def verification_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint folder does not match its manifest (a missing, truncated or changed
    file), or None when it does. A checkpoint without a manifest (written before manifests
    existed) cannot be checked: None, with a warning."""
    path = Path(path)
    if not (path / META_FILE).exists():
        return f"no {META_FILE} (not a complete checkpoint)"
    try:
        with open(path / MANIFEST_FILE) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        logger.warning("checkpoint %s has no %s: its files cannot be verified", path, MANIFEST_FILE)
        return None
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST_FILE} ({error})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
    for name, expected in files.items():  # sizes first: a truncated file is found without reading
        if _file_crc32(path / name) != expected["crc32"]:
            return f"{name} differs from the manifest (CRC-32 mismatch)"
    return None


_verified: set[Path] = set()  # checkpoints this process has verified (loading verifies once)


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder, or CheckpointError when it does not match its manifest."""
    path = Path(path).resolve()
    if path not in _verified:
        problem = verification_problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        _verified.add(path)
    return path


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (unfinished `.tmp` folders are ignored;
    a `.old` folder, the previous copy during a re-save of the same step, counts only when the
    re-save did not finish)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found: dict[str, Path] = {}
    for p in directory.iterdir():
        match = _NAME.fullmatch(p.name)
        if match and p.is_dir() and (p / META_FILE).exists():
            if match.group(2) is None or match.group(1) not in found:
                found[match.group(1)] = p
    return [found[step] for step in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def find_resumable(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `directory` that verifies; each newer one that does not is
    reported (once, by rank 0) and skipped. None when there is none."""
    checkpoints = list_checkpoints(directory)
    for i, path in enumerate(reversed(checkpoints)):
        problem = verification_problem(path)
        if problem is None:
            _verified.add(path.resolve())
            return path
        if _is_main():
            older = checkpoints[-i - 2].name if i + 1 < len(checkpoints) else None
            logger.warning("checkpoint %s is damaged (%s): %s", path, problem,
                           f"falling back to {older}" if older else "no older checkpoint")
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself (verified), or the newest verifying one in a checkpoints folder
    or a training output folder (which keeps them in `checkpoints/`)."""
    path = Path(path)
    if (path / META_FILE).exists():
        return verify_checkpoint(path)
    for directory in (path, path / "checkpoints"):
        if list_checkpoints(directory):
            found = find_resumable(directory)
            if found is None:
                raise CheckpointError(f"no checkpoint in {directory} verifies (each is damaged; see the warnings)")
            return verify_checkpoint(found)
    raise FileNotFoundError(f"no checkpoint at {path} (expected a step_XXXXXXXX folder with {META_FILE}, or a folder containing them)")


def _tensors(state: Any):
    if isinstance(state, torch.Tensor):
        yield state.to_local() if hasattr(state, "to_local") else state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def state_is_finite(state: Any) -> bool:
    """Whether every floating-point tensor in a (possibly sharded) state is finite on every
    process (collective when distributed: all agree)."""
    tensors = [t for t in _tensors(state) if t.is_floating_point() and t.numel() > 0]
    device = tensors[0].device if tensors else torch.device("cpu")
    flags = [torch.isfinite(t).all().to(device) for t in tensors]
    finite = torch.stack(flags).all().to(torch.float32) if flags else torch.ones((), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def save_checkpoint(directory: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], keep: int = 2, extra: dict[str, Any] | None = None) -> Path | None:
    """Collective: every rank calls it. Returns the final folder, or None (nothing written, a
    warning logged) when a parameter or optimizer state is not finite. extra: further training
    state (tensors, the same on every rank, e.g. the inter-scene queue) saved with the weights."""
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    staging = directory / f"step_{step:08d}.tmp"
    previous = directory / f"step_{step:08d}.old"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if extra:
        state["extra"] = extra
    if not state_is_finite(state):
        if _is_main():
            logger.warning("step %d: the weights or optimizer state are not finite: checkpoint not written", step)
        return None
    if _is_main():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left over from a crash
    barrier()
    with _dcp_errors("write", staging):
        dcp.save(state, checkpoint_id=str(staging))
    barrier()
    if _is_main():
        _write_manifest(staging)
        _write_json_durably(staging / META_FILE, dict(meta, step=step))  # last: marks it complete
        _fsync_dir(staging)
        if final.exists():  # the same step saved again (e.g. the end of a resumed run)
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)  # kept until the new copy is in place
        os.replace(staging, final)
        _fsync_dir(directory)
        shutil.rmtree(previous, ignore_errors=True)
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _verified.discard(final.resolve())
    barrier()
    return final


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    with open(path / META_FILE) as f:
        return json.load(f)


def load_checkpoint_extra(path: str | os.PathLike, extra: dict[str, Any]) -> None:
    """Loads the `extra` state of save_checkpoint in place (tensors of the shapes saved)."""
    path = resolve_checkpoint(path)
    # Fails e.g. for a checkpoint saved with the switch off, or with another queue size.
    with _dcp_errors(f"restore the {', '.join(extra)} state of", path):
        dcp.load({"extra": extra}, checkpoint_id=str(path))


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Collective when distributed. Loads model (and optimizer) state in place, resharding as
    needed; returns meta.json. A weights-only checkpoint (meta "weights_only", e.g. one written by
    `python -m dimaskdino.convert`) loads into the model and leaves the optimizer fresh: resuming
    from it fine-tunes from step 0."""
    path = resolve_checkpoint(path)
    if optimizer is None or read_meta(path).get("weights_only", False):
        state = {"model": get_model_state_dict(model)}
        with _dcp_errors("load", path):
            dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        with _dcp_errors("load", path):
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
    with _dcp_errors("load", path):
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    category_map = CategoryMap.from_state_dict(meta["categories"])
    return model.to(device).eval(), cfg, category_map
