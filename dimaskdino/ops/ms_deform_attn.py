"""Multi-scale deformable attention (Deformable-DETR convention).

value (B, S, H, D); spatial_shapes (L, 2) int64 as (h, w); level_start_index (L,) int64;
sampling_locations (B, Q, H, L, P, 2) normalized (x, y); attention_weights (B, Q, H, L, P);
returns (B, Q, H*D) in value's dtype. Bilinear sampling with zero padding at
pixel = loc * size - 0.5, i.e. grid_sample(align_corners=False).

`impl`: "auto" (native kernel for the device when there is one, else the reference with one
warning), "cpu" / "cuda" (native, error if unavailable), "ref" (pure PyTorch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from dimaskdino import _extension
from dimaskdino.ops._triton import alert_not_deterministic

OP_NAME = "dimaskdino::ms_deform_attn"
IMPLS = ("auto", "cpu", "cuda", "ref")
# Value dtypes each native kernel accumulates correctly (float32 accumulation for 16-bit types).
NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}


def ms_deform_attn_ref(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure PyTorch (grid_sample per level). `spatial_shapes` may be a list of (h, w) so that
    torch.compile sees static sizes; levels are taken as stored back to back in `value`."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    per_level = value.to(compute_dtype).split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations.to(compute_dtype) - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (B, h*w, H, D) -> (B*H, D, h, w)
        level_value = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, channels, h, w)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*H, D, Q, P)
    weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*H, D, Q)
    return out.view(batch, heads * channels, queries).transpose(1, 2).contiguous().to(value.dtype)


def _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Errors that name the argument, raised before any kernel runs."""

    def fail(name: str, message: str):
        raise ValueError(f"ms_deform_attn: argument '{name}': {message}")

    tensors = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            fail(name, f"expected a torch.Tensor, got {type(tensor).__name__}")
    if value.dim() != 4:
        fail("value", f"expected 4 dims (B, S, H, D), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        fail("value", f"expected a floating dtype, got {value.dtype}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.dtype != torch.int64:
        fail("spatial_shapes", f"expected int64 of shape (L, 2), got {spatial_shapes.dtype} {tuple(spatial_shapes.shape)}")
    levels = spatial_shapes.shape[0]
    if level_start_index.shape != (levels,) or level_start_index.dtype != torch.int64:
        fail("level_start_index", f"expected int64 of shape ({levels},), got {level_start_index.dtype} {tuple(level_start_index.shape)}")
    batch, _, heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        fail("sampling_locations", f"expected (B, Q, H, L, P, 2), got shape {tuple(sampling_locations.shape)}")
    b, _, h, l, _, _ = sampling_locations.shape
    if (b, h, l) != (batch, heads, levels):
        fail(
            "sampling_locations",
            f"shape {tuple(sampling_locations.shape)} does not match B={batch}, H={heads} of value and L={levels} of spatial_shapes",
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        fail("attention_weights", f"expected shape {tuple(sampling_locations.shape[:-1])}, got {tuple(attention_weights.shape)}")
    for name in ("sampling_locations", "attention_weights"):
        dtype = tensors[name].dtype
        if dtype not in (value.dtype, torch.float32):
            fail(name, f"dtype {dtype} must be float32 or value's dtype {value.dtype}")
    if sampling_locations.dtype != attention_weights.dtype:
        fail("attention_weights", f"dtype {attention_weights.dtype} differs from sampling_locations' {sampling_locations.dtype}")
    for name, tensor in tensors.items():
        if tensor.device != value.device:
            fail(name, f"on {tensor.device}, but value is on {value.device}")
    # The size check reads spatial_shapes' values: only where that costs no device sync (on a
    # GPU it would be a copy to the host per call), no graph break, and the values exist (not
    # fake or meta tensors, e.g. a FakeTensorMode trace).
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling() and not any(
        is_fake(t) for t in (spatial_shapes, level_start_index)
    ):
        sizes = spatial_shapes.prod(1)
        if (spatial_shapes <= 0).any():
            fail("spatial_shapes", f"every level needs h, w >= 1, got {spatial_shapes.tolist()}")
        if int(sizes.sum()) != value.shape[1]:
            fail("spatial_shapes", f"sum of h*w = {int(sizes.sum())} but value has S = {value.shape[1]} tokens")
        expected_starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        if level_start_index.device.type == "cpu" and not torch.equal(level_start_index, expected_starts):
            fail("level_start_index", f"expected the running sum of h*w {expected_starts.tolist()}, got {level_start_index.tolist()}")


def resolve_impl(impl: str, value: torch.Tensor) -> str:
    """The implementation that will run: "ref" or the native device kernel."""
    if impl not in IMPLS:
        raise ValueError(f"ms_deform_attn: argument 'impl': expected one of {IMPLS}, got {impl!r}")
    device_type = value.device.type
    if impl == "ref":
        return "ref"
    if impl != "auto":
        if impl != device_type:
            raise ValueError(f"ms_deform_attn: argument 'impl': {impl!r} given, but value is on {value.device}")
        if not _extension.native_available(OP_NAME, device_type):
            raise RuntimeError(f"ms_deform_attn: impl={impl!r}: no native {device_type} kernel ({_extension.why_unavailable(device_type)})")
        if value.dtype not in NATIVE_DTYPES[device_type]:
            raise ValueError(f"ms_deform_attn: argument 'value': the {device_type} kernel supports {NATIVE_DTYPES[device_type]}, got {value.dtype}")
        return impl
    if not _extension.native_available(OP_NAME, device_type):
        _extension.warn_fallback_once("ms_deform_attn", f"no native {device_type} kernel ({_extension.why_unavailable(device_type)})")
        return "ref"
    if value.dtype not in NATIVE_DTYPES[device_type]:
        _extension.warn_fallback_once("ms_deform_attn", f"the {device_type} kernel does not support {value.dtype}")
        return "ref"
    return device_type


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention; see the module docstring for shapes and `impl`."""
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if resolve_impl(impl, value) == "ref":
        return ms_deform_attn_ref(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.dimaskdino.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _register() -> None:
    """Fake (shape) kernels and autograd for the native op; only when the extension loaded."""

    @torch.library.register_fake(OP_NAME)
    def _fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, channels = value.shape
        return value.new_empty(batch, sampling_locations.shape[1], heads * channels)

    @torch.library.register_fake("dimaskdino::_ms_deform_attn_backward")
    def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    if value.is_cuda:
        # The CUDA backward scatters into grad_value with atomic adds (the CPU one splits the work
        # so that it needs none). The reference is no way out: grid_sample's CUDA backward alerts too.
        alert_not_deterministic("ms_deform_attn backward (CUDA kernel with atomic adds)", alternative=None)
    grad_value, grad_loc, grad_weights = torch.ops.dimaskdino._ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_loc, grad_weights


if _extension.load_error() is None:
    _register()
