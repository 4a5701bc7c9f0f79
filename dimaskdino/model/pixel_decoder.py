"""Pixel decoder (SPEC section 1): input projections, the multi-scale deformable encoder and the
stride-4 mask features.

Levels are ordered fine to coarse everywhere in the model: level 0 = res3 (stride 8), 1 = res4,
2 = res5, 3 = the extra stride-64 level made from res5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dimaskdino.model.layers import FeedForward, float32_under_autocast, sine_position_embedding_2d, xavier_init_weights
from dimaskdino.model.ms_deform_attn import MSDeformAttn


@dataclass
class EncodedFeatures:
    """What the pixel decoder hands to query selection and the decoder."""

    memory: torch.Tensor  # (B, S, d) encoder output, levels flattened back to back
    position: torch.Tensor  # (S, d) sine position encoding of every token (no level embedding)
    spatial_shapes: torch.Tensor  # (L, 2) int64 (h, w)
    level_start_index: torch.Tensor  # (L,) int64
    shapes: list[tuple[int, int]]  # the same (h, w) as Python ints: sizes are static, no host sync
    mask_features: torch.Tensor  # (B, d, H/4, W/4)


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """detectron2's conv init: Kaiming-uniform with a=1 ("Xavier" in Caffe2), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ConvNorm(nn.Sequential):
    """Conv2d followed by GroupNorm(32) (and ReLU when asked)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True,
                 relu: bool = False):
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias),
            nn.GroupNorm(32, out_channels),
        ]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class EncoderLayer(nn.Module):
    """MSDA self-attention (query = token + position, reference = the token's own centre),
    then FFN; post-norm."""

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, dim_feedforward: int, impl: str):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points, impl=impl)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, dim_feedforward)

    def forward(self, tokens, position, reference_points, spatial_shapes, level_start_index):
        attended = self.self_attn(tokens + position, reference_points, tokens, spatial_shapes, level_start_index)
        tokens = self.norm1(tokens + attended)
        return self.ffn(tokens)


def token_centers(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Normalized (x, y) centre of every token of every level, levels back to back: (S, 2)."""
    centers = []
    for height, width in shapes:
        ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centers.append(torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2))
    return torch.cat(centers, dim=0)


class PixelDecoder(nn.Module):
    def __init__(
        self,
        in_channels: dict[str, int],
        hidden_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 2048,
        impl: str = "auto",
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_levels = 4
        # res3, res4, res5: 1x1 conv + GN; then a 3x3 stride-2 conv + GN on res5 for stride 64.
        self.input_proj = nn.ModuleList(
            [ConvNorm(in_channels[name], hidden_dim, 1) for name in ("res3", "res4", "res5")]
            + [ConvNorm(in_channels["res5"], hidden_dim, 3, stride=2)]
        )
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, hidden_dim))
        self.layers = nn.ModuleList(
            EncoderLayer(hidden_dim, self.num_levels, num_heads, num_points, dim_feedforward, impl)
            for _ in range(num_layers)
        )
        # Mask features: lateral on res2 + upsampled stride-8 encoder output, 3x3 conv, 1x1 conv.
        self.lateral_conv = ConvNorm(in_channels["res2"], hidden_dim, 1, bias=False)
        self.output_conv = ConvNorm(hidden_dim, hidden_dim, 3, bias=False, relu=True)
        self.mask_features = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for layer in self.layers:
            xavier_init_weights(layer)
            layer.self_attn.reset_parameters()  # the MSDA keeps its own radial-grid init
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        c2_xavier_fill(self.lateral_conv[0])
        c2_xavier_fill(self.output_conv[0])
        c2_xavier_fill(self.mask_features)

    @float32_under_autocast
    def forward(self, features: dict[str, torch.Tensor]) -> EncodedFeatures:
        res5 = features["res5"]
        levels = [self.input_proj[i](features[name]) for i, name in enumerate(("res3", "res4", "res5"))]
        levels.append(self.input_proj[3](res5))
        batch = res5.shape[0]
        device = res5.device
        shapes = [(int(level.shape[2]), int(level.shape[3])) for level in levels]
        num_feats = self.hidden_dim // 2

        position = torch.cat([sine_position_embedding_2d(h, w, num_feats, device) for h, w in shapes], dim=0)
        level_position = torch.cat(
            [self.level_embed[i].expand(h * w, -1) for i, (h, w) in enumerate(shapes)], dim=0
        )
        tokens = torch.cat([level.flatten(2).transpose(1, 2) for level in levels], dim=1)  # (B, S, d)
        spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64, device=device)

        encoder_position = (position.to(tokens.dtype) + level_position)[None]
        centers = token_centers(shapes, device)
        reference_points = centers[None, :, None, :].expand(batch, -1, self.num_levels, -1)
        for layer in self.layers:
            tokens = layer(tokens, encoder_position, reference_points, spatial_shapes, level_start_index)

        # Stride-8 level (level 0) back to a map, fused with res2 for the stride-4 mask features.
        height8, width8 = shapes[0]
        stride8 = tokens[:, : height8 * width8].transpose(1, 2).reshape(batch, self.hidden_dim, height8, width8)
        lateral = self.lateral_conv(features["res2"])
        fused = lateral + F.interpolate(stride8, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        mask_features = self.mask_features(self.output_conv(fused))

        return EncodedFeatures(
            memory=tokens,
            position=position,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            shapes=shapes,
            mask_features=mask_features,
        )
