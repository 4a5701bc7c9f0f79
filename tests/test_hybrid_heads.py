"""Co-DETR auxiliary heads (dimaskdino.model.hybrid): NMS and RoIAlign against slow references,
hand-built assigner cases, and one forward / backward of the whole module."""

import pytest
import torch

from dimaskdino.model.box_ops import box_cxcywh_to_xyxy, box_iou
from dimaskdino.model.hybrid import (
    HEAD_NAMES,
    IGNORED,
    NEGATIVE,
    GroundTruth,
    HybridHeads,
    QueryContent,
    atss_assign,
    build_positive_queries,
    decode_deltas,
    encode_deltas,
    greedy_nms_keep,
    level_anchors,
    max_iou_assign,
    nms,
    roi_align,
    roi_pyramid_levels,
    sample_assigned,
)

HIDDEN = 64
NUM_CLASSES = 5
SHAPES = [(16, 16), (8, 8), (4, 4), (2, 2)]
IMAGE_HW = (128, 128)


def random_boxes(num: int, generator: torch.Generator, size: float = 50.0) -> torch.Tensor:
    top_left = torch.rand(num, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(num, 2, generator=generator, dtype=torch.float64) * size * 0.5 + 1.0
    return torch.cat((top_left, top_left + wh), dim=1)


# ------------------------------------------------------------------------------------------ NMS


def brute_force_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Textbook greedy NMS: visit boxes by decreasing score (equal scores in input order), keep a box
    unless a kept box overlaps it by more than the threshold."""
    boxes, scores = boxes.tolist(), scores.tolist()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(python_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def python_iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nms_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(60, g)
    # Scores rounded to one decimal: many ties, which must keep the input order.
    scores = (torch.rand(60, generator=g, dtype=torch.float64) * 10).round() / 10
    for threshold in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, threshold).tolist() == brute_force_nms(boxes, scores, threshold)


def test_nms_keeps_an_overlap_equal_to_the_threshold():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.1]])  # IoU 0.5, ~0.91
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1]


def test_batched_nms_ignores_invalid_boxes():
    g = torch.Generator().manual_seed(5)
    boxes = random_boxes(2 * 3 * 20, g).reshape(2, 3, 20, 4)
    valid = torch.rand(2, 3, 20, generator=g) > 0.3
    keep = greedy_nms_keep(boxes, valid, 0.5)  # boxes taken as already sorted by score
    for index in [(0, 0), (0, 2), (1, 1)]:
        rows = valid[index].nonzero().squeeze(1)
        scores = -torch.arange(rows.numel(), dtype=torch.float64)  # input order = score order
        expected = rows[brute_force_nms(boxes[index][rows], scores, 0.5)]
        assert keep[index].nonzero().squeeze(1).tolist() == sorted(expected.tolist())


def test_nms_of_no_boxes():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


# ------------------------------------------------------------------------------------- RoIAlign


def bilinear_reference(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's roi_align bilinear_interpolate, one point, written out."""
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(feature.shape[0], dtype=feature.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feature[:, y_low, x_low] + hy * lx * feature[:, y_low, x_high]
            + ly * hx * feature[:, y_high, x_low] + ly * lx * feature[:, y_high, x_high])


def roi_align_reference(feature, box, stride, output_size, sampling_ratio):
    x0, y0, x1, y1 = [float(v) / stride - 0.5 for v in box]
    bin_w, bin_h = (x1 - x0) / output_size, (y1 - y0) / output_size
    out = torch.zeros(feature.shape[0], output_size, output_size, dtype=feature.dtype)
    for ph in range(output_size):
        for pw in range(output_size):
            total = torch.zeros(feature.shape[0], dtype=feature.dtype)
            for iy in range(sampling_ratio):
                y = y0 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                for ix in range(sampling_ratio):
                    x = x0 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                    total = total + bilinear_reference(feature, y, x)
            out[:, ph, pw] = total / sampling_ratio**2
    return out


def test_roi_align_equals_reference():
    g = torch.Generator().manual_seed(0)
    strides = [2, 4]
    features = [torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64),
                torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)]
    rois = torch.tensor([
        [1.0, 2.0, 9.0, 7.0],  # inside
        [-5.0, -3.0, 6.0, 4.0],  # over the top-left corner
        [10.0, 8.0, 17.5, 14.0],  # over the bottom-right corner (image is 14 x 12)
        [-9.0, 1.0, -1.5, 5.0],  # mostly more than one pixel outside
        [3.3, 3.3, 3.3, 3.3],  # degenerate
        [0.0, 0.0, 14.0, 12.0],  # whole image
    ], dtype=torch.float64)
    batch_index = torch.tensor([0, 1, 1, 0, 1, 0])
    levels = torch.tensor([0, 1, 0, 1, 0, 1])
    out = roi_align(features, rois, batch_index, levels, strides, output_size=3, sampling_ratio=2)
    assert out.shape == (6, 3, 3, 3)
    for r in range(6):
        level = int(levels[r])
        expected = roi_align_reference(features[level][batch_index[r]], rois[r], strides[level], 3, 2)
        torch.testing.assert_close(out[r], expected, rtol=0, atol=1e-12)


