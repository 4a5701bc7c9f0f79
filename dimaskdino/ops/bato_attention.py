"""BATO attention (SPEC section 4): every encoder token attends to the 50 guiding tokens.

q (B, H, S, D), k and v (B, H, K, D) with K small (the Triton kernel takes K <= 128, D <= 128);
returns (B, H, S, D) = softmax(q k^T / sqrt(D)) v in q's dtype. Dense, no mask. Any strides: the
output has q's memory layout, so a q that is a (B, S, H, D) tensor transposed to (B, H, S, D) gives
an output that transposes back to (B, S, H*D) without a copy.

`impl`: "auto" (the Triton kernel on a CUDA device where Triton compiles, else the reference: with
one warning on CUDA, silently on a CPU), "triton" (error if it cannot run; on a CPU tensor it runs
the Triton interpreter, which needs TRITON_INTERPRET=1 and is for testing), "ref" (pure PyTorch).
"""

from __future__ import annotations

import functools

import torch
from torch.library import triton_op, wrap_triton

from dimaskdino.ops._triton import (
    cdiv,
    check_direct_call,
    dot_precision,
    interpreter_upcast,
    kernel_module,
    make_compile_safe,
    resolve_triton_impl,
)

OP_NAME = "dimaskdino::bato_attention"
BACKWARD_OP_NAME = "dimaskdino::_bato_attention_backward"
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_KEYS = 128  # keys and values of one (batch, head) stay in registers
MAX_HEAD_DIM = 128


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
                UPCAST=interpreter_upcast(q.dtype, "bato_attention"))
    return kernels, batch, heads, seq, dim, meta


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


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
    config = kernels.forward_config(_DTYPE_NAMES[q.dtype], meta["BLOCK_K"])
    grid = (cdiv(seq, config["BLOCK_M"]), batch * heads)
    wrap_triton(kernels.bato_attention_fwd_kernel)[grid](
        q, k, v, out, seq, k.shape[2], heads, dim ** -0.5,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        PRECISION=dot_precision(q.dtype), num_stages=kernels.NUM_STAGES, **config, **meta,
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
    config = kernels.backward_config(_DTYPE_NAMES[q.dtype], meta["BLOCK_K"])
    splits = _backward_splits(q.device, batch * heads, cdiv(seq, config["BLOCK_M"]))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_k_parts = torch.empty(batch * heads, splits, num_keys, dim, dtype=acc_dtype, device=q.device)
    grad_v_parts = torch.empty_like(grad_k_parts)
    wrap_triton(kernels.bato_attention_bwd_kernel)[(splits, batch * heads)](
        q, k, v, grad_out, grad_q, grad_k_parts, grad_v_parts, seq, num_keys, heads, splits, dim ** -0.5,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(),
        num_stages=kernels.NUM_STAGES, **config, **meta,
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
