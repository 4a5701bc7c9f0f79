"""Model tests on CPU. The parameter-count and full-architecture tests use the real presets
(random init); the rest use the small `demo` preset on small images to stay fast."""

import math

import pytest
import torch
from torch.utils._pytree import tree_leaves

import dimaskdino.model.ms_deform_attn as msda_module
from dimaskdino.config import apply_overrides, get_preset
from dimaskdino.model import DIMaskDINO, build_model
from dimaskdino.model.__main__ import main as model_cli
from dimaskdino.model.backbone import FrozenBatchNorm2d, ResNet
from dimaskdino.model.decoder import Decoder
from dimaskdino.model.denoising import DenoisingGenerator, denoising_attention_mask
from dimaskdino.model.layers import box_sine_embedding, inverse_sigmoid, sine_position_embedding_2d
from dimaskdino.model.ms_deform_attn import MSDeformAttn
from dimaskdino.model.query_selection import encoder_proposals, mask_enhanced_boxes

PREDICTION_KEYS = {"logits", "boxes", "masks"}


def random_targets(counts, num_classes, height, width, generator=None):
    targets = []
    for count in counts:
        centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (count,), generator=generator),
                "boxes": torch.cat((centers, sizes), dim=1),
                "masks": torch.rand(count, height, width, generator=generator) > 0.5,
            }
        )
    return targets


def small_cfg(*overrides):
    return apply_overrides(get_preset("demo"), list(overrides))


def small_model(*overrides, train=True):
    torch.manual_seed(0)
    model = build_model(small_cfg(*overrides))
    return model.train(train)


def images(batch=2, height=128, width=160):
    return torch.rand(batch, 3, height, width) * 255


def prediction_dicts(outputs):
    """(name, prediction) for every prediction dict, denoising ones as 'dn/<name>'."""
    for name, value in outputs.items():
        if name == "dn":
            if value is not None:
                for sub_name, sub_value in value.items():
                    if isinstance(sub_value, dict):
                        yield f"dn/{sub_name}", sub_value
        elif isinstance(value, dict):
            yield name, value


def dummy_loss(outputs):
    return sum(tensor.float().square().mean() for _, pred in prediction_dicts(outputs) for tensor in pred.values())


# ---------------------------------------------------------------------------------------------
# Parameter counts (real presets)
# ---------------------------------------------------------------------------------------------


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_papers():
    maskdino = count(build_model(get_preset("maskdino_r50_50ep")))
    dimaskdino = count(build_model(get_preset("dimaskdino_r50_12ep")))
    print(f"maskdino_r50_50ep: {maskdino:,}  dimaskdino_r50_12ep: {dimaskdino:,}  diff: {dimaskdino - maskdino:+,}")
    assert abs(maskdino - 52e6) / 52e6 < 0.03  # MaskDINO R50: about 52M
    assert abs((dimaskdino - maskdino) - 0.2e6) <= 0.5e6  # DI-MaskDINO: about +0.2M net
    # Exact figures (frozen BN statistics and affine are buffers, not parameters).
    assert maskdino == 52_058_004
    assert dimaskdino == 52_286_232


def test_schedule_presets_share_the_architecture():
    assert count(build_model(get_preset("dimaskdino_r50_24ep"))) == 52_286_232
    assert count(build_model(get_preset("maskdino_r50_12ep"))) == 52_058_004


# ---------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------

# torchvision.models.resnet{18,34,50}(): parameter totals (with fc) and state-dict sizes.
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}
TORCHVISION_STATE_KEYS = {18: 122, 34: 218, 50: 320}