def test_roi_levels_follow_finest_scale():
    sides = torch.tensor([20.0, 111.0, 112.5, 230.0, 460.0, 5000.0])
    rois = torch.stack((torch.zeros(6), torch.zeros(6), sides, sides), dim=1)
    assert roi_pyramid_levels(rois, num_levels=4).tolist() == [0, 0, 1, 2, 3, 3]


def test_deltas_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors, targets = random_boxes(10, g), random_boxes(10, g)
    stds = (0.1, 0.1, 0.2, 0.2)
    torch.testing.assert_close(decode_deltas(anchors, encode_deltas(anchors, targets, stds), stds), targets)


# ------------------------------------------------------------------------------------ assigners


def test_atss_assigns_the_anchors_inside_a_gt():
    anchors = level_anchors((5, 5), 8, [(8.0, 8.0)], "cpu", torch.float64)  # centres 4, 12, ..., 36
    gt = torch.tensor([[8.0, 8.0, 26.0, 25.0]], dtype=torch.float64)
    assigned = atss_assign(anchors, [25], gt)
    # The four anchors centred at (12|20, 12|20) lie inside the GT and overlap it most.
    assert assigned.eq(0).nonzero().squeeze(1).tolist() == [6, 7, 11, 12]
    assert assigned[[i for i in range(25) if i not in (6, 7, 11, 12)]].eq(NEGATIVE).all()
    assert atss_assign(anchors, [25], gt[:0]).eq(NEGATIVE).all()


def test_atss_never_takes_an_anchor_centred_outside_its_gt():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    anchors = torch.tensor([
        [5.5, 0.0, 15.5, 10.0],  # centre (10.5, 5): outside, IoU 0.29
        [2.0, 2.0, 8.0, 8.0],  # centre inside, IoU 0.36
        [-8.0, -8.0, 2.0, 2.0], [-8.0, 8.0, 2.0, 18.0], [8.0, -8.0, 18.0, 2.0], [8.0, 8.0, 18.0, 18.0],
        [-9.0, 0.0, 1.0, 10.0], [0.0, -9.0, 10.0, 1.0], [0.0, 9.0, 10.0, 19.0],
    ], dtype=torch.float64)
    ious = box_iou(gt, anchors)[0][0]
    threshold = ious.mean() + ious.std()  # all 9 anchors are candidates
    assert ious[0] >= threshold and ious[1] >= threshold  # the IoU test alone would take anchor 0
    assigned = atss_assign(anchors, [9], gt)
    assert assigned[0] == NEGATIVE and assigned[1] == 0


@pytest.mark.parametrize("swap", [False, True])
def test_atss_gives_a_shared_anchor_to_the_higher_iou_gt(swap):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] + [[40.0 + 20 * i, 40.0, 50.0 + 20 * i, 50.0] for i in range(8)],
                           dtype=torch.float64)
    gts = torch.tensor([[0.0, 0.0, 10.0, 12.0], [-1.0, 0.0, 10.0, 10.0]], dtype=torch.float64)  # IoU 0.83, 0.91
    if swap:
        gts = gts.flip(0)
    assigned = atss_assign(anchors, [9], gts)
    assert assigned[0] == (0 if swap else 1)
    assert assigned[1:].eq(NEGATIVE).all()


