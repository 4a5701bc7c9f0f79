"""The multi-scale deformable attention module (SPEC section 1) around `dimaskdino.ops.ms_deform_attn`."""

from __future__ import annotations

import math

import torch
from torch import nn

from dimaskdino.ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Deformable attention over L feature levels, P points per level and head.

    reference_points (B, Q, L, 2) are normalized (cx, cy); (B, Q, L, 4) are boxes (cx, cy, w, h)
    whose offsets are scaled by 0.5 * (w, h) / P.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, impl: str = "auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Radial grid: head k starts looking in direction 2*pi*k/H, point p at distance p+1.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, num_query, _ = query.shape
        num_value = value.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if reference_points.shape[:3] != (batch, num_query, levels) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"MSDeformAttn: argument 'reference_points': expected ({batch}, {num_query}, {levels}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, num_value, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(batch, num_query, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_query, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_query, heads, levels, points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalize by that level's (w, h).
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            centers, sizes = reference_points[..., :2], reference_points[..., 2:]
            locations = centers[:, :, None, :, None, :] + offsets / points * sizes[:, :, None, :, None, :] * 0.5
        # Locations and weights stay at least float32 under autocast: a bf16 location is off by
        # up to a quarter pixel on a 128-wide map.
        precise = torch.promote_types(value.dtype, torch.float32)
        out = ms_deform_attn(
            value, spatial_shapes, level_start_index, locations.to(precise), weights.to(precise), impl=self.impl
        )
        return self.output_proj(out)
