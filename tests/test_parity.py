"""The engine computes what the authors' code computes (issue 11).

tests/fixtures/authors/{dimaskdino,maskdino}.pt hold a tiny DI-MaskDINO / MaskDINO built and run by
the authors' own code (tests/fixtures/make_authors_fixture.py, keys in FORMAT.md): their weights in
their key format, two images of different sizes, every output of their eval forward, and their
criterion's inputs and loss terms with the random points injected. These tests convert the
weights with `dimaskdino.convert`, run the engine in fp32 and require:

- every output (first selection, TI layers, initial prediction, each decoder layer: logits, boxes,
  masks) within 1e-4 (logits, boxes) / 1e-3 (mask logits) of theirs, and the same final instances;
- every loss term of the engine's criterion, given their outputs, targets and points, within 1e-5
  relative of their criterion's.

With DIMASKDINO_AUTHORS_DIMASKDINO / DIMASKDINO_AUTHORS_MASKDINO (+ DIMASKDINO_AUTHORS_DETECTRON2)
pointing at checkouts, `test_live_*` also runs their code now (tests/authors_harness.py) on the
fixture's weights and inputs and compares the engine with that.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from dimaskdino.convert import authors_to_engine, check_against_model, infer_config
from dimaskdino.model import build_model
from dimaskdino.model.criterion import build_criterion
from dimaskdino.model.postprocess import postprocess

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures" / "authors"
KINDS = ("dimaskdino", "maskdino")
LOGIT_TOL, BOX_TOL, MASK_TOL, LOSS_RTOL = 1e-4, 1e-4, 1e-3, 1e-5

sys.path.insert(0, str(TESTS))
import authors_harness as harness  # noqa: E402  (tests/ helper: their code, only when present)


@functools.cache
def fixture(kind: str) -> dict:
    path = FIXTURES / f"{kind}.pt"
    if not path.exists():
        pytest.fail(f"{path} is missing: run tests/fixtures/make_authors_fixture.py")
    return torch.load(path, weights_only=True)


def authors_state(kind: str) -> dict[str, torch.Tensor]:
    return harness.unpack_state_dict(fixture(kind))


# Their decoder, TI and BATO layers take `nhead`, whose default (8) their decoder never overrides:
# only the encoder follows MODEL.MaskDINO.NHEADS.
FIXED_HEADS = ["model.decoder.num_heads=8", "model.di.num_heads=8", "model.bato.num_heads=8"]


def engine_config(kind: str):
    fx = fixture(kind)
    overrides = list(fx["engine/overrides"]) + FIXED_HEADS
    return infer_config(authors_state(kind), fx["engine/preset"], overrides, f"{kind}.pt")


@functools.cache
def engine_model(kind: str) -> torch.nn.Module:
    """The engine model with the fixture's weights converted, fp32, eval mode."""
    cfg = engine_config(kind)
    state, source = authors_to_engine(authors_state(kind), cfg, f"{kind}.pt")
    check_against_model(state, source, cfg, f"{kind}.pt")
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def fixture_batch(fx: dict) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The fixture's uint8 images as one (B, 3, H, W) float batch (padded with zeros: the model
    zeroes the padding at evaluation, as their ImageList pads after normalizing) and their sizes."""
    sizes = [tuple(int(v) for v in size) for size in fx["images/sizes"]]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    batch = torch.zeros(len(sizes), 3, height, width)
    for index, (h, w) in enumerate(sizes):
        batch[index, :, :h, :w] = fx[f"images/uint8/{index}"].float()
    return batch, sizes


@functools.cache
def engine_eval(kind: str) -> dict:
    batch, sizes = fixture_batch(fixture(kind))
    with torch.no_grad():
        return engine_model(kind)(batch, image_sizes=sizes, intermediate_masks=True)


def output_pairs(kind: str, reference: dict) -> list[tuple[str, str, torch.Tensor, torch.Tensor, float]]:
    """(name, field, engine, authors, tolerance) for every output the reference has; `reference`
    holds the fixture's eval keys without the "eval/" prefix."""
    out = engine_eval(kind)
    names = [("interm", "interm")]
    names += [(f"ti/{i}", f"ti{i}") for i in range(len([k for k in out if k.startswith("ti")]))]
    names += [("initial", "init")]
    names += [(f"layer/{l}", f"dec{l}") for l in range(engine_model(kind).num_decoder_layers)]
    pairs = []
    for theirs, ours in names:
        for field, tol in (("logits", LOGIT_TOL), ("boxes", BOX_TOL), ("masks", MASK_TOL)):
            key = f"{theirs}/{field}"
            if key not in reference:
                assert not (theirs.startswith("ti") and field != "masks"), f"fixture lacks {key}"
                continue
            pairs.append((ours, field, out[ours][field], reference[key], tol))
    return pairs


