"""Hungarian matching of many outputs at once (SPEC section 5).

Cost of query q against GT j of the same image:
    cost_class * focal(q, label_j) + cost_bbox * L1(box_q, box_j) - cost_giou * GIoU(box_q, box_j)
    + cost_mask * BCE(mask_q, mask_j) + cost_dice * dice(mask_q, mask_j)
with the mask terms only for outputs that predict masks, evaluated at `num_points` points drawn
uniformly once per image and shared by every query, every GT and every output of that image.

Host synchronization: every cost matrix of every output and image is computed on the device,
padded to the largest GT count of the batch, made finite, packed into ONE tensor and copied to the
host ONCE (`transfer_to_host`); the Hungarian problems are then solved with scipy, and all the
resulting indices go back to the device in one copy. No per-image or per-output synchronization.

Mask costs (`mask_costs(pred, points, gt_point_values)`, the only place that reads predicted masks):
- a prediction with "masks" (B, Q, H, W) logits: bilinear samples of the masks at the points, then
  the BCE and dice reductions (the reference path);
- a prediction with "mask_embed" (B, Q, d) and "mask_features" (B, d, H, W) instead (the model's
  `train_masks="points"` mode): mask logits are linear in the features and so is bilinear sampling,
  so the features are sampled once per image at its points ((B, d, P), once per distinct features
  tensor per step: every output of an image shares the points) and `dimaskdino.ops.point_mask_costs`
  makes the costs from the embeddings with no Q x H x W tensor (its Triton kernel does not even
  write the Q x P point logits).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils.rnn import pad_sequence

from dimaskdino.ops.mask_loss import point_mask_costs, sample_point_features

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .point_sample import rand_per_image, point_sample, point_sample_rows

# Replaces NaN / +inf costs (and bounds every cost) before solving: large enough to lose against
# any real cost, small enough that sums over an assignment keep float64 precision.
LARGE_COST = 1e8

Matches = list[tuple[torch.Tensor, torch.Tensor]]


def transfer_to_host(packed: torch.Tensor) -> np.ndarray:
    """The single device-to-host copy of a matching step (tests count calls to this function)."""
    if is_fake(packed):
        return fake_tensor_costs(packed)
    return packed.to("cpu").numpy()


def fake_tensor_costs(packed: torch.Tensor) -> np.ndarray:
    """Costs for a FakeTensor (shapes without values: the fake-GPU training step in CI): all zero,
    so the solver returns its fixed assignment (query i <-> GT i) and the rest of the step sees
    matches of the real sizes. Never used with real tensors."""
    return np.zeros(tuple(packed.shape), dtype=np.float32)


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal matching cost (B, Q, N) of logits (B, Q, C) against GT labels (B, N).

    pos - neg focal terms of the GT class (DINO / MaskDINO), with -log p = softplus(-x) and
    -log(1 - p) = softplus(x) instead of log(p + 1e-8): equal up to that epsilon, finite for any
    finite logit. Gathers the GT classes first, so the work is Q x N, not Q x C.
    """
    x = torch.gather(logits, 2, labels.unsqueeze(1).expand(-1, logits.shape[1], -1))
    prob = x.sigmoid()
    pos = alpha * (1.0 - prob).pow(gamma) * F.softplus(-x)
    neg = (1.0 - alpha) * prob.pow(gamma) * F.softplus(x)
    return pos - neg


