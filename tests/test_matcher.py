"""Hungarian matcher, box ops and point sampling: hand-checked small cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import record_host_syncs
from dimaskdino.model import matcher as matcher_module
from dimaskdino.model.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    masks_to_boxes,
)
from dimaskdino.model.matcher import LARGE_COST, HungarianMatcher
from dimaskdino.model.point_sample import point_sample, point_sample_rows, uncertainty_points

NUM_CLASSES = 5
MASK = 16  # mask logits are MASK x MASK, GT masks 4x that


def make_matcher(num_points=256, **costs):
    weights = dict(cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0, cost_dice=5.0)
    weights.update(costs)
    return HungarianMatcher(**weights, num_points=num_points, focal_alpha=0.25, focal_gamma=2.0)


def make_targets(num_gt, seed=0):
    """GT with distinct labels, boxes and rectangular masks (at 4x the mask-logit resolution)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (num_gt,), generator=g)
    size = 4 * MASK
    masks = torch.zeros(num_gt, size, size, dtype=torch.bool)
    x0 = torch.randint(0, size // 2, (num_gt,), generator=g)
    y0 = torch.randint(0, size // 2, (num_gt,), generator=g)
    w = torch.randint(8, size // 2, (num_gt,), generator=g)
    h = torch.randint(8, size // 2, (num_gt,), generator=g)
    for j in range(num_gt):
        masks[j, y0[j]: y0[j] + h[j], x0[j]: x0[j] + w[j]] = True
    boxes = box_xyxy_to_cxcywh(masks_to_boxes(masks) / size)
    return {"labels": labels, "boxes": boxes, "masks": masks}


def perfect_prediction(target, num_queries, query_of_gt):
    """Predictions where query query_of_gt[j] is exactly GT j and the rest are confident background."""
    logits = torch.full((num_queries, NUM_CLASSES), -10.0)
    boxes = torch.tensor([0.9, 0.9, 0.05, 0.05]).repeat(num_queries, 1)
    masks = torch.full((num_queries, MASK, MASK), -10.0)
    gt_small = F.avg_pool2d(target["masks"].float()[:, None], 4)[:, 0]  # GT at the mask-logit resolution
    for j, q in enumerate(query_of_gt):
        logits[q, target["labels"][j]] = 10.0
        boxes[q] = target["boxes"][j]
        masks[q] = torch.where(gt_small[j] > 0.5, 10.0, -10.0)
    return logits, boxes, masks


def batch_prediction(targets, num_queries, queries_of_gt):
    parts = [perfect_prediction(t, num_queries, q) for t, q in zip(targets, queries_of_gt)]
    return {key: torch.stack([p[i] for p in parts]) for i, key in enumerate(("logits", "boxes", "masks"))}


# ---------------------------------------------------------------------------- box ops


def test_box_conversions_round_trip_and_iou_by_hand():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    xyxy = box_cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(xyxy[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), boxes)
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 4.0, 5.0, 5.0]])
    iou, _ = box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1.0 / 7.0, 0.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9 (union 7) and 5x5 = 25 (union 5)
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - 2 / 9, 0.0 - 20 / 25]]))
    torch.testing.assert_close(elementwise_generalized_box_iou(a.expand(2, 4), b), giou[0])
    # batched pairwise
    assert generalized_box_iou(b[None].expand(3, 2, 4), a[None].expand(3, 1, 4)).shape == (3, 2, 1)


