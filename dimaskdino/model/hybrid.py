"""Collaborative hybrid assignment (Co-DETR, Zong et al. 2023, arXiv 2211.12860): the auxiliary heads.

Co-DETR trains one-to-many auxiliary heads on the encoder output next to the one-to-one DETR
decoder. They (1) give the encoder dense supervision through their own losses and (2) hand the
decoder "customized positive queries": the positive anchors / proposals of each head, with the GT
they were assigned to, which the integrating model decodes in extra query groups.

`HybridHeads` implements both parts for two heads:

- a multi-scale adapter: the L encoder levels (strides 8, 16, 32, ...) reshaped to maps, plus one
  extra level made by a 3x3 stride-2 conv + GroupNorm(32) on the coarsest one;
- "atss" (Co-DINO's ATSS head): per location one square anchor of side 8 x stride; a cls tower and
  a reg tower of one conv3x3 + GN + ReLU each, shared over levels; cls conv (prior 0.01), reg conv
  (DeltaXYWH deltas, stds (0.1, 0.1, 0.2, 0.2)) times a learnable scale per level, centerness conv
  on the reg tower. ATSS assigner (top 9 nearest centres per level, IoU >= mean + std, anchor centre
  inside the GT, highest IoU wins). Losses: focal (alpha 0.25, gamma 2) / num_pos, GIoU weighted by
  the centerness target / sum of centerness targets (at least 1, as mmdet) x 2, centerness BCE /
  num_pos (num_pos at least 1);
- "rcnn" (Co-DETR's Faster R-CNN head): RPN on every pyramid level (conv3x3 + ReLU, 1x1 objectness
  and 1x1 reg convs, 3 anchors of ratios 0.5, 1, 2 and side 8 x stride, DeltaXYWH stds 1), max-IoU
  assigner (0.7 / 0.3, low-quality matches >= 0.3 for every GT), 256 anchors sampled per image (at
  most half positive), BCE and L1 / num sampled. Proposals: top 1000 per level, clipped, boxes
  under 1 px dropped, NMS 0.7 within each level (mmdet's batched_nms over level ids), top 1000 per
  image, then the GT boxes appended. RoI stage: max-IoU assigner (0.5 / 0.5, no low-quality
  matches), 512 RoIs sampled per image (at most 25 % positive), multi-level RoIAlign (7x7, aligned,
  finest_scale 56 over the first four pyramid levels), two shared FC 1024 layers, softmax
  classifier (background = last class) with cross entropy, box deltas (stds 0.1, 0.1, 0.2, 0.2)
  decoded and trained with GIoU / num sampled x 10.

Every auxiliary loss is multiplied by `aux_weight`. Boxes are handled in pixel xyxy of the padded
image internally; the queries leave as normalized cxcywh.

Simplifications with respect to Co-DETR / mmdet (deliberate):
- anchors sit at cell centres ((x + 0.5) * stride), not at mmdet's cell corners (center_offset 0),
  matching the aligned RoIAlign and the token centres used elsewhere in this model;
- the level strides are fixed (8 x 2^l), not read from the backbone;
- RoIAlign always takes 2 x 2 samples per bin (mmdet's sampling_ratio=0 adapts it to the RoI size);
- the R-CNN box regression is class-agnostic (Co-DETR's Shared2FCBBoxHead regresses per class);
- the RPN keeps the top 1000 boxes per level before NMS (Co-DETR's train-time nms_pre is larger);
- normalizers (num_pos, sum of centerness targets, number of sampled anchors / RoIs) are averaged
  over processes (as mmdet's reduce_mean), so N processes give the 1-process losses;
- loss weights are those of mmdet's heads times `aux_weight`; Co-DETR's configs additionally scale
  the auxiliary losses by the number of decoder layers, which is left to the caller;
- positive queries are padded with the head's own negatives (ATSS: random negative anchors; R-CNN:
  sampled negative RoIs); when an image has too few, the whole padded image box (0.5, 0.5, 1, 1) is
  used. Query boxes are clipped to the image, converted to cxcywh and clamped into
  [QUERY_BOX_EPS, 1 - QUERY_BOX_EPS] so that inverse_sigmoid stays finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dimaskdino.dist import all_reduce_max_int, mean_over_processes

from .box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, elementwise_generalized_box_iou
from .criterion import sigmoid_focal_loss_sum
from .layers import box_sine_embedding
from .pixel_decoder import ConvNorm, c2_xavier_fill
from .point_sample import rank_within_group

HEAD_NAMES = ("atss", "rcnn")

FINEST_STRIDE = 8  # stride of the first encoder level; level l has stride 8 * 2^l
ANCHOR_SCALE = 8  # anchor side = 8 x stride (mmdet octave_base_scale / scales=[8])
RPN_RATIOS = (0.5, 1.0, 2.0)  # height / width of the RPN anchors
ATSS_STDS = (0.1, 0.1, 0.2, 0.2)
RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
# mmdet's DeltaXYWHBBoxCoder clamps log-scale deltas so that exp() cannot blow up.
MAX_LOG_RATIO = abs(math.log(16.0 / 1000.0))
ATSS_TOPK = 9
# mmdet requires an ATSS anchor centre to be this many pixels inside the GT box.
ATSS_INSIDE_MARGIN = 0.01
RPN_PRE_NMS_PER_LEVEL = 1000
RPN_POST_NMS_PER_IMAGE = 1000
RPN_NMS_IOU = 0.7
RPN_MIN_BOX_SIZE = 1.0  # pixels
RPN_SAMPLES, RPN_POSITIVE_FRACTION = 256, 0.5
ROI_SAMPLES, ROI_POSITIVE_FRACTION = 512, 0.25
ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO = 7, 2
ROI_FINEST_SCALE = 56
ROI_MAX_LEVELS = 4
BOX_HEAD_DIM = 1024
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
QUERY_BOX_EPS = 1e-4
PADDING_QUERY_BOX = (0.5, 0.5, 1.0, 1.0)  # normalized cxcywh: the whole padded image

# max-IoU assignment codes (any value >= 0 is the index of the assigned GT)
NEGATIVE = -1
IGNORED = -2


@dataclass
class PositiveQueries:
    """One head's customized positive queries for the decoder: M per image (M = min(max_positives,
    largest positive count in the batch), at least 1), positives first then padding negatives."""

    content: torch.Tensor  # (B, M, d): LayerNorm(Linear(box_sine_embedding(boxes, d // 2)))
    boxes: torch.Tensor  # (B, M, 4) normalized cxcywh in the padded frame, detached
    matches: list[tuple[torch.Tensor, torch.Tensor]]  # per image (query_idx (n_i,), gt_idx (n_i,)) int64


@dataclass
class HybridOutput:
    losses: dict[str, torch.Tensor]  # weighted scalar losses of the auxiliary heads
    queries: dict[str, PositiveQueries]  # keyed by head name


@dataclass
class GroundTruth:
    """The batch's targets in the frame the heads work in (pixel xyxy of the padded image)."""

    boxes: list[torch.Tensor]  # per image (N_i, 4) pixel xyxy
    labels: list[torch.Tensor]  # per image (N_i,) int64
    image_hw: tuple[int, int]
    generators: list[torch.Generator | None]  # per image; None = the global RNG


