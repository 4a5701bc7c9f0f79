"""Inference post-processing (SPEC section 5): per image boxes, masks, scores, labels.

- scores = sigmoid of the Q x C class logits; the top_k (query, class) pairs over all of them, no
  NMS (a query may appear with several classes);
- masks: the selected stride-4 mask logits are upsampled bilinearly to the padded input size,
  cropped to the valid image size, resized bilinearly to the original size, then > 0;
- final score = class probability x mean mask probability inside the mask (at the original size);
- boxes from the box head: cxcywh normalized to the PADDED input -> xyxy pixels of the padded input,
  scaled to the original image; not clipped to the image (the authors' box_postprocess does not
  clip, and COCO evaluation takes the boxes as they are).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .box_ops import box_cxcywh_to_xyxy

# Masks are resized and scored this many at a time, bounding the float memory at the original size.
_MASK_CHUNK = 16


def decoder_output_names(outputs: dict) -> list[str]:
    """`init` (if present) then `dec0`, `dec1`, ... in layer order: the last is the final output."""
    layers = sorted((int(m.group(1)), name) for name in outputs if (m := re.fullmatch(r"dec(\d+)", name)))
    return (["init"] if "init" in outputs else []) + [name for _, name in layers]


def _as_size(size) -> tuple[int, int]:
    height, width = (int(v) for v in size)
    return height, width


def _masks_to_original(mask_logits, padded_size, image_size, original_size):
    """Bool masks (k, Ho, Wo) and mean mask probability inside each mask, from stride-4 logits (k, Hm, Wm)."""
    height, width = image_size
    masks, mask_scores = [], []
    for chunk in mask_logits.split(_MASK_CHUNK):
        logits = F.interpolate(chunk[:, None].float(), size=padded_size, mode="bilinear", align_corners=False)
        logits = logits[:, :, :height, :width]
        logits = F.interpolate(logits, size=original_size, mode="bilinear", align_corners=False)[:, 0]
        binary = logits > 0
        inside = binary.flatten(1).float()
        mask_scores.append((logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6))
        masks.append(binary)
    if not masks:
        return mask_logits.new_zeros((0, *original_size), dtype=torch.bool), mask_logits.new_zeros(0).float()
    return torch.cat(masks), torch.cat(mask_scores)


def _boxes_to_original(boxes_cxcywh, padded_size, image_size, original_size):
    """Normalized cxcywh over the padded input -> xyxy pixels of the original image (not clipped)."""
    padded_h, padded_w = padded_size
    height, width = image_size
    original_h, original_w = original_size
    boxes = box_cxcywh_to_xyxy(boxes_cxcywh.float())
    boxes = boxes * boxes.new_tensor([padded_w, padded_h, padded_w, padded_h])
    return boxes * boxes.new_tensor([original_w / width, original_h / height, original_w / width, original_h / height])


@torch.no_grad()
def postprocess(pred: dict, image_sizes, original_sizes, top_k: int = 100, padded_size=None) -> list[dict]:
    """Per image {"boxes" (k, 4) xyxy original pixels, "scores" (k,), "labels" (k,) int64,
    "masks" (k, Ho, Wo) bool}, sorted by final score.

    pred: {"logits" (B, Q, C), "boxes" (B, Q, 4), "masks" (B, Q, Hm, Wm)} of one output.
    image_sizes: valid (h, w) of each image inside the padded input; original_sizes: (Ho, Wo).
    padded_size: (H, W) of the padded input; default 4 x the mask size (masks are at stride 4).
    Without "masks" the score is the class probability and "masks" is absent.
    """
    logits = pred["logits"]
    batch, num_queries, num_classes = logits.shape
    has_masks = "masks" in pred
    if padded_size is None:
        if not has_masks:
            raise ValueError("postprocess: padded_size is required for outputs without masks")
        padded_size = (4 * pred["masks"].shape[-2], 4 * pred["masks"].shape[-1])
    padded_size = _as_size(padded_size)
    k = min(top_k, num_queries * num_classes)

    results = []
    for b in range(batch):
        image_size = _as_size(image_sizes[b])
        original_size = _as_size(original_sizes[b])
        class_prob, flat_index = logits[b].float().sigmoid().flatten().topk(k)
        query = flat_index // num_classes
        result = {
            "boxes": _boxes_to_original(pred["boxes"][b, query], padded_size, image_size, original_size),
            "labels": flat_index % num_classes,
        }
        if has_masks:
            masks, mask_scores = _masks_to_original(pred["masks"][b, query], padded_size, image_size, original_size)
            result["masks"] = masks
            result["scores"] = class_prob * mask_scores
        else:
            result["scores"] = class_prob
        order = result["scores"].argsort(descending=True)
        results.append({key: value[order] for key, value in result.items()})
    return results


@torch.no_grad()
def postprocess_all_layers(
    outputs: dict, image_sizes, original_sizes, top_k: int = 100, padded_size=None
) -> dict[str, list[dict]]:
    """`postprocess` of every decoder output (`init`, `dec0`, ...): name -> per-image results, for
    the per-layer box/mask AP diagnostic."""
    return {
        name: postprocess(outputs[name], image_sizes, original_sizes, top_k=top_k, padded_size=padded_size)
        for name in decoder_output_names(outputs)
    }
