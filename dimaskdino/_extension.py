"""Loads the compiled extension `dimaskdino._C` once and says which native kernels it provides.

The extension is optional at import time so that the pure-PyTorch references stay usable from a
source tree that has not been built; ops ask `native_available` and, when falling back, warn once.
"""

from __future__ import annotations

import functools
import warnings

import torch

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when `dimaskdino._C` imported, else the reason it did not."""
    try:
        import dimaskdino._C  # noqa: F401  (its static initializers register the kernels)
    except ImportError as error:
        return f"dimaskdino._C did not load: {error}; build it with `pip install --no-build-isolation -e .`"
    return None


@torch.compiler.assume_constant_result  # fixed for the process; lets torch.compile trace callers
def native_available(op: str, device_type: str) -> bool:
    """True when the extension is loaded and registered a kernel for `op` on this device type."""
    key = _DISPATCH_KEYS.get(device_type)
    if load_error() is not None or key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def why_unavailable(device_type: str) -> str:
    error = load_error()
    if error is not None:
        return error
    if device_type == "cuda":
        return "the extension was built without CUDA (torch without CUDA, or nvcc not found at build time)"
    return f"no native kernels for device type {device_type!r}"


@functools.lru_cache(maxsize=None)
def warn_fallback_once(op: str, reason: str) -> None:
    """One warning per (op, reason) for the whole process: no silent fallback, no log spam."""
    warnings.warn(f"dimaskdino: {op}: {reason}; using the pure-PyTorch reference", stacklevel=3)
