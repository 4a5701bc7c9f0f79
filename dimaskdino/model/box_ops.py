"""Box conversions and (generalized) IoU, written once for the whole project.

Conventions: `cxcywh` = (centre x, centre y, width, height); `xyxy` = (x0, y0, x1, y1). Every
function works on any leading batch dimensions. Pairwise functions take (..., N, 4) and (..., M, 4)
and return (..., N, M); `elementwise_*` take two (..., 4) tensors of the same shape and return (...).
"""

from __future__ import annotations

import torch

# Guards 0 / 0 when both boxes are degenerate (zero area); far below the area of a one-pixel box
# of a 4096-pixel image (6e-8), so it never changes a real IoU.
_EPS = 1e-12


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) * 0.5, (y0 + y1) * 0.5, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of xyxy boxes: (..., N, 4), (..., M, 4) -> iou (..., N, M), union (..., N, M)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union.clamp(min=_EPS), union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes: (..., N, M), in [-1, 1]."""
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=_EPS)


def elementwise_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU of aligned pairs of xyxy boxes: (..., 4), (..., 4) -> iou (...), union (...)."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union.clamp(min=_EPS), union


def elementwise_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of aligned pairs of xyxy boxes (the diagonal of `generalized_box_iou`
    without building the N x N matrix, which matters for denoising with many GT)."""
    iou, union = elementwise_box_iou(boxes1, boxes2)
    top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=_EPS)


def masks_to_boxes(
    masks: torch.Tensor, inclusive_max: bool = True, empty_value: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
) -> torch.Tensor:
    """Tight xyxy boxes of binary masks (..., H, W). inclusive_max=True: pixel-edge coordinates,
    a mask covering columns 3..5 gives x0 = 3, x1 = 6, so dividing by (W, H) normalizes exactly
    (detectron2's BitMasks convention); False: x1 = 5, the last index (the authors'
    box_ops.masks_to_boxes, used for their mask-enhanced anchors). Empty masks give `empty_value`.
    Vectorized: no host synchronization."""
    masks = masks.bool()
    height, width = masks.shape[-2:]
    any_in_col = masks.any(dim=-2)  # (..., W)
    any_in_row = masks.any(dim=-1)  # (..., H)
    cols = torch.arange(width, device=masks.device, dtype=torch.float32)
    rows = torch.arange(height, device=masks.device, dtype=torch.float32)
    end = 1.0 if inclusive_max else 0.0
    big = float(max(height, width) + 1)
    x0 = torch.where(any_in_col, cols, big).amin(dim=-1)
    x1 = torch.where(any_in_col, cols + end, -1.0).amax(dim=-1)
    y0 = torch.where(any_in_row, rows, big).amin(dim=-1)
    y1 = torch.where(any_in_row, rows + end, -1.0).amax(dim=-1)
    boxes = torch.stack((x0, y0, x1, y1), dim=-1)
    nonempty = any_in_col.any(dim=-1, keepdim=True)
    return torch.where(nonempty, boxes, boxes.new_tensor(empty_value))