def torchvision_style_state_dict(backbone: ResNet, num_classes=1000):
    """What torchvision's resnet state_dict() holds: our keys + BN step counters + classifier."""
    state = dict(backbone.state_dict())
    for name, module in backbone.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            state[f"{name}.num_batches_tracked"] = torch.tensor(0)
    final_channels = backbone.out_channels["res5"]
    state["fc.weight"] = torch.randn(num_classes, final_channels)
    state["fc.bias"] = torch.randn(num_classes)
    return state


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_backbone_has_torchvision_layout(depth):
    backbone = ResNet(depth)
    state = torchvision_style_state_dict(backbone)
    assert len(state) == TORCHVISION_STATE_KEYS[depth]
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == TORCHVISION_PARAMS[depth]
    # Frozen BN: nothing trainable but the convolutions.
    assert all(".bn" not in name and "downsample.1" not in name for name, _ in backbone.named_parameters())
    # Torchvision names: spot checks of the v1.5 bottleneck (stride in the 3x3 conv).
    if depth == 50:
        assert backbone.layer2[0].conv2.stride == (2, 2) and backbone.layer2[0].conv1.stride == (1, 1)
        assert backbone.layer4[2].conv3.weight.shape == (2048, 512, 1, 1)
        assert "layer3.0.downsample.1.running_var" in state


def test_backbone_loads_torchvision_state_dict_strictly(tmp_path):
    source = ResNet(18)
    for buffer_name, buffer in source.named_buffers():
        buffer.copy_(torch.rand_like(buffer) + 0.5)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_style_state_dict(source), path)

    cfg = small_cfg(f"model.backbone.weights={path}", "model.backbone.norm=frozen_bn")
    model = build_model(cfg)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key

    broken = torchvision_style_state_dict(source)
    broken["layer1.0.conv9.weight"] = broken.pop("layer1.0.conv2.weight")
    torch.save(broken, path)
    with pytest.raises(ValueError, match="layer1.0.conv2.weight"):
        build_model(cfg)
    with pytest.raises(ValueError, match="frozen_bn"):
        build_model(small_cfg(f"model.backbone.weights={path}", "model.backbone.norm=group_norm"))


def test_frozen_batchnorm_matches_eval_batchnorm():
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        for tensor in (bn.weight, bn.bias, bn.running_mean):
            tensor.copy_(torch.randn(8))
        bn.running_var.copy_(torch.rand(8) + 0.1)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))


def test_backbone_strides():
    features = ResNet(50)(torch.randn(1, 3, 64, 96))
    assert [tuple(features[f"res{i}"].shape[1:]) for i in range(2, 6)] == [
        (256, 16, 24), (512, 8, 12), (1024, 4, 6), (2048, 2, 3)
    ]


# ---------------------------------------------------------------------------------------------
# Full architecture (real preset)
# ---------------------------------------------------------------------------------------------


