"""BATO attention (SPEC section 4): every encoder token attends to the 50 guiding tokens.

q (B, H, S, D), k and v (B, H, K, D) with K small (the Triton kernel takes K <= 128, D <= 128);
returns (B, H, S, D) = softmax(q k^T / sqrt(D)) v in q's dtype. Dense, no mask. Any strides: the
output has q's memory layout, so a q that is a (B, S, H, D) tensor transposed to (B, H, S, D) gives
an output that transposes back to (B, S, H*D) without a copy.

`impl`: "auto" (the Triton kernel on a CUDA device where Triton compiles, else the reference: with
one warning on CUDA, silently on a CPU), "triton" (error if it cannot run; on a CPU tensor it runs
the Triton interpreter, which needs TRITON_INTERPRET=1 and is for testing), "ref" (pure PyTorch).

This module also holds the Triton plumbing shared with dimaskdino.ops.topk_select (implementation
choice, interpreter handling under torch.compile).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from dimaskdino import _extension

OP_NAME = "dimaskdino::bato_attention"
BACKWARD_OP_NAME = "dimaskdino::_bato_attention_backward"
IMPLS = ("auto", "triton", "ref")
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_KEYS = 128  # keys and values of one (batch, head) stay in registers
MAX_HEAD_DIM = 128


# ---------------------------------------------------------------------------------------------
# Shared Triton plumbing


def _triton_interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def kernel_module(name: str):
    """dimaskdino.kernels.<name>, imported on first use: triton.jit decides at decoration time
    whether a kernel is compiled or interpreted, so the import must follow TRITON_INTERPRET."""
    return importlib.import_module(f"dimaskdino.kernels.{name}")


def kernels_interpreted(name: str) -> bool:
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


# ---------------------------------------------------------------------------------------------
# Reference


def bato_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch math in the inputs' dtype (not SDPA, so that it is an honest baseline)."""
    attn = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return torch.matmul(attn.softmax(dim=-1), v)


# ---------------------------------------------------------------------------------------------
# Validation and implementation choice