def assert_outputs_match(kind: str, reference: dict) -> None:
    pairs = output_pairs(kind, reference)
    expected = 3 * (2 + engine_model(kind).num_decoder_layers) + (4 if kind == "dimaskdino" else 0)
    assert len(pairs) == expected, f"compared {len(pairs)} tensors, expected {expected}"
    failures = []
    for name, field, ours, theirs, tol in pairs:
        assert ours.shape == theirs.shape, f"{name}/{field}: shape {tuple(ours.shape)} vs theirs {tuple(theirs.shape)}"
        diff = (ours.float() - theirs.float()).abs().max().item()
        if not diff <= tol:
            failures.append(f"{name}/{field}: max abs diff {diff:.3g} > {tol:g}")
    assert not failures, f"{kind}: " + "; ".join(failures)


def assert_instances_match(kind: str, reference: dict) -> None:
    fx = fixture(kind)
    out = engine_eval(kind)
    batch, sizes = fixture_batch(fx)
    final = out[f"dec{engine_model(kind).num_decoder_layers - 1}"]
    results = postprocess(final, sizes, sizes, top_k=int(fx["engine/test_top_k"]), padded_size=tuple(batch.shape[-2:]))
    for b, ours in enumerate(results):
        # Their top-k is unsorted: compare both sorted by (score, label).
        theirs_scores = reference[f"instances/{b}/scores"]
        order_theirs = sorted(range(len(theirs_scores)), key=lambda i: (-float(theirs_scores[i]), int(reference[f"instances/{b}/labels"][i])))
        order_ours = sorted(range(len(ours["scores"])), key=lambda i: (-float(ours["scores"][i]), int(ours["labels"][i])))
        assert len(order_ours) == len(order_theirs)
        torch.testing.assert_close(ours["scores"][order_ours], theirs_scores[order_theirs], rtol=0, atol=1e-4)
        assert ours["labels"][order_ours].tolist() == reference[f"instances/{b}/labels"][order_theirs].tolist()
        # boxes in pixels: 1e-4 of the normalized box, in pixels of the padded frame
        pixel_tol = BOX_TOL * max(batch.shape[-2:])
        torch.testing.assert_close(ours["boxes"][order_ours], reference[f"instances/{b}/boxes_xyxy"][order_theirs].float(),
                                   rtol=0, atol=pixel_tol)
        masks_ours, masks_theirs = ours["masks"][order_ours], reference[f"instances/{b}/masks"][order_theirs]
        assert masks_ours.shape == masks_theirs.shape
        # a pixel may flip only where the upsampled logit is within the 1e-3 tolerance of 0
        assert (masks_ours != masks_theirs).float().mean().item() <= 1e-3


def eval_reference(kind: str) -> dict:
    return {key[len("eval/"):]: value for key, value in fixture(kind).items() if key.startswith("eval/")}


