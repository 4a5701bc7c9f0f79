"""The prediction heads shared by every output (SPEC sections 2 and 4): one class Linear, one
3-layer box MLP (last layer zero-init), one 3-layer mask-embedding MLP, and the decoder LayerNorm
applied before them."""

from __future__ import annotations

import torch
from torch import nn

from dimaskdino.model.layers import MLP, refine_boxes


class PredictionHeads(nn.Module):
    def __init__(self, hidden_dim: int, num_classes: int):
        super().__init__()
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.bbox_embed.zero_init_last_layer()
        self.mask_embed = MLP(hidden_dim, hidden_dim, hidden_dim, 3)

    def refine_boxes(self, tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """sigmoid(box MLP(tokens) + logit(reference)) with the shared box MLP."""
        return refine_boxes(self.bbox_embed, tokens, reference)

    def masks(self, tokens: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """Mask logits: mask embedding of each token dotted with every pixel of the mask features."""
        return masks_from_embeddings(self.mask_embed(tokens), mask_features)

    def predict(
        self,
        queries: torch.Tensor,
        mask_features: torch.Tensor,
        reference: torch.Tensor | None = None,
        with_masks: bool = True,
        point_masks: bool = False,
        with_embeddings: bool = False,
        renorm: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Class logits and mask logits of the normalized queries; boxes refined from `reference`
        (normalized cxcywh) when it is given. point_masks=True: instead of the (B, Q, H, W) mask
        logits, "mask_embed" (B, Q, d) and "mask_features" (the given tensor, not a copy), from
        which the matcher and the criterion make logits only where they sample them.
        with_embeddings=True: "mask_embed" and "mask_features" besides the full "masks" (losses
        that query pixels other than the image's own: instance-unique querying).

        renorm=True (decoder layers' outputs): the class and mask heads see decoder_norm applied
        twice, the box head once, as in the authors' code (their decoder returns
        decoder_norm(output) and their prediction heads normalize again). It cannot be folded into
        the weights, so their checkpoints need it."""
        normed = self.decoder_norm(queries)
        box_input = normed
        if renorm:
            normed = self.decoder_norm(normed)
        out = {"logits": self.class_embed(normed)}
        if with_masks and (point_masks or with_embeddings):
            out["mask_embed"] = self.mask_embed(normed)
            out["mask_features"] = mask_features
            if not point_masks:
                out["masks"] = masks_from_embeddings(out["mask_embed"], mask_features)
        elif with_masks:
            out["masks"] = self.masks(normed, mask_features)
        if reference is not None:
            out["boxes"] = self.refine_boxes(box_input, reference)
        return out


def masks_from_embeddings(mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
    """Mask logits (B, Q, H, W) of mask embeddings (B, Q, d) and mask features (B, d, H, W)."""
    return torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