def test_masks_to_boxes_pixel_edges():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 3:6] = True
    torch.testing.assert_close(masks_to_boxes(masks), torch.tensor([[3.0, 1.0, 6.0, 3.0], [0.0, 0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------------------- point sampling


def test_point_sample_matches_grid_sample_including_outside_points():
    features = torch.randn(3, 4, 7, 9)
    points = torch.rand(3, 50, 2) * 1.2 - 0.1  # some outside [0, 1]
    expected = F.grid_sample(features, 2 * points[:, :, None] - 1, align_corners=False)[..., 0]
    torch.testing.assert_close(point_sample(features, points), expected)
    # per-map points with row selection, and shared points, with the gather implementation
    rows = torch.tensor([2, 0, 2])
    maps = features[:, 0]
    torch.testing.assert_close(point_sample_rows(maps, points, rows), point_sample(maps[rows][:, None], points)[:, 0])
    shared = points[0]
    expected = point_sample(maps[:, None], shared.expand(3, -1, -1))[:, 0]
    torch.testing.assert_close(point_sample_rows(maps, shared), expected)
    # bool maps read as they are
    binary = maps > 0
    torch.testing.assert_close(point_sample_rows(binary, shared), point_sample_rows(binary.float(), shared))


def test_point_sample_same_normalized_point_at_two_resolutions():
    """A GT mask at 4x resolution and its stride-4 version agree at the same normalized points."""
    big = torch.zeros(1, 1, 64, 64)
    big[..., 16:48, 8:40] = 1.0
    small = F.avg_pool2d(big, 4)
    points = torch.tensor([[[0.4, 0.5], [0.05, 0.5], [0.4, 0.9], [0.3, 0.3]]])
    torch.testing.assert_close(point_sample(big, points), point_sample(small, points))


def test_uncertainty_points_keep_the_most_uncertain_candidates():
    torch.manual_seed(0)
    # logits = distance of x from 0.5 (in logits): uncertain points are those near x = 0.5
    xs = (torch.arange(64) + 0.5) / 64
    logits = (xs - 0.5).abs().mul(100).expand(64, 64).clone()[None].repeat(2, 1, 1)
    points = uncertainty_points(logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert points.shape == (2, 100, 2)
    chosen = points[:, :75, 0]
    # of 300 uniform candidates, the 75 closest to x = 0.5 lie within about 0.125 + sampling noise
    assert (chosen - 0.5).abs().max() < 0.2
    assert (points >= 0).all() and (points <= 1).all()


# ---------------------------------------------------------------------------- matcher


def test_perfect_prediction_matches_identity_with_near_zero_cost():
    target = make_targets(4)
    pred = batch_prediction([target], num_queries=4, queries_of_gt=[[0, 1, 2, 3]])
    # masks at the GT resolution, so that "perfect" holds at every point, not just away from edges
    pred["masks"] = torch.where(target["masks"], 20.0, -20.0)[None]
    off_diagonal = ~torch.eye(4, dtype=torch.bool)

    def costs(**weights):
        zero = dict(cost_class=0.0, cost_bbox=0.0, cost_giou=0.0, cost_mask=0.0, cost_dice=0.0)
        return make_matcher(num_points=4096, **{**zero, **weights}).cost_matrices({"a": pred}, [target])["a"][0]

    # L1, mask BCE and dice of a perfect pair are (near) zero, far below any other pair
    for name in ("cost_bbox", "cost_mask", "cost_dice"):
        cost = costs(**{name: 1.0})
        assert cost.diagonal().abs().max() < 0.05, (name, cost)
        assert cost[off_diagonal].min() > 0.05, (name, cost)
    # -GIoU of a perfect pair is its minimum, -1
    torch.testing.assert_close(costs(cost_giou=1.0).diagonal(), torch.full((4,), -1.0))
    # focal cost of a confident right class is its minimum: -(1 - alpha) * p^gamma * softplus(10)
    p = torch.tensor(10.0).sigmoid()
    best = 0.25 * (1 - p) ** 2 * F.softplus(torch.tensor(-10.0)) - 0.75 * p**2 * F.softplus(torch.tensor(10.0))
    torch.testing.assert_close(costs(cost_class=1.0).diagonal(), best.expand(4))

    matcher = make_matcher()
    (pred_idx, gt_idx), = matcher.match({"dec0": pred}, [target])["dec0"]
    assert pred_idx.tolist() == [0, 1, 2, 3] and gt_idx.tolist() == [0, 1, 2, 3]


def test_permuted_predictions_recover_the_permutation_for_every_output():
    targets = [make_targets(5, seed=1), make_targets(3, seed=2)]
    queries_of_gt = [[7, 2, 9, 0, 4], [5, 1, 8]]
    pred = batch_prediction(targets, num_queries=10, queries_of_gt=queries_of_gt)
    no_masks = {"logits": pred["logits"], "boxes": pred["boxes"]}
    outputs = {"dec0": pred, "interm": pred, "ti0": no_masks}
    matches = make_matcher().match(outputs, targets)
    assert set(matches) == set(outputs)
    for name in outputs:
        for (pred_idx, gt_idx), expected in zip(matches[name], queries_of_gt):
            assert pred_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
            assert pred_idx.tolist() == sorted(expected)
            assert {q: j for q, j in zip(pred_idx.tolist(), gt_idx.tolist())} == {q: j for j, q in enumerate(expected)}


def test_cost_matrix_equals_direct_per_pair_formula():
    """The GEMM forms of the BCE / dice costs and the gathered focal cost equal a per-pair loop."""
    target = make_targets(3, seed=3)
    torch.manual_seed(1)
    pred = {
        "logits": torch.randn(1, 4, NUM_CLASSES),
        "boxes": torch.rand(1, 4, 4) * 0.5 + 0.1,
        "masks": torch.randn(1, 4, MASK, MASK) * 3,
    }
    matcher = make_matcher(num_points=64)
    cost = matcher.cost_matrices({"a": pred}, [target], generators=[torch.Generator().manual_seed(5)])["a"][0]
    points = torch.rand(1, 64, 2, generator=torch.Generator().manual_seed(5))  # the matcher's draw
    x = point_sample(pred["masks"], points)[0]  # (Q, P)
    t = point_sample(target["masks"].float()[None], points)[0]  # (N, P)
    alpha, gamma = 0.25, 2.0
    expected = torch.zeros(4, 3)
    for q in range(4):
        for j in range(3):
            p = pred["logits"][0, q, target["labels"][j]].sigmoid()
            focal = alpha * (1 - p) ** gamma * -torch.log(p) - (1 - alpha) * p**gamma * -torch.log(1 - p)
            l1 = (pred["boxes"][0, q] - target["boxes"][j]).abs().sum()
            pred_xyxy = box_cxcywh_to_xyxy(pred["boxes"][0, q:q + 1])
            giou = generalized_box_iou(pred_xyxy, box_cxcywh_to_xyxy(target["boxes"][j:j + 1]))[0, 0]
            bce = F.binary_cross_entropy_with_logits(x[q], t[j])
            s = x[q].sigmoid()
            dice = 1 - (2 * (s * t[j]).sum() + 1) / (s.sum() + t[j].sum() + 1)
            expected[q, j] = 4 * focal + 5 * l1 - 2 * giou + 5 * bce + 5 * dice
    torch.testing.assert_close(cost, expected, atol=1e-4, rtol=1e-4)


def test_outputs_without_masks_use_class_and_box_costs_only():
    target = make_targets(2, seed=4)
    pred = batch_prediction([target], num_queries=3, queries_of_gt=[[0, 1]])
    matcher = make_matcher()
    with_masks = matcher.cost_matrices({"a": pred}, [target])["a"]
    without = matcher.cost_matrices({"a": {"logits": pred["logits"], "boxes": pred["boxes"]}}, [target])["a"]
    box_only = make_matcher(cost_mask=0.0, cost_dice=0.0).cost_matrices({"a": pred}, [target])["a"]
    torch.testing.assert_close(without, box_only)
    assert not torch.allclose(with_masks, without)


def test_nan_and_inf_still_give_a_valid_assignment():
    target = make_targets(3, seed=5)
    pred = batch_prediction([target], num_queries=6, queries_of_gt=[[1, 3, 5]])
    pred["logits"][0, 0] = float("nan")
    pred["boxes"][0, 2] = float("nan")
    pred["masks"][0, 4] = float("inf")
    pred["logits"][0, 3, 0] = float("inf")
    matcher = make_matcher()
    cost = matcher.cost_matrices({"a": pred}, [target])["a"]
    assert torch.isfinite(cost).all() and cost.abs().max() <= LARGE_COST
    (pred_idx, gt_idx), = matcher.match({"a": pred}, [target])["a"]
    assert len(set(pred_idx.tolist())) == 3 and sorted(gt_idx.tolist()) == [0, 1, 2]
    assert not set(pred_idx.tolist()) & {0, 2}  # the NaN queries lose to the finite ones
    # everything NaN: still a valid (arbitrary) assignment
    for key in pred:
        pred[key] = torch.full_like(pred[key], float("nan"))
    (pred_idx, gt_idx), = matcher.match({"a": pred}, [target])["a"]
    assert len(set(pred_idx.tolist())) == 3 and sorted(gt_idx.tolist()) == [0, 1, 2]


def test_empty_gt_gives_empty_matches():
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
             "masks": torch.zeros(0, 4 * MASK, 4 * MASK, dtype=torch.bool)}
    full = make_targets(2, seed=6)
    pred = batch_prediction([full, full], num_queries=4, queries_of_gt=[[0, 1], [0, 1]])
    matcher = make_matcher()
    matches = matcher.match({"a": pred}, [empty, full])["a"]
    assert matches[0][0].numel() == 0 and matches[0][1].numel() == 0
    assert matches[1][0].tolist() == [0, 1]
    matches = matcher.match({"a": pred, "b": pred}, [empty, empty])
    assert all(p.numel() == 0 and g.numel() == 0 for name in ("a", "b") for p, g in matches[name])


def test_more_gt_than_queries_and_many_gt():
    matcher = make_matcher(num_points=128)
    target = make_targets(120, seed=7)
    torch.manual_seed(2)
    pred = {"logits": torch.randn(1, 300, NUM_CLASSES), "boxes": torch.rand(1, 300, 4),
            "masks": torch.randn(1, 300, MASK, MASK)}
    small = {key: value[:, :50] for key, value in pred.items()}
    matches = matcher.match({"many": pred, "few": small}, [target])
    pred_idx, gt_idx = matches["many"][0]
    assert len(pred_idx) == 120 and len(set(pred_idx.tolist())) == 120 and sorted(gt_idx.tolist()) == list(range(120))
    pred_idx, gt_idx = matches["few"][0]
    assert len(pred_idx) == 50 and len(set(gt_idx.tolist())) == 50


def test_one_device_to_host_transfer_per_step(monkeypatch):
    """All cost matrices of all outputs and images leave the device in ONE copy; nothing else syncs."""
    targets = [make_targets(3, seed=8), make_targets(5, seed=9), make_targets(1, seed=10)]
    pred = batch_prediction(targets, num_queries=8, queries_of_gt=[[0, 1, 2], [3, 4, 5, 6, 7], [2]])
    outputs = {f"dec{i}": pred for i in range(4)}
    outputs["ti0"] = {"logits": pred["logits"], "boxes": pred["boxes"]}

    transfers = []
    real_transfer = matcher_module.transfer_to_host
    monkeypatch.setattr(matcher_module, "transfer_to_host", lambda t: transfers.append(t.shape) or real_transfer(t))
    syncs = record_host_syncs(monkeypatch)
    matches = make_matcher().match(outputs, targets)
    monkeypatch.undo()
    assert len(transfers) == 1, transfers
    assert syncs == [], syncs
    assert matches["dec3"][1][0].tolist() == [3, 4, 5, 6, 7]


def test_cost_is_computed_in_float32_for_low_precision_outputs():
    target = make_targets(2, seed=11)
    pred = batch_prediction([target], num_queries=3, queries_of_gt=[[2, 0]])
    half = {key: value.bfloat16() for key, value in pred.items()}
    matcher = make_matcher()
    cost = matcher.cost_matrices({"a": half}, [target])["a"]
    assert cost.dtype == torch.float32
    (pred_idx, gt_idx), = matcher.match({"a": half}, [target])["a"]
    assert pred_idx.tolist() == [0, 2] and gt_idx.tolist() == [1, 0]
    assert math.isfinite(cost.sum().item())


def test_forward_is_match():
    target = make_targets(2, seed=12)
    pred = batch_prediction([target], num_queries=3, queries_of_gt=[[1, 2]])
    out = make_matcher()({"a": pred}, [target])
    assert out["a"][0][0].tolist() == [1, 2]


@pytest.mark.parametrize("num_gt", [0, 1])
def test_point_sample_rows_handles_tiny_inputs(num_gt):
    maps = torch.ones(num_gt, 4, 4, dtype=torch.bool)
    assert point_sample_rows(maps, torch.rand(7, 2)).shape == (num_gt, 7)