# --------------------------------------------------------------------------------------------
# Box coding, anchors
# --------------------------------------------------------------------------------------------


def box_compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Boxes and losses are computed in float32 (float64 when the model runs in float64), never bf16."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def encode_deltas(anchors: torch.Tensor, targets: torch.Tensor, stds: tuple[float, ...]) -> torch.Tensor:
    """DeltaXYWH targets of xyxy `targets` relative to xyxy `anchors`, divided by `stds`: (..., 4)."""
    anchor_cxcywh = box_xyxy_to_cxcywh(anchors)
    target_cxcywh = box_xyxy_to_cxcywh(targets)
    centre = (target_cxcywh[..., :2] - anchor_cxcywh[..., :2]) / anchor_cxcywh[..., 2:]
    size = torch.log(target_cxcywh[..., 2:] / anchor_cxcywh[..., 2:])
    return torch.cat((centre, size), dim=-1) / anchors.new_tensor(stds)


def decode_deltas(anchors: torch.Tensor, deltas: torch.Tensor, stds: tuple[float, ...]) -> torch.Tensor:
    """Inverse of `encode_deltas` (log-size deltas clamped as mmdet does): xyxy boxes (..., 4)."""
    deltas = deltas * deltas.new_tensor(stds)
    anchor_cxcywh = box_xyxy_to_cxcywh(anchors)
    centre = anchor_cxcywh[..., :2] + anchor_cxcywh[..., 2:] * deltas[..., :2]
    size = anchor_cxcywh[..., 2:] * deltas[..., 2:].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    return box_cxcywh_to_xyxy(torch.cat((centre, size), dim=-1))


def clip_boxes(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    height, width = image_hw
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)), -1)


def level_anchors(
    shape: tuple[int, int], stride: int, sizes_wh: list[tuple[float, float]], device, dtype
) -> torch.Tensor:
    """Anchors of one level, xyxy pixels, location-major then anchor: (h * w * len(sizes_wh), 4)."""
    height, width = shape
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 1, 2)
    half = torch.tensor(sizes_wh, device=device, dtype=dtype) * 0.5  # (A, 2)
    return torch.cat((centres - half, centres + half), dim=-1).reshape(-1, 4)


def atss_anchor_sizes(stride: int) -> list[tuple[float, float]]:
    side = float(ANCHOR_SCALE * stride)
    return [(side, side)]


def rpn_anchor_sizes(stride: int) -> list[tuple[float, float]]:
    # mmdet AnchorGenerator: the area stays (8 x stride)^2, ratio = height / width.
    side = float(ANCHOR_SCALE * stride)
    return [(side / math.sqrt(ratio), side * math.sqrt(ratio)) for ratio in RPN_RATIOS]


def pixel_gt_boxes(targets: list[dict], image_hw: tuple[int, int], device, dtype) -> list[torch.Tensor]:
    height, width = image_hw
    scale = torch.tensor([width, height, width, height], device=device, dtype=dtype)
    return [box_cxcywh_to_xyxy(target["boxes"].to(device=device, dtype=dtype)) * scale for target in targets]


# --------------------------------------------------------------------------------------------
# Assigners and samplers
# --------------------------------------------------------------------------------------------