def test_full_dimaskdino_r50_12ep_forward_and_backward():
    torch.manual_seed(0)
    cfg = get_preset("dimaskdino_r50_12ep")
    model = build_model(cfg).train()
    height, width = 256, 320
    targets = random_targets([3, 7], 80, height, width)
    outputs = model(images(2, height, width), targets)

    expected = {"interm", "ti0", "ti1", "init", "dn"} | {f"dec{i}" for i in range(6)}
    assert expected <= set(outputs)
    assert model.num_decoder_layers == 6 and model.final_output_key() == "dec5"
    mask_size = (height // 4, width // 4)
    for name in ["interm", "init"] + [f"dec{i}" for i in range(6)]:
        pred = outputs[name]
        queries = 600 if name == "interm" else 300
        assert set(pred) == PREDICTION_KEYS, name
        assert pred["logits"].shape == (2, queries, 80), name
        assert pred["boxes"].shape == (2, queries, 4), name
        assert pred["masks"].shape == (2, queries, *mask_size), name
    for name in ("ti0", "ti1"):
        assert set(outputs[name]) == {"logits", "boxes"}
        assert outputs[name]["logits"].shape == (2, 600, 80) and outputs[name]["boxes"].shape == (2, 600, 4)
    dn = outputs["dn"]
    assert dn["single_pad"] == 7 and dn["num_groups"] == 100 // 7
    for name in ["init"] + [f"dec{i}" for i in range(6)]:
        assert dn[name]["logits"].shape == (2, 14 * 7, 80)
        assert dn[name]["masks"].shape == (2, 14 * 7, *mask_size)
    for name, pred in prediction_dicts(outputs):
        for key, tensor in pred.items():
            assert torch.isfinite(tensor).all(), f"{name}/{key}"
        assert ((pred["boxes"] >= 0) & (pred["boxes"] <= 1)).all(), name

    dummy_loss(outputs).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Variants and switches (small configs)
# ---------------------------------------------------------------------------------------------


def test_maskdino_variant_has_no_ti_no_bato_and_nine_layers():
    model = small_model("model.di.enabled=false", "model.bato.enabled=false", "model.decoder.num_layers=9")
    assert model.token_interaction is None and model.decoder.bato is None
    outputs = model(images(), random_targets([2, 4], 10, 128, 160))
    assert not any(k.startswith("ti") for k in outputs)
    assert outputs["interm"]["logits"].shape[1] == 50  # one selection of num_queries tokens
    assert model.final_output_key() == "dec8" and "dec8" in outputs and "dec9" not in outputs
    assert outputs["dn"]["dec8"]["boxes"].shape == (2, outputs["dn"]["num_groups"] * 4, 4)


@pytest.mark.parametrize("di, bato", [(True, False), (False, True)])
def test_di_and_bato_switch_independently(di, bato):
    model = small_model(f"model.di.enabled={di}", f"model.bato.enabled={bato}")
    assert (model.token_interaction is not None) == di and (model.decoder.bato is not None) == bato
    outputs = model(images(), random_targets([2, 4], 10, 128, 160))
    assert ("ti0" in outputs) == di
    assert outputs[model.final_output_key()]["masks"].shape == (2, 50, 32, 40)
    dummy_loss(outputs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reference_impl_reaches_every_op_caller():
    model = build_model(small_cfg("impl=ref"))
    attentions = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    assert len(attentions) == 2 + 3  # encoder + decoder layers of the demo
    assert all(m.impl == "ref" for m in attentions)
    # top-k selection, BATO's guiding-token selection and its attention
    assert model.token_selection.impl == "ref"
    assert model.decoder.bato.impl == "ref" and model.decoder.bato.cross_attn.impl == "ref"
    with torch.no_grad():
        outputs = model(images(1))
    assert torch.isfinite(outputs["dec2"]["masks"]).all()


def test_first_selection_scores_zero_out_invalid_tokens():
    """Scores of tokens with an invalid proposal are those of a zero token (MaskDINO masks the
    memory itself); the op path must agree with masking the memory."""
    model = small_model(train=False)
    selection, heads = model.token_selection, model.heads
    memory = torch.randn(2, 30, 64)
    valid = torch.rand(30) > 0.3
    proposals = torch.randn(30, 4).masked_fill(~valid[:, None], float("inf"))
    with torch.no_grad():
        picked = selection(memory, proposals, valid, heads, num_select=12)
        masked = memory * valid[None, :, None]
        expected_scores = heads.class_embed(selection.project(masked)).max(-1).values
        expected = expected_scores.topk(12, dim=1).indices
        assert torch.equal(picked.index, expected)
        torch.testing.assert_close(picked.content, selection.project(masked.gather(1, expected[..., None].expand(-1, -1, 64))))


def test_eval_mode_has_no_denoising():
    model = small_model(train=False)
    with torch.no_grad():
        outputs = model(images(), random_targets([2, 4], 10, 128, 160))
    assert outputs["dn"] is None
    assert outputs["dec2"]["logits"].shape == (2, 50, 10)


def test_training_without_targets_has_no_denoising_but_keeps_label_embedding_in_graph():
    model = small_model()
    outputs = model(images())
    assert outputs["dn"] is None
    dummy_loss(outputs).backward()
    assert model.denoising.label_enc.weight.grad is not None


def test_intermediate_masks_can_be_skipped():
    model = small_model(train=False)
    with torch.no_grad():
        outputs = model(images(1), intermediate_masks=False)
    assert "masks" in outputs["dec2"] and "masks" not in outputs["dec0"] and "masks" not in outputs["init"]
    assert "masks" in outputs["interm"]


# ---------------------------------------------------------------------------------------------
# Denoising edge cases
# ---------------------------------------------------------------------------------------------


def test_image_without_gt_gets_only_padding_denoising_queries():
    model = small_model()
    outputs = model(images(), random_targets([0, 3], 10, 128, 160))
    dn = outputs["dn"]
    assert dn["single_pad"] == 3 and dn["num_groups"] == 50 // 3
    for _, pred in prediction_dicts(outputs):
        assert all(torch.isfinite(t).all() for t in pred.values())


def test_no_gt_anywhere_turns_denoising_off():
    model = small_model()
    outputs = model(images(), random_targets([0, 0], 10, 128, 160))
    assert outputs["dn"] is None
    assert torch.isfinite(outputs["dec2"]["boxes"]).all()


def test_more_gt_than_denoising_queries():
    model = small_model("model.denoising.num_queries=100")
    outputs = model(images(), random_targets([101, 2], 10, 128, 160))
    assert outputs["dn"] is None  # not even one group fits
    assert torch.isfinite(outputs["dec2"]["masks"]).all()
    outputs = model(images(), random_targets([100, 2], 10, 128, 160))
    assert outputs["dn"]["num_groups"] == 1 and outputs["dn"]["single_pad"] == 100
    assert outputs["dn"]["dec2"]["logits"].shape == (2, 100, 10)


def test_denoising_queries_follow_spec():
    torch.manual_seed(0)
    generator = DenoisingGenerator(num_classes=5, hidden_dim=32, num_queries=100, label_noise_prob=0.2, box_noise_scale=0.4)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": boxes}, {"labels": torch.tensor([2]), "boxes": boxes[:1]}]
    queries = generator(targets, num_matching=7)
    assert (queries.num_groups, queries.single_pad) == (50, 2)
    assert queries.content.shape == (2, 100, 32) and queries.boxes.shape == (2, 100, 4)
    noised = queries.boxes.view(2, 50, 2, 4)
    gt = torch.stack((boxes, torch.stack((boxes[0], torch.full((4,), 0.5)))))[:, None]  # (2, 1, 2, 4)
    shift = (noised - gt).abs()
    # centre moved by at most 0.4 * half size, w and h by at most 0.4 * size
    assert (shift[..., :2] <= 0.4 * gt[..., 2:] / 2 + 1e-6).all()
    assert (shift[..., 2:] <= 0.4 * gt[..., 2:] + 1e-6).all()
    # padding query (image 1, GT index 1): zero content, box 0.5
    assert torch.equal(queries.content.view(2, 50, 2, 32)[1, :, 1], torch.zeros(50, 32))
    assert torch.equal(noised[1, :, 1], torch.full((50, 4), 0.5))
    # content = label embedding of the (noised) label: most of them the GT label
    embed = generator.label_enc.weight
    label0 = (queries.content.view(2, 50, 2, 32)[0, :, 0] - embed[1]).abs().sum(-1) == 0
    assert 0.6 < label0.float().mean() < 1.0  # about 1 - 0.2 * 4/5 kept


def test_denoising_attention_mask():
    blocked = denoising_attention_mask(num_groups=3, single_pad=2, num_matching=4, device=torch.device("cpu"))
    assert blocked.shape == (10, 10)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[6:, :6] = True  # matching queries do not see denoising queries
    for g in range(3):
        rows = slice(2 * g, 2 * g + 2)
        expected[rows, :6] = True
        expected[rows, 2 * g : 2 * g + 2] = False  # a group sees itself
    assert torch.equal(blocked, expected)
    assert not blocked[:6, 6:].any()  # denoising queries see the matching ones


# ---------------------------------------------------------------------------------------------
# Detach rules, look-forward-twice, mask features
# ---------------------------------------------------------------------------------------------


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_decoder_inputs_are_detached_from_the_first_selection():
    model = small_model()
    outputs = model(images(), random_targets([2, 3], 10, 128, 160))
    grads = grads_of(model, outputs["dec2"]["logits"].sum() + outputs["dec2"]["boxes"].sum() + outputs["ti1"]["logits"].sum())
    assert grads["token_selection.enc_output.weight"] is None  # content and boxes detached before TI


def test_interm_outputs_train_the_selection():
    model = small_model()
    outputs = model(images(), random_targets([2, 3], 10, 128, 160))
    interm = outputs["interm"]
    grads = grads_of(model, interm["logits"].sum() + interm["boxes"].sum() + interm["masks"].sum())
    assert grads["token_selection.enc_output.weight"] is not None
    assert grads["heads.bbox_embed.layers.0.weight"] is not None
    assert all(grads[n] is None for n in grads if n.startswith("token_interaction."))


def test_decoder_boxes_reach_the_token_interaction_boxes():
    model = small_model()
    outputs = model(images(), random_targets([2, 3], 10, 128, 160))
    grads = grads_of(model, outputs["init"]["boxes"].sum())
    # init boxes = the TI-refined boxes of the selected tokens, NOT detached
    assert grads["token_interaction.bbox_embed.layers.2.weight"] is not None


def test_reference_detach_and_look_forward_twice():
    model = small_model()
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[2].requires_grad))
        for layer in model.decoder.layers
    ]
    captured = {}
    original = Decoder.forward

    def capture(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        captured["result"] = result
        return result

    Decoder.forward = capture
    try:
        model(images(), random_targets([2, 3], 10, 128, 160))
    finally:
        Decoder.forward = original
        for hook in hooks:
            hook.remove()
    # Layer 0 starts from the undetached TI boxes; later layers from detached references ...
    assert seen == [True, False, False]
    # ... but the box each later layer predicts is refined from the undetached one.
    references = captured["result"].references
    assert all(ref.grad_fn is not None for ref in references)


def test_bato_mask_features_feed_layers_after_the_first():
    model = small_model()
    outputs = model(images(), random_targets([2, 3], 10, 128, 160))
    conv = "decoder.bato.mask_feature_conv.0.weight"
    assert grads_of(model, outputs["dec0"]["masks"].sum() + outputs["init"]["masks"].sum() + outputs["interm"]["masks"].sum())[conv] is None
    outputs = model(images(), random_targets([2, 3], 10, 128, 160))
    assert grads_of(model, outputs["dec1"]["masks"].sum())[conv] is not None
    outputs = model(images(), random_targets([2, 3], 10, 128, 160))
    assert grads_of(model, outputs["dn"]["dec2"]["masks"].sum())[conv] is not None


def test_bato_updates_the_memory_of_later_layers():
    model = small_model()
    outputs = model(images(), random_targets([2, 3], 10, 128, 160))
    grads = grads_of(model, outputs["dec2"]["logits"].sum())
    assert grads["decoder.bato.cross_attn.q_proj.weight"] is not None
    outputs = model(images(), random_targets([2, 3], 10, 128, 160))
    grads = grads_of(model, outputs["dec0"]["logits"].sum())
    assert grads["decoder.bato.cross_attn.q_proj.weight"] is None


def test_box_heads_start_as_identity_refinement():
    model = small_model()
    assert torch.count_nonzero(model.heads.bbox_embed.layers[-1].weight) == 0
    assert torch.count_nonzero(model.token_interaction.bbox_embed.layers[-1].weight) == 0
    model.eval()
    with torch.no_grad():
        outputs = model(images(1))
    # With zero last layers every refinement is the identity: dec0 boxes = init boxes.
    torch.testing.assert_close(outputs["dec0"]["boxes"], outputs["init"]["boxes"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_mask_enhanced_boxes_follow_the_authors_masks_to_boxes():
    logits = torch.full((1, 3, 8, 10), -1.0)
    logits[0, 0, 2:4, 5:10] = 1.0  # rows 2..3, columns 5..9
    logits[0, 2, 0, 0] = 1.0  # one pixel
    boxes = mask_enhanced_boxes(logits)
    # corners at the (min, max) pixel indices, no +1: x 5..9 of 10, y 2..3 of 8
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.7, 0.3125, 0.4, 0.125]))
    # an empty mask: the authors' (1e8, 1e8, 0, 0) box through their eps-clamped inverse sigmoid
    far, near = 1 / (1 + 1e-5), 1e-5 / (1 + 1e-5)
    torch.testing.assert_close(boxes[0, 1], torch.tensor([far, far, near, near]))
    # one pixel: zero width and height, clamped the same way
    torch.testing.assert_close(boxes[0, 2], torch.tensor([near, near, near, near]))


