"""SPEC section 6 switches in the model, criterion and trainer: Co-DETR hybrid assignment
(train.hybrid_heads, train.hybrid_masks) and instance-unique querying (train.inter_scene,
train.equivariance). Off: the model, its weights and outputs are exactly those without the
feature; on: finite losses under their own keys, gradients reaching the new parts; inference never
runs them."""

import math

import numpy as np
import pytest
import torch

from dimaskdino.config import PRESETS, apply_overrides, get_preset
from dimaskdino.model import build_model
from dimaskdino.model.criterion import build_criterion, gt_point_values
from dimaskdino.model.point_sample import point_sample

TINY_MODEL = [
    "model.num_classes=3", "model.num_queries=12", "model.di.num_first_selection=24",
    "model.bato.num_guiding_tokens=4", "model.denoising.num_queries=12", "loss.num_points=64",
    "train.hybrid_max_positives=20", "train.inter_scene_queue_size=2000", "train.inter_scene_pixels_per_instance=10",
    "train.inter_scene_max_instances=4",
]
SWITCHES = {
    "hybrid": ["train.hybrid_heads=atss,rcnn"],
    "hybrid_masks": ["train.hybrid_heads=atss,rcnn", "train.hybrid_masks=true"],
    "inter_scene": ["train.inter_scene=true"],
    "equivariance": ["train.equivariance=true"],
}
SIZE = 96


def tiny_cfg(*overrides):
    return apply_overrides(get_preset("demo"), [*TINY_MODEL, *overrides])


def build(*overrides):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*overrides))


