"""The authors' fixtures (tests/fixtures/authors) are well formed, and, when the authors' checkouts
are given (DIMASKDINO_AUTHORS_DIMASKDINO / _MASKDINO / _DETECTRON2, see tests/authors_harness.py),
their code reproduces every stored output and loss from the stored weights and inputs."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import authors_harness as harness  # noqa: E402
from dimaskdino.config import apply_overrides, get_preset  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "authors"
KINDS = ["dimaskdino", "maskdino"]


def load(kind: str) -> dict:
    return torch.load(FIXTURES / f"{kind}.pt", weights_only=True)


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_weights_unpack_to_their_checkpoint(kind, tmp_path):
    fixture = load(kind)
    state_dict = harness.unpack_state_dict(fixture)
    assert list(state_dict) == fixture["weights/keys"]
    assert all(t.dtype == torch.float32 for t in state_dict.values())
    assert state_dict["sem_seg_head.predictor.class_embed.weight"].shape == (5, 256)
    # Shared modules are stored once and come back equal under every key.
    predictor = "sem_seg_head.predictor."
    assert torch.equal(state_dict[predictor + "decoder_norm.weight"], state_dict[predictor + "decoder.norm.weight"])
    # Packing is exact: the stored values are the ones their model ran with.
    repacked = harness.unpack_state_dict(harness.pack_state_dict(state_dict))
    assert all(torch.equal(repacked[k], v) for k, v in state_dict.items())
    # Not constant anywhere (a symmetric init would hide a mis-mapped tensor), but empty_weight.
    constant = [k for k, v in state_dict.items() if v.numel() > 1 and bool((v == v.flatten()[0]).all())]
    assert constant == ["criterion.empty_weight"] or constant == []
    path = tmp_path / "model.pth"
    harness.write_authors_checkpoint(fixture, path)
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["model"] and list(saved["model"]) == fixture["weights/keys"]
    parameters = {k: v for k, v in state_dict.items() if k.startswith(("backbone.", "sem_seg_head."))}
    assert len(parameters) > 300


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_engine_overrides_apply(kind):
    fixture = load(kind)
    cfg = apply_overrides(get_preset(fixture["engine/preset"]), fixture["engine/overrides"])
    assert cfg.model.num_classes == fixture["eval/layer/0/logits"].shape[-1]
    assert cfg.model.num_queries == fixture["eval/layer/0/logits"].shape[1]
    assert cfg.model.decoder.num_layers == len([k for k in fixture if k.startswith("eval/layer/") and k.endswith("/logits")])
    assert cfg.model.di.enabled == (kind == "dimaskdino")
    if kind == "dimaskdino":
        assert cfg.model.di.num_first_selection == fixture["eval/interm/logits"].shape[1]
        assert cfg.model.di.num_ti_layers == len([k for k in fixture if k.startswith("eval/ti/") and k.endswith("/logits")])


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_criterion_inputs_rebuild(kind):
    fixture = load(kind)
    outputs, targets, mask_dict = harness.criterion_inputs(fixture)
    num_layers = len([k for k in fixture if k.startswith("eval/layer/") and k.endswith("/logits")])
    assert len(outputs["aux_outputs"]) == num_layers  # the initial prediction + all layers but the last
    assert set(outputs["interm_outputs"]) == {"pred_logits", "pred_boxes", "pred_masks"}
    assert ("oldm_outputs" in outputs) == (kind == "dimaskdino")
    assert [len(t["labels"]) for t in targets] == [3, 2]
    assert mask_dict["scalar"] == 3 and mask_dict["pad_size"] == 9
    assert mask_dict["output_known_lbs_bboxes"]["pred_logits"].shape[1] == 9
    names = [k.removeprefix("train/losses/") for k in fixture if k.startswith("train/losses/")]
    assert {"loss_ce", "loss_mask_interm", "loss_dice_dn_0"} <= set(names)
    assert all(f"train/weight_dict/{name}" in fixture for name in names)


def authors_available(kind: str) -> str | None:
    """None when the live test can run, else why not."""
    if harness.checkout(kind) is None:
        return f"{harness.KINDS[kind].env} not set"
    root = os.environ.get(harness.ENV_DETECTRON2, "")
    if not root and importlib.util.find_spec("detectron2") is None:
        return f"detectron2 not importable and {harness.ENV_DETECTRON2} not set"
    for module in ("fvcore", "scipy"):
        if importlib.util.find_spec(module) is None:
            return f"{module} (a detectron2 / authors' dependency) not installed"
    return None


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=0, atol=atol))


@pytest.mark.parametrize("kind", KINDS)
def test_authors_code_reproduces_fixture(kind):
    reason = authors_available(kind)
    if reason:
        pytest.skip(reason)
    fixture = load(kind)
    cfg = harness.build_cfg(kind, fixture["authors/overrides"])
    model = harness.build_model(kind, cfg)
    model.load_state_dict(harness.unpack_state_dict(fixture), strict=True)
    images = [fixture[f"images/uint8/{b}"] for b in range(len(fixture["images/sizes"]))]
    outputs = harness.eval_forward(model, images)
    for key, value in outputs.items():
        stored = fixture[f"eval/{key}"]
        if stored.dtype == torch.float16:  # channel slices of intermediate values
            value = value[:, : stored.shape[1]]
            assert close(value, stored, atol=1e-2 * (1 + float(value.abs().max()))), key
        elif value.dtype == torch.bool or not value.is_floating_point():
            assert torch.equal(value, stored), key
        else:
            assert close(value, stored, atol=1e-5), key
    # Their criterion on the stored inputs with the stored points gives the stored terms.
    losses = harness.run_criterion(model, *harness.criterion_inputs(fixture), fixture["train/matcher_points"],
                                   fixture["train/loss_points"], kind=kind)
    stored = {k.removeprefix("train/losses/"): v for k, v in fixture.items() if k.startswith("train/losses/")}
    assert set(losses) == set(stored)
    for name, value in losses.items():
        assert torch.allclose(value, stored[name], rtol=1e-6, atol=1e-7), name
