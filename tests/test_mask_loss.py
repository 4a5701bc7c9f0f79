"""Point-sampled mask cost and mask loss: the Triton kernels (under the interpreter on a CPU) and the
PyTorch paths against the reference that materializes Q x H x W mask logits; the matcher, the
criterion and the model in point-mask mode against their full-mask mode."""

import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dimaskdino.model import criterion as criterion_module
from dimaskdino.model import matcher as matcher_module
from dimaskdino.model.box_ops import box_xyxy_to_cxcywh, masks_to_boxes
from dimaskdino.model.criterion import SetCriterion
from dimaskdino.model.matcher import HungarianMatcher, mask_costs_from_point_logits
from dimaskdino.model.point_sample import point_sample
from dimaskdino.ops import (
    matched_mask_logits,
    point_mask_costs,
    point_mask_costs_ref,
    point_mask_loss,
    point_mask_loss_ref,
    sample_point_features,
)
from conftest import triton_cpu_reason, triton_devices

DEVICES = triton_devices("mask_loss")
needs_triton_cpu = pytest.mark.skipif(triton_cpu_reason("mask_loss") is not None, reason=str(triton_cpu_reason("mask_loss")))


def rel_close(got, want, rtol, floor=1e-3):
    """max |got - want| / max(|want|, floor) <= rtol (the relative error the task states)."""
    err = ((got.double() - want.double()).abs() / want.double().abs().clamp(min=floor)).max().item()
    assert err <= rtol, err


def cost_inputs(batch=2, queries=37, dim=48, height=13, width=17, num_gt=5, points=300, dtype=torch.float32, device="cpu",
                seed=0):
    g = torch.Generator().manual_seed(seed)
    embed = (torch.randn(batch, queries, dim, generator=g) * dim ** -0.25).to(device, dtype)
    features = (torch.randn(batch, dim, height, width, generator=g) * dim ** -0.25).to(device, dtype)
    pts = (torch.rand(batch, points, 2, generator=g) * 1.2 - 0.1).to(device)  # some outside [0, 1]
    gt = (torch.rand(batch, num_gt, points, generator=g) * 1.6 - 0.3).clamp(0, 1).to(device)  # 0, 1 and between
    return embed, features, pts, gt


def full_mask_costs(embed, features, points, gt):
    """The reference as the matcher computes it today: (B, Q, H, W) logits, grid_sample, reductions."""
    logits = point_sample(torch.einsum("bqc,bchw->bqhw", embed, features), points)
    return mask_costs_from_point_logits(logits, gt.to(logits.dtype))


# ---------------------------------------------------------------------------------------------
# Matching cost

