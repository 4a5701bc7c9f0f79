"""Set criterion: every loss and deep-supervision term of SPEC section 5.

`criterion(outputs, targets)` returns WEIGHTED scalar losses (their sum is the total loss) keyed
"{output}/{term}": outputs `init`, `dec0`.., `interm`, `ti0`, `ti1`, and `dn/init`, `dn/dec0`..;
terms `class`, `l1`, `giou`, `mask_bce`, `mask_dice` (mask terms only for outputs with masks, so
never for the TI outputs).

- class: sigmoid focal loss (alpha, gamma) summed over every query and class, target one-hot of the
  matched GT label (all zero for unmatched queries = background);
- l1 on normalized cxcywh, giou = 1 - GIoU, of matched pairs;
- mask_bce (mean over points) and mask_dice (+1 smoothed) of matched pairs, on num_points points
  per pair chosen by the uncertainty of the matched predicted mask (no gradient in choosing), the
  GT value at a point being the bilinear sample of the binary GT mask there. Only the matched
  pairs' mask logits are used: taken from "masks" (B, Q, H, W), or, for a prediction with
  "mask_embed" + "mask_features" instead (the model's train_masks="points"), made for the matched
  pairs only (one GEMM per image, dimaskdino.ops.matched_mask_logits); sampling + BCE + dice then
  run in dimaskdino.ops.point_mask_loss (a fused Triton kernel on a GPU);
- every sum divided by num_boxes = the batch's GT count averaged over processes, at least 1. The
  denoising terms are divided by num_boxes x num_groups, since every GT appears once per group
  (as the authors do), so a denoising term is per GT copy like the matched ones.

With Co-DETR's hybrid assignment on (the model's "hybrid" output), the auxiliary heads' own losses
are added as they come ("hybrid/atss/...", "hybrid/rpn/...", "hybrid/rcnn/...") and each head's
positive queries get the terms above in every decoder layer ("hybrid/<head>/dec<i>/<term>")
against their fixed one-to-many targets, normalized by the head's positive count.

All non-denoising outputs are matched in ONE `matcher.match` call (one device-to-host transfer per
step); denoising query g * single_pad + i is paired with GT i without matching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dimaskdino.dist import mean_over_processes

from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from dimaskdino.ops.mask_loss import matched_mask_logits, point_mask_loss

from .matcher import HungarianMatcher, Matches, has_mask_prediction
from .point_sample import point_sample, rank_within_group, uncertainty_points
from .postprocess import decoder_output_names


def sigmoid_focal_loss_sum(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sum over all elements of the sigmoid focal loss (Lin et al. 2017) with alpha weighting."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    return (alpha_t * ce * (1.0 - p_t).pow(gamma)).sum()


def dice_loss_sum(point_logits: torch.Tensor, point_targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of 1 - (2 s.t + 1) / (sum s + sum t + 1), s = sigmoid of the logits."""
    prob = point_logits.sigmoid()
    numerator = 2.0 * (prob * point_targets).sum(-1)
    denominator = prob.sum(-1) + point_targets.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum()


def is_prediction(value) -> bool:
    return isinstance(value, dict) and "logits" in value and "boxes" in value


def denoising_matches(sizes: list[int], num_groups: int, single_pad: int, device) -> Matches:
    """Fixed pairs of the denoising queries: query g * single_pad + i <-> GT i, i < that image's GT
    count, for every group g. Built on the device from host-known sizes (no synchronization)."""
    matches = []
    for size in sizes:
        if size > single_pad:
            raise ValueError(f"denoising: an image has {size} GT but single_pad is {single_pad}")
        gt_idx = torch.arange(size, device=device)
        group_start = torch.arange(num_groups, device=device) * single_pad
        pred_idx = (group_start[:, None] + gt_idx[None, :]).reshape(-1)
        matches.append((pred_idx, gt_idx.repeat(num_groups)))
    return matches


