"""Two-stage query selection (SPEC section 2): encoder proposals, top-k tokens by the shared class
head, their boxes and the mask-enhanced box initialization."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dimaskdino.model.heads import PredictionHeads
from dimaskdino.model.layers import box_xyxy_to_cxcywh, inverse_sigmoid, masks_to_boxes
from dimaskdino.ops import class_max_scores


def encoder_proposals(shapes: list[tuple[int, int]], device: torch.device, sizes: str = "authors") -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal per token: a box centred on the token, in inverse-sigmoid space, with
    w = h = 0.05 * 2^i where i counts levels coarsest first (the order in which the authors'
    decoder flattens them, FEATURE_ORDER low2high): 0.05 at the coarsest level (stride 64) ...
    0.4 at the finest (stride 8); `shapes` are fine to coarse, as everywhere in the model.
    sizes="by_stride": i counts levels finest first (0.05 at stride 8 ... 0.4 at stride 64).
    Returns proposals (S, 4) and valid (S,); the proposals of tokens too close to the border (any
    coordinate outside (0.01, 0.99)) are +inf, as in MaskDINO's gen_encoder_output_proposals.
    Batch independent: the model uses no padding mask."""
    proposals = []
    num_levels = len(shapes)
    for level, (height, width) in enumerate(shapes):
        ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        exponent = level if sizes == "by_stride" else num_levels - 1 - level
        size = torch.full_like(grid_x, 0.05 * 2.0**exponent)
        proposals.append(torch.stack((grid_x, grid_y, size, size), dim=-1).reshape(-1, 4))
    proposals = torch.cat(proposals, dim=0)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(dim=-1)
    logits = torch.log(proposals / (1 - proposals))
    return logits.masked_fill(~valid[:, None], float("inf")), valid


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, S, C), index (B, K) -> (B, K, C)."""
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


@dataclass
class Selection:
    content: torch.Tensor  # (B, K, d) enc_output of the selected tokens, not detached
    boxes: torch.Tensor  # (B, K, 4) sigmoid cxcywh, box head + proposal, not detached
    index: torch.Tensor  # (B, K) token indices into the flattened memory


class TokenSelection(nn.Module):
    """enc_output = LayerNorm(Linear(memory)); score = max class logit of the shared class head;
    the top-k tokens per image are kept, with boxes = shared box head + proposal."""

    def __init__(self, hidden_dim: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)

    def project(self, memory: torch.Tensor) -> torch.Tensor:
        return self.enc_output_norm(self.enc_output(memory))

    def scores(self, memory: torch.Tensor, class_head: nn.Linear) -> torch.Tensor:
        """max_c class_head(LayerNorm(Linear(memory))), without autograd: (B, S) float32."""
        proj, norm = self.enc_output, self.enc_output_norm
        return class_max_scores(
            memory, class_head.weight, class_head.bias, norm.weight, norm.bias, proj.weight, proj.bias,
            eps=norm.eps, impl=self.impl,
        )

    def forward(
        self,
        memory: torch.Tensor,
        proposals: torch.Tensor,
        valid: torch.Tensor,
        heads: PredictionHeads,
        num_select: int,
    ) -> Selection:
        # Scores only pick indices (top-k has no gradient), so they are computed without autograd
        # over all S tokens; the heads are then recomputed, with gradients, on the K selected ones.
        scores = self.scores(memory, heads.class_embed)
        # Tokens with an invalid proposal count as zero vectors (MaskDINO zeroes them): they
        # score like a zero token, computed once rather than masking a copy of the memory.
        zero_score = self.scores(memory.new_zeros(1, 1, memory.shape[-1]), heads.class_embed)
        scores = torch.where(valid[None], scores, zero_score.view(1, 1))
        index = scores.topk(min(num_select, memory.shape[1]), dim=1).indices
        selected_valid = valid[index][..., None]  # (B, K, 1)
        content = self.project(gather_tokens(memory, index) * selected_valid)
        boxes = (heads.bbox_embed(content).float() + proposals[index]).sigmoid()
        return Selection(content=content, boxes=boxes, index=index)


def mask_enhanced_boxes(mask_logits: torch.Tensor, selected_boxes: torch.Tensor | None = None) -> torch.Tensor:
    """Boxes of the predicted masks (logits > 0), normalized cxcywh, as the authors make them
    (their box_ops.masks_to_boxes, then inverse_sigmoid, then sigmoid in the decoder): corners at
    the (min, max) pixel indices with no +1, and an empty mask gives their degenerate box
    (x0 = y0 = 1e8, x1 = y1 = 0), which the eps-clamped inverse sigmoid turns into
    (1/(1+1e-5), 1/(1+1e-5), 1e-5/(1+1e-5), 1e-5/(1+1e-5)). Sync-free. mask_logits (B, K, h, w).

    With `selected_boxes` (B, K, 4) (model.mask_box_style=pixel_edges, the engine's former boxes):
    pixel-edge corners (x1 = last index + 1), no inverse-sigmoid clamp, and a query whose mask is
    empty keeps its selected box."""
    height, width = mask_logits.shape[-2:]
    foreground = mask_logits > 0
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=mask_logits.device)
    if selected_boxes is None:
        boxes_xyxy = masks_to_boxes(foreground, inclusive_max=False, empty_value=(1e8, 1e8, 0.0, 0.0))
        return inverse_sigmoid(box_xyxy_to_cxcywh(boxes_xyxy) / scale).sigmoid()
    boxes = box_xyxy_to_cxcywh(masks_to_boxes(foreground) / scale).to(selected_boxes.dtype)
    return torch.where(foreground.flatten(2).any(dim=-1, keepdim=True), boxes, selected_boxes)