def box_costs(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 distance and -GIoU, (B, Q, N) each, of normalized cxcywh boxes (B, Q, 4) vs (B, N, 4)."""
    l1 = torch.cdist(pred_boxes, gt_boxes, p=1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))
    return l1, -giou


def has_mask_prediction(pred: dict) -> bool:
    """Whether a prediction dict predicts masks: full logits "masks", or "mask_embed" and
    "mask_features" to be combined at sampled points (see dimaskdino.ops.mask_loss)."""
    return "masks" in pred or "mask_embed" in pred


def mask_costs_from_point_logits(
    point_logits: torch.Tensor, gt_point_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE and dice costs (B, Q, N) of point logits (B, Q, P) vs GT point values (B, N, P).

    BCE: sum_p [t softplus(-x) + (1 - t) softplus(x)] = sum_p softplus(x) - x . t, since
    softplus(-x) - softplus(x) = -x: one GEMM, no Q x N x P tensor. Dice: 1 - (2 s.t + 1) /
    (sum s + sum t + 1) with s = sigmoid(x): one more GEMM.
    """
    num_points = point_logits.shape[-1]
    targets_t = gt_point_values.transpose(1, 2)  # (B, P, N)
    bce = (F.softplus(point_logits).sum(-1, keepdim=True) - torch.bmm(point_logits, targets_t)) / num_points
    prob = point_logits.sigmoid()
    numerator = 2.0 * torch.bmm(prob, targets_t)
    denominator = prob.sum(-1, keepdim=True) + gt_point_values.sum(-1).unsqueeze(1)
    dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return bce, dice


class HungarianMatcher(nn.Module):
    def __init__(
        self,
        cost_class: float,
        cost_bbox: float,
        cost_giou: float,
        cost_mask: float,
        cost_dice: float,
        num_points: int,
        focal_alpha: float,
        focal_gamma: float,
        impl: str = "auto",
    ):
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.impl = impl  # of dimaskdino.ops.point_mask_costs (predictions with "mask_embed")
        self._point_features: dict | None = None  # per cost_matrices call: sampled features by tensor

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, num_points={self.num_points}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, impl={self.impl!r}"
        )

    # ------------------------------------------------------------------ costs (on the device)

    def mask_costs(
        self, pred: dict, points: torch.Tensor, gt_point_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE and dice costs (B, Q, N) of the output's mask logits pred["masks"] (B, Q, H, W) at
        the per-image points (B, P, 2) against the GT values there (B, N, P).

        Takes the whole prediction dict so that a fused replacement can read what it needs instead
        (e.g. query mask embeddings and the mask features: sample the features once at the points,
        then one GEMM gives every query's point logits without Q x H x W masks): a prediction with
        "mask_embed" (B, Q, d) and "mask_features" (B, d, H, W) and no "masks" takes that path
        (a prediction with both is matched on its "masks", as without the embeddings)."""
        if "masks" not in pred:
            features = pred["mask_features"]
            # Outputs share a few features tensors (original and BATO-updated): sample each once.
            # 16-bit embeddings (autocast): the sampled features rounded to their dtype, so that the
            # GEMM runs on tensor cores (the reference's mask logits are 16-bit einsum outputs).
            embed = pred["mask_embed"]
            dtype = embed.dtype if embed.dtype in (torch.bfloat16, torch.float16) else None
            # The storage, not data_ptr(): FakeTensors (the fake-GPU step in CI) have no data pointer.
            key = (StorageWeakRef(features.untyped_storage()), features.storage_offset(), tuple(features.shape),
                   features.stride(), features.dtype, dtype)
            cache = self._point_features if self._point_features is not None else {}
            if key not in cache:
                sampled = sample_point_features(features, points)
                cache[key] = sampled if dtype is None else sampled.to(dtype)
            return point_mask_costs(embed, cache[key], gt_point_values, impl=self.impl)
        point_logits = point_sample(pred["masks"], points)  # (B, Q, P) float32
        return mask_costs_from_point_logits(point_logits, gt_point_values)

    def sample_gt_points(
        self, targets: list[dict], device: torch.device, generators: list[torch.Generator] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform points (B, P, 2), one set per image, and the GT mask values there (B, max_gt, P),
        zero for padding GT. The masks are read where they are (bool is fine), never copied."""
        points = rand_per_image([1] * len(targets), (self.num_points, 2), device, generators)
        values = []
        for image_points, target in zip(points, targets):
            if target["labels"].shape[0] == 0:
                values.append(torch.zeros(0, self.num_points, device=device))
            else:
                values.append(point_sample_rows(target["masks"].to(device), image_points).float())
        return points, pad_sequence(values, batch_first=True)  # (B, max_gt, P): some image has max_gt

    def cost_matrix(
        self,
        pred: dict,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        points: torch.Tensor | None,
        gt_point_values: torch.Tensor | None,
    ) -> torch.Tensor:
        """Weighted total cost (B, Q, max_gt) of one output, float32, finite."""
        logits = pred["logits"].float()
        boxes = pred["boxes"].float()
        cost = self.cost_class * focal_class_cost(logits, gt_labels, self.focal_alpha, self.focal_gamma)
        l1, neg_giou = box_costs(boxes, gt_boxes)
        cost = cost + self.cost_bbox * l1 + self.cost_giou * neg_giou
        if has_mask_prediction(pred):
            bce, dice = self.mask_costs(pred, points, gt_point_values)
            cost = cost + self.cost_mask * bce + self.cost_dice * dice
        # NaN -> worst, +-inf -> +-LARGE_COST, and everything bounded: the solver needs finite costs.
        return cost.nan_to_num(nan=LARGE_COST, posinf=LARGE_COST, neginf=-LARGE_COST).clamp(-LARGE_COST, LARGE_COST)

    @torch.no_grad()
    def cost_matrices(
        self, outputs: dict[str, dict], targets: list[dict], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """Cost matrices (B, Q_output, max_gt) of every output, on the device; columns past an
        image's GT count are padding."""
        first = next(iter(outputs.values()))
        device = first["logits"].device
        sizes = [int(t["labels"].shape[0]) for t in targets]
        max_gt = max(sizes, default=0)
        if max_gt == 0:
            return {name: first["logits"].new_zeros(pred["logits"].shape[0], pred["logits"].shape[1], 0)
                    for name, pred in outputs.items()}
        # Pad GT to max_gt per image (label 0, box (0.5, 0.5, 0.5, 0.5): finite costs, dropped on the host).
        gt_labels = pad_sequence([t["labels"].to(device).long() for t in targets], batch_first=True)
        gt_boxes = pad_sequence([t["boxes"].to(device).float() for t in targets], batch_first=True, padding_value=0.5)
        points = gt_point_values = None
        if any(has_mask_prediction(pred) for pred in outputs.values()):
            points, gt_point_values = self.sample_gt_points(targets, device, generators)
        self._point_features = {}
        try:
            with torch.autocast(device_type=device.type, enabled=False):  # costs in float32
                return {
                    name: self.cost_matrix(pred, gt_labels, gt_boxes, points, gt_point_values)
                    for name, pred in outputs.items()
                }
        finally:
            self._point_features = None

    # ------------------------------------------------------------------ solve (on the host)

    @torch.no_grad()
    def match(
        self, outputs: dict[str, dict], targets: list[dict], generators: list[torch.Generator] | None = None
    ) -> dict[str, Matches]:
        """Hungarian matching of every output in `outputs` (name -> {"logits", "boxes"[, "masks" or
        "mask_embed" + "mask_features"]})
        against `targets`. Returns name -> per image (pred_idx, gt_idx), int64 on the outputs'
        device, pred_idx ascending. An image without GT gets empty tensors."""
        if not outputs:
            return {}
        costs = self.cost_matrices(outputs, targets, generators)
        device = next(iter(costs.values())).device
        sizes = [int(t["labels"].shape[0]) for t in targets]
        shapes = {name: tuple(cost.shape) for name, cost in costs.items()}
        packed = torch.cat([cost.reshape(-1) for cost in costs.values()])
        host = transfer_to_host(packed).astype(np.float64)

        solved: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        offset = 0
        for name, (batch, num_queries, max_gt) in shapes.items():
            block = host[offset: offset + batch * num_queries * max_gt].reshape(batch, num_queries, max_gt)
            offset += batch * num_queries * max_gt
            solved[name] = [linear_sum_assignment(block[b, :, : sizes[b]]) for b in range(batch)]
        return self._indices_to_device(solved, device)

    @staticmethod
    def _indices_to_device(solved: dict[str, list[tuple[np.ndarray, np.ndarray]]], device) -> dict[str, Matches]:
        """All (pred_idx, gt_idx) arrays into one int64 tensor, one host-to-device copy, split into views."""
        pieces = [part for pairs in solved.values() for pred_gt in pairs for part in pred_gt]
        lengths = [len(part) for part in pieces]
        host = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)
        flat = torch.from_numpy(host).to(device, non_blocking=True)
        split = iter(torch.split(flat, lengths))
        return {name: [(next(split), next(split)) for _ in pairs] for name, pairs in solved.items()}

    def forward(self, outputs: dict[str, dict], targets: list[dict], generators: list[torch.Generator] | None = None):
        return self.match(outputs, targets, generators)