def test_pixel_edge_mask_boxes_and_empty_masks_keep_the_selected_box():
    logits = torch.full((1, 2, 8, 10), -1.0)
    logits[0, 0, 2:4, 5:10] = 1.0  # rows 2..3, columns 5..9
    selected = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]])
    boxes = mask_enhanced_boxes(logits, selected)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.75, 0.375, 0.5, 0.25]))  # x 5..10 of 10, y 2..4 of 8
    torch.testing.assert_close(boxes[0, 1], selected[0, 1])  # no mask: the selected box


def test_proposal_sizes_by_stride_grow_with_the_stride():
    proposals, _ = encoder_proposals([(8, 8), (4, 4), (2, 2), (1, 1)], torch.device("cpu"), sizes="by_stride")
    sizes = proposals.sigmoid()[[0, 64, 80, 84], 2]
    torch.testing.assert_close(sizes, torch.tensor([0.05, 0.1, 0.2, 0.4]))


@pytest.mark.parametrize("key,value", [("model.mask_box_style", "pixel_edges"), ("model.proposal_sizes", "by_stride")])
def test_former_box_choices_change_the_training_forward(key, value):
    """Each switch reaches the model: same weights and batch, different outputs downstream of the
    first boxes (the mask-embedding MLP's last layer zeroed, so every first-selection mask is
    empty: the case where the selected box is kept)."""
    common = ["model.num_classes=3", "model.di.num_first_selection=60", "model.num_queries=20",
              "model.bato.num_guiding_tokens=5", "model.mask_box_style=authors", "model.proposal_sizes=authors"]
    batch = images(1, 64, 64)
    outputs = []
    for overrides in (common, [*common, f"{key}={value}"]):
        model = small_model(*overrides, train=False)
        with torch.no_grad():
            last = model.heads.mask_embed.layers[-1]
            last.weight.zero_()
            last.bias.zero_()
            outputs.append([t for t in tree_leaves(model(batch)) if isinstance(t, torch.Tensor)])
    assert len(outputs[0]) == len(outputs[1])
    assert not all(torch.equal(a, b) for a, b in zip(*outputs))
    with pytest.raises(ValueError, match=key):
        small_cfg(f"{key}=sideways")