def test_max_iou_assigner_hand_case():
    ious = torch.tensor([
        [0.80, 0.50, 0.20, 0.10, 0.00],
        [0.10, 0.35, 0.25, 0.60, 0.60],  # best anchors 3 and 4 (a tie): both low-quality matches
        [0.05, 0.10, 0.29, 0.00, 0.00],  # best IoU 0.29 < min_pos_iou: takes nothing
        [0.00, 0.50, 0.00, 0.00, 0.00],  # best anchor 1 (an ignored anchor whose max-IoU GT is GT 0) ...
        [0.00, 0.45, 0.00, 0.00, 0.00],  # ... and this GT's best too: the later GT wins, as in mmdet's loop
    ])
    rpn = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
    assert max_iou_assign(ious, **rpn, match_low_quality=True).tolist() == [0, 4, NEGATIVE, 1, 1]
    assert max_iou_assign(ious, **rpn, match_low_quality=False).tolist() == [0, IGNORED, NEGATIVE, IGNORED, IGNORED]
    roi = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)
    assert max_iou_assign(ious, **roi).tolist() == [0, 0, NEGATIVE, 1, 1]
    assert max_iou_assign(ious[:0], **rpn, match_low_quality=True).tolist() == [NEGATIVE] * 5


def test_sampler_caps_positives_and_fills_with_negatives():
    assigned = torch.tensor([0] * 30 + [NEGATIVE] * 50 + [IGNORED] * 10)
    positives, negatives = sample_assigned(assigned, 40, 0.25, torch.Generator().manual_seed(0))
    assert positives.numel() == 10 and negatives.numel() == 30
    assert assigned[positives].ge(0).all() and assigned[negatives].eq(NEGATIVE).all()
    assert positives.unique().numel() == 10 and negatives.unique().numel() == 30


def test_positive_queries_are_capped_and_padded():
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    ground_truth = GroundTruth(boxes=[], labels=[], image_hw=(100, 200), generators=gens)
    positives = [random_boxes(7, gens[0]), random_boxes(2, gens[0])]
    positive_gt = [torch.arange(7), torch.tensor([1, 0])]
    pools = [random_boxes(10, gens[0]), random_boxes(1, gens[0])]
    queries = build_positive_queries(positives, positive_gt, pools, 4, ground_truth, QueryContent(32))
    assert queries.boxes.shape == (2, 4, 4) and queries.content.shape == (2, 4, 32)
    (rows0, gt0), (rows1, gt1) = queries.matches
    assert rows0.tolist() == [0, 1, 2, 3] and gt0.unique().numel() == 4
    assert rows1.tolist() == [0, 1] and gt1.tolist() == [1, 0]
    # Image 1: 2 positives, its only negative, then the whole-image box.
    torch.testing.assert_close(queries.boxes[1, 3], torch.tensor([0.5, 0.5, 1 - 1e-4, 1 - 1e-4], dtype=torch.float64))


# -------------------------------------------------------------------------------- whole module


