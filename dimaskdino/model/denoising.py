"""Denoising queries, "seg" mode (SPEC section 4): noised GT labels and boxes, in G groups of M
(M = max GT per image), prepended to the matching queries.

Query g*M + i of image b is GT i of image b in group g (a padding query when i >= that image's GT
count: zero content, box (0.5, 0.5, 0.5, 0.5), no loss). No contrastive negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dimaskdino.model.point_sample import rand_per_image


@dataclass
class DenoisingQueries:
    content: torch.Tensor  # (B, G*M, d)
    boxes: torch.Tensor  # (B, G*M, 4) normalized cxcywh (noised GT; 0.5 for padding queries)
    self_attn_blocked: torch.Tensor  # (G*M + Q, G*M + Q) bool, True = may not attend
    num_groups: int
    single_pad: int

    @property
    def num_queries(self) -> int:
        return self.num_groups * self.single_pad


def denoising_attention_mask(num_groups: int, single_pad: int, num_matching: int, device: torch.device) -> torch.Tensor:
    """Matching queries do not see denoising queries; denoising groups do not see each other;
    denoising queries see the matching queries (DN-DETR)."""
    num_dn = num_groups * single_pad
    total = num_dn + num_matching
    index = torch.arange(total, device=device)
    is_dn = index < num_dn
    group = torch.where(is_dn, torch.div(index, max(single_pad, 1), rounding_mode="floor"), -1)
    matching_sees_dn = ~is_dn[:, None] & is_dn[None, :]
    other_group = is_dn[:, None] & is_dn[None, :] & (group[:, None] != group[None, :])
    return matching_sees_dn | other_group


class DenoisingGenerator(nn.Module):
    """Holds the label embedding (the content of a denoising query) and builds the queries."""

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        num_queries: int = 100,
        label_noise_prob: float = 0.2,
        box_noise_scale: float = 0.4,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.label_noise_prob = label_noise_prob
        self.box_noise_scale = box_noise_scale
        self.label_enc = nn.Embedding(num_classes, hidden_dim)

    def forward(
        self,
        targets: list[dict[str, torch.Tensor]],
        num_matching: int,
        generators: list[torch.Generator] | None = None,
        max_gt: int | None = None,
    ) -> DenoisingQueries | None:
        """None when denoising cannot be used: no GT in the batch, or more GT in one image than
        denoising queries (then not even one group fits).

        max_gt: the largest GT count per image over the whole global batch (all processes), so
        that the number of groups does not depend on how the batch is split; default: this
        batch's. generators: one per image for the noise (see `rand_per_image`)."""
        counts = [int(t["labels"].shape[0]) for t in targets]  # shapes: no host sync
        single_pad = max(counts, default=0) if max_gt is None else max_gt
        if single_pad < max(counts, default=0):
            raise ValueError(f"denoising: max_gt={max_gt} is smaller than an image's GT count {max(counts)}")
        if single_pad == 0 or single_pad > self.num_queries:
            return None
        num_groups = self.num_queries // single_pad
        device = self.label_enc.weight.device
        batch = len(targets)

        # Pad every image to M GT: (B, M) labels, (B, M, 4) boxes, (B, M) valid.
        labels = torch.zeros(batch, single_pad, dtype=torch.int64, device=device)
        boxes = torch.full((batch, single_pad, 4), 0.5, dtype=torch.float32, device=device)
        valid = torch.zeros(batch, single_pad, dtype=torch.bool, device=device)
        for b, (target, count) in enumerate(zip(targets, counts)):
            if count:
                labels[b, :count] = target["labels"].to(device=device, dtype=torch.int64)
                boxes[b, :count] = target["boxes"].to(device=device, dtype=torch.float32)
                valid[b, :count] = True
        labels = labels.repeat(1, num_groups)
        boxes = boxes.repeat(1, num_groups, 1)
        valid = valid.repeat(1, num_groups)

        per_image = [1] * batch
        if self.label_noise_prob > 0:
            draws = rand_per_image(per_image, (labels.shape[1], 2), device, generators)
            flip = draws[..., 0] < self.label_noise_prob
            random_labels = (draws[..., 1] * self.num_classes).long().clamp(max=self.num_classes - 1)
            labels = torch.where(flip, random_labels, labels)
        if self.box_noise_scale > 0:
            # Centre moves up to scale * half size; width and height change by up to +-scale.
            half_wh = boxes[..., 2:] / 2
            extent = torch.cat((half_wh, boxes[..., 2:]), dim=-1)
            uniform = rand_per_image(per_image, tuple(boxes.shape[1:]), device, generators)
            noise = (uniform * 2 - 1) * extent * self.box_noise_scale
            boxes = (boxes + noise).clamp(0.0, 1.0)

        content = self.label_enc(labels) * valid[..., None]
        # Padding queries sit at logit 0 (box 0.5, 0.5, 0.5, 0.5), as in DN-DETR's zero padding.
        boxes = torch.where(valid[..., None], boxes, torch.full_like(boxes, 0.5))
        blocked = denoising_attention_mask(num_groups, single_pad, num_matching, device)
        return DenoisingQueries(
            content=content, boxes=boxes, self_attn_blocked=blocked, num_groups=num_groups, single_pad=single_pad
        )
