"""Small building blocks shared by the model: MLP, attention, FFN, sine embeddings, box helpers."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

# Box conversions live in box_ops (shared with the matcher and the criterion); re-exported here.
from dimaskdino.model.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, masks_to_boxes

__all__ = [
    "MLP",
    "MultiHeadAttention",
    "FeedForward",
    "inverse_sigmoid",
    "refine_boxes",
    "sine_position_embedding_2d",
    "box_sine_embedding",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "masks_to_boxes",
]


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out))

    def zero_init_last_layer(self) -> None:
        # Box heads start as the identity refinement: the first prediction is the reference box.
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = F.relu(x)
        return x


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/output projections (same parameter count as
    nn.MultiheadAttention), batch-first, computed with scaled_dot_product_attention.

    `blocked`: bool, True where a query may NOT attend to a key; (Lq, Lk) or (B, Lq, Lk).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MultiHeadAttention: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocked: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, num_query, _ = query.shape
        num_key = key.shape[1]
        head_dim = self.dim // self.num_heads
        q = self.q_proj(query).view(batch, num_query, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, num_key, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, num_key, self.num_heads, head_dim).transpose(1, 2)
        out = self.attend(q, k, v, blocked)  # (B, heads, Lq, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(batch, num_query, self.dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        allowed = None
        if blocked is not None:
            allowed = ~blocked
            allowed = allowed[:, None] if allowed.dim() == 3 else allowed  # broadcast over heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


class FeedForward(nn.Module):
    """Post-norm FFN block: LayerNorm(x + Linear(ReLU(Linear(x))))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


def float32_under_autocast(forward):
    """Decorator for a module's forward: when the module's `fp32_island` is True and autocast is
    on, the forward runs with autocast off on float32 copies of its floating-point tensor
    arguments (dicts and lists included). The authors' fp16 recipe runs their pixel decoder, TI
    layers and decoder layers like this (@autocast(enabled=False)); model.fp32_layers switches it
    on. Off (the default), the forward runs under the caller's autocast."""
    from torch.utils._pytree import tree_leaves, tree_map

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if not getattr(self, "fp32_island", False):
            return forward(self, *args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        if not torch.is_autocast_enabled(device_type):
            return forward(self, *args, **kwargs)

        def to_float(value):
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        with torch.autocast(device_type, enabled=False):
            return forward(self, *tree_map(to_float, args), **tree_map(to_float, kwargs))

    return wrapper


def xavier_init_weights(module: nn.Module) -> None:
    """Xavier-uniform for every weight matrix under `module` (the DETR-family transformer init)."""
    for parameter in module.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x kept >= eps, so it stays finite."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def refine_boxes(box_mlp: nn.Module, tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sigmoid(box_mlp(tokens) + logit(reference)); reference is a normalized cxcywh box.
    Box arithmetic stays float32 under autocast (a bf16 box is off by up to 4 px at 1024)."""
    return (box_mlp(tokens).float() + inverse_sigmoid(reference.float())).sigmoid()


def _sine_cosine(coords: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(...,) angles -> (..., num_feats): sin on even frequencies, cos on odd ones, interleaved."""
    index = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    angles = coords.float()[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_embedding_2d(
    height: int, width: int, num_feats: int, device: torch.device, temperature: float = 10000.0
) -> torch.Tensor:
    """Normalized 2-D sine encoding of an h x w grid (DETR's PositionEmbeddingSine with
    normalize=True): row i maps to 2*pi*(i+1)/h. Returns (h*w, 2*num_feats) as [y-part, x-part]."""
    eps = 1e-6
    scale = 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    pos_y = _sine_cosine(y, num_feats, temperature)[:, None, :].expand(height, width, num_feats)
    pos_x = _sine_cosine(x, num_feats, temperature)[None, :, :].expand(height, width, num_feats)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, 2 * num_feats)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of normalized (cx, cy, w, h) boxes: (..., 4) -> (..., 4*num_feats), in the
    order [y, x, w, h] (DINO's gen_sineembed_for_position)."""
    scaled = boxes * (2 * math.pi)
    cx, cy, w, h = scaled.unbind(-1)
    return torch.cat([_sine_cosine(c, num_feats, temperature) for c in (cy, cx, w, h)], dim=-1)
