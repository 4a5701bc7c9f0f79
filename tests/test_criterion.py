"""SetCriterion: every key, hand-checked values, empty GT, many GT, gradients, denoising."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import record_host_syncs
from dimaskdino.model import criterion as criterion_module
from dimaskdino.model import matcher as matcher_module
from dimaskdino.model.box_ops import box_xyxy_to_cxcywh, masks_to_boxes
from dimaskdino.model.criterion import SetCriterion, build_criterion, denoising_matches, sigmoid_focal_loss_sum
from dimaskdino.model.matcher import HungarianMatcher
from dimaskdino.model.point_sample import point_sample

C = 5  # classes
MASK = 8  # mask logits MASK x MASK; GT masks 4x
TERMS = ("class", "l1", "giou", "mask_bce", "mask_dice")


def make_criterion(num_points=64, num_classes=C):
    matcher = HungarianMatcher(cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0, cost_dice=5.0,
                               num_points=num_points, focal_alpha=0.25, focal_gamma=2.0)
    return SetCriterion(num_classes, matcher, class_weight=4.0, l1_weight=5.0, giou_weight=2.0,
                        mask_bce_weight=5.0, dice_weight=5.0, num_points=num_points, oversample_ratio=3.0,
                        importance_sample_ratio=0.75, focal_alpha=0.25, focal_gamma=2.0)


def make_target(num_gt, seed=0, size=4 * MASK):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_gt, size, size, dtype=torch.bool)
    for j in range(num_gt):
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(4, size // 2, (2,), generator=g).tolist()
        masks[j, y0: y0 + h, x0: x0 + w] = True
    return {"labels": torch.randint(0, C, (num_gt,), generator=g),
            "boxes": box_xyxy_to_cxcywh(masks_to_boxes(masks) / size), "masks": masks}


def pred(batch, queries, masks=True, mask_size=MASK):
    out = {"logits": torch.randn(batch, queries, C).requires_grad_(),
           "boxes": (torch.rand(batch, queries, 4) * 0.5 + 0.2).requires_grad_()}
    if masks:
        out["masks"] = torch.randn(batch, queries, mask_size, mask_size).requires_grad_()
    return out


def model_outputs(batch=2, queries=6, layers=6, interm=10, dn_groups=2, dn_pad=3, with_dn=True):
    outputs = {"init": pred(batch, queries)}
    for i in range(layers):
        outputs[f"dec{i}"] = pred(batch, queries)
    outputs["interm"] = pred(batch, interm)
    outputs["ti0"] = pred(batch, interm, masks=False)
    outputs["ti1"] = pred(batch, interm, masks=False)
    outputs["dn"] = None
    if with_dn:
        outputs["dn"] = {"num_groups": dn_groups, "single_pad": dn_pad, "init": pred(batch, dn_groups * dn_pad)}
        for i in range(layers):
            outputs["dn"][f"dec{i}"] = pred(batch, dn_groups * dn_pad)
    return outputs


def expected_keys(layers=6, with_dn=True):
    keys = set()
    for name in ["init"] + [f"dec{i}" for i in range(layers)] + ["interm"]:
        keys |= {f"{name}/{t}" for t in TERMS}
    for name in ("ti0", "ti1"):
        keys |= {f"{name}/{t}" for t in ("class", "l1", "giou")}
    if with_dn:
        for name in ["init"] + [f"dec{i}" for i in range(layers)]:
            keys |= {f"dn/{name}/{t}" for t in TERMS}
    return keys


def all_predictions(outputs):
    for name, value in outputs.items():
        if name == "dn" and value is not None:
            yield from ((f"dn/{k}", v) for k, v in value.items() if isinstance(v, dict))
        elif isinstance(value, dict):
            yield name, value


def focal_by_hand(logits, onehot, alpha=0.25, gamma=2.0):
    p = logits.sigmoid()
    pos = -alpha * (1 - p) ** gamma * torch.log(p)
    neg = -(1 - alpha) * p**gamma * torch.log(1 - p)
    return torch.where(onehot.bool(), pos, neg).sum()


# ---------------------------------------------------------------------------- values


def test_focal_loss_equals_direct_formula():
    logits = torch.randn(2, 7, C) * 3
    onehot = torch.zeros(2, 7, C)
    onehot[0, 3, 1] = onehot[1, 0, 4] = 1
    torch.testing.assert_close(sigmoid_focal_loss_sum(logits, onehot, 0.25, 2.0), focal_by_hand(logits, onehot))

    criterion = make_criterion()
    target = make_target(2, seed=1)
    out = pred(1, 4)
    losses = criterion({"dec0": out}, [target])
    (pred_idx, gt_idx), = criterion.last_matches["dec0"]
    onehot = torch.zeros(1, 4, C)
    onehot[0, pred_idx, target["labels"][gt_idx]] = 1
    expected = 4.0 * focal_by_hand(out["logits"].detach(), onehot) / 2  # weight 4, num_boxes 2
    torch.testing.assert_close(losses["dec0/class"].detach(), expected)


def test_box_losses_by_hand():
    criterion = make_criterion()
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
              "masks": torch.zeros(1, 32, 32, dtype=torch.bool)}
    out = {"logits": torch.zeros(1, 1, C), "boxes": torch.tensor([[[0.55, 0.5, 0.2, 0.3]]])}
    losses = criterion({"ti0": out}, [target])
    assert set(losses) == {"ti0/class", "ti0/l1", "ti0/giou"}
    torch.testing.assert_close(losses["ti0/l1"], torch.tensor(5.0 * (0.05 + 0.1)))
    # pred xyxy (0.45, 0.35, 0.65, 0.65), GT (0.4, 0.4, 0.6, 0.6): inter 0.15 * 0.2, union 0.06 + 0.04 - 0.03
    # enclosing (0.4, 0.35, 0.65, 0.65) = 0.25 * 0.3
    iou = 0.03 / 0.07
    giou = iou - (0.075 - 0.07) / 0.075
    torch.testing.assert_close(losses["ti0/giou"], torch.tensor(2.0 * (1 - giou)))


def test_mask_losses_pair_each_prediction_with_its_gt(monkeypatch):
    """With the points fixed, mask BCE and dice equal a direct computation on the matched pairs,
    for matched outputs (one pair per GT) and denoising outputs (one pair per GT per group)."""
    fixed = torch.rand(1, 16, 2) * 0.8 + 0.1
    monkeypatch.setattr(criterion_module, "uncertainty_points",
                        lambda logits, *a, **k: fixed.expand(len(logits), -1, -1))
    criterion = make_criterion()
    targets = [make_target(3, seed=2), make_target(2, seed=3)]
    outputs = {"dec0": pred(2, 5), "dn": {"num_groups": 2, "single_pad": 3, "dec0": pred(2, 6)}}
    losses = criterion(outputs, targets)

    def direct(masks, matches, normalizer):
        bce = dice = 0.0
        for b, (pred_idx, gt_idx) in enumerate(matches):
            for q, j in zip(pred_idx.tolist(), gt_idx.tolist()):
                x = point_sample(masks[b, q][None, None].detach(), fixed)[0, 0]
                t = point_sample(targets[b]["masks"][j][None, None].float(), fixed)[0, 0]
                bce += F.binary_cross_entropy_with_logits(x, t)
                s = x.sigmoid()
                dice += 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
        return 5.0 * bce / normalizer, 5.0 * dice / normalizer

    bce, dice = direct(outputs["dec0"]["masks"], criterion.last_matches["dec0"], 5)
    torch.testing.assert_close(losses["dec0/mask_bce"].detach(), bce)
    torch.testing.assert_close(losses["dec0/mask_dice"].detach(), dice)
    dn_matches = denoising_matches([3, 2], 2, 3, "cpu")
    bce, dice = direct(outputs["dn"]["dec0"]["masks"], dn_matches, 5 * 2)
    torch.testing.assert_close(losses["dn/dec0/mask_bce"].detach(), bce)
    torch.testing.assert_close(losses["dn/dec0/mask_dice"].detach(), dice)


def test_perfect_masks_give_small_mask_losses():
    criterion = make_criterion(num_points=256)
    target = make_target(2, seed=4)
    good = {"logits": torch.zeros(1, 2, C), "boxes": target["boxes"][None].clone(),
            "masks": torch.where(target["masks"], 20.0, -20.0)[None]}  # at GT resolution: exact
    bad = dict(good, masks=-good["masks"])
    good_losses = criterion({"dec0": good}, [target])
    bad_losses = criterion({"dec0": bad}, [target])
    # not ~0: 75% of the points sit on the mask edges (uncertainty sampling), where a bilinear logit
    # of +-20 and a bilinear GT value in (0, 1) disagree
    assert good_losses["dec0/mask_dice"] < 0.25 * bad_losses["dec0/mask_dice"]
    assert good_losses["dec0/mask_bce"] < 0.1 * bad_losses["dec0/mask_bce"]
    assert good_losses["dec0/l1"] == 0


def test_denoising_pairs_normalization_and_background_padding():
    assert [(p.tolist(), g.tolist()) for p, g in denoising_matches([2, 0, 3], 2, 3, "cpu")] == [
        ([0, 1, 3, 4], [0, 1, 0, 1]), ([], []), ([0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2])]
    with pytest.raises(ValueError):
        denoising_matches([4], 2, 3, "cpu")

    criterion = make_criterion()
    targets = [make_target(2, seed=5), make_target(0)]
    dn_out = pred(2, 6, masks=False)
    losses = criterion({"dec0": pred(2, 4), "dn": {"num_groups": 2, "single_pad": 3, "dec0": dn_out}}, targets)
    pairs = [(0, 0), (1, 1), (3, 0), (4, 1)]  # image 0: query g * 3 + i <-> GT i; image 1: nothing
    boxes = dn_out["boxes"].detach()
    l1 = sum((boxes[0, q] - targets[0]["boxes"][j]).abs().sum() for q, j in pairs)
    torch.testing.assert_close(losses["dn/dec0/l1"].detach(), 5.0 * l1 / (2 * 2))  # num_boxes 2 x 2 groups
    onehot = torch.zeros(2, 6, C)
    for q, j in pairs:
        onehot[0, q, targets[0]["labels"][j]] = 1  # padding queries 2, 5 and image 1: background
    expected = 4.0 * focal_by_hand(dn_out["logits"].detach(), onehot) / 4
    torch.testing.assert_close(losses["dn/dec0/class"].detach(), expected)


# ---------------------------------------------------------------------------- structure


def test_every_key_present_and_total_is_the_sum():
    criterion = make_criterion()
    losses = criterion(model_outputs(), [make_target(3, seed=6), make_target(2, seed=7)])
    assert set(losses) == expected_keys()
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert all(v > 0 for v in losses.values())
    assert set(criterion.last_matches) == {"init", *(f"dec{i}" for i in range(6)), "interm", "ti0", "ti1"}


def test_one_matching_call_and_one_transfer_per_step(monkeypatch):
    criterion = make_criterion()
    calls, transfers = [], []
    real_match = criterion.matcher.match
    monkeypatch.setattr(criterion.matcher, "match",
                        lambda outputs, *a, **k: calls.append(sorted(outputs)) or real_match(outputs, *a, **k))
    real_transfer = matcher_module.transfer_to_host
    monkeypatch.setattr(matcher_module, "transfer_to_host", lambda t: transfers.append(1) or real_transfer(t))
    outputs, targets = model_outputs(), [make_target(3, seed=8), make_target(1, seed=9)]
    syncs = record_host_syncs(monkeypatch)
    criterion(outputs, targets)
    monkeypatch.undo()
    assert len(calls) == 1 and "dn" not in calls[0] and len(calls[0]) == 10
    assert len(transfers) == 1
    assert syncs == [], syncs  # no other host synchronization in the whole criterion


@pytest.mark.parametrize("all_empty", [False, True])
def test_empty_gt_images_are_finite_and_backward_works(all_empty):
    criterion = make_criterion()
    targets = [make_target(0), make_target(0 if all_empty else 2, seed=10)]
    outputs = model_outputs(with_dn=not all_empty)
    losses = criterion(outputs, targets)
    assert set(losses) == expected_keys(with_dn=not all_empty)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    if all_empty:
        for key, value in losses.items():
            if key.endswith("/class"):
                assert value > 0  # everything pushed to background
            else:
                assert value == 0
        for _, out in all_predictions(outputs):
            assert out["logits"].grad.abs().sum() > 0
            assert out["boxes"].grad is not None and out["boxes"].grad.abs().sum() == 0
            if "masks" in out:
                assert out["masks"].grad is not None and out["masks"].grad.abs().sum() == 0


def test_gradients_reach_logits_boxes_and_masks_of_every_output():
    criterion = make_criterion()
    outputs = model_outputs()
    losses = criterion(outputs, [make_target(3, seed=11), make_target(2, seed=12)])
    sum(losses.values()).backward()
    for name, out in all_predictions(outputs):
        for key, tensor in out.items():
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0, (name, key)
            assert torch.isfinite(tensor.grad).all(), (name, key)


def test_many_gt():
    criterion = make_criterion(num_points=32)
    targets = [make_target(120, seed=13, size=64), make_target(101, seed=14, size=64)]
    outputs = {"dec0": pred(2, 300, mask_size=16), "ti0": pred(2, 300, masks=False),
               "dn": None}
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert [len(p) for p, _ in criterion.last_matches["dec0"]] == [120, 101]
    sum(losses.values()).backward()


def test_final_matches_follow_layer_order():
    criterion = make_criterion()
    outputs = {f"dec{i}": pred(1, 4) for i in (0, 1, 2, 9, 10)}
    criterion(outputs, [make_target(2, seed=15)])
    assert criterion.final_output_name == "dec10"
    assert criterion.final_matches() is criterion.last_matches["dec10"]


def test_low_precision_outputs_give_float32_losses():
    criterion = make_criterion()
    outputs = {"dec0": {k: v.detach().bfloat16().requires_grad_() for k, v in pred(2, 5).items()}}
    losses = criterion(outputs, [make_target(2, seed=16), make_target(1, seed=17)])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert outputs["dec0"]["masks"].grad.dtype == torch.bfloat16


def test_build_criterion_from_config():
    from dimaskdino.config import Config

    cfg = Config()
    criterion = build_criterion(cfg)
    assert criterion.num_classes == cfg.model.num_classes
    assert (criterion.class_weight, criterion.l1_weight, criterion.giou_weight) == (4.0, 5.0, 2.0)
    assert (criterion.mask_bce_weight, criterion.dice_weight, criterion.num_points) == (5.0, 5.0, 12544)
    m = criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.cost_mask, m.cost_dice) == (4.0, 5.0, 2.0, 5.0, 5.0)
    assert (m.focal_alpha, m.focal_gamma, m.num_points) == (0.25, 2.0, 12544)


# ---------------------------------------------------------------------------- num_boxes


def test_num_boxes_is_clamped_total_without_distributed():
    assert SetCriterion.average_num_boxes([make_target(3), make_target(2)], "cpu") == 5.0
    assert SetCriterion.average_num_boxes([make_target(0)], "cpu") == 1.0


def _average_num_boxes_worker(rank, init_file, counts, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        value = SetCriterion.average_num_boxes([{"labels": torch.zeros(counts[rank], dtype=torch.int64)}], "cpu")
        if rank == 0:
            torch.save(torch.as_tensor(value), result_file)
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_over_processes():
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        # fork: the children reuse the imported modules (spawn would re-import torch, seconds each)
        mp.start_processes(_average_num_boxes_worker, args=(os.path.join(tmp, "init"), [3, 0], result),
                           nprocs=2, start_method="fork")
        assert torch.load(result).item() == 1.5
