"""The deformable decoder (SPEC section 4): self-attention with the denoising mask, MSDA
cross-attention with 4-d reference boxes, FFN, post-norm; iterative box refinement with
look-forward-twice; BATO between layers 0 and 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dimaskdino.model.di import BalanceAwareTokenOptimization
from dimaskdino.model.heads import PredictionHeads
from dimaskdino.model.layers import (
    MLP,
    FeedForward,
    MultiHeadAttention,
    box_sine_embedding,
    float32_under_autocast,
    xavier_init_weights,
)
from dimaskdino.model.ms_deform_attn import MSDeformAttn
from dimaskdino.model.pixel_decoder import EncodedFeatures


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, dim_feedforward: int, impl: str):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, num_levels, num_heads, num_points, impl=impl)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, dim_feedforward)
        self.num_levels = num_levels

    @float32_under_autocast
    def forward(
        self,
        queries: torch.Tensor,
        query_position: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        features: EncodedFeatures,
        self_attn_blocked: torch.Tensor | None,
    ) -> torch.Tensor:
        q = k = queries + query_position
        queries = self.norm1(queries + self.self_attn(q, k, queries, blocked=self_attn_blocked))
        # Same reference box on every level (no padding, so no per-level valid ratio).
        reference = reference_boxes[:, :, None, :].expand(-1, -1, self.num_levels, -1)
        attended = self.cross_attn(
            queries + query_position, reference, memory, features.spatial_shapes, features.level_start_index
        )
        queries = self.norm2(queries + attended)
        return self.ffn(queries)


@dataclass
class DecoderOutput:
    hidden: list[torch.Tensor]  # per layer, the raw layer output (B, T, d)
    references: list[torch.Tensor]  # per layer, the undetached reference that layer started from
    updated_mask_features: torch.Tensor | None  # BATO's mask features for outputs 1..N-1
    bato_memory: torch.Tensor | None  # the memory BATO made for layers 1..N-1 (None without BATO)


class Decoder(nn.Module):
    def __init__(
        self,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        num_points: int,
        dim_feedforward: int,
        num_levels: int,
        impl: str,
        bato: BalanceAwareTokenOptimization | None,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, num_levels, num_heads, num_points, dim_feedforward, impl)
            for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        xavier_init_weights(self)
        for layer in self.layers:
            layer.cross_attn.reset_parameters()
        self.bato = bato  # initialized by itself

    def forward(
        self,
        queries: torch.Tensor,
        reference_boxes: torch.Tensor,
        features: EncodedFeatures,
        heads: PredictionHeads,
        self_attn_blocked: torch.Tensor | None,
        num_denoising: int,
        bato_memory: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """queries (B, T, d) and reference_boxes (B, T, 4) normalized cxcywh, with the denoising
        queries first (`num_denoising` of them) and the matching queries after.

        bato_memory: layers 1..N-1 read this memory instead of running BATO on these queries'
        layer-0 outputs. The hybrid-assignment queries pass the main pass's, so that they see the
        same features as the matching queries (BATO is guided by the matching queries only)."""
        memory = features.memory
        updated_mask_features = None
        hidden, references = [], []
        loss_reference = reference_boxes  # layer 0 starts from the undetached input boxes
        for layer_index, layer in enumerate(self.layers):
            query_position = self.ref_point_head(box_sine_embedding(reference_boxes, self.hidden_dim // 2))
            if layer_index == 1 and bato_memory is not None:
                memory = bato_memory
            elif layer_index == 1 and self.bato is not None:
                # Q_bal = layer 0's matching outputs; box guiding tokens = positional queries of
                # their layer-0-refined boxes, i.e. this layer's query positions.
                memory = self.bato(
                    hidden[0][:, num_denoising:],
                    query_position[:, num_denoising:],
                    memory,
                    features.position.to(memory.dtype),
                    heads,
                )
                updated_mask_features = self.bato.update_mask_features(
                    memory, features.shapes[0], features.mask_features
                )
            references.append(loss_reference)
            queries = layer(queries, query_position, reference_boxes, memory, features, self_attn_blocked)
            hidden.append(queries)
            # Refinement from the raw layer output (as DINO). The next layer starts from a detached
            # copy, while the box it predicts for the loss is refined from the undetached one
            # ("look forward twice").
            loss_reference = heads.refine_boxes(queries, reference_boxes)
            reference_boxes = loss_reference.detach()
        return DecoderOutput(
            hidden=hidden, references=references, updated_mask_features=updated_mask_features,
            bato_memory=memory if self.bato is not None and len(self.layers) > 1 else None,
        )