def test_encoder_proposal_sizes_follow_the_authors_level_order():
    # levels fine to coarse (strides 8, 16, 32, 64): w = h = 0.4, 0.2, 0.1, 0.05
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    proposals, valid = encoder_proposals(shapes, torch.device("cpu"))
    assert proposals.shape == (85, 4) and valid.all()
    boxes = proposals.sigmoid()
    torch.testing.assert_close(boxes[0], torch.tensor([0.0625, 0.0625, 0.4, 0.4]))
    torch.testing.assert_close(boxes[64], torch.tensor([0.125, 0.125, 0.2, 0.2]))
    torch.testing.assert_close(boxes[80], torch.tensor([0.25, 0.25, 0.1, 0.1]))
    torch.testing.assert_close(boxes[84], torch.tensor([0.5, 0.5, 0.05, 0.05]))
    _, valid = encoder_proposals([(200, 200)], torch.device("cpu"))
    assert not valid[0] and valid[200 * 100 + 100]  # the corner token's centre is < 0.01


def test_sine_embeddings():
    pos = sine_position_embedding_2d(3, 5, 8, torch.device("cpu"))
    assert pos.shape == (15, 16)
    # row 1, column 4 (last): y = 2/3 * 2pi, x = 5/5 * 2pi; first frequency sin, second cos
    torch.testing.assert_close(pos[9, 0], torch.tensor(math.sin(2 / 3 * 2 * math.pi)), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[9, 8], torch.tensor(math.sin(2 * math.pi)), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[9, 9], torch.tensor(math.cos(2 * math.pi)), atol=1e-5, rtol=0)
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    embed = box_sine_embedding(box, 64)
    assert embed.shape == (1, 256)
    # order y, x, w, h
    torch.testing.assert_close(embed[0, [0, 64, 128, 192]], torch.sin(torch.tensor([0.2, 0.1, 0.3, 0.4]) * 2 * math.pi))


