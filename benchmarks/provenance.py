"""What every result file records about where and from what it was produced.

A figure is only a result if it can be traced to a device, library versions and a commit of a
clean tree; `provenance()` gathers those, and `write_result()` writes a JSON file into a folder the
caller chose (committed results under benchmarks/results/ are updated on purpose, by passing
that folder, never by a plain run).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        return subprocess.check_output(["git", *args], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """True when tracked files differ from the commit (untracked files do not count, nor do the
    committed results under benchmarks/results/: results written by the runs themselves must not
    make the tree dirty for the next script). None outside a git checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return None if status is None else bool(status)


def device_description(device=None) -> str:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def device_slug(device=None) -> str:
    """Result file prefix: "cpu", or the GPU's name ("h200") for a CUDA device (default: the
    first GPU when there is one)."""
    import torch

    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-")
    return "cpu"


def versions() -> dict:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    return found


def provenance(device=None) -> dict:
    return {
        "device": device_description(device),
        **versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }


def write_result(out_dir: str | os.PathLike, name: str, payload: dict, device=None) -> Path:
    """Writes {provenance, **payload} to out_dir/name (atomically) and returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**provenance(device), **payload}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
