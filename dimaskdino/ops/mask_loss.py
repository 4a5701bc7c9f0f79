"""Point-sampled mask matching cost and mask loss (SPEC section 5) without Q x H x W mask logits.

Mask logits are linear in the mask features, logit_q = e_q . F (e: mask embeddings (B, Q, D), F:
mask features (B, D, H, W)), and bilinear sampling is linear, so the logit of query q at point p is
e_q . F(p): sampling the features once at the points and one GEMM give every query's point
logits. Two ops and two helpers build on that:

- `sample_point_features(features, points)` -> (B, D, P): the features at each image's points
  (shared by every query, GT and output of the image), float32 (float64 for float64 features).
- `point_mask_costs(embed, point_features, gt_values)` -> (bce, dice), each (B, Q, N): the
  matcher's mean BCE and dice costs of every query against every GT at the shared points, GT
  values (B, N, P). The Triton kernel keeps the (Q, P) logits on chip (tile by tile: x = e F(p),
  then x t^T, sigmoid(x) t^T and the row sums with tl.dot); the reference materializes (B, Q, P)
  logits with one bmm (12,544 points: ~5x fewer than a 256 x 256 map). No gradient (matching).
  Precision: sums in float32; embeddings and point features both in one 16-bit dtype (autocast:
  the matcher rounds the sampled features to the embeddings' dtype) multiply on tensor cores with
  float32 accumulation, the precision of the reference's 16-bit mask logits; otherwise the point
  logits are float32-exact.
- `matched_mask_logits(embed, features, src_idx, rows_per_image)` -> (R, H, W): the mask logits
  of the R matched queries only (one GEMM per image): what the loss's uncertainty sampling and
  point sampling read. (Why not per-point gathers of D features for the loss: each pair has its
  own 12,544 points plus 37,632 candidates, 4 corners each = 3x the 65,536 pixels of a 256 x 256
  map, and each corner read is D = 256 values without tensor cores: ~1 G values per image for 20
  pairs, while the GEMM reads the image's map once (17 M values) and writes R x H x W logits.)
- `point_mask_loss(masks, points, targets)` -> (bce, dice), each (R,): per matched pair, mean BCE
  and dice of the pair's mask logits (R, H, W) sampled at its own points (R, P, 2) against the GT
  values there (R, P). The Triton forward fuses the bilinear sampling, BCE, sigmoid and the four
  row sums in one pass and writes R x 4 floats; the backward recomputes the point logits and
  scatters dL/dx into the (R, H, W) gradient with atomics. Differentiable with respect to masks
  only (points and targets carry no gradient: uncertainty sampling and GT values are no-grad).

Points are normalized (x, y) in [0, 1] over the map; pixel = x * W - 0.5 (grid_sample,
align_corners=False), zero outside the map. All sums and outputs in float32 (float64 when an
input is float64); any float input dtype (bf16 under autocast).

`impl`: "auto" (the Triton kernels on a CUDA device where Triton compiles, else the reference: with
one warning on CUDA, silently on a CPU), "triton" (error if it cannot run; on a CPU tensor it runs
the Triton interpreter, which needs TRITON_INTERPRET=1 and is for testing), "ref" (pure PyTorch).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from dimaskdino.ops._triton import (
    IMPLS,
    alert_not_deterministic,
    cdiv,
    check_direct_call,
    dot_precision,
    interpreter_upcast,
    kernel_module,
    kernels_interpreted,
    make_compile_safe,
    resolve_triton_impl,
)

KERNELS = "mask_loss"
COST_OP_NAME = "dimaskdino::point_mask_costs"
LOSS_OP_NAME = "dimaskdino::point_mask_loss_stats"
LOSS_BACKWARD_OP_NAME = "dimaskdino::_point_mask_loss_stats_backward"
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
__all__ = [
    "IMPLS",
    "matched_mask_logits",
    "point_mask_costs",
    "point_mask_costs_ref",
    "point_mask_loss",
    "point_mask_loss_ref",
    "sample_point_features",
]


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _fail(op: str, name: str, message: str):
    raise ValueError(f"{op}: argument '{name}': {message}")


def _check_tensor(op: str, name: str, tensor, dims: int, layout: str, device=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        _fail(op, name, f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        _fail(op, name, f"expected {dims} dims {layout}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        _fail(op, name, f"expected a floating dtype, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        _fail(op, name, f"on {tensor.device}, but the first argument is on {device}")


# ---------------------------------------------------------------------------------------------
# Helpers (pure PyTorch, differentiable)


def _grid_sample_points(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of maps (N, C, H, W) at points (N, P, 2) -> (N, C, P) in maps' dtype."""
    grid = (2.0 * points.to(maps.dtype) - 1.0).unsqueeze(2)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def sample_point_features(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The mask features (B, D, H, W) at each image's points (B, P, 2) -> (B, D, P), float32
    (float64 for float64 features). float32/64 features: one grid_sample; 16-bit features: four
    gathers per image in their own dtype with float32 weights (no float32 copy of the map)."""
    op = "sample_point_features"
    _check_tensor(op, "features", features, 4, "(B, D, H, W)")
    _check_tensor(op, "points", points, 3, "(B, P, 2)", features.device)
    if points.shape[0] != features.shape[0] or points.shape[2] != 2:
        _fail(op, "points", f"expected ({features.shape[0]}, P, 2), got {tuple(points.shape)}")
    if features.dtype in (torch.float32, torch.float64):
        return _grid_sample_points(features, points)
    batch, dim, height, width = features.shape
    px = points[..., 0].float() * width - 0.5
    py = points[..., 1].float() * height - 0.5
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    x0, y0 = x0.long(), y0.long()
    flat = [features[b].reshape(dim, height * width) for b in range(batch)]  # views unless cropped
    out = None
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            index = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)  # (B, P)
            values = torch.stack([flat[b][:, index[b]] for b in range(batch)])  # (B, D, P)
            term = values.float() * (wx * wy * inside).unsqueeze(1)
            out = term if out is None else out + term
    return out


def matched_mask_logits(
    embed: torch.Tensor, features: torch.Tensor, src_idx: torch.Tensor, rows_per_image: list[int]
) -> torch.Tensor:
    """Mask logits (R, H, W) of the matched queries only: pair r of image b (pairs ordered by
    image, rows_per_image[b] of them) is embed[b, src_idx[r]] . features[b]. One GEMM per image,
    in the common dtype of embed and features (as the model's einsum; bf16 under autocast)."""
    op = "matched_mask_logits"
    _check_tensor(op, "embed", embed, 3, "(B, Q, D)")
    _check_tensor(op, "features", features, 4, "(B, D, H, W)", embed.device)
    batch, _, dim = embed.shape
    if features.shape[:2] != (batch, dim):
        _fail(op, "features", f"expected (B={batch}, D={dim}, H, W), got {tuple(features.shape)}")
    if len(rows_per_image) != batch or sum(rows_per_image) != src_idx.shape[0]:
        _fail(op, "rows_per_image", f"expected {batch} counts summing to {src_idx.shape[0]}, got {rows_per_image}")
    height, width = features.shape[-2:]
    dtype = torch.promote_types(embed.dtype, features.dtype)
    parts = []
    for b, idx in enumerate(torch.split(src_idx, rows_per_image)):
        if idx.shape[0] == 0:
            continue
        rows = embed[b, idx].to(dtype)  # (R_b, D)
        parts.append(torch.mm(rows, features[b].to(dtype).reshape(dim, height * width)).view(-1, height, width))
    if not parts:
        return embed.new_zeros((0, height, width), dtype=dtype) + 0.0 * (embed.sum() + features.sum()).to(dtype)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------------------------------
# Matching cost


def point_mask_costs_ref(
    embed: torch.Tensor, point_features: torch.Tensor, gt_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q, P) point logits with one bmm, then mean BCE = (sum softplus(x) - x . t) / P and
    dice = 1 - (2 s . t + 1) / (sum s + sum t + 1) with two more bmm (no Q x N x P tensor)."""
    acc = _acc_dtype(embed, point_features, gt_values)
    x = torch.bmm(embed.to(acc), point_features.to(acc))
    targets = gt_values.to(acc)
    targets_t = targets.transpose(1, 2)
    num_points = x.shape[-1]
    bce = (F.softplus(x).sum(-1, keepdim=True) - torch.bmm(x, targets_t)) / num_points
    prob = x.sigmoid()
    dice = 1.0 - (2.0 * torch.bmm(prob, targets_t) + 1.0) / (
        prob.sum(-1, keepdim=True) + targets.sum(-1).unsqueeze(1) + 1.0
    )
    return bce, dice


def _validate_costs(embed, point_features, gt_values) -> None:
    op = "point_mask_costs"
    _check_tensor(op, "embed", embed, 3, "(B, Q, D)")
    device = embed.device
    _check_tensor(op, "point_features", point_features, 3, "(B, D, P)", device)
    _check_tensor(op, "gt_values", gt_values, 3, "(B, N, P)", device)
    batch, _, dim = embed.shape
    if dim == 0:
        _fail(op, "embed", f"needs D >= 1, got shape {tuple(embed.shape)}")
    if point_features.shape[:2] != (batch, dim):
        _fail(op, "point_features", f"expected (B={batch}, D={dim}, P), got {tuple(point_features.shape)}")
    if point_features.shape[2] == 0:
        _fail(op, "point_features", "needs at least one point (P >= 1)")
    if gt_values.shape[0] != batch or gt_values.shape[2] != point_features.shape[2]:
        _fail(op, "gt_values", f"expected (B={batch}, N, P={point_features.shape[2]}), got {tuple(gt_values.shape)}")


def _costs_unsupported(embed, point_features, gt_values) -> str | None:
    for name, tensor in (("embed", embed), ("point_features", point_features), ("gt_values", gt_values)):
        if tensor.dtype not in TRITON_DTYPES:
            return f"argument '{name}': the Triton kernel takes {TRITON_DTYPES}, got {tensor.dtype}"
    return None


def resolve_costs_impl(impl: str, embed: torch.Tensor, point_features: torch.Tensor, gt_values: torch.Tensor) -> str:
    """The implementation that will run: "triton" or "ref"."""
    return resolve_triton_impl("point_mask_costs", KERNELS, impl, embed.device,
                               _costs_unsupported(embed, point_features, gt_values))


def point_mask_costs(
    embed: torch.Tensor, point_features: torch.Tensor, gt_values: torch.Tensor, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE and dice matching costs (B, Q, N) of the queries' mask embeddings (B, Q, D) at
    the sampled features (B, D, P) (see `sample_point_features`) against the GT values (B, N, P).
    No gradient (the matcher runs without one)."""
    _validate_costs(embed, point_features, gt_values)
    with torch.no_grad():
        if resolve_costs_impl(impl, embed, point_features, gt_values) == "ref":
            return point_mask_costs_ref(embed, point_features, gt_values)
        return torch.ops.dimaskdino.point_mask_costs(embed, point_features, gt_values)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cost_splits(device: torch.device, programs: int, num_p_blocks: int) -> int:
    """Point splits per (q-block, image, n-block): about 2 programs per SM in all on a GPU; 2 in
    the interpreter (tests then see programs that walk several point blocks)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = cdiv(2 * _multiprocessors(index), programs)
    else:
        target = 2
    return max(1, min(target, num_p_blocks))


@triton_op(COST_OP_NAME, mutates_args=())
def _point_mask_costs_triton(
    embed: torch.Tensor, point_features: torch.Tensor, gt_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate_costs(embed, point_features, gt_values)
    check_direct_call("point_mask_costs", KERNELS, embed, _costs_unsupported(embed, point_features, gt_values))
    batch, num_queries, dim = embed.shape
    num_gt, num_points = gt_values.shape[1], gt_values.shape[2]
    acc = _acc_dtype(embed, point_features, gt_values)
    if batch * num_queries * num_gt == 0:
        empty = embed.new_zeros((batch, num_queries, num_gt), dtype=acc)
        return empty, empty.clone()
    kernels = kernel_module(KERNELS)
    block_q, block_n, block_p, block_d = kernels.cost_block_sizes(num_gt, dim, kernels_interpreted(KERNELS))
    q_blocks, n_blocks = cdiv(num_queries, block_q), cdiv(num_gt, block_n)
    splits = _cost_splits(embed.device, q_blocks * batch * n_blocks, cdiv(num_points, block_p))
    half_dot = embed.dtype in (torch.bfloat16, torch.float16) and point_features.dtype == embed.dtype
    xt = torch.empty(batch, splits, num_queries, num_gt, dtype=acc, device=embed.device)
    st = torch.empty_like(xt)
    sp = torch.empty(batch, splits, num_queries, dtype=acc, device=embed.device)
    s = torch.empty_like(sp)
    wrap_triton(kernels.point_mask_cost_kernel)[(q_blocks, splits, batch * n_blocks)](
        embed, point_features, gt_values, xt, st, sp, s,
        num_queries, num_gt, num_points, dim, splits, n_blocks,
        *embed.stride(), *point_features.stride(), *gt_values.stride(),
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_D=block_d,
        FP64=acc == torch.float64, PRECISION=dot_precision(acc), HALF_DOT=half_dot,
        UPCAST=half_dot and interpreter_upcast(embed.dtype, KERNELS), num_warps=kernels.COST_NUM_WARPS, num_stages=kernels.NUM_STAGES,
    )
    # Deterministic reduction of the split partials, then the costs.
    target_sum = gt_values.sum(-1, dtype=acc)  # (B, N)
    bce = (sp.sum(1).unsqueeze(-1) - xt.sum(1)) / num_points
    dice = 1.0 - (2.0 * st.sum(1) + 1.0) / (s.sum(1).unsqueeze(-1) + target_sum.unsqueeze(1) + 1.0)
    return bce, dice


def _fake_costs(embed, point_features, gt_values):
    acc = _acc_dtype(embed, point_features, gt_values)
    shape = (embed.shape[0], embed.shape[1], gt_values.shape[1])
    return embed.new_empty(shape, dtype=acc), embed.new_empty(shape, dtype=acc)


make_compile_safe(_point_mask_costs_triton, _fake_costs, KERNELS)


# ---------------------------------------------------------------------------------------------
# Mask loss


def point_mask_loss_ref(
    masks: torch.Tensor, points: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample of each pair's map at its points, then BCE mean and dice per pair, as the
    criterion computes them on materialized masks (float32, float64 for float64 masks)."""
    acc = torch.float64 if masks.dtype == torch.float64 else torch.float32
    logits = _grid_sample_points(masks.unsqueeze(1).to(acc), points).squeeze(1)  # (R, P)
    targets = targets.to(acc)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    prob = logits.sigmoid()
    dice = 1.0 - (2.0 * (prob * targets).sum(-1) + 1.0) / (prob.sum(-1) + targets.sum(-1) + 1.0)
    return bce, dice


def _validate_loss(masks, points, targets, op: str = "point_mask_loss") -> None:
    _check_tensor(op, "masks", masks, 3, "(R, H, W)")
    device = masks.device
    _check_tensor(op, "points", points, 3, "(R, P, 2)", device)
    _check_tensor(op, "targets", targets, 2, "(R, P)", device)
    num_rows, height, width = masks.shape
    if height == 0 or width == 0:
        _fail(op, "masks", f"needs H, W >= 1, got shape {tuple(masks.shape)}")
    if points.shape[0] != num_rows or points.shape[2] != 2:
        _fail(op, "points", f"expected (R={num_rows}, P, 2), got {tuple(points.shape)}")
    if points.shape[1] == 0:
        _fail(op, "points", "needs at least one point per pair (P >= 1)")
    if targets.shape != points.shape[:2]:
        _fail(op, "targets", f"expected (R, P) = {tuple(points.shape[:2])}, got {tuple(targets.shape)}")


def _loss_unsupported(masks, points, targets) -> str | None:
    for name, tensor in (("masks", masks), ("points", points), ("targets", targets)):
        if tensor.dtype not in TRITON_DTYPES:
            return f"argument '{name}': the Triton kernel takes {TRITON_DTYPES}, got {tensor.dtype}"
    return None


def resolve_loss_impl(impl: str, masks: torch.Tensor, points: torch.Tensor, targets: torch.Tensor) -> str:
    """The implementation that will run: "triton" or "ref"."""
    return resolve_triton_impl("point_mask_loss", KERNELS, impl, masks.device, _loss_unsupported(masks, points, targets))


def point_mask_loss(
    masks: torch.Tensor, points: torch.Tensor, targets: torch.Tensor, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matched pair: mean BCE (R,) and dice (R,) of its mask logits (R, H, W) sampled at its
    points (R, P, 2) against the GT values there (R, P). Gradient to masks only."""
    _validate_loss(masks, points, targets)
    if torch.is_grad_enabled():
        for name, tensor in (("points", points), ("targets", targets)):
            if tensor.requires_grad:
                _fail("point_mask_loss", name, "no gradient flows to the points or targets: pass them detached")
    if resolve_loss_impl(impl, masks, points, targets) == "ref":
        return point_mask_loss_ref(masks, points, targets)
    stats = torch.ops.dimaskdino.point_mask_loss_stats(masks, points, targets)  # (R, 4)
    bce = stats[:, 0] / points.shape[1]
    dice = 1.0 - (2.0 * stats[:, 2] + 1.0) / (stats[:, 1] + stats[:, 3] + 1.0)
    return bce, dice


def _loss_launch(masks: torch.Tensor):
    kernels = kernel_module(KERNELS)
    acc = torch.float64 if masks.dtype == torch.float64 else torch.float32
    return kernels, acc, kernels.loss_block_size(kernels_interpreted(KERNELS))


@triton_op(LOSS_OP_NAME, mutates_args=())
def _point_mask_loss_stats_triton(masks: torch.Tensor, points: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(R, 4): per pair [sum BCE, sum sigmoid, sum sigmoid * t, sum t] over its points."""
    _validate_loss(masks, points, targets, "point_mask_loss_stats")
    check_direct_call("point_mask_loss_stats", KERNELS, masks, _loss_unsupported(masks, points, targets))
    kernels, acc, block_p = _loss_launch(masks)
    num_rows, height, width = masks.shape
    num_points = points.shape[1]
    if num_rows == 0:
        return masks.new_zeros((0, 4), dtype=acc)
    num_blocks = cdiv(num_points, block_p)
    parts = torch.empty(num_rows, num_blocks, 4, dtype=acc, device=masks.device)
    wrap_triton(kernels.point_mask_loss_fwd_kernel)[(num_rows, num_blocks)](
        masks, points, targets, parts, num_points, height, width, num_blocks,
        *masks.stride(), *points.stride(), *targets.stride(),
        BLOCK_P=block_p, FP64=acc == torch.float64, num_warps=kernels.LOSS_NUM_WARPS,
    )
    return parts.sum(1)


@triton_op(LOSS_BACKWARD_OP_NAME, mutates_args=())
def _point_mask_loss_stats_backward_triton(
    grad_stats: torch.Tensor, masks: torch.Tensor, points: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Gradient (R, H, W) of the masks, in their dtype."""
    _validate_loss(masks, points, targets, "point_mask_loss_stats backward")
    kernels, acc, block_p = _loss_launch(masks)
    num_rows, height, width = masks.shape
    if grad_stats.shape != (num_rows, 4) or grad_stats.device != masks.device or not grad_stats.is_floating_point():
        raise ValueError(
            f"point_mask_loss_stats backward: argument 'grad_stats': expected a float ({num_rows}, 4) tensor on "
            f"{masks.device}, got {tuple(grad_stats.shape)} {grad_stats.dtype} on {grad_stats.device}"
        )
    check_direct_call("point_mask_loss_stats", KERNELS, masks, _loss_unsupported(masks, points, targets))
    grad = torch.zeros(num_rows, height, width, dtype=acc, device=masks.device)
    num_points = points.shape[1]
    if num_rows > 0:
        num_blocks = cdiv(num_points, block_p)
        wrap_triton(kernels.point_mask_loss_bwd_kernel)[(num_rows, num_blocks)](
            masks, points, targets, grad_stats, grad, num_points, height, width,
            *masks.stride(), *points.stride(), *targets.stride(), *grad_stats.stride(),
            BLOCK_P=block_p, FP64=acc == torch.float64, num_warps=kernels.LOSS_NUM_WARPS,
        )
    return grad.to(masks.dtype)


def _fake_loss_stats(masks, points, targets):
    acc = torch.float64 if masks.dtype == torch.float64 else torch.float32
    return masks.new_empty((masks.shape[0], 4), dtype=acc)


def _fake_loss_backward(grad_stats, masks, points, targets):
    return masks.new_empty(masks.shape)


make_compile_safe(_point_mask_loss_stats_triton, _fake_loss_stats, KERNELS)
make_compile_safe(_point_mask_loss_stats_backward_triton, _fake_loss_backward, KERNELS)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_stats):
    masks, points, targets = ctx.saved_tensors
    if masks.is_cuda:
        alert_not_deterministic("point_mask_loss backward (Triton kernel with atomic adds)")
    grad = torch.ops.dimaskdino._point_mask_loss_stats_backward(grad_stats, masks, points, targets)
    return grad, None, None


_point_mask_loss_stats_triton.register_autograd(_backward, setup_context=_setup_context)
