"""Fused top-k token selection (SPEC sections 2-4): scores only pick indices, so they are computed
without autograd in one pass that writes S floats, then torch.topk picks k tokens per image.

memory (B, S, d). First selection: score = max_c class_linear(LayerNorm(proj_linear(memory)))_c.
Without the projection (proj_weight=None, and norm_weight, norm_bias, proj_bias None): the input
is already normalized (the second selection on the last TI output, BATO's guiding tokens) and
score = max_c class_linear(memory)_c. Weights are nn.Linear / nn.LayerNorm parameters:
proj_weight (d, d), proj_bias (d,) or None, norm_weight and norm_bias (d,), class_weight (C, d),
class_bias (C,) or None.

Precision follows autocast: the Linears run in memory's dtype (weights cast to it, fp32
accumulation), the LayerNorm in at least fp32. Scores come back in float32 (float64 for float64
memory). The selected tokens' heads are recomputed, with gradients, by the caller.

`impl`: "auto" (the Triton kernel on a CUDA device where Triton compiles, else the reference: with
one warning on CUDA, silently on a CPU), "triton" (error if it cannot run; on a CPU tensor it runs
the Triton interpreter, which needs TRITON_INTERPRET=1 and is for testing), "ref" (pure PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from dimaskdino.ops._triton import (
    IMPLS,
    cdiv,
    check_direct_call,
    dot_precision,
    interpreter_upcast,
    kernel_module,
    make_compile_safe,
    resolve_triton_impl,
)

OP_NAME = "dimaskdino::class_max_scores"
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
__all__ = ["IMPLS", "class_max_scores", "class_max_scores_ref", "topk_select", "topk_select_ref"]


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Reference


def class_max_scores_ref(
    memory: torch.Tensor,
    class_weight: torch.Tensor,
    class_bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """(B, S) max class logit per token, in PyTorch (as the model computes it under autocast)."""
    dtype = memory.dtype
    x = memory
    if proj_weight is not None:
        x = F.linear(x, proj_weight.to(dtype), None if proj_bias is None else proj_bias.to(dtype))
        norm_dtype = torch.promote_types(dtype, torch.float32)
        x = F.layer_norm(x.to(norm_dtype), (x.shape[-1],), norm_weight.to(norm_dtype), norm_bias.to(norm_dtype), eps).to(dtype)
    logits = F.linear(x, class_weight.to(dtype), None if class_bias is None else class_bias.to(dtype))
    return logits.amax(dim=-1).to(_score_dtype(dtype))


def topk_select_ref(
    memory: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    class_weight: torch.Tensor,
    class_bias: torch.Tensor | None,
    k: int,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, k), indices (B, k) int64) of the k best tokens per image, in PyTorch."""
    with torch.no_grad():
        scores = class_max_scores_ref(memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps)
        return scores.topk(k, dim=1)


# ---------------------------------------------------------------------------------------------
# Validation and implementation choice