def test_inverse_sigmoid_is_finite():
    x = torch.tensor([0.0, 1e-9, 0.5, 1.0, 2.0, -1.0])
    y = inverse_sigmoid(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[2], torch.tensor(0.0))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def test_unpadded_input_is_padded_internally():
    model = small_model(train=False)
    with torch.no_grad():
        outputs = model(images(1, 122, 150))
    assert outputs["dec2"]["masks"].shape == (1, 50, 31, 38)  # ceil(H/4), ceil(W/4)
    assert torch.isfinite(outputs["dec2"]["boxes"]).all()


def test_unpadded_input_keeps_boxes_in_the_input_frame():
    model = small_model("model.denoising.box_noise_scale=0", "model.denoising.label_noise_prob=0")
    targets = random_targets([2, 3], 10, 122, 150)
    outputs = model(images(2, 122, 150), targets)
    # Without noise the denoising queries' initial boxes are the GT boxes, in the input's frame.
    dn_boxes = outputs["dn"]["init"]["boxes"].view(2, -1, 3, 4)
    torch.testing.assert_close(dn_boxes[0, :, :2], targets[0]["boxes"].expand(dn_boxes.shape[1], -1, -1))
    torch.testing.assert_close(dn_boxes[1], targets[1]["boxes"].expand(dn_boxes.shape[1], -1, -1))
    assert outputs["dn"]["dec2"]["masks"].shape[-2:] == (31, 38)