def atss_assign(anchors: torch.Tensor, level_sizes: list[int], gt_boxes: torch.Tensor,
                topk: int = ATSS_TOPK) -> torch.Tensor:
    """ATSS (Zhang et al. 2020) for one image. anchors (A, 4) xyxy with levels back to back
    (`level_sizes` anchors each), gt_boxes (G, 4) xyxy. Returns (A,) int64: the assigned GT index,
    or NEGATIVE."""
    assigned = torch.full((anchors.shape[0],), NEGATIVE, dtype=torch.long, device=anchors.device)
    if gt_boxes.shape[0] == 0:
        return assigned
    ious, _ = box_iou(gt_boxes, anchors)  # (G, A)
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) * 0.5
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) * 0.5
    distances = (gt_centres[:, None, :] - anchor_centres[None, :, :]).norm(dim=-1)
    candidates = nearest_per_level(distances, level_sizes, topk)  # (G, K)
    candidate_ious = ious.gather(1, candidates)
    # Unbiased std as mmdet (torch.std); a single candidate has no spread.
    correction = 1 if candidates.shape[1] > 1 else 0
    threshold = candidate_ious.mean(1, keepdim=True) + candidate_ious.std(1, keepdim=True, correction=correction)
    accepted = (candidate_ious >= threshold) & centres_inside(anchor_centres[candidates], gt_boxes)
    # A GT's candidates come from disjoint level ranges, so the scatter never writes a cell twice.
    claimed = torch.full_like(ious, -math.inf)
    claimed.scatter_(1, candidates, torch.where(accepted, candidate_ious, -math.inf))
    best_iou, best_gt = claimed.max(dim=0)
    return torch.where(best_iou > -math.inf, best_gt, assigned)


def nearest_per_level(distances: torch.Tensor, level_sizes: list[int], topk: int) -> torch.Tensor:
    """Indices of the `topk` smallest distances (G, A) within every level: (G, sum_l min(topk, A_l))."""
    candidates, start = [], 0
    for size in level_sizes:
        count = min(topk, size)
        if count > 0:
            nearest = distances[:, start:start + size].topk(count, dim=1, largest=False).indices
            candidates.append(nearest + start)
        start += size
    return torch.cat(candidates, dim=1)


def centres_inside(centres: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """centres (G, K, 2) against their own GT (G, 4): strictly inside by ATSS_INSIDE_MARGIN: (G, K)."""
    to_top_left = centres - gt_boxes[:, None, :2]
    to_bottom_right = gt_boxes[:, None, 2:] - centres
    return torch.cat((to_top_left, to_bottom_right), dim=-1).amin(-1) > ATSS_INSIDE_MARGIN


def max_iou_assign(ious: torch.Tensor, pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float,
                   match_low_quality: bool) -> torch.Tensor:
    """mmdet's MaxIoUAssigner on a (G, A) IoU matrix: (A,) int64 with the assigned GT index,
    NEGATIVE (max IoU < neg_iou_thr) or IGNORED (in between). With `match_low_quality`, every GT
    also takes all of its best anchors (ties included) when that IoU >= min_pos_iou; a later GT
    overrides an earlier one there, as in mmdet's loop over GT."""
    num_gt, num_anchors = ious.shape
    if num_gt == 0:
        return torch.full((num_anchors,), NEGATIVE, dtype=torch.long, device=ious.device)
    max_iou, best_gt = ious.max(dim=0)
    assigned = torch.full((num_anchors,), IGNORED, dtype=torch.long, device=ious.device)
    assigned = torch.where(max_iou < neg_iou_thr, NEGATIVE, assigned)
    assigned = torch.where(max_iou >= pos_iou_thr, best_gt, assigned)
    if match_low_quality:
        gt_best_iou = ious.max(dim=1, keepdim=True).values  # (G, 1)
        is_best = (ious == gt_best_iou) & (gt_best_iou >= min_pos_iou)
        gt_rank = torch.arange(1, num_gt + 1, device=ious.device)[:, None]
        last_claimer = (is_best * gt_rank).amax(dim=0)  # 0 where no GT claims the anchor
        assigned = torch.where(last_claimer > 0, last_claimer - 1, assigned)
    return assigned


def random_subset(indices: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """At most `count` of `indices`: all of them (in order) when there are few enough, else a random
    subset drawn from `generator` (mmdet's RandomSampler)."""
    if indices.numel() <= count:
        return indices
    order = torch.randperm(indices.numel(), generator=generator, device=indices.device)
    return indices[order[:count]]


def sample_assigned(assigned: torch.Tensor, num_samples: int, positive_fraction: float,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive / negative indices of one image: at most num_samples * positive_fraction
    positives, negatives filling up to num_samples."""
    positives = torch.nonzero(assigned >= 0).squeeze(1)
    negatives = torch.nonzero(assigned == NEGATIVE).squeeze(1)
    positives = random_subset(positives, int(num_samples * positive_fraction), generator)
    negatives = random_subset(negatives, num_samples - positives.numel(), generator)
    return positives, negatives


# --------------------------------------------------------------------------------------------
# NMS and RoIAlign in plain PyTorch
# --------------------------------------------------------------------------------------------


def greedy_nms_keep(sorted_boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Exact greedy NMS of boxes already sorted by decreasing score, batched over leading dims:
    sorted_boxes (..., K, 4) xyxy, valid (..., K) bool (invalid boxes neither kept nor suppressing).
    Returns keep (..., K) bool.

    Box j is kept iff it is valid and no kept box before it overlaps it by more than the threshold.
    Iterating that rule from any start fixes one more leading box per pass, so it reaches the greedy
    result (the rule's only fixed point); in practice a few passes, each one vectorised."""
    ious, _ = box_iou(sorted_boxes, sorted_boxes)
    num_boxes = sorted_boxes.shape[-2]
    earlier = torch.ones(num_boxes, num_boxes, dtype=torch.bool, device=sorted_boxes.device).triu(1)
    suppresses = (ious > iou_threshold) & earlier
    keep = valid
    while True:
        new_keep = valid & ~(suppresses & keep[..., :, None]).any(dim=-2)
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of (N, 4) xyxy boxes: indices of the kept boxes by decreasing score (int64).
    Equal scores keep their input order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    valid = torch.ones(order.shape, dtype=torch.bool, device=boxes.device)
    keep = greedy_nms_keep(boxes[order], valid, iou_threshold)
    return order[keep]


def roi_pyramid_levels(rois: torch.Tensor, num_levels: int, finest_scale: int = ROI_FINEST_SCALE) -> torch.Tensor:
    """mmdet's map_roi_levels: floor(log2(sqrt(area) / finest_scale)), clamped to [0, num_levels)."""
    scale = ((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])).clamp(min=0).sqrt()
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(0, num_levels - 1).long()


def roi_align(features: list[torch.Tensor], rois: torch.Tensor, batch_index: torch.Tensor, levels: torch.Tensor,
              strides: list[int], output_size: int = ROI_OUTPUT_SIZE,
              sampling_ratio: int = ROI_SAMPLING_RATIO) -> torch.Tensor:
    """RoIAlign (aligned=True, average of sampling_ratio^2 bilinear samples per bin) of xyxy pixel
    `rois` (R, 4) of image `batch_index` (R,) on `features[levels]` (each (B, C, h, w), stride
    `strides[level]`). Returns (R, C, output_size, output_size) float32 (float64 for float64 maps).

    Samples follow torchvision's roi_align exactly: a sample further than one pixel outside the map
    is zero, one within a pixel of it reads the border. Done with one grid_sample per level."""
    grid_side = output_size * sampling_ratio
    dtype = box_compute_dtype(features[0])
    pieces, order = [], []
    for level, (feature, stride) in enumerate(zip(features, strides)):
        chosen = torch.nonzero(levels == level).squeeze(1)
        if chosen.numel() == 0:
            continue
        boxes = rois[chosen].to(dtype) / stride - 0.5  # aligned: pixel centres at integer coordinates
        pieces.append(sample_roi_grids(feature.to(dtype), boxes, batch_index[chosen], grid_side))
        order.append(chosen)
    if not pieces:
        return features[0].new_zeros((0, features[0].shape[1], output_size, output_size), dtype=dtype)
    samples = torch.cat(pieces)[torch.argsort(torch.cat(order))]
    return F.avg_pool2d(samples, sampling_ratio)


def sample_roi_grids(feature: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor,
                     grid_side: int) -> torch.Tensor:
    """Bilinear samples on a regular grid_side x grid_side grid inside each box (feature pixel
    coordinates, pixel centres at integers): (n, C, grid_side, grid_side)."""
    num_images, channels, height, width = feature.shape
    steps = (torch.arange(grid_side, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid_side
    xs = boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])  # (n, S)
    ys = boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])
    x = xs[:, None, :].expand(-1, grid_side, -1)
    y = ys[:, :, None].expand(-1, -1, grid_side)
    inside = (x >= -1) & (x <= width) & (y >= -1) & (y <= height)
    # Clamping into the map makes the border samples read the border value instead of fading out.
    grid = torch.stack(
        ((2 * x.clamp(0, width - 1) + 1) / width - 1, (2 * y.clamp(0, height - 1) + 1) / height - 1), dim=-1
    ).reshape(-1, grid_side * grid_side, 2)
    # grid_sample takes one grid per image: lay each image's boxes out in its own row of slots.
    slot, num_slots = rank_within_group(batch_index, num_images)
    slotted = grid.new_zeros(num_images, num_slots, grid_side * grid_side, 2)
    slotted[batch_index, slot] = grid
    sampled = F.grid_sample(feature, slotted, mode="bilinear", padding_mode="zeros", align_corners=False)
    values = sampled.permute(0, 2, 1, 3)[batch_index, slot]  # (n, C, S*S)
    values = values * inside.reshape(-1, 1, grid_side * grid_side)
    return values.reshape(-1, channels, grid_side, grid_side)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def normal_init(conv: nn.Module, std: float, bias: float = 0.0) -> None:
    nn.init.normal_(conv.weight, std=std)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, bias)