def make_targets():
    boxes = torch.tensor([[0.30, 0.30, 0.40, 0.30], [0.65, 0.70, 0.50, 0.40], [0.50, 0.50, 0.90, 0.90]])
    return [{"labels": torch.tensor([0, 3, 4]), "boxes": boxes},
            {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]


def make_generators():
    return [torch.Generator().manual_seed(100 + i) for i in range(2)]


@pytest.fixture(scope="module")
def trained_step():
    torch.manual_seed(0)
    model = HybridHeads(HIDDEN, NUM_CLASSES, len(SHAPES), ("atss", "rcnn"))
    memory = torch.randn(2, sum(h * w for h, w in SHAPES), HIDDEN, requires_grad=True)
    output = model(memory, SHAPES, make_targets(), IMAGE_HW, make_generators())
    sum(output.losses.values()).backward()
    return model, memory, output


def test_losses_present_finite_and_positive(trained_step):
    _, _, output = trained_step
    expected = {"hybrid/atss/class", "hybrid/atss/giou", "hybrid/atss/centerness", "hybrid/rpn/class",
                "hybrid/rpn/l1", "hybrid/rcnn/class", "hybrid/rcnn/giou"}
    assert set(output.losses) == expected
    for key, value in output.losses.items():
        assert value.dim() == 0 and torch.isfinite(value) and value > 0, key


def test_every_loss_parameter_gets_a_gradient(trained_step):
    model, memory, _ = trained_step
    assert torch.isfinite(memory.grad).all() and memory.grad.abs().sum() > 0
    for name, parameter in model.named_parameters():
        if "query_content" in name:
            assert parameter.grad is None, name  # trained only through the decoder
        elif name.endswith("scales"):
            # A level without positive anchors gives its scale no gradient.
            assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name


def test_query_content_layers_get_gradients_from_the_content(trained_step):
    model, _, output = trained_step
    # A random weighting: the sum of a LayerNorm output does not depend on its input.
    weights = torch.Generator().manual_seed(1)
    total = sum((queries.content * torch.randn(queries.content.shape, generator=weights)).sum()
                for queries in output.queries.values())
    total.backward()
    for name, parameter in model.named_parameters():
        if "query_content" in name:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name


def test_positive_queries(trained_step):
    _, _, output = trained_step
    targets = make_targets()
    gt_xyxy = box_cxcywh_to_xyxy(targets[0]["boxes"])
    assert set(output.queries) == set(HEAD_NAMES)
    for name, queries in output.queries.items():
        num_queries = queries.boxes.shape[1]
        assert 1 <= num_queries <= 300
        assert queries.content.shape == (2, num_queries, HIDDEN)
        assert queries.boxes.shape == (2, num_queries, 4) and not queries.boxes.requires_grad
        assert ((queries.boxes > 0) & (queries.boxes < 1)).all()
        (rows, gt_index), (empty_rows, empty_gt) = queries.matches
        assert rows.dtype == gt_index.dtype == torch.int64
        assert rows.numel() == num_queries  # image 0 has the most positives
        assert rows.tolist() == list(range(rows.numel())) and gt_index.lt(3).all() and gt_index.ge(0).all()
        assert set(gt_index.tolist()) == {0, 1, 2}, name  # every GT gets at least one positive
        assert empty_rows.numel() == 0 and empty_gt.numel() == 0
        positives = box_cxcywh_to_xyxy(queries.boxes[0, rows])
        if name == "atss":  # anchor centres inside their GT
            centres = queries.boxes[0, rows, :2]
            assigned = gt_xyxy[gt_index]
            assert ((centres > assigned[:, :2]) & (centres < assigned[:, 2:])).all()
        else:  # sampled positive RoIs overlap their GT by at least 0.5
            ious = box_iou(positives, gt_xyxy)[0]
            assert ious[torch.arange(rows.numel()), gt_index].ge(0.5 - 1e-6).all()


def test_forward_is_deterministic_given_generators(trained_step):
    model, memory, output = trained_step
    with torch.no_grad():
        again = model(memory, SHAPES, make_targets(), IMAGE_HW, make_generators())
    for key, value in output.losses.items():
        assert torch.equal(value, again.losses[key]), key
    for name, queries in output.queries.items():
        assert torch.equal(queries.boxes, again.queries[name].boxes)
        assert torch.equal(queries.content, again.queries[name].content)
        for (rows, gt), (rows2, gt2) in zip(queries.matches, again.queries[name].matches):
            assert torch.equal(rows, rows2) and torch.equal(gt, gt2)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="atss"):
        HybridHeads(32, 3, 2, ("atss", "fcos"))
    model = HybridHeads(32, 3, 2, ("atss",))
    memory = torch.randn(2, 16 + 4, 32)
    with pytest.raises(ValueError, match="targets"):
        model(memory, [(4, 4), (2, 2)], make_targets()[:1], (32, 32))
    with pytest.raises(ValueError, match="heads"):
        HybridHeads(32, 3, 2, ())


def test_float64_without_generators_and_one_head():
    torch.manual_seed(0)
    model = HybridHeads(32, 3, 2, ("rcnn",)).double()
    memory = torch.randn(2, 16 + 4, 32, dtype=torch.float64)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.6, 0.5]])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    output = model(memory, [(4, 4), (2, 2)], targets, (32, 32))  # global RNG
    assert set(output.losses) == {"hybrid/rpn/class", "hybrid/rpn/l1", "hybrid/rcnn/class", "hybrid/rcnn/giou"}
    assert all(value.dtype == torch.float64 and torch.isfinite(value) for value in output.losses.values())
    assert set(output.queries) == {"rcnn"} and output.queries["rcnn"].boxes.dtype == torch.float64