@pytest.mark.parametrize("kind", KINDS)
def test_converted_weights_load_exactly(kind):
    cfg = engine_config(kind)
    state, _ = authors_to_engine(authors_state(kind), cfg, f"{kind}.pt")
    model = engine_model(kind)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert sum(p.numel() for p in model.parameters()) == fixture(kind)["num_parameters"]


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_match_the_authors(kind):
    assert_outputs_match(kind, eval_reference(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_final_instances_match_the_authors(kind):
    assert_instances_match(kind, eval_reference(kind))


# ---------------------------------------------------------------------------------------------
# Criterion
# ---------------------------------------------------------------------------------------------

_TERMS = {"class": "loss_ce", "l1": "loss_bbox", "giou": "loss_giou", "mask_bce": "loss_mask", "mask_dice": "loss_dice"}


def _prediction(fx: dict, prefix: str) -> dict:
    out = {"logits": fx[f"{prefix}/pred_logits"], "boxes": fx[f"{prefix}/pred_boxes"]}
    if f"{prefix}/pred_masks" in fx:
        out["masks"] = fx[f"{prefix}/pred_masks"]
    return out


def engine_outputs_from_authors(fx: dict, num_layers: int) -> dict:
    """Their criterion's input (outputs + denoising bookkeeping) in the engine's output format."""
    outputs = {"interm": _prediction(fx, "train/outputs/interm_outputs")}
    for i in range(fx.get("train/outputs/oldm_outputs/#len", 0)):
        outputs[f"ti{i}"] = _prediction(fx, f"train/outputs/oldm_outputs/{i}")
    num_aux = fx["train/outputs/aux_outputs/#len"]
    assert num_aux == num_layers, "aux outputs = the initial prediction + every decoder layer but the last"
    stage_names = ["init"] + [f"dec{l}" for l in range(num_layers)]
    for i in range(num_aux):
        outputs[stage_names[i]] = _prediction(fx, f"train/outputs/aux_outputs/{i}")
    outputs[stage_names[-1]] = _prediction(fx, "train/outputs")
    known = "train/mask_dict/output_known_lbs_bboxes"
    if f"{known}/pred_logits" in fx:
        scalar, pad_size = int(fx["train/mask_dict/scalar"]), int(fx["train/mask_dict/pad_size"])
        dn = {"num_groups": scalar, "single_pad": pad_size // scalar}
        for i in range(num_aux):
            dn[stage_names[i]] = _prediction(fx, f"{known}/aux_outputs/{i}")
        dn[stage_names[-1]] = _prediction(fx, known)
        outputs["dn"] = dn
    else:
        outputs["dn"] = None
    return outputs


def authors_loss_name(engine_key: str, num_layers: int) -> str:
    """The name of their criterion's term for an engine loss key "{output}/{term}"."""
    *output, term = engine_key.split("/")
    base = _TERMS[term]
    dn = output[0] == "dn"
    name = output[-1]
    if name.startswith("ti"):
        return f"oldm_{base}_{name[2:]}"
    if name == "interm":
        return f"{base}_interm"
    index = 0 if name == "init" else int(name[3:]) + 1  # their aux index
    last = index == num_layers  # the last decoder layer: their main output, no suffix
    if dn:
        return f"{base}_dn" if last else f"{base}_dn_{index}"
    return base if last else f"{base}_{index}"


def engine_losses_on_authors_inputs(kind: str, fx: dict) -> dict[str, torch.Tensor]:
    """The engine's criterion on their recorded outputs and targets, with their points injected:
    the matcher's uniform points and the mask losses' points (no importance sampling)."""
    import dimaskdino.model.criterion as criterion_module
    import dimaskdino.model.matcher as matcher_module

    cfg = engine_config(kind)
    matcher_points, loss_points = fx["train/matcher_points"], fx["train/loss_points"]
    assert cfg.loss.num_points == matcher_points.shape[0] == loss_points.shape[0]
    num_layers = engine_model(kind).num_decoder_layers
    outputs = engine_outputs_from_authors(fx, num_layers)
    targets = [
        {name: fx[f"train/criterion_targets/{b}/{name}"] for name in ("labels", "boxes", "masks")}
        for b in range(fx["train/criterion_targets/#len"])
    ]
    criterion = build_criterion(cfg)

    def injected_uniform(rows_per_image, tail, device, generators):
        assert tail == tuple(matcher_points.shape)
        return matcher_points.to(device).expand(sum(rows_per_image), *tail)

    def injected_mask_points(mask_logits, num_points, *args, **kwargs):
        return loss_points.to(mask_logits.device).expand(mask_logits.shape[0], *loss_points.shape)

    saved = matcher_module.rand_per_image, criterion_module.uncertainty_points
    matcher_module.rand_per_image, criterion_module.uncertainty_points = injected_uniform, injected_mask_points
    try:
        with torch.no_grad():
            return criterion(outputs, targets)
    finally:
        matcher_module.rand_per_image, criterion_module.uncertainty_points = saved


def assert_losses_match(kind: str, fx: dict, theirs: dict[str, torch.Tensor]) -> None:
    cfg = engine_config(kind)
    num_layers = engine_model(kind).num_decoder_layers
    weights = {"class": cfg.loss.class_weight, "l1": cfg.loss.l1_weight, "giou": cfg.loss.giou_weight,
               "mask_bce": cfg.loss.mask_bce_weight, "mask_dice": cfg.loss.dice_weight}
    ours = engine_losses_on_authors_inputs(kind, fx)
    weight_dict = {k[len("train/weight_dict/"):]: v for k, v in fx.items() if k.startswith("train/weight_dict/")}
    counted = {name for name in theirs if name in weight_dict}  # their model drops the others
    compared, failures = set(), []
    for key, value in ours.items():
        name = authors_loss_name(key, num_layers)
        assert name in theirs, f"engine term {key} has no counterpart {name} among theirs"
        unweighted = value / weights[key.rsplit("/", 1)[-1]]
        reference = theirs[name].float()
        if not torch.allclose(unweighted, reference, rtol=LOSS_RTOL, atol=1e-7):
            failures.append(f"{key} ({name}): {unweighted.item():.7g} vs theirs {reference.item():.7g}")
        assert weight_dict.get(name, weights[key.rsplit("/", 1)[-1]]) == pytest.approx(weights[key.rsplit("/", 1)[-1]])
        compared.add(name)
    assert not failures, f"{kind}: " + "; ".join(failures)
    assert counted <= compared, f"their terms without an engine counterpart: {sorted(counted - compared)}"


@pytest.mark.parametrize("kind", KINDS)
def test_criterion_terms_match_the_authors(kind):
    fx = fixture(kind)
    theirs = {k[len("train/losses/"):]: v for k, v in fx.items() if k.startswith("train/losses/")}
    assert_losses_match(kind, fx, theirs)


# ---------------------------------------------------------------------------------------------
# Live: their code, now (skips without their checkouts)
# ---------------------------------------------------------------------------------------------


def _live_model(kind: str):
    if harness.checkout(kind) is None:
        pytest.skip(f"live comparison with the authors' code: set {harness.KINDS[kind].env} "
                    f"(and {harness.ENV_DETECTRON2} if detectron2 is not installed) to their checkout")
    sys.path.insert(0, str(FIXTURES.parent))
    import make_authors_fixture as maker

    cfg = harness.build_cfg(kind, maker.COMMON_OVERRIDES + maker.KIND_OVERRIDES[kind])
    model = harness.build_model(kind, cfg)
    model.load_state_dict(authors_state(kind), strict=True)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_live_outputs_match_the_authors(kind):
    model = _live_model(kind)
    fx = fixture(kind)
    images = [fx[f"images/uint8/{b}"] for b in range(len(fx["images/sizes"]))]
    live = harness.eval_forward(model, images)
    assert_outputs_match(kind, live)
    assert_instances_match(kind, live)


@pytest.mark.parametrize("kind", KINDS)
def test_live_criterion_terms_match_the_authors(kind):
    model = _live_model(kind)
    fx = fixture(kind)
    outputs, targets, mask_dict = harness.criterion_inputs(fx)
    theirs = harness.run_criterion(model, outputs, targets, mask_dict, fx["train/matcher_points"],
                                   fx["train/loss_points"], kind=kind)
    assert_losses_match(kind, fx, {name: value.detach() for name, value in theirs.items()})