COST_CASES = {
    # q 37: partial q-blocks; d 48: three d-chunks of 16; p 300: two splits walking several blocks
    "q37_n5_d48": dict(),
    # n 17: two n-blocks (only the first writes the row sums); one image; points = 1
    "n17_b1": dict(batch=1, num_gt=17, queries=20),
    "p1_n1": dict(points=1, num_gt=1, queries=3, dim=5),
    # 1x1 and thin maps, three images
    "map1x1_b3": dict(batch=3, height=1, width=1, points=40, queries=16, dim=16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(COST_CASES))
def test_costs_match_the_full_mask_reference_float32(case, device):
    embed, features, pts, gt = cost_inputs(device=device, **COST_CASES[case])
    want = full_mask_costs(embed, features, pts, gt)
    sampled = sample_point_features(features, pts)
    for impl in ("triton", "ref"):
        got = point_mask_costs(embed, sampled, gt, impl=impl)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32 and g.shape == w.shape and not g.requires_grad
            rel_close(g, w, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_costs_float64_and_strided_inputs(device):
    embed, features, pts, gt = cost_inputs(dtype=torch.float64, device=device, queries=21, num_gt=18, points=100)
    want = full_mask_costs(embed, features, pts, gt.double())
    # Non-contiguous everywhere: embed (B, D, Q) transposed, features and GT values sliced.
    embed_t = embed.transpose(1, 2).contiguous().transpose(1, 2)
    sampled = sample_point_features(features, pts)
    sampled = torch.stack((sampled, sampled), -1)[..., 0]
    gt_wide = torch.stack((gt.double(), gt.double()), -1)[..., 0]
    assert not (embed_t.is_contiguous() or sampled.is_contiguous() or gt_wide.is_contiguous())
    got = point_mask_costs(embed_t, sampled, gt_wide, impl="triton")
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_costs_low_precision_error_at_most_twice_pytorch(device):
    """bf16 embeddings and features (autocast): against the float64 costs of the same bf16 values,
    our error is at most 2x that of the reference (bf16 einsum masks, grid_sample, reductions)."""
    embed, features, pts, gt = cost_inputs(device=device, dim=256, queries=40, points=200)
    embed, features = embed.bfloat16(), features.bfloat16()
    truth = full_mask_costs(embed.double(), features.double(), pts, gt.double())
    pytorch = full_mask_costs(embed, features, pts, gt)
    sampled = sample_point_features(features, pts).to(embed.dtype)  # as the matcher passes them
    ours = point_mask_costs(embed, sampled, gt, impl="triton")
    for name, t, o, p in zip(("bce", "dice"), truth, ours, pytorch):
        assert o.dtype == torch.float32
        assert (o.double() - t).abs().max() <= 2 * (p.double() - t).abs().max(), name


def test_sample_point_features_16bit_gathers_equal_grid_sample():
    _, features, pts, _ = cost_inputs(dtype=torch.bfloat16)
    torch.testing.assert_close(sample_point_features(features, pts), point_sample(features.float(), pts))
    cropped = features[..., :9, :11]  # a view, as the model crops padded inputs
    torch.testing.assert_close(sample_point_features(cropped, pts), point_sample(cropped.float(), pts))


@pytest.mark.parametrize("device", DEVICES)
def test_costs_empty_sets(device):
    embed, features, pts, gt = cost_inputs(device=device, queries=4, points=8)
    sampled = sample_point_features(features, pts)
    for e, t in ((embed[:, :0], gt), (embed, gt[:, :0]), (embed[:0], gt[:0])):
        for impl in ("triton", "ref"):
            bce, dice = point_mask_costs(e, sampled[: e.shape[0]], t, impl=impl)
            assert bce.shape == dice.shape == (e.shape[0], e.shape[1], t.shape[1])


# ---------------------------------------------------------------------------------------------
# Loss


def loss_inputs(rows=7, height=13, width=17, points=300, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.randn(rows, height, width, generator=g) * 3).to(device, dtype)
    pts = (torch.rand(rows, points, 2, generator=g) * 1.2 - 0.1).to(device)
    targets = (torch.rand(rows, points, generator=g) * 1.6 - 0.3).clamp(0, 1).to(device)
    return masks, pts, targets


def check_loss(inputs, rtol, atol=0.0, floor=1e-3):
    masks, pts, targets = inputs
    weights = torch.rand(2, masks.shape[0], dtype=torch.float64, device=masks.device)
    results = []
    for fn in (point_mask_loss_ref, lambda *a: point_mask_loss(*a, impl="triton")):
        leaf = masks.detach().clone().requires_grad_()
        bce, dice = fn(leaf, pts, targets)
        loss = (bce * weights[0].to(bce.dtype)).sum() + (dice * weights[1].to(dice.dtype)).sum()
        results.append((bce, dice, torch.autograd.grad(loss, leaf)[0]))
    (bce_r, dice_r, grad_r), (bce, dice, grad) = results
    assert bce.dtype == bce_r.dtype and grad.dtype == masks.dtype and grad.shape == masks.shape
    rel_close(bce, bce_r, rtol, floor)
    rel_close(dice, dice_r, rtol, floor)
    torch.testing.assert_close(grad, grad_r, rtol=rtol, atol=atol or rtol * grad_r.abs().max().item())


LOSS_CASES = {
    "r7_p300": dict(),  # 5 point blocks of 64, the last partial
    "r1_p1": dict(rows=1, points=1),
    "map1x1": dict(rows=3, height=1, width=1, points=50),
    "map2x40": dict(rows=2, height=2, width=40, points=130),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_matches_reference(case, device):
    check_loss(loss_inputs(device=device, **LOSS_CASES[case]), rtol=1e-4)
    check_loss(loss_inputs(device=device, dtype=torch.float64, **LOSS_CASES[case]), rtol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_strided_and_bf16_inputs(device):
    masks, pts, targets = loss_inputs(device=device, rows=4, points=90)
    # A cropped view of a wider map, points (R, 2, P) transposed, targets sliced.
    wide = torch.cat((masks, masks), 2)[..., : masks.shape[2]]
    pts_t = pts.transpose(1, 2).contiguous().transpose(1, 2)
    targets_s = torch.stack((targets, targets), 2)[..., 0]
    assert not (wide.is_contiguous() or pts_t.is_contiguous() or targets_s.is_contiguous())
    check_loss((wide, pts_t, targets_s), rtol=1e-4)
    # bf16 maps: both sample the bf16 values exactly in float32, so they agree to float32 rounding.
    check_loss((masks.bfloat16(), pts, targets), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_gradcheck_float64(device):
    masks, pts, targets = loss_inputs(rows=2, height=3, width=4, points=20, dtype=torch.float64, device=device)
    masks.requires_grad_()

    def fn(m):
        bce, dice = point_mask_loss(m, pts, targets, impl="triton")
        return bce * 1.5 + dice

    assert torch.autograd.gradcheck(fn, (masks,))


@pytest.mark.parametrize("device", DEVICES)
def test_loss_empty_and_bad_gradient_requests(device):
    masks, pts, targets = loss_inputs(device=device, rows=0, points=5)
    masks.requires_grad_()
    bce, dice = point_mask_loss(masks, pts, targets, impl="triton")
    assert bce.shape == dice.shape == (0,)
    (grad,) = torch.autograd.grad(bce.sum() + dice.sum(), masks, allow_unused=True)
    assert grad is None or grad.shape == masks.shape
    masks, pts, targets = loss_inputs(device=device, rows=2, points=5)
    with pytest.raises(ValueError, match="argument 'points'"):
        point_mask_loss(masks, pts.requires_grad_(), targets)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    masks, pts, targets = loss_inputs(device=device, rows=3, points=70)
    torch.library.opcheck(torch.ops.dimaskdino.point_mask_loss_stats.default, (masks.requires_grad_(), pts, targets))
    grad = torch.randn(3, 4, device=device)
    torch.library.opcheck(torch.ops.dimaskdino._point_mask_loss_stats_backward.default, (grad, masks.detach(), pts, targets))
    embed, features, pts, gt = cost_inputs(device=device, queries=17, points=40, num_gt=3, dim=16)
    torch.library.opcheck(torch.ops.dimaskdino.point_mask_costs.default, (embed, sample_point_features(features, pts), gt))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()
    masks, pts, targets = loss_inputs(device=device, rows=3, points=70)
    masks.requires_grad_()
    embed, features, cpts, gt = cost_inputs(device=device, queries=17, points=40, num_gt=3, dim=16)
    sampled = sample_point_features(features, cpts)

    def fn(masks, embed):
        bce, dice = point_mask_loss(masks * 2, pts, targets, impl="triton")
        cost_bce, cost_dice = point_mask_costs(embed, sampled, gt, impl="triton")
        return bce.sum() + dice.sum() + 0 * (cost_bce.sum() + cost_dice.sum()), cost_bce + cost_dice

    compiled = torch.compile(fn, fullgraph=True)
    eager_loss, eager_cost = fn(masks, embed)
    compiled_loss, compiled_cost = compiled(masks, embed)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_cost, eager_cost)
    torch.testing.assert_close(torch.autograd.grad(compiled_loss, masks)[0], torch.autograd.grad(eager_loss, masks)[0])


def _bad_loss_args():
    masks, pts, targets = loss_inputs(rows=2, points=5)
    return dict(masks=masks, points=pts, targets=targets)


def _bad_cost_args():
    embed, features, pts, gt = cost_inputs(queries=3, points=6, num_gt=2, dim=4)
    return dict(embed=embed, point_features=sample_point_features(features, pts), gt_values=gt)


@pytest.mark.parametrize(
    "fn, make, name, changes",
    [
        (point_mask_loss, _bad_loss_args, "masks", lambda a: dict(masks=a["masks"][0])),
        (point_mask_loss, _bad_loss_args, "masks", lambda a: dict(masks=a["masks"].long())),
        (point_mask_loss, _bad_loss_args, "masks", lambda a: dict(masks=a["masks"][:, :0])),
        (point_mask_loss, _bad_loss_args, "points", lambda a: dict(points=a["points"][:1])),
        (point_mask_loss, _bad_loss_args, "points", lambda a: dict(points=a["points"][..., :1])),
        (point_mask_loss, _bad_loss_args, "points", lambda a: dict(points=a["points"][:, :0], targets=a["targets"][:, :0])),
        (point_mask_loss, _bad_loss_args, "points", lambda a: dict(points=a["points"].to("meta"))),
        (point_mask_loss, _bad_loss_args, "targets", lambda a: dict(targets=a["targets"][:, :3])),
        (point_mask_loss, _bad_loss_args, "targets", lambda a: dict(targets=None)),
        (point_mask_costs, _bad_cost_args, "embed", lambda a: dict(embed=a["embed"][0])),
        (point_mask_costs, _bad_cost_args, "point_features", lambda a: dict(point_features=a["point_features"][:, :2])),
        (point_mask_costs, _bad_cost_args, "point_features", lambda a: dict(point_features=a["point_features"][..., :0],
                                                                            gt_values=a["gt_values"][..., :0])),
        (point_mask_costs, _bad_cost_args, "gt_values", lambda a: dict(gt_values=a["gt_values"][..., :2])),
        (point_mask_costs, _bad_cost_args, "gt_values", lambda a: dict(gt_values=a["gt_values"].bool())),
    ],
)
def test_bad_input_names_the_argument(fn, make, name, changes):
    args = make()
    args.update(changes(args))
    for impl in ("auto", "ref", "triton"):
        with pytest.raises(ValueError, match=f"argument '{name}'"):
            fn(**args, impl=impl)


def test_auto_on_cpu_is_the_reference_without_a_warning_and_impl_errors(monkeypatch):
    loss_args, cost_args = _bad_loss_args(), _bad_cost_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for got, want in zip(point_mask_loss(**loss_args), point_mask_loss_ref(**loss_args)):
            assert torch.equal(got, want)
        for got, want in zip(point_mask_costs(**cost_args), point_mask_costs_ref(**cost_args)):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="argument 'impl'"):
        point_mask_loss(**loss_args, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        point_mask_costs(**cost_args, impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.dimaskdino.point_mask_loss_stats(*loss_args.values())


# ---------------------------------------------------------------------------------------------
# Matcher and criterion with point-mask predictions


NUM_CLASSES = 5


def make_target(num_gt, size, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_gt, size, size, dtype=torch.bool)
    for j in range(num_gt):
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(3, size // 2, (2,), generator=g).tolist()
        masks[j, y0: y0 + h, x0: x0 + w] = True
    return {"labels": torch.randint(0, NUM_CLASSES, (num_gt,), generator=g),
            "boxes": box_xyxy_to_cxcywh(masks_to_boxes(masks) / size), "masks": masks}


def point_and_full_preds(batch, queries, dim, features, seed):
    """The same predictions twice: with "mask_embed" + "mask_features", and with their "masks"."""
    g = torch.Generator().manual_seed(seed)
    embed = (torch.randn(batch, queries, dim, generator=g) * dim ** -0.25).requires_grad_()
    base = {"logits": torch.randn(batch, queries, NUM_CLASSES, generator=g),
            "boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.2}
    point = dict(base, mask_embed=embed, mask_features=features)
    full = dict(base, masks=torch.einsum("bqc,bchw->bqhw", embed, features))
    return point, full


def make_matcher(num_points, impl="auto"):
    return HungarianMatcher(cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0, cost_dice=5.0,
                            num_points=num_points, focal_alpha=0.25, focal_gamma=2.0, impl=impl)


class AllocationRecorder(TorchDispatchMode):
    """Shapes of every tensor an aten op returns (views included)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.shapes.append((str(func), tuple(leaf.shape)))
        return out


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton_cpu), "ref"])
def test_matcher_costs_equal_and_never_make_query_maps(impl, monkeypatch):
    """Point-mask outputs give the full-mask costs (1e-4 relative, same points), and no tensor made
    during matching holds a map per query (a shape with Q and the map's H, W or H*W): shown by
    recording the shape of every tensor an aten op returns. The Triton path does not even make the
    (B, Q, P) point logits that the PyTorch path makes."""
    batch, queries, dim, height, width, num_points = 2, 23, 24, 20, 28, 200
    targets = [make_target(3, 4 * height, 1), make_target(4, 4 * height, 2)]
    g = torch.Generator().manual_seed(3)
    features = torch.randn(batch, dim, height, width, generator=g) * dim ** -0.25
    updated = torch.randn(batch, dim, height, width, generator=g) * dim ** -0.25  # BATO's, for dec1
    point_init, full_init = point_and_full_preds(batch, queries, dim, features, 6)
    point0, full0 = point_and_full_preds(batch, queries, dim, features, 4)
    point1, full1 = point_and_full_preds(batch, queries, dim, updated, 5)
    matcher = make_matcher(num_points, impl)
    generators = lambda: [torch.Generator().manual_seed(10 + b) for b in range(batch)]  # noqa: E731
    want = matcher.cost_matrices({"init": full_init, "dec0": full0, "dec1": full1}, targets, generators())
    sampled = []
    real_sample = matcher_module.sample_point_features
    monkeypatch.setattr(matcher_module, "sample_point_features", lambda f, p: sampled.append(1) or real_sample(f, p))
    recorder = AllocationRecorder()
    with recorder:
        got = matcher.cost_matrices({"init": point_init, "dec0": point0, "dec1": point1}, targets, generators())
    for name in want:
        rel_close(got[name], want[name], 1e-4)
    per_query_maps = [(op, s) for op, s in recorder.shapes
                      if queries in s and (s[-2:] == (height, width) or height * width in s)]
    assert not per_query_maps, per_query_maps
    point_logits = [(op, s) for op, s in recorder.shapes if s == (batch, queries, num_points)]
    assert bool(point_logits) == (impl == "ref"), point_logits
    # The features are sampled once per distinct features tensor (2 here), not once per output (3).
    assert len(sampled) == 2
    # Sanity of the check: the full-mask path does make such tensors.
    recorder = AllocationRecorder()
    with recorder:
        torch.einsum("bqc,bchw->bqhw", point0["mask_embed"], features)
    assert any(queries in s and s[-2:] == (height, width) for _, s in recorder.shapes)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton_cpu), "ref"])
def test_criterion_point_masks_equal_full_masks(monkeypatch, impl):
    """Matched and denoising mask losses and their gradients (to the embeddings and the features)
    from point-mask predictions equal those of the full masks made from the same embeddings and
    features, given the same points."""
    batch, queries, dim, height, width = 2, 9, 16, 12, 10
    draws = []

    def fixed_points(logits, num_points, *args, **kwargs):  # the same draws, call by call, in both runs
        g = torch.Generator().manual_seed(len(draws))
        draws.append(1)
        return torch.rand(len(logits), num_points, 2, generator=g) * 1.1 - 0.05

    monkeypatch.setattr(criterion_module, "uncertainty_points", fixed_points)
    targets = [make_target(3, 4 * height, 6), make_target(2, 4 * height, 7)]
    features = (torch.randn(batch, dim, height, width) * dim ** -0.25).requires_grad_()

    def run(mode):
        draws.clear()
        matcher = make_matcher(40, impl)
        criterion = SetCriterion(NUM_CLASSES, matcher, class_weight=4.0, l1_weight=5.0, giou_weight=2.0,
                                 mask_bce_weight=5.0, dice_weight=5.0, num_points=40, oversample_ratio=3.0,
                                 importance_sample_ratio=0.75, focal_alpha=0.25, focal_gamma=2.0, impl=impl)
        point, full = point_and_full_preds(batch, queries, dim, features, 8)
        dn_point, dn_full = point_and_full_preds(batch, 6, dim, features, 9)
        pred, dn = (point, dn_point) if mode == "points" else (full, dn_full)
        outputs = {"dec0": pred, "dn": {"num_groups": 2, "single_pad": 3, "dec0": dn}}
        losses = criterion(outputs, targets, [torch.Generator().manual_seed(b) for b in range(batch)])
        mask_terms = {k: v for k, v in losses.items() if "mask" in k}
        grads = torch.autograd.grad(sum(mask_terms.values()), (point["mask_embed"], dn_point["mask_embed"], features))
        return mask_terms, grads, criterion.last_matches["dec0"]

    point_losses, point_grads, point_matches = run("points")
    full_losses, full_grads, full_matches = run("full")
    for (a, b), (c, d) in zip(point_matches, full_matches):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert set(point_losses) == set(full_losses) == {f"{p}/{t}" for p in ("dec0", "dn/dec0") for t in ("mask_bce", "mask_dice")}
    for key in full_losses:
        rel_close(point_losses[key], full_losses[key], 1e-4)
    for got, want in zip(point_grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_matched_mask_logits_and_empty_pairs():
    embed = torch.randn(2, 5, 8, requires_grad=True)
    features = torch.randn(2, 8, 6, 7, requires_grad=True)
    src = torch.tensor([4, 0, 2])
    got = matched_mask_logits(embed, features, src, [2, 1])
    full = torch.einsum("bqc,bchw->bqhw", embed, features)
    torch.testing.assert_close(got, torch.stack((full[0, 4], full[0, 0], full[1, 2])))
    empty = matched_mask_logits(embed, features, src[:0], [0, 0])
    assert empty.shape == (0, 6, 7)
    # A criterion on point masks with no GT: finite zero mask losses whose gradients are zero, not None.
    criterion = SetCriterion(NUM_CLASSES, make_matcher(16), 4.0, 5.0, 2.0, 5.0, 5.0, 16, 3.0, 0.75, 0.25, 2.0)
    point, _ = point_and_full_preds(2, 5, 8, features, 1)
    losses = criterion({"dec0": point}, [make_target(0, 24, 0), make_target(0, 24, 1)])
    assert losses["dec0/mask_bce"] == 0 and losses["dec0/mask_dice"] == 0
    grads = torch.autograd.grad(sum(losses.values()), (point["mask_embed"], features))
    assert all(g is not None and not g.any() for g in grads)


# ---------------------------------------------------------------------------------------------
# Model


def test_model_point_masks_train_like_full_masks(monkeypatch):
    """train_masks="points" vs "full" with the same weights, inputs and random draws (uncertainty
    points fixed): the same prediction dicts but for the masks, and the same losses (1e-4 relative)
    and mask-head gradients; "auto" is "full" on a CPU and in evaluation."""
    from dimaskdino.config import apply_overrides, get_preset
    from dimaskdino.model import build_model
    from dimaskdino.model.criterion import build_criterion

    draws = []

    def fixed_points(logits, num_points, *args, **kwargs):
        g = torch.Generator().manual_seed(len(draws) % 100)
        draws.append(1)
        return torch.rand(len(logits), num_points, 2, generator=g)

    monkeypatch.setattr(criterion_module, "uncertainty_points", fixed_points)
    height, width = 122, 150  # padded internally to 128 x 160: the masks and features are cropped
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, height, width, generator=g) * 255
    targets = []
    for count in (3, 2):
        masks = torch.zeros(count, height, width, dtype=torch.bool)
        for j in range(count):
            masks[j, 10 + 20 * j: 60 + 20 * j, 15 + 10 * j: 90] = True
        targets.append({"labels": torch.randint(0, 10, (count,), generator=g),
                        "boxes": box_xyxy_to_cxcywh(masks_to_boxes(masks) / torch.tensor([width, height] * 2)),
                        "masks": masks})

    def run(mode):
        cfg = apply_overrides(get_preset("demo"), [f"model.train_masks={mode}", "loss.num_points=300"])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        draws.clear()
        generators = [torch.Generator().manual_seed(b) for b in range(2)]
        outputs = model(images, targets, generators=generators)
        losses = build_criterion(cfg)(outputs, targets, [torch.Generator().manual_seed(b + 5) for b in range(2)])
        sum(losses.values()).backward()
        return model, outputs, losses

    model_p, outputs_p, losses_p = run("points")
    model_f, outputs_f, losses_f = run("full")
    assert model_f.uses_point_masks(torch.device("cpu")) is False
    assert build_model(apply_overrides(get_preset("demo"), [])).train().uses_point_masks(torch.device("cpu")) is False
    assert build_model(apply_overrides(get_preset("demo"), ["model.train_masks=points"])).eval().uses_point_masks(
        torch.device("cpu")) is False

    feats = {}
    for name in ("interm", "init", "dec0", "dec1", "dec2"):
        for pred_p, pred_f in ((outputs_p[name], outputs_f[name]), (outputs_p["dn"].get(name), outputs_f["dn"].get(name))):
            if pred_p is None:
                continue
            assert "masks" not in pred_p and set(pred_p) == (set(pred_f) - {"masks"}) | {"mask_embed", "mask_features"}
            assert pred_p["mask_features"].shape[-2:] == pred_f["masks"].shape[-2:] == (31, 38)
            assert pred_p["mask_embed"].shape[:2] == pred_f["masks"].shape[:2]
            made = torch.einsum("bqc,bchw->bqhw", pred_p["mask_embed"], pred_p["mask_features"])
            torch.testing.assert_close(made, pred_f["masks"], rtol=1e-4, atol=1e-4)
            feats.setdefault(name, pred_p["mask_features"].data_ptr())
    # init, dec0 and interm share the original features, dec1.. BATO's (no copies).
    assert feats["init"] == feats["dec0"] == feats["interm"] != feats["dec1"] == feats["dec2"]
    assert set(losses_p) == set(losses_f)
    for key in losses_f:
        rel_close(losses_p[key], losses_f[key], 1e-4)
    params_p, params_f = dict(model_p.named_parameters()), dict(model_f.named_parameters())
    missing = [name for name, p in params_p.items() if p.grad is None]
    assert not missing, missing
    for name in params_f:
        if name.startswith(("heads.mask_embed", "pixel_decoder.mask_features", "decoder.bato.mask_feature_conv")):
            want = params_f[name].grad
            torch.testing.assert_close(params_p[name].grad, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


# ---------------------------------------------------------------------------------------------
# What a GPU runs, checked without one


# Compiling the kernels for Hopper (sm_90a) at the model's launches: tests/test_triton_compile.py.


@pytest.fixture
def deterministic_algorithms():
    """Restores torch's determinism settings after a test that changes them."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_cuda_backward_alerts_under_deterministic_algorithms(deterministic_algorithms):
    """The CUDA-only branch of the loss backward (its kernel scatters with atomic adds), run on fake
    CUDA tensors: it used to call a torch._C function that no supported torch has."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from dimaskdino.ops import mask_loss as mask_loss_module

    with FakeTensorMode():
        masks, points, targets = (torch.empty(shape, device="cuda") for shape in ((2, 8, 8), (2, 5, 2), (2, 5)))
        ctx, grad_stats = SimpleNamespace(saved_tensors=(masks, points, targets)), torch.empty(2, 4, device="cuda")
        deterministic_algorithms(False)
        grad, *_ = mask_loss_module._backward(ctx, grad_stats)
        assert grad.shape == masks.shape and grad.device.type == "cuda"
        deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="point_mask_loss backward"):
            mask_loss_module._backward(ctx, grad_stats)
        deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="point_mask_loss backward .* deterministic"):
            mask_loss_module._backward(ctx, grad_stats)