class PyramidAdapter(nn.Module):
    """Encoder memory -> feature pyramid: the L levels as maps plus a stride-2 conv + GN level."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.extra_level = ConvNorm(hidden_dim, hidden_dim, 3, stride=2)
        c2_xavier_fill(self.extra_level[0])

    def forward(self, memory: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        batch, _, dim = memory.shape
        maps, start = [], 0
        for height, width in shapes:
            tokens = memory[:, start:start + height * width]
            maps.append(tokens.transpose(1, 2).reshape(batch, dim, height, width))
            start += height * width
        maps.append(self.extra_level(maps[-1]))
        return maps


class QueryContent(nn.Module):
    """Content embedding of a positive query from its box: LayerNorm(Linear(sine embedding))."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.proj = nn.Linear(2 * hidden_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, boxes_cxcywh: torch.Tensor) -> torch.Tensor:
        embedding = box_sine_embedding(boxes_cxcywh, self.hidden_dim // 2)
        return self.norm(self.proj(embedding.to(self.proj.weight.dtype)))


class ATSSHead(nn.Module):
    """Dense head shared over levels: (cls logits (B, A, K), deltas (B, A, 4), centerness (B, A)),
    anchors location-major within a level, levels back to back."""

    def __init__(self, hidden_dim: int, num_classes: int, num_levels: int):
        super().__init__()
        self.cls_tower = ConvNorm(hidden_dim, hidden_dim, 3, bias=False, relu=True)
        self.reg_tower = ConvNorm(hidden_dim, hidden_dim, 3, bias=False, relu=True)
        self.cls_conv = nn.Conv2d(hidden_dim, num_classes, 3, padding=1)
        self.reg_conv = nn.Conv2d(hidden_dim, 4, 3, padding=1)
        self.centerness_conv = nn.Conv2d(hidden_dim, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        for conv in (self.cls_tower[0], self.reg_tower[0], self.reg_conv, self.centerness_conv):
            normal_init(conv, std=0.01)
        # Prior 0.01 for every class keeps the focal loss of the many background anchors small at start.
        normal_init(self.cls_conv, std=0.01, bias=-math.log((1 - 0.01) / 0.01))

    def forward(self, pyramid: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, deltas, centerness = [], [], []
        for level, feature in enumerate(pyramid):
            cls_feature = self.cls_tower(feature)
            reg_feature = self.reg_tower(feature)
            logits.append(self.cls_conv(cls_feature).flatten(2).transpose(1, 2))
            deltas.append((self.reg_conv(reg_feature) * self.scales[level]).flatten(2).transpose(1, 2))
            centerness.append(self.centerness_conv(reg_feature).flatten(1))
        return torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(centerness, 1)


class RPNHead(nn.Module):
    """Per level: objectness logits (B, h*w*A) and deltas (B, h*w*A, 4), location-major."""

    def __init__(self, hidden_dim: int, num_anchors: int = len(RPN_RATIOS)):
        super().__init__()
        self.num_anchors = num_anchors
        self.conv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1)
        self.objectness = nn.Conv2d(hidden_dim, num_anchors, 1)
        self.reg = nn.Conv2d(hidden_dim, 4 * num_anchors, 1)
        for conv in (self.conv, self.objectness, self.reg):
            normal_init(conv, std=0.01)

    def forward(self, pyramid: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for feature in pyramid:
            hidden = F.relu(self.conv(feature))
            batch, _, height, width = hidden.shape
            logits.append(self.objectness(hidden).permute(0, 2, 3, 1).reshape(batch, -1))
            reg = self.reg(hidden).reshape(batch, self.num_anchors, 4, height, width)
            deltas.append(reg.permute(0, 3, 4, 1, 2).reshape(batch, -1, 4))
        return logits, deltas


class RoIBoxHead(nn.Module):
    """Two shared FC layers, softmax classifier (num_classes + 1, background last) and
    class-agnostic deltas."""

    def __init__(self, hidden_dim: int, num_classes: int, output_size: int = ROI_OUTPUT_SIZE):
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim * output_size * output_size, BOX_HEAD_DIM)
        self.fc2 = nn.Linear(BOX_HEAD_DIM, BOX_HEAD_DIM)
        self.cls = nn.Linear(BOX_HEAD_DIM, num_classes + 1)
        self.reg = nn.Linear(BOX_HEAD_DIM, 4)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        normal_init(self.cls, std=0.01)
        normal_init(self.reg, std=0.001)

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.fc2(F.relu(self.fc1(roi_features.flatten(1)))))
        return self.cls(hidden), self.reg(hidden)


# --------------------------------------------------------------------------------------------
# Positive queries
# --------------------------------------------------------------------------------------------


def normalized_query_boxes(boxes_xyxy: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel xyxy -> normalized cxcywh clipped to the image and clamped into (0, 1), detached."""
    height, width = image_hw
    scale = boxes_xyxy.new_tensor([width, height, width, height])
    cxcywh = box_xyxy_to_cxcywh(clip_boxes(boxes_xyxy.detach(), image_hw) / scale)
    return cxcywh.clamp(QUERY_BOX_EPS, 1 - QUERY_BOX_EPS)


def build_positive_queries(positive_boxes: list[torch.Tensor], positive_gt: list[torch.Tensor],
                           negative_pools: list[torch.Tensor], max_positives: int, ground_truth: GroundTruth,
                           content: QueryContent) -> PositiveQueries:
    """Per image: at most max_positives positives (pixel xyxy, with their GT index), then padding
    negatives drawn from the image's pool (whole-image boxes when the pool runs out)."""
    kept_boxes, kept_gt = [], []
    for boxes, gt_index, generator in zip(positive_boxes, positive_gt, ground_truth.generators):
        chosen = random_subset(torch.arange(boxes.shape[0], device=boxes.device), max_positives, generator)
        kept_boxes.append(boxes[chosen])
        kept_gt.append(gt_index[chosen])
    # The largest count over every process's images: the padding (which enters the class loss)
    # does not depend on how the batch is split.
    num_queries = all_reduce_max_int(max(1, max(boxes.shape[0] for boxes in kept_boxes)), kept_boxes[0].device)
    rows, matches = [], []
    for boxes, gt_index, pool, generator in zip(kept_boxes, kept_gt, negative_pools, ground_truth.generators):
        missing = num_queries - boxes.shape[0]
        padding = pool[random_subset(torch.arange(pool.shape[0], device=pool.device), missing, generator)]
        image_boxes = normalized_query_boxes(torch.cat((boxes, padding)), ground_truth.image_hw)
        filler = image_boxes.new_tensor(PADDING_QUERY_BOX).clamp(QUERY_BOX_EPS, 1 - QUERY_BOX_EPS)
        rows.append(torch.cat((image_boxes, filler.expand(num_queries - image_boxes.shape[0], 4))))
        matches.append((torch.arange(boxes.shape[0], device=boxes.device), gt_index.long()))
    query_boxes = torch.stack(rows)
    return PositiveQueries(content=content(query_boxes), boxes=query_boxes, matches=matches)


# --------------------------------------------------------------------------------------------
# Branches: one head with its losses and queries
# --------------------------------------------------------------------------------------------


class ATSSBranch(nn.Module):
    def __init__(self, hidden_dim: int, num_classes: int, num_levels: int):
        super().__init__()
        self.num_classes = num_classes
        self.head = ATSSHead(hidden_dim, num_classes, num_levels)
        self.query_content = QueryContent(hidden_dim)

    def forward(self, pyramid: list[torch.Tensor], strides: list[int], ground_truth: GroundTruth,
                max_positives: int) -> tuple[dict[str, torch.Tensor], PositiveQueries]:
        logits, deltas, centerness = self.head(pyramid)
        dtype = box_compute_dtype(pyramid[0])
        logits, deltas, centerness = logits.to(dtype), deltas.to(dtype), centerness.to(dtype)
        anchors = torch.cat([
            level_anchors(feature.shape[-2:], stride, atss_anchor_sizes(stride), feature.device, dtype)
            for feature, stride in zip(pyramid, strides)
        ])
        level_sizes = [feature.shape[-2] * feature.shape[-1] for feature in pyramid]
        positives, positive_gt, negative_pools = [], [], []
        for gt_boxes in ground_truth.boxes:
            assigned = atss_assign(anchors, level_sizes, gt_boxes)
            positives.append(torch.nonzero(assigned >= 0).squeeze(1))
            positive_gt.append(assigned[positives[-1]])
            negative_pools.append(anchors[assigned == NEGATIVE])
        losses = self.losses(logits, deltas, centerness, anchors, positives, positive_gt, ground_truth)
        queries = build_positive_queries([anchors[index] for index in positives], positive_gt, negative_pools,
                                         max_positives, ground_truth, self.query_content)
        return losses, queries

    def losses(self, logits, deltas, centerness, anchors, positives, positive_gt, ground_truth):
        """Focal class loss over every anchor, centerness-weighted GIoU and centerness BCE on positives."""
        image_index = torch.cat([torch.full_like(index, image) for image, index in enumerate(positives)])
        anchor_index = torch.cat(positives)
        labels = torch.cat([lab[gt] for lab, gt in zip(ground_truth.labels, positive_gt)])
        gt_boxes = torch.cat([boxes[gt] for boxes, gt in zip(ground_truth.boxes, positive_gt)])
        class_targets = torch.zeros_like(logits)
        class_targets[image_index, anchor_index, labels] = 1.0
        num_positives = mean_over_processes(anchor_index.numel(), logits.device)

        positive_anchors = anchors[anchor_index]
        predicted = decode_deltas(positive_anchors, deltas[image_index, anchor_index], ATSS_STDS)
        centerness_targets = centerness_target((positive_anchors[:, :2] + positive_anchors[:, 2:]) * 0.5, gt_boxes)
        giou_loss = (1 - elementwise_generalized_box_iou(predicted, gt_boxes)) * centerness_targets
        return {
            "atss/class": sigmoid_focal_loss_sum(logits, class_targets, FOCAL_ALPHA, FOCAL_GAMMA) / num_positives,
            # mmdet clamps this normalizer to at least 1 as well.
            "atss/giou": 2.0 * giou_loss.sum() / mean_over_processes(centerness_targets.sum(), logits.device),
            "atss/centerness": F.binary_cross_entropy_with_logits(
                centerness[image_index, anchor_index], centerness_targets, reduction="sum") / num_positives,
        }


def centerness_target(points: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of points (P, 2) inside their GT boxes (P, 4): sqrt(min/max lr * min/max tb)."""
    left_right = torch.stack((points[:, 0] - gt_boxes[:, 0], gt_boxes[:, 2] - points[:, 0]), -1).clamp(min=0)
    top_bottom = torch.stack((points[:, 1] - gt_boxes[:, 1], gt_boxes[:, 3] - points[:, 1]), -1).clamp(min=0)
    ratio_x = left_right.amin(-1) / left_right.amax(-1).clamp(min=1e-12)
    ratio_y = top_bottom.amin(-1) / top_bottom.amax(-1).clamp(min=1e-12)
    return (ratio_x * ratio_y).sqrt()


class RCNNBranch(nn.Module):
    def __init__(self, hidden_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.rpn = RPNHead(hidden_dim)
        self.box_head = RoIBoxHead(hidden_dim, num_classes)
        self.query_content = QueryContent(hidden_dim)

    def forward(self, pyramid: list[torch.Tensor], strides: list[int], ground_truth: GroundTruth,
                max_positives: int) -> tuple[dict[str, torch.Tensor], PositiveQueries]:
        dtype = box_compute_dtype(pyramid[0])
        logits, deltas = self.rpn(pyramid)
        logits = [level.to(dtype) for level in logits]
        deltas = [level.to(dtype) for level in deltas]
        anchors = [
            level_anchors(feature.shape[-2:], stride, rpn_anchor_sizes(stride), feature.device, dtype)
            for feature, stride in zip(pyramid, strides)
        ]
        losses = rpn_losses(torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(anchors), ground_truth)
        proposals, valid = propose_boxes(logits, deltas, anchors, ground_truth.image_hw)
        rois = sample_rois(proposals, valid, ground_truth)
        num_roi_levels = min(ROI_MAX_LEVELS, len(pyramid))
        features = roi_align(pyramid[:num_roi_levels], rois.boxes, rois.image_index,
                             roi_pyramid_levels(rois.boxes, num_roi_levels), strides[:num_roi_levels])
        class_logits, box_deltas = self.box_head(features)
        losses.update(rcnn_losses(class_logits.to(dtype), box_deltas.to(dtype), rois, self.num_classes))
        queries = build_positive_queries(rois.positive_boxes, rois.positive_gt, rois.negative_boxes,
                                         max_positives, ground_truth, self.query_content)
        return losses, queries


def rpn_losses(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
               ground_truth: GroundTruth) -> dict[str, torch.Tensor]:
    """BCE on the sampled anchors and L1 on the positives' deltas, both / number sampled."""
    image_index, anchor_index, objectness, positive_image, positive_anchor, target_deltas = [], [], [], [], [], []
    for image, (gt_boxes, generator) in enumerate(zip(ground_truth.boxes, ground_truth.generators)):
        assigned = max_iou_assign(box_iou(gt_boxes, anchors)[0], pos_iou_thr=0.7, neg_iou_thr=0.3,
                                  min_pos_iou=0.3, match_low_quality=True)
        positives, negatives = sample_assigned(assigned, RPN_SAMPLES, RPN_POSITIVE_FRACTION, generator)
        sampled = torch.cat((positives, negatives))
        image_index.append(torch.full_like(sampled, image))
        anchor_index.append(sampled)
        objectness.append(torch.cat((torch.ones_like(positives), torch.zeros_like(negatives))))
        positive_image.append(torch.full_like(positives, image))
        positive_anchor.append(positives)
        target_deltas.append(encode_deltas(anchors[positives], gt_boxes[assigned[positives]], RPN_STDS))
    image_index, anchor_index = torch.cat(image_index), torch.cat(anchor_index)
    positive_image, positive_anchor = torch.cat(positive_image), torch.cat(positive_anchor)
    num_sampled = mean_over_processes(anchor_index.numel(), logits.device)
    class_loss = F.binary_cross_entropy_with_logits(
        logits[image_index, anchor_index], torch.cat(objectness).to(logits.dtype), reduction="sum")
    l1_loss = (deltas[positive_image, positive_anchor] - torch.cat(target_deltas)).abs().sum()
    return {"rpn/class": class_loss / num_sampled, "rpn/l1": l1_loss / num_sampled}


@torch.no_grad()
def propose_boxes(logits: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                  image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN proposals, all images and levels at once: per level the top RPN_PRE_NMS_PER_LEVEL,
    decoded, clipped, small boxes dropped, NMS within the level; then the best
    RPN_POST_NMS_PER_IMAGE of the image. Returns boxes (B, N, 4) xyxy and valid (B, N) bool."""
    per_level = max(min(RPN_PRE_NMS_PER_LEVEL, level.shape[1]) for level in logits)
    level_boxes, level_scores, level_valid = [], [], []
    for level_logits, level_deltas, level_anchor in zip(logits, deltas, anchors):
        count = min(RPN_PRE_NMS_PER_LEVEL, level_logits.shape[1])
        scores, index = level_logits.topk(count, dim=1)  # sorted: NMS needs decreasing scores
        chosen_deltas = level_deltas.gather(1, index[..., None].expand(-1, -1, 4))
        boxes = clip_boxes(decode_deltas(level_anchor[index], chosen_deltas, RPN_STDS), image_hw)
        big_enough = ((boxes[..., 2:] - boxes[..., :2]) >= RPN_MIN_BOX_SIZE).all(-1)
        pad = per_level - count
        level_boxes.append(F.pad(boxes, (0, 0, 0, pad)))
        level_scores.append(F.pad(scores, (0, pad), value=-math.inf))
        level_valid.append(F.pad(big_enough, (0, pad), value=False))
    boxes, scores = torch.stack(level_boxes, 1), torch.stack(level_scores, 1)  # (B, L, K, ...)
    keep = greedy_nms_keep(boxes, torch.stack(level_valid, 1), RPN_NMS_IOU)
    scores = torch.where(keep, scores, -math.inf).flatten(1)
    count = min(RPN_POST_NMS_PER_IMAGE, scores.shape[1])
    best_scores, best = scores.topk(count, dim=1)
    best_boxes = boxes.flatten(1, 2).gather(1, best[..., None].expand(-1, -1, 4))
    return best_boxes, best_scores > -math.inf


@dataclass
class SampledRoIs:
    boxes: torch.Tensor  # (R, 4) xyxy pixels, per image positives then negatives
    image_index: torch.Tensor  # (R,)
    positive_labels: torch.Tensor  # (P,) GT class of every positive, in order
    is_positive: torch.Tensor  # (R,) bool
    gt_boxes: torch.Tensor  # (P, 4) the GT box of every positive, in order
    positive_boxes: list[torch.Tensor]  # per image (p_i, 4)
    positive_gt: list[torch.Tensor]  # per image (p_i,)
    negative_boxes: list[torch.Tensor]  # per image (n_i, 4)


@torch.no_grad()
def sample_rois(proposals: torch.Tensor, valid: torch.Tensor, ground_truth: GroundTruth) -> SampledRoIs:
    """Per image: proposals + GT boxes, max-IoU assignment (0.5 / 0.5), ROI_SAMPLES sampled."""
    boxes, image_index, positive_labels, is_positive, gt_boxes = [], [], [], [], []
    positive_boxes, positive_gt, negative_boxes = [], [], []
    for image, (gt, gt_labels, generator) in enumerate(
            zip(ground_truth.boxes, ground_truth.labels, ground_truth.generators)):
        candidates = torch.cat((proposals[image][valid[image]], gt))
        assigned = max_iou_assign(box_iou(gt, candidates)[0], pos_iou_thr=0.5, neg_iou_thr=0.5,
                                  min_pos_iou=0.5, match_low_quality=False)
        positives, negatives = sample_assigned(assigned, ROI_SAMPLES, ROI_POSITIVE_FRACTION, generator)
        sampled = torch.cat((positives, negatives))
        boxes.append(candidates[sampled])
        image_index.append(torch.full_like(sampled, image))
        positive_labels.append(gt_labels[assigned[positives]])
        is_positive.append(torch.arange(sampled.numel(), device=sampled.device) < positives.numel())
        gt_boxes.append(gt[assigned[positives]])
        positive_boxes.append(candidates[positives])
        positive_gt.append(assigned[positives])
        negative_boxes.append(candidates[negatives])
    return SampledRoIs(torch.cat(boxes), torch.cat(image_index), torch.cat(positive_labels), torch.cat(is_positive),
                       torch.cat(gt_boxes), positive_boxes, positive_gt, negative_boxes)


def rcnn_losses(class_logits: torch.Tensor, box_deltas: torch.Tensor, rois: SampledRoIs,
                num_classes: int) -> dict[str, torch.Tensor]:
    """Cross entropy over the sampled RoIs; GIoU of the positives' decoded boxes / number sampled x 10."""
    labels = torch.full_like(rois.image_index, num_classes)  # background = the last class
    labels[rois.is_positive] = rois.positive_labels
    num_sampled = mean_over_processes(labels.numel(), labels.device)
    predicted = decode_deltas(rois.boxes[rois.is_positive], box_deltas[rois.is_positive], RCNN_STDS)
    giou_loss = (1 - elementwise_generalized_box_iou(predicted, rois.gt_boxes)).sum()
    return {
        "rcnn/class": F.cross_entropy(class_logits, labels, reduction="sum") / num_sampled,
        "rcnn/giou": 10.0 * giou_loss / num_sampled,
    }


# --------------------------------------------------------------------------------------------
# The public module
# --------------------------------------------------------------------------------------------


class HybridHeads(nn.Module):
    """Co-DETR's auxiliary heads on the encoder memory: weighted losses and positive queries."""

    def __init__(self, hidden_dim: int, num_classes: int, num_levels: int, heads: tuple[str, ...],
                 max_positives: int = 300, aux_weight: float = 2.0):
        super().__init__()
        validate_head_names(heads)
        if hidden_dim % 32 != 0:
            raise ValueError(f"HybridHeads: hidden_dim={hidden_dim} must be a multiple of 32 (GroupNorm(32))")
        if num_classes < 1:
            raise ValueError(f"HybridHeads: num_classes={num_classes} must be >= 1")
        if num_levels < 1:
            raise ValueError(f"HybridHeads: num_levels={num_levels} must be >= 1")
        if max_positives < 1:
            raise ValueError(f"HybridHeads: max_positives={max_positives} must be >= 1")
        self.hidden_dim, self.num_classes, self.num_levels = hidden_dim, num_classes, num_levels
        self.heads, self.max_positives, self.aux_weight = tuple(heads), max_positives, aux_weight
        self.adapter = PyramidAdapter(hidden_dim)
        branches = {"atss": lambda: ATSSBranch(hidden_dim, num_classes, num_levels + 1),
                    "rcnn": lambda: RCNNBranch(hidden_dim, num_classes)}
        self.branches = nn.ModuleDict({name: branches[name]() for name in heads})

    def extra_repr(self) -> str:
        return f"heads={self.heads}, max_positives={self.max_positives}, aux_weight={self.aux_weight}"

    def forward(self, memory: torch.Tensor, shapes: list[tuple[int, int]], targets: list[dict],
                image_hw: tuple[int, int], generators: list[torch.Generator] | None = None) -> HybridOutput:
        self.validate_inputs(memory, shapes, targets, generators)
        pyramid = self.adapter(memory, shapes)
        strides = [FINEST_STRIDE * 2**level for level in range(len(pyramid))]
        dtype = box_compute_dtype(memory)
        ground_truth = GroundTruth(
            boxes=pixel_gt_boxes(targets, image_hw, memory.device, dtype),
            labels=[target["labels"].to(memory.device).long() for target in targets],
            image_hw=(int(image_hw[0]), int(image_hw[1])),
            generators=list(generators) if generators is not None else [None] * len(targets),
        )
        losses, queries = {}, {}
        for name, branch in self.branches.items():
            branch_losses, queries[name] = branch(pyramid, strides, ground_truth, self.max_positives)
            losses.update({f"hybrid/{key}": self.aux_weight * value for key, value in branch_losses.items()})
        return HybridOutput(losses=losses, queries=queries)

    def validate_inputs(self, memory, shapes, targets, generators) -> None:
        if memory.dim() != 3 or memory.shape[-1] != self.hidden_dim:
            raise ValueError(f"HybridHeads: memory must be (B, S, {self.hidden_dim}), got {tuple(memory.shape)}")
        if len(shapes) != self.num_levels:
            raise ValueError(f"HybridHeads: shapes has {len(shapes)} levels, expected num_levels={self.num_levels}")
        if sum(height * width for height, width in shapes) != memory.shape[1]:
            raise ValueError(f"HybridHeads: shapes {shapes} do not add up to memory's {memory.shape[1]} tokens")
        if len(targets) != memory.shape[0]:
            raise ValueError(f"HybridHeads: {len(targets)} targets for a batch of {memory.shape[0]} images")
        for index, target in enumerate(targets):
            boxes, labels = target["boxes"], target["labels"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"HybridHeads: targets[{index}] needs boxes (N, 4) and labels (N,), got "
                                 f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
        if generators is not None and len(generators) != memory.shape[0]:
            raise ValueError(f"HybridHeads: {len(generators)} generators for a batch of {memory.shape[0]} images")


def validate_head_names(heads: tuple[str, ...]) -> None:
    if isinstance(heads, str) or len(heads) == 0:
        raise ValueError(f"HybridHeads: heads must be a non-empty tuple of names from {HEAD_NAMES}, got {heads!r}")
    unknown = [name for name in heads if name not in HEAD_NAMES]
    if unknown:
        raise ValueError(f"HybridHeads: unknown head name(s) {unknown} in heads; known: {HEAD_NAMES}")
    if len(set(heads)) != len(heads):
        raise ValueError(f"HybridHeads: heads {heads} names a head twice")