def _validate(op, memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps) -> None:
    def fail(name: str, message: str):
        raise ValueError(f"{op}: argument '{name}': {message}")

    optional = {"class_bias": class_bias, "norm_weight": norm_weight, "norm_bias": norm_bias,
                "proj_weight": proj_weight, "proj_bias": proj_bias}
    for name, tensor in {"memory": memory, "class_weight": class_weight, **optional}.items():
        if tensor is None and name in optional:
            continue
        if not isinstance(tensor, torch.Tensor):
            fail(name, f"expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            fail(name, f"expected a floating dtype, got {tensor.dtype}")
        if name != "memory" and tensor.device != memory.device:
            fail(name, f"on {tensor.device}, but memory is on {memory.device}")
    if memory.dim() != 3:
        fail("memory", f"expected 3 dims (B, S, d), got shape {tuple(memory.shape)}")
    dim = memory.shape[2]
    if dim == 0:
        fail("memory", "model width d must be at least 1")
    if class_weight.dim() != 2 or class_weight.shape[1] != dim or class_weight.shape[0] == 0:
        fail("class_weight", f"expected shape (C, {dim}) with C >= 1, got {tuple(class_weight.shape)}")
    if class_bias is not None and class_bias.shape != (class_weight.shape[0],):
        fail("class_bias", f"expected shape ({class_weight.shape[0]},), got {tuple(class_bias.shape)}")
    if proj_weight is None:
        for name in ("norm_weight", "norm_bias", "proj_bias"):
            if optional[name] is not None:
                fail(name, "given without proj_weight: without the projection there is no LayerNorm or projection bias")
    else:
        if proj_weight.shape != (dim, dim):
            fail("proj_weight", f"expected shape ({dim}, {dim}), got {tuple(proj_weight.shape)}")
        for name in ("norm_weight", "norm_bias", "proj_bias"):
            tensor = optional[name]
            if tensor is None and name != "proj_bias":
                fail(name, "required with proj_weight (LayerNorm(Linear(memory)))")
            if tensor is not None and tensor.shape != (dim,):
                fail(name, f"expected shape ({dim},), got {tuple(tensor.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        fail("eps", f"expected a positive float, got {eps!r}")


def _triton_unsupported(memory: torch.Tensor) -> str | None:
    if memory.dtype not in TRITON_DTYPES:
        return f"argument 'memory': the Triton kernel takes {TRITON_DTYPES}, got {memory.dtype}"
    max_dim = 512  # kernels/topk_select.py MAX_DIM (not imported here: the import is lazy)
    if memory.shape[2] > max_dim:
        return f"argument 'memory': the Triton kernel takes d <= {max_dim}, got d={memory.shape[2]}"
    return None


def resolve_impl(impl: str, memory: torch.Tensor, op: str = "class_max_scores") -> str:
    """The implementation that will run: "triton" or "ref"."""
    return resolve_triton_impl(op, "topk_select", impl, memory.device, _triton_unsupported(memory))


def _scores(op, memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps, impl):
    _validate(op, memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps)
    with torch.no_grad():
        if resolve_impl(impl, memory, op) == "ref":
            return class_max_scores_ref(memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps)
        return torch.ops.dimaskdino.class_max_scores(
            memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, float(eps)
        )


def class_max_scores(
    memory: torch.Tensor,
    class_weight: torch.Tensor,
    class_bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    impl: str = "auto",
) -> torch.Tensor:
    """(B, S) scores without gradient; for callers that mask or combine scores before top-k."""
    return _scores("class_max_scores", memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps, impl)


def topk_select(
    memory: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    class_weight: torch.Tensor,
    class_bias: torch.Tensor | None,
    k: int,
    impl: str = "auto",
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, k), indices (B, k) int64), best first, without gradient; see the module docstring."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"topk_select: argument 'k': expected an int, got {type(k).__name__}")
    if isinstance(memory, torch.Tensor) and memory.dim() == 3 and not 0 <= k <= memory.shape[1]:
        raise ValueError(f"topk_select: argument 'k': expected 0 <= k <= S = {memory.shape[1]}, got {k}")
    scores = _scores("topk_select", memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps, impl)
    with torch.no_grad():
        return scores.topk(k, dim=1)


# ---------------------------------------------------------------------------------------------
# Triton op (no autograd: the scores only pick indices)


@triton_op(OP_NAME, mutates_args=())
def _class_max_scores_triton(
    memory: torch.Tensor,
    class_weight: torch.Tensor,
    class_bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    _validate("class_max_scores", memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps)
    check_direct_call("class_max_scores", "topk_select", memory, _triton_unsupported(memory))
    batch, seq, dim = memory.shape
    out = memory.new_empty((batch, seq), dtype=_score_dtype(memory.dtype))
    if out.numel() == 0:
        return out
    kernels = kernel_module("topk_select")
    num_classes = class_weight.shape[0]
    config = kernels.launch_config(dim, num_classes)
    has_proj = proj_weight is not None
    # Absent tensors: the kernel never reads these pointers (constexpr flags); pass memory.
    proj_w = proj_weight if has_proj else memory
    wrap_triton(kernels.class_max_scores_kernel)[(cdiv(seq, config["BLOCK_M"]), batch)](
        memory, proj_w, memory if proj_bias is None else proj_bias,
        memory if norm_weight is None else norm_weight, memory if norm_bias is None else norm_bias,
        class_weight, memory if class_bias is None else class_bias, out,
        seq, dim, num_classes, eps,
        *memory.stride(), proj_w.stride(0) if has_proj else 0, proj_w.stride(1) if has_proj else 0,
        *class_weight.stride(), *out.stride(),
        HAS_PROJ=has_proj, HAS_PROJ_BIAS=proj_bias is not None, HAS_CLASS_BIAS=class_bias is not None,
        FP64=memory.dtype == torch.float64, PRECISION=dot_precision(memory.dtype),
        UPCAST=interpreter_upcast(memory.dtype, "topk_select"), **config,
    )
    return out


def _fake(memory, class_weight, class_bias, norm_weight, norm_bias, proj_weight, proj_bias, eps):
    return memory.new_empty(memory.shape[:2], dtype=_score_dtype(memory.dtype))


make_compile_safe(_class_max_scores_triton, _fake, "topk_select")
