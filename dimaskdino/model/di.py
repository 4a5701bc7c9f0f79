"""The two DI-MaskDINO additions: token interaction with the second selection (SPEC section 3)
and balance-aware tokens optimization, BATO (SPEC section 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dimaskdino.model.heads import PredictionHeads
from dimaskdino.model.layers import (
    MLP,
    FeedForward,
    MultiHeadAttention,
    box_sine_embedding,
    float32_under_autocast,
    refine_boxes,
    xavier_init_weights,
)
from dimaskdino.model.pixel_decoder import c2_xavier_fill
from dimaskdino.model.query_selection import gather_tokens
from dimaskdino.ops import bato_attention, topk_select


class TokenInteractionLayer(nn.Module):
    """Self-attention (q = k = content + pos, v = content) and FFN, post-norm; no cross-attention."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, dim_feedforward)

    def forward(self, content: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        q = k = content + position
        content = self.norm1(content + self.self_attn(q, k, content))
        return self.ffn(content)


@dataclass
class TokenInteractionOutput:
    queries: torch.Tensor  # (B, k2, d) pre-norm content of the second selection
    boxes: torch.Tensor  # (B, k2, 4) their refined boxes, NOT detached
    layer_outputs: list[dict[str, torch.Tensor]]  # per TI layer: {"logits", "boxes"} over all k1 tokens


class TokenInteraction(nn.Module):
    """TI layers over the first-selection tokens, then the second selection (top-k2 by the shared
    class head on the normalized last output)."""

    def __init__(self, hidden_dim: int, num_layers: int, num_heads: int, dim_feedforward: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.layers = nn.ModuleList(
            TokenInteractionLayer(hidden_dim, num_heads, dim_feedforward) for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        self.norm = nn.LayerNorm(hidden_dim)
        xavier_init_weights(self)
        # Own box MLP, shared by the TI layers; zero-init last layer (set after the xavier pass).
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.bbox_embed.zero_init_last_layer()

    @float32_under_autocast
    def forward(
        self, content: torch.Tensor, boxes: torch.Tensor, heads: PredictionHeads, num_select: int
    ) -> TokenInteractionOutput:
        """content (B, k1, d) and boxes (B, k1, 4) come detached from the first selection."""
        layer_outputs = []
        refined = boxes
        for layer in self.layers:
            position = self.ref_point_head(box_sine_embedding(boxes, self.hidden_dim // 2))
            content = layer(content, position)
            refined = refine_boxes(self.bbox_embed, content, boxes)
            # Each TI layer refines its input box; the next layer starts from a detached copy.
            boxes = refined.detach()
            # The TI losses see what the authors' code predicts from the normalized output: class
            # logits through the decoder heads (which apply decoder_norm again) and a second box
            # delta from the normalized output on top of the box passed on.
            normed = self.norm(content)
            layer_outputs.append({
                "logits": heads.class_embed(heads.decoder_norm(normed)),
                "boxes": refine_boxes(self.bbox_embed, normed, refined),
            })
        # Second selection: the class head on the TI-normalized last output (no decoder_norm).
        scores = heads.class_embed(self.norm(content)).max(dim=-1).values
        index = scores.topk(min(num_select, scores.shape[1]), dim=1).indices
        return TokenInteractionOutput(
            queries=gather_tokens(content, index), boxes=gather_tokens(refined, index), layer_outputs=layer_outputs
        )


class GuidedAttention(MultiHeadAttention):
    """BATO's dense attention: S encoder tokens attend to a few guiding tokens (all keys fit on
    chip), through the `bato_attention` op. No mask."""

    def __init__(self, dim: int, num_heads: int, impl: str = "auto"):
        super().__init__(dim, num_heads)
        self.impl = impl

    def attend(self, q, k, v, blocked):
        if blocked is not None:
            raise ValueError("GuidedAttention takes no attention mask")
        return bato_attention(q, k, v, impl=self.impl)


class BalanceAwareTokenOptimization(nn.Module):
    """BATO: the top guiding tokens of Q_bal (decoder layer 0's output) update every encoder token
    by dense attention (T_bal), and T_bal's stride-8 level updates the mask features."""

    def __init__(
        self, hidden_dim: int, num_heads: int, dim_feedforward: int, num_guiding_tokens: int, impl: str = "auto"
    ):
        super().__init__()
        self.num_guiding_tokens = num_guiding_tokens
        self.impl = impl
        self.cross_attn = GuidedAttention(hidden_dim, num_heads, impl=impl)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.ffn = FeedForward(hidden_dim, dim_feedforward)
        xavier_init_weights(self)
        self.mask_feature_conv = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(32, hidden_dim),
            nn.ReLU(),
        )
        c2_xavier_fill(self.mask_feature_conv[0])

    def forward(
        self,
        balance_queries: torch.Tensor,
        box_positions: torch.Tensor,
        memory: torch.Tensor,
        memory_position: torch.Tensor,
        heads: PredictionHeads,
    ) -> torch.Tensor:
        """balance_queries (B, Q, d): Q_bal, matching queries only, no decoder norm;
        box_positions (B, Q, d): their decoder positional queries (from layer-0-refined boxes);
        memory (B, S, d), memory_position (S, d). Returns T_bal (B, S, d)."""
        # Guiding tokens: top-k of the shared class head on the raw Q_bal (no LayerNorm).
        class_head = heads.class_embed
        num_select = min(self.num_guiding_tokens, balance_queries.shape[1])
        _, index = topk_select(
            balance_queries, None, None, None, None, class_head.weight, class_head.bias, num_select, impl=self.impl
        )
        mask_tokens = heads.mask_embed(gather_tokens(balance_queries, index))
        box_tokens = gather_tokens(box_positions, index)
        attended = self.cross_attn(memory + memory_position, mask_tokens + box_tokens, mask_tokens)
        return self.ffn(self.norm1(memory + attended))

    def update_mask_features(
        self, balanced_memory: torch.Tensor, shape: tuple[int, int], mask_features: torch.Tensor
    ) -> torch.Tensor:
        """Stride-8 level of T_bal (the first `h*w` tokens) upsampled onto the stride-4 mask
        features, then 3x3 conv + GN + ReLU."""
        height, width = shape
        batch, _, dim = balanced_memory.shape
        stride8 = balanced_memory[:, : height * width].transpose(1, 2).reshape(batch, dim, height, width)
        upsampled = F.interpolate(stride8, size=mask_features.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_feature_conv(mask_features + upsampled)