def float_gt_masks(targets: list[dict], device) -> list[torch.Tensor]:
    """GT masks per image as float (N, 1, H, W), made once per step and shared by every output:
    grid_sample needs float maps. (Memory: N x H x W x 4 bytes per image; a fused kernel reading
    the bool masks directly would remove it.)"""
    return [t["masks"].to(device)[:, None].float() for t in targets]


@torch.no_grad()
def gt_point_values(
    gt_masks: list[torch.Tensor], matches: Matches, points: torch.Tensor, copies_per_gt: int | None
) -> torch.Tensor:
    """Values (R, P) of the matched GT masks at each pair's points (R, P, 2), pairs ordered by image.

    One grid_sample per image with the GT masks as the batch, no per-pair copy of a mask: a GT row
    carries the points of every pair that uses that GT. Hungarian pairs use each GT at most once
    (copies_per_gt = 1); denoising pair g * n + i uses GT i (copies_per_gt = num_groups);
    copies_per_gt=None: any number of pairs per GT (the hybrid heads' one-to-many positives).
    """
    num_points = points.shape[1]
    values, start = [], 0
    for masks, (pred_idx, gt_idx) in zip(gt_masks, matches):
        count = pred_idx.shape[0]
        if count == 0:
            continue
        image_points = points[start: start + count]
        start += count
        num_gt = masks.shape[0]
        if copies_per_gt == 1:
            grid = image_points.new_zeros(num_gt, num_points, 2).index_copy_(0, gt_idx, image_points)
            values.append(point_sample(masks, grid)[:, 0][gt_idx])
        elif copies_per_gt is None:
            rank, max_copies = rank_within_group(gt_idx, num_gt)  # pairs sharing a GT
            grid = image_points.new_zeros(num_gt, max_copies, num_points, 2)
            grid[gt_idx, rank] = image_points
            sampled = point_sample(masks, grid.reshape(num_gt, max_copies * num_points, 2))[:, 0]
            values.append(sampled.reshape(num_gt, max_copies, num_points)[gt_idx, rank])
        else:
            grid = image_points.reshape(copies_per_gt, num_gt, num_points, 2).transpose(0, 1)
            sampled = point_sample(masks, grid.reshape(num_gt, copies_per_gt * num_points, 2))[:, 0]
            values.append(sampled.reshape(num_gt, copies_per_gt, num_points).transpose(0, 1).reshape(-1, num_points))
    return torch.cat(values)


class SetCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float,
        l1_weight: float,
        giou_weight: float,
        mask_bce_weight: float,
        dice_weight: float,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        focal_alpha: float,
        focal_gamma: float,
        impl: str = "auto",
        hybrid_query_weight: float = 1.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.mask_bce_weight = mask_bce_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.impl = impl  # of dimaskdino.ops.point_mask_loss
        self.hybrid_query_weight = hybrid_query_weight  # per decoder layer, the hybrid positive queries
        # Matches of the last call, for logging (e.g. matched mask IoU of the final output).
        self.last_matches: dict[str, Matches] = {}
        self.final_output_name: str | None = None

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weights: class={self.class_weight}, l1={self.l1_weight}, "
            f"giou={self.giou_weight}, mask_bce={self.mask_bce_weight}, dice={self.dice_weight}; "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}"
        )

    def final_matches(self) -> Matches:
        """(pred_idx, gt_idx) per image of the final decoder output of the last call."""
        if self.final_output_name is None:
            raise RuntimeError("final_matches: the criterion has not been called on decoder outputs yet")
        return self.last_matches[self.final_output_name]

    # ------------------------------------------------------------------ normalization

    @staticmethod
    def average_num_boxes(targets: list[dict], device) -> torch.Tensor | float:
        """GT count of the batch averaged over all processes, at least 1 (a float when not
        distributed, so no device tensor and no synchronization is needed)."""
        return SetCriterion.average_count(sum(int(t["labels"].shape[0]) for t in targets), device)

    @staticmethod
    def average_count(count: int, device) -> torch.Tensor | float:
        """A per-process count averaged over all processes, at least 1."""
        return mean_over_processes(count, device, minimum=1.0)

    # ------------------------------------------------------------------ per-output losses

    def class_loss(self, logits, batch_idx, src_idx, gt_labels, normalizer):
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"criterion: logits have {logits.shape[-1]} classes, expected {self.num_classes}")
        logits = logits.float()
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, gt_labels] = 1.0
        return sigmoid_focal_loss_sum(logits, onehot, self.focal_alpha, self.focal_gamma) / normalizer

    @staticmethod
    def box_losses(boxes, batch_idx, src_idx, gt_boxes, normalizer):
        src = boxes[batch_idx, src_idx].float()
        l1 = (src - gt_boxes).abs().sum() / normalizer
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(gt_boxes))
        return l1, (1.0 - giou).sum() / normalizer

    def mask_losses(self, masks, batch_idx, src_idx, gt_masks, matches, copies_per_gt, normalizer, generators):
        """Point-sampled BCE and dice of the matched masks (SPEC section 5). `masks`: the output's
        mask logits (B, Q, H, W), or its prediction dict (with "masks", or with "mask_embed" and
        "mask_features", whose matched pairs' logits are then made here, one GEMM per image)."""
        pred = masks if isinstance(masks, dict) else {"masks": masks}
        rows_per_image = [int(src.shape[0]) for src, _ in matches]
        if batch_idx.shape[0] == 0:
            inputs = [pred["masks"]] if "masks" in pred else [pred["mask_embed"], pred["mask_features"]]
            zero = sum(t.reshape(-1)[:0].float().sum() for t in inputs)  # 0, finite, part of the graph
            return zero, zero
        if "masks" in pred:
            matched = pred["masks"][batch_idx, src_idx].float()  # (R, Hm, Wm): only the matched masks
        else:
            matched = matched_mask_logits(pred["mask_embed"], pred["mask_features"], src_idx, rows_per_image).float()
        points = uncertainty_points(
            matched.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio, generators,
            rows_per_image=rows_per_image,
        )
        with torch.no_grad():
            point_targets = gt_point_values(gt_masks, matches, points, copies_per_gt)
        bce, dice = point_mask_loss(matched, points, point_targets, impl=self.impl)  # (R,) each
        return bce.sum() / normalizer, dice.sum() / normalizer

    def output_losses(self, prefix, pred, targets, gt_masks, matches, copies_per_gt, normalizer, generators):
        """Weighted losses "{prefix}/{term}" of one output given its (pred_idx, gt_idx) per image."""
        device = pred["logits"].device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(matches)]).to(device)
        src_idx = torch.cat([src for src, _ in matches]).to(device)
        gt_labels = torch.cat([t["labels"].to(device).long()[gt] for t, (_, gt) in zip(targets, matches)])
        gt_boxes = torch.cat([t["boxes"].to(device)[gt] for t, (_, gt) in zip(targets, matches)]).float()

        class_loss = self.class_loss(pred["logits"], batch_idx, src_idx, gt_labels, normalizer)
        losses = {f"{prefix}/class": self.class_weight * class_loss}
        l1, giou = self.box_losses(pred["boxes"], batch_idx, src_idx, gt_boxes, normalizer)
        losses[f"{prefix}/l1"] = self.l1_weight * l1
        losses[f"{prefix}/giou"] = self.giou_weight * giou
        if has_mask_prediction(pred):
            bce, dice = self.mask_losses(
                pred, batch_idx, src_idx, gt_masks, matches, copies_per_gt, normalizer, generators
            )
            losses[f"{prefix}/mask_bce"] = self.mask_bce_weight * bce
            losses[f"{prefix}/mask_dice"] = self.dice_weight * dice
        return losses

    # ------------------------------------------------------------------ all outputs

    def forward(
        self, outputs: dict, targets: list[dict], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """Weighted losses; `generators` (one per image) make every random draw of an image
        independent of the rest of the batch."""
        matched_outputs = {name: pred for name, pred in outputs.items() if name != "dn" and is_prediction(pred)}
        if not matched_outputs:
            raise ValueError("criterion: outputs contain no prediction dict ({'logits', 'boxes', ...})")
        device = next(iter(matched_outputs.values()))["logits"].device
        num_boxes = self.average_num_boxes(targets, device)

        matches = self.matcher.match(matched_outputs, targets, generators)
        self.last_matches = matches
        decoder_names = decoder_output_names(matched_outputs)
        self.final_output_name = decoder_names[-1] if decoder_names else None

        dn = outputs.get("dn")
        hybrid = outputs.get("hybrid")
        needs_masks = (
            any(has_mask_prediction(pred) for pred in matched_outputs.values())
            or (dn is not None and any(is_prediction(pred) and has_mask_prediction(pred) for pred in dn.values()))
            or (hybrid is not None and any(
                is_prediction(pred) and has_mask_prediction(pred) for group in hybrid["groups"].values() for pred in group.values()
            ))
        )
        gt_masks = float_gt_masks(targets, device) if needs_masks else None

        losses: dict[str, torch.Tensor] = {}
        for name, pred in matched_outputs.items():
            losses.update(
                self.output_losses(name, pred, targets, gt_masks, matches[name], 1, num_boxes, generators)
            )

        if dn is not None:
            num_groups, single_pad = int(dn["num_groups"]), int(dn["single_pad"])
            sizes = [int(t["labels"].shape[0]) for t in targets]
            dn_matches = denoising_matches(sizes, num_groups, single_pad, device)
            for name, pred in dn.items():
                if not is_prediction(pred):
                    continue
                if pred["logits"].shape[1] != num_groups * single_pad:
                    raise ValueError(
                        f"criterion: dn/{name} has {pred['logits'].shape[1]} queries, expected "
                        f"num_groups * single_pad = {num_groups * single_pad}"
                    )
                losses.update(self.output_losses(
                    f"dn/{name}", pred, targets, gt_masks, dn_matches, num_groups, num_boxes * num_groups, generators
                ))
        if hybrid is not None:
            losses.update(self.hybrid_losses(hybrid, targets, gt_masks, device, generators))
        return losses

    def hybrid_losses(self, hybrid: dict, targets, gt_masks, device, generators) -> dict[str, torch.Tensor]:
        """Co-DETR: the auxiliary heads' own (already weighted) losses, and for each head's positive
        queries in every decoder layer the usual terms against their fixed one-to-many targets
        (no matching), normalized by that head's positive count, weighted hybrid_query_weight."""
        losses = dict(hybrid["losses"])
        for head, group in hybrid["groups"].items():
            matches = group["matches"]
            num_positives = self.average_count(sum(int(q.shape[0]) for q, _ in matches), device)
            for name, pred in group.items():
                if not is_prediction(pred):
                    continue
                terms = self.output_losses(f"hybrid/{head}/{name}", pred, targets, gt_masks, matches, None, num_positives, generators)
                losses.update({key: self.hybrid_query_weight * value for key, value in terms.items()})
        return losses


def build_matcher(cfg) -> HungarianMatcher:
    loss = cfg.loss
    return HungarianMatcher(
        cost_class=loss.cost_class,
        cost_bbox=loss.cost_bbox,
        cost_giou=loss.cost_giou,
        cost_mask=loss.cost_mask,
        cost_dice=loss.cost_dice,
        num_points=loss.num_points,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
        impl=cfg.impl,
    )


def build_criterion(cfg) -> SetCriterion:
    """SetCriterion from cfg.loss and cfg.model.num_classes."""
    loss = cfg.loss
    return SetCriterion(
        num_classes=cfg.model.num_classes,
        matcher=build_matcher(cfg),
        class_weight=loss.class_weight,
        l1_weight=loss.l1_weight,
        giou_weight=loss.giou_weight,
        mask_bce_weight=loss.mask_bce_weight,
        dice_weight=loss.dice_weight,
        num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
        impl=cfg.impl,
        hybrid_query_weight=cfg.train.hybrid_query_weight,
    )