def _validate(q, k, v) -> None:
    def fail(name: str, message: str):
        raise ValueError(f"bato_attention: argument '{name}': {message}")

    tensors = {"q": q, "k": k, "v": v}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            fail(name, f"expected a torch.Tensor, got {type(tensor).__name__}")
    if q.dim() != 4:
        fail("q", f"expected 4 dims (B, H, S, D), got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        fail("q", f"expected a floating dtype, got {q.dtype}")
    if q.shape[-1] == 0:
        fail("q", f"head dim D must be at least 1, got shape {tuple(q.shape)}")
    batch, heads, _, dim = q.shape
    if k.dim() != 4:
        fail("k", f"expected 4 dims (B, H, K, D), got shape {tuple(k.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, dim):
        fail("k", f"shape {tuple(k.shape)} does not match B={batch}, H={heads}, D={dim} of q")
    if k.shape[2] == 0:
        fail("k", "needs at least one key (K >= 1)")
    if v.shape != k.shape:
        fail("v", f"expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name in ("k", "v"):
        if tensors[name].dtype != q.dtype:
            fail(name, f"dtype {tensors[name].dtype} differs from q's {q.dtype}")
        if tensors[name].device != q.device:
            fail(name, f"on {tensors[name].device}, but q is on {q.device}")


def _triton_unsupported(q: torch.Tensor, k: torch.Tensor) -> str | None:
    if q.dtype not in TRITON_DTYPES:
        return f"argument 'q': the Triton kernel takes {TRITON_DTYPES}, got {q.dtype}"
    if k.shape[2] > MAX_KEYS:
        return f"argument 'k': the Triton kernel keeps all keys on chip and takes at most {MAX_KEYS}, got K={k.shape[2]}"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"argument 'q': the Triton kernel takes a head dim of at most {MAX_HEAD_DIM}, got D={q.shape[3]}"
    return None


def resolve_impl(impl: str, q: torch.Tensor, k: torch.Tensor) -> str:
    """The implementation that will run: "triton" or "ref"."""
    return resolve_triton_impl("bato_attention", "bato_attention", impl, q.device, _triton_unsupported(q, k))


def bato_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v; see the module docstring for shapes and `impl`."""
    _validate(q, k, v)
    if resolve_impl(impl, q, k) == "ref":
        return bato_attention_ref(q, k, v)
    return torch.ops.dimaskdino.bato_attention(q, k, v)


# ---------------------------------------------------------------------------------------------
# Triton op


def _launch_args(q, k, v):
    kernels = kernel_module("bato_attention")
    batch, heads, seq, dim = q.shape
    block_k, block_d = kernels.block_sizes(k.shape[2], dim)
    meta = dict(HEAD_DIM=dim, BLOCK_K=block_k, BLOCK_D=block_d, FP64=q.dtype == torch.float64,
                PRECISION=dot_precision(q.dtype), UPCAST=interpreter_upcast(q.dtype, "bato_attention"))
    return kernels, batch, heads, seq, dim, meta


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_splits(device: torch.device, batch_heads: int, num_blocks: int) -> int:
    """Programs per (batch, head) in the backward: about 2 per SM in all on a GPU (one wave: two
    backward CTAs fit on an SM); 2 in the interpreter (so that tests see programs that walk several
    query blocks)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = cdiv(2 * _multiprocessors(index), batch_heads)
    else:
        target = 2
    return max(1, min(target, num_blocks))


@triton_op(OP_NAME, mutates_args=())
def _bato_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    _validate(q, k, v)
    check_direct_call("bato_attention", "bato_attention", q, _triton_unsupported(q, k))
    out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    kernels, batch, heads, seq, dim, meta = _launch_args(q, k, v)
    grid = (cdiv(seq, kernels.FWD_BLOCK_M), batch * heads)
    wrap_triton(kernels.bato_attention_fwd_kernel)[grid](
        q, k, v, out, seq, k.shape[2], heads, dim ** -0.5,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        BLOCK_M=kernels.FWD_BLOCK_M, num_warps=kernels.FWD_NUM_WARPS, num_stages=kernels.NUM_STAGES, **meta,
    )
    return out


@triton_op(BACKWARD_OP_NAME, mutates_args=())
def _bato_attention_backward_triton(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate(q, k, v)
    if grad_out.shape != q.shape or grad_out.dtype != q.dtype or grad_out.device != q.device:
        raise ValueError(
            f"bato_attention backward: argument 'grad_out': expected {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(grad_out.shape)} {grad_out.dtype} on {grad_out.device}"
        )
    check_direct_call("bato_attention", "bato_attention", q, _triton_unsupported(q, k))
    grad_q = torch.empty_like(q)
    batch, heads, seq, dim = q.shape
    num_keys = k.shape[2]
    if batch * heads == 0:
        return grad_q, k.new_zeros(k.shape), v.new_zeros(v.shape)
    kernels, batch, heads, seq, dim, meta = _launch_args(q, k, v)
    splits = _backward_splits(q.device, batch * heads, cdiv(seq, kernels.BWD_BLOCK_M))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_k_parts = torch.empty(batch * heads, splits, num_keys, dim, dtype=acc_dtype, device=q.device)
    grad_v_parts = torch.empty_like(grad_k_parts)
    wrap_triton(kernels.bato_attention_bwd_kernel)[(splits, batch * heads)](
        q, k, v, grad_out, grad_q, grad_k_parts, grad_v_parts, seq, num_keys, heads, splits, dim ** -0.5,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(),
        BLOCK_M=kernels.BWD_BLOCK_M, num_warps=kernels.BWD_NUM_WARPS, num_stages=kernels.NUM_STAGES, **meta,
    )
    # Deterministic reduction of the per-split partials (see kernels/bato_attention.py).
    grad_k = grad_k_parts.sum(1).view(batch, heads, num_keys, dim).to(k.dtype)
    grad_v = grad_v_parts.sum(1).view(batch, heads, num_keys, dim).to(v.dtype)
    return grad_q, grad_k, grad_v


def _fake(q, k, v):
    return torch.empty_like(q)


def _fake_backward(grad_out, q, k, v):
    return torch.empty_like(q), k.new_empty(k.shape), v.new_empty(v.shape)


make_compile_safe(_bato_attention_triton, _fake, "bato_attention")
make_compile_safe(_bato_attention_backward_triton, _fake_backward, "bato_attention")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    return torch.ops.dimaskdino._bato_attention_backward(grad_out, q, k, v)


_bato_attention_triton.register_autograd(_backward, setup_context=_setup_context)