def test_padding_content_is_ignored_with_image_sizes():
    model = small_model(train=False)
    a = images(1)
    b = a.clone()
    b[:, :, 100:, :] = 0.0
    b[:, :, :, 120:] = 255.0
    sizes = [(100, 120)]
    with torch.no_grad():
        out_a = model(a, image_sizes=sizes)
        out_b = model(b, image_sizes=sizes)
    torch.testing.assert_close(out_a["dec2"]["logits"], out_b["dec2"]["logits"])
    torch.testing.assert_close(out_a["dec2"]["boxes"], out_b["dec2"]["boxes"])


def test_bad_inputs_raise_clear_errors():
    model = small_model(train=False)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="floating"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_sizes"):
        model(images(2), image_sizes=[(10, 10)])
    with pytest.raises(ValueError, match="outside"):
        model(images(1), image_sizes=[(500, 10)])
    with pytest.raises(ValueError, match="targets"):
        model.train()(images(2), [{"labels": torch.zeros(1, dtype=torch.long), "boxes": torch.rand(1, 4)}])
    with pytest.raises(ValueError, match="boxes"):
        model.train()(images(1), [{"labels": torch.zeros(2, dtype=torch.long), "boxes": torch.rand(3, 4)}])


def test_forward_has_no_host_synchronization():
    """The whole forward and backward run on the meta device, where reading a value (.item(),
    .tolist(), nonzero, boolean indexing) is impossible. The MSDA op is stubbed: its CPU input
    checks are not part of this model."""
    original = msda_module.ms_deform_attn

    def shape_only(value, spatial_shapes, level_start_index, locations, weights, impl="auto"):
        batch, _, heads, channels = value.shape
        return value.new_empty(batch, locations.shape[1], heads * channels) + weights.sum() * 0 + locations.sum() * 0

    msda_module.ms_deform_attn = shape_only
    try:
        with torch.device("meta"):
            model = build_model(small_cfg()).train()
            x = images(2, 128, 160)
            targets = [
                {"labels": torch.zeros(3, dtype=torch.long), "boxes": torch.rand(3, 4)},
                {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.rand(0, 4)},
            ]
        outputs = model(x, targets, image_sizes=[(128, 150), (100, 160)])
        dummy_loss(outputs).backward()
    finally:
        msda_module.ms_deform_attn = original
    assert outputs["dec2"]["masks"].shape == (2, 50, 32, 40) and outputs["dn"]["num_groups"] == 16


def test_model_cli_prints_parameters_and_flops(capsys):
    model_cli(["--preset", "demo", "--size", "128", "160"])
    text = capsys.readouterr().out
    assert "parameters:" in text and "GFLOPs" in text and "multiply-add" in text


def test_build_model_is_reexported():
    import dimaskdino

    assert isinstance(dimaskdino.build_model(small_cfg()), DIMaskDINO)
