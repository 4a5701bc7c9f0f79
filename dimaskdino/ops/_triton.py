"""Triton plumbing shared by the Triton ops (bato_attention, topk_select, mask_loss): which
implementation runs, the interpreter (CPU tests) and torch.compile."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode

from dimaskdino import _extension

IMPLS = ("auto", "triton", "ref")



def _triton_interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _source_tree_kernels() -> None:
    """Makes dimaskdino.kernels importable from a source checkout that was not pip-installed (the
    repo's top-level kernels/ folder is mapped to dimaskdino.kernels only by the install)."""
    if "dimaskdino.kernels" in sys.modules or importlib.util.find_spec("dimaskdino.kernels") is not None:
        return
    folder = Path(__file__).resolve().parents[2] / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("dimaskdino.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dimaskdino.kernels"] = module
    spec.loader.exec_module(module)


@functools.lru_cache(maxsize=None)
def kernel_module(name: str):
    """dimaskdino.kernels.<name>, imported on first use: triton.jit decides at decoration time
    whether a kernel is compiled or interpreted, so the import must follow TRITON_INTERPRET."""
    _source_tree_kernels()
    return importlib.import_module(f"dimaskdino.kernels.{name}")


@functools.lru_cache(maxsize=None)
def kernels_interpreted(name: str) -> bool:
    """Whether the kernels of dimaskdino.kernels.<name> are interpreted: fixed when the module is
    imported (once, kernel_module), so walking the module once is enough; ops ask on every call."""
    from triton.runtime.interpreter import InterpretedFunction

    module = kernel_module(name)
    return any(isinstance(getattr(module, attr), InterpretedFunction) for attr in dir(module) if attr.endswith("_kernel"))


@torch.compiler.assume_constant_result  # fixed for the process; lets torch.compile trace callers
def triton_status(name: str, device_type: str) -> str:
    """"compiled", "interpreted", or "unavailable: <why>" for the kernels of dimaskdino.kernels.<name>
    on this device type."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"unavailable: triton is not importable ({error})"
    try:
        kernel_module(name)
    except ImportError as error:
        return f"unavailable: the Triton kernels dimaskdino.kernels.{name} are not importable ({error})"
    if device_type == "cpu":
        if not _triton_interpret_requested():
            return (
                "unavailable: Triton kernels run on a CPU tensor only in the Triton interpreter, which is for "
                "testing: set TRITON_INTERPRET=1 in the environment (or use impl='ref')"
            )
        if not kernels_interpreted(name):
            return (
                f"unavailable: TRITON_INTERPRET=1 was set after dimaskdino.kernels.{name} was imported, so its "
                "kernels were compiled for a GPU; set it before the first import"
            )
        return "interpreted"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "unavailable: CUDA is not available"
        if kernels_interpreted(name):
            return "interpreted"
        if torch.cuda.get_device_capability() < (8, 0):
            return "unavailable: the Triton kernels need a GPU of compute capability 8.0 or newer"
        return "compiled"
    return f"unavailable: no Triton kernels for device type {device_type!r}"


def resolve_triton_impl(op: str, kernels: str, impl: str, device: torch.device, unsupported: str | None) -> str:
    """"triton" or "ref". `unsupported`: None, or why the Triton kernel cannot take these inputs,
    as "argument '<name>': ..." (a ValueError under impl="triton", a warned fallback under auto)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: argument 'impl': expected one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        return "ref"
    status = triton_status(kernels, device.type)
    if impl == "triton":
        if status.startswith("unavailable"):
            raise RuntimeError(f"{op}: impl='triton' on {device}: {status.removeprefix('unavailable: ')}")
        if unsupported is not None:
            raise ValueError(f"{op}: {unsupported}")
        return "triton"
    # auto: the interpreter is for tests, so a CPU (or another device) takes the reference silently.
    if device.type != "cuda":
        return "ref"
    if status != "compiled":
        why = "TRITON_INTERPRET=1 is set" if status == "interpreted" else status.removeprefix("unavailable: ")
        _extension.warn_fallback_once(op, f"no compiled Triton kernel: {why}")
        return "ref"
    if unsupported is not None:
        _extension.warn_fallback_once(op, f"the Triton kernel does not take these inputs ({unsupported})")
        return "ref"
    return "triton"


def check_direct_call(op: str, kernels: str, tensor: torch.Tensor, unsupported: str | None) -> None:
    """For torch.ops.dimaskdino.<op> called directly (the wrapper's checks skipped): a clear error
    instead of a Triton launch failure. Skipped while tracing with fake tensors (nothing launches)."""
    if is_fake(tensor):
        return
    device = tensor.device
    status = triton_status(kernels, device.type)
    if status.startswith("unavailable"):
        raise RuntimeError(f"{op}: the Triton kernel cannot run on {device}: {status.removeprefix('unavailable: ')}")
    if unsupported is not None:
        raise ValueError(f"{op}: {unsupported}")


def alert_not_deterministic(what: str, alternative: str | None = "impl='ref' for this op") -> None:
    """As PyTorch's own nondeterministic CUDA backward passes (grid_sample's): an error under
    torch.use_deterministic_algorithms(True), a warning under warn_only=True, nothing otherwise.
    Public API only: torch._C._alert_not_deterministic no longer exists (torch 2.11 to 2.14)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = f"{what} does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)'"
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(f"{message} with warn_only=True", stacklevel=2)
        return
    way_out = f"use {alternative} or warn_only=True" if alternative else "use warn_only=True"
    raise RuntimeError(f"{message}; {way_out}")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: full fp32 for fp32 inputs (PyTorch's default matmul does not use
    TF32 either), irrelevant for 16-bit and fp64 inputs."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def interpreter_upcast(dtype: torch.dtype, kernels: str) -> bool:
    """True where tl.dot operands must go to fp32 first: bf16 under the Triton interpreter, whose
    tl.dot multiplies bf16 bit patterns (triton issue #11584). Never on compiled kernels."""
    return dtype == torch.bfloat16 and kernels_interpreted(kernels)


def make_compile_safe(op, fake, kernels: str) -> None:
    """Registers `fake` as the op's shape function, and keeps the op opaque to AOTAutograd while
    its kernels are interpreted.

    A triton_op's default fake kernel is its own body, and under torch.compile AOTAutograd inlines
    that body so that Inductor sees the kernel launches. Both need compiled kernels: an
    InterpretedFunction launched on fake or functional tensors reads their (absent) data. With
    interpreted kernels the op therefore stays a single node in the graph and runs eagerly;
    with compiled kernels (a GPU) the usual triton_op decomposition is kept.
    """
    op.register_fake(fake)
    decompose = op._torch_dispatch_fns[FunctionalTensorMode]  # set by triton_op (torch 2.13)

    def functional(mode, op_overload, types, args, kwargs):
        if kernels_interpreted(kernels):
            return mode.__torch_dispatch__(op_overload, types, args, kwargs)
        return decompose(mode, op_overload, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functional)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