def make_batch(seed=0, counts=(3, 1), first_id=10):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(counts), 3, SIZE, SIZE, generator=g) * 255
    targets = []
    for b, count in enumerate(counts):
        masks = torch.zeros(count, SIZE, SIZE, dtype=torch.bool)
        boxes = []
        for j in range(count):
            x0, y0 = torch.randint(0, SIZE // 2, (2,), generator=g).tolist()
            w, h = torch.randint(8, SIZE // 2, (2,), generator=g).tolist()
            masks[j, y0: y0 + h, x0: x0 + w] = True
            boxes.append([(x0 + w / 2) / SIZE, (y0 + h / 2) / SIZE, w / SIZE, h / SIZE])
        targets.append({"labels": torch.randint(0, 3, (count,), generator=g),
                        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "masks": masks,
                        "image_id": first_id + b})
    return images, targets


def generators(n=2, seed=0):
    return [torch.Generator().manual_seed(seed * 100 + i) for i in range(n)]


def forward(model, images, targets, seed=0):
    return model(images, targets, generators=generators(len(targets), seed), dn_max_gt=max(len(t["labels"]) for t in targets))


def assert_same_outputs(expected, actual, path="outputs"):
    """Every tensor of `expected` equals (bitwise) the one at the same place in `actual`; `actual`
    may have more keys (the switch's own outputs)."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), path
    elif isinstance(expected, dict):
        for key, value in expected.items():
            assert key in actual, f"{path}/{key} missing"
            assert_same_outputs(value, actual[key], f"{path}/{key}")
    else:
        assert expected == actual, path


# ---------------------------------------------------------------------------------------------
# Off = as without it; inference unchanged


def test_every_switch_is_off_in_every_preset():
    for name in PRESETS:
        train = get_preset(name).train
        assert train.hybrid_heads == () and not train.hybrid_masks
        assert not train.inter_scene and not train.equivariance


@pytest.mark.parametrize("overrides, message", [
    (["train.hybrid_heads=atss,fcos"], "train.hybrid_heads"),
    (["train.hybrid_heads=atss,atss"], "train.hybrid_heads"),
    (["train.hybrid_masks=true"], "train.hybrid_masks needs train.hybrid_heads"),
    (["train.hybrid_heads=rcnn", "train.hybrid_max_positives=0"], "train.hybrid_max_positives"),
    (["train.inter_scene_queue_size=0"], "train.inter_scene_queue_size"),
    (["train.equivariance_min_scale=1.5"], "train.equivariance_min_scale"),
])
def test_bad_switch_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_preset("demo"), overrides)


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_switch_leaves_weights_and_outputs_of_the_model_unchanged(switch):
    base, switched = build(), build(*SWITCHES[switch])
    base_state, switched_state = base.state_dict(), switched.state_dict()
    extra = set(switched_state) - set(base_state)
    assert all(key.startswith("hybrid.") for key in extra), extra
    assert bool(extra) == switch.startswith("hybrid")
    for key, value in base_state.items():  # the initial weights of everything else are unchanged
        assert torch.equal(value, switched_state[key]), key

    images, targets = make_batch()
    base.train(), switched.train()
    expected, actual = forward(base, images, targets), forward(switched, images, targets)
    assert_same_outputs(expected, actual)
    extra_outputs = set(actual) - set(expected)
    assert extra_outputs == ({"hybrid"} if switch.startswith("hybrid") else set())

    # Inference: identical outputs, and the training-only parts never run.
    base.eval(), switched.eval()
    if switched.hybrid is not None:
        switched.hybrid.forward = lambda *args, **kwargs: pytest.fail("hybrid heads ran at inference")
    with torch.no_grad():
        expected, actual = base(images), switched(images)
    assert set(expected) == set(actual)
    assert_same_outputs(expected, actual)
    assert all("mask_embed" not in value for value in actual.values() if isinstance(value, dict))


def test_inference_checkpoint_loads_without_the_training_only_parts(tmp_path):
    from dimaskdino.checkpoint import load_for_inference, save_checkpoint
    from dimaskdino.config import config_to_dict

    cfg = tiny_cfg(*SWITCHES["hybrid"])
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    meta = dict(config=config_to_dict(cfg), categories={"coco_ids": [1, 2, 3], "names": ["a", "b", "c"]})
    path = save_checkpoint(tmp_path, 1, model, optimizer, meta)
    loaded, loaded_cfg, _ = load_for_inference(path)
    assert loaded.hybrid is None and loaded_cfg.train.hybrid_heads == ()
    images, _ = make_batch()
    model.eval()
    with torch.no_grad():
        assert_same_outputs(model(images), loaded(images))


# ---------------------------------------------------------------------------------------------
# Hybrid assignment


@pytest.mark.parametrize("masks", [False, True])
def test_hybrid_forward_backward_reaches_every_new_parameter(masks):
    switch = "hybrid_masks" if masks else "hybrid"
    model = build(*SWITCHES[switch]).train()
    criterion = build_criterion(tiny_cfg(*SWITCHES[switch]))
    images, targets = make_batch(counts=(3, 0))  # an image without GT too
    outputs = forward(model, images, targets)
    groups = outputs["hybrid"]["groups"]
    assert set(groups) == {"atss", "rcnn"}
    losses = criterion(outputs, targets, generators=generators())
    last = model.num_decoder_layers - 1
    for head in ("atss", "rcnn"):
        for layer in range(model.num_decoder_layers):
            for term in ("class", "l1", "giou"):
                assert f"hybrid/{head}/dec{layer}/{term}" in losses
            assert (f"hybrid/{head}/dec{layer}/mask_bce" in losses) == masks
            assert (f"hybrid/{head}/dec{layer}/mask_dice" in losses) == masks
        assert not any(key.startswith(f"hybrid/{head}/init") for key in losses)
        matches = groups[head]["matches"]
        assert matches[1][0].numel() == 0  # no GT, no positives
        assert matches[0][0].numel() > 0 and int(matches[0][1].max()) < 3
    assert any(key.startswith("hybrid/atss/") and "/dec" not in key for key in losses)  # the heads' own
    assert any(key.startswith("hybrid/rpn/") for key in losses) and any(key.startswith("hybrid/rcnn/") and "/dec" not in key for key in losses)
    for key, value in losses.items():
        assert torch.isfinite(value), key
    assert f"hybrid/atss/dec{last}/class" in losses
    sum(losses.values()).backward()
    for name, param in model.hybrid.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_hybrid_losses_are_normalized_by_positives_and_weighted():
    cfg = tiny_cfg(*SWITCHES["hybrid"])
    model = build(*SWITCHES["hybrid"]).train()
    images, targets = make_batch()
    outputs = forward(model, images, targets)
    base = build_criterion(cfg)(outputs, targets, generators=generators())
    doubled = build_criterion(apply_overrides(cfg, ["train.hybrid_query_weight=2.0"]))(outputs, targets, generators=generators())
    for key, value in base.items():
        factor = 2.0 if key.startswith("hybrid/") and "/dec" in key else 1.0
        assert doubled[key].item() == pytest.approx(factor * value.item(), rel=1e-6), key


def test_gt_point_values_with_one_to_many_pairs():
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(3, 1, 20, 24, generator=g) > 0.5).float(), (torch.rand(2, 1, 20, 24, generator=g) > 0.5).float()]
    matches = [(torch.tensor([4, 0, 7, 1, 3]), torch.tensor([2, 2, 0, 2, 1])), (torch.tensor([5]), torch.tensor([1]))]
    points = torch.rand(6, 17, 2, generator=g)
    values = gt_point_values(masks, matches, points, None)
    expected = torch.cat([point_sample(m[gt], p)[:, 0] for m, (_, gt), p in zip(masks, matches, points.split([5, 1]))])
    torch.testing.assert_close(values, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Instance-unique querying


def test_inter_scene_term_uses_other_images_only_and_trains_the_mask_embeddings():
    from dimaskdino.training_methods import InterSceneTerm

    cfg = tiny_cfg(*SWITCHES["inter_scene"])
    model = build(*SWITCHES["inter_scene"]).train()
    term = InterSceneTerm(cfg.train.inter_scene_queue_size, cfg.model.hidden_dim, cfg.train.inter_scene_pixels_per_instance,
                          cfg.train.inter_scene_max_instances, cfg.train.inter_scene_weight, 0.25, 2.0, torch.device("cpu"))
    final = model.final_output_key()
    images, targets = make_batch(seed=0, counts=(3,), first_id=10)  # one image
    first = term(forward(model, images, targets)[final], targets, generators(1))
    assert set(first) == {"inter_scene/focal"}
    assert first["inter_scene/focal"].item() == 0.0  # the queue was empty
    assert int(term.queue.valid.sum()) == 3 * cfg.train.inter_scene_pixels_per_instance

    # The same image again: its own entries do not count.
    again = term(forward(model, images, targets)[final], targets, generators(1))
    assert again["inter_scene/focal"].item() == 0.0

    images, targets = make_batch(seed=1, first_id=20)
    outputs = forward(model, images, targets)
    other = term(outputs[final], targets, generators())["inter_scene/focal"]
    assert torch.isfinite(other) and other.item() > 0
    model.zero_grad()
    other.backward()
    for name, param in model.heads.mask_embed.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_equivariance_losses_have_their_own_keys_and_gradients():
    from dimaskdino.data.second_view import make_second_view, sample_view_transform
    from dimaskdino.training_methods import equivariance_losses

    cfg = tiny_cfg(*SWITCHES["equivariance"])
    model = build(*SWITCHES["equivariance"]).train()
    criterion = build_criterion(cfg)
    images, targets = make_batch()
    sizes = [(SIZE, SIZE)] * 2
    transforms = [sample_view_transform(np.random.default_rng(i), sizes[i], min_scale=0.6) for i in range(2)]
    images2, targets2 = make_second_view(images, sizes, targets, transforms, pad_value=0.0)
    view = {"images": images2, "image_sizes": sizes, "targets": targets2, "transforms": transforms}
    outputs = forward(model, images, targets)
    outputs2 = model(images2, targets2, sizes, generators=generators(seed=1), dn_max_gt=3, auxiliary=False)
    losses = criterion(outputs, targets, generators=generators())
    final = model.final_output_key()
    equi = equivariance_losses(criterion, outputs, outputs2, view, final, cfg.train.equivariance_weight, generators(seed=1))
    assert criterion.final_matches() is not None and criterion.final_output_name == final
    assert "equi/features" in equi and f"equi/{final}/mask_bce" in equi and "equi/dn/dec0/class" in equi
    assert not set(equi) & set(losses)
    for key, value in equi.items():
        assert torch.isfinite(value), key
    sum(equi.values()).backward()
    grads = [p.grad for p in model.pixel_decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# In the trainer: every switch on, 1 vs 2 processes, and exact resume (the queue is checkpointed)

ALL_ON = ["train.hybrid_heads=atss,rcnn", "train.hybrid_masks=true", "train.inter_scene=true", "train.equivariance=true",
          "train.hybrid_max_positives=20", "train.inter_scene_queue_size=4000", "train.inter_scene_pixels_per_instance=10",
          "train.inter_scene_max_instances=8"]


def test_training_with_every_switch_on_two_processes_and_exact_resume(tmp_path):
    from test_train import loss_records, run_training

    cache = tmp_path / "cache"
    # Denoising groups from the global batch: with the authors' per-process default they depend on the split.
    common = [*ALL_ON, "train.eval_period=-1", "train.deterministic=true", "model.denoising.max_gt_scope=global"]
    run_training(tmp_path / "one", cache, [*common, "train.max_steps=4", "train.checkpoint_period=0"])
    one = loss_records(tmp_path / "one")
    assert [r["step"] for r in one] == [1, 2, 3, 4]
    for prefix in ("hybrid/atss/dec0/", "hybrid/rcnn/dec0/", "hybrid/rpn/", "inter_scene/", "equi/dec2/", "equi/features"):
        assert any(key.startswith(prefix) for key in one[-1]), prefix
    assert one[-1]["inter_scene/focal"] > 0  # the queue holds other images' pixels from step 2 on
    assert all(math.isfinite(r["loss"]) for r in one)

    # The same global batch on 2 processes (the queue is gathered from both).
    run_training(tmp_path / "two", cache, [*common, "train.max_steps=4", "train.checkpoint_period=0"], nproc=2)
    two = loss_records(tmp_path / "two")
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])

    # Stop after 2 steps, resume to 4: the same losses as straight through.
    run_training(tmp_path / "resumed", cache, [*common, "train.max_steps=2", "train.checkpoint_period=2"])
    run_training(tmp_path / "resumed", cache, [*common, "train.max_steps=4", "train.checkpoint_period=2"])
    resumed = {r["step"]: r["loss"] for r in loss_records(tmp_path / "resumed")}
    for record in one[2:]:
        assert resumed[record["step"]] == pytest.approx(record["loss"], rel=1e-6), record["step"]
