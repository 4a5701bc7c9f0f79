"""`python -m dimaskdino.convert` through its real entry point: an authors' checkpoint (the
fixture's weights as their DetectionCheckpointer saves them) converts, and `python -m
dimaskdino.evaluate` on it predicts what their model predicted; malformed or mismatched
checkpoints fail with one line naming the key and write nothing."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import test_parity as parity  # tests/ is on sys.path under pytest (rootdir conftest)
from dimaskdino.convert import COCO_CATEGORIES, category_state

KIND = "dimaskdino"
IMAGE = 0  # the 96 x 128 image: the padded frame of the fixture's batch, so its outputs are its own


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def convert_args(kind: str = KIND) -> list[str]:
    fx = parity.fixture(kind)
    return ["--preset", fx["engine/preset"], *fx["engine/overrides"], *parity.FIXED_HEADS]


@pytest.fixture(scope="module")
def authors_pth(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("authors") / "model_final.pth"
    parity.harness.write_authors_checkpoint(parity.fixture(KIND), path)
    return path


def write_tiny_coco(root: Path) -> tuple[Path, Path]:
    """The fixture's first image as a PNG (lossless) with its training targets as RLE GT, and the
    fixture's 5 classes as categories 1..5."""
    from PIL import Image

    fx = parity.fixture(KIND)
    images = root / "images"
    images.mkdir()
    image = fx[f"images/uint8/{IMAGE}"]
    height, width = image.shape[-2:]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(images / "a.png")
    annotations = []
    for index, (label, mask) in enumerate(zip(fx[f"train/targets/{IMAGE}/labels"], fx[f"train/targets/{IMAGE}/masks"])):
        rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        annotations.append({"id": index + 1, "image_id": 1, "category_id": int(label) + 1, "iscrowd": 0,
                            "segmentation": rle, "area": float(mask.sum()),
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": int(height), "width": int(width)}],
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": f"c{i + 1}"} for i in range(5)]}
    json_path = root / "tiny.json"
    json_path.write_text(json.dumps(coco))
    return json_path, images


def test_convert_then_evaluate_predicts_what_their_model_predicted(tmp_path, authors_pth):
    json_path, images = write_tiny_coco(tmp_path)
    out = tmp_path / "converted"
    fx = parity.fixture(KIND)
    height, width = (int(v) for v in fx["images/sizes"][IMAGE])
    # Their fixture ran on the images at their own size: no test-time resize.
    result = run_module("dimaskdino.convert", str(authors_pth), str(out), "--categories", str(json_path),
                        *convert_args(), f"data.test_short_side={min(height, width)}",
                        f"data.test_max_size={max(height, width)}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "meta.json").exists()

    predictions = tmp_path / "predictions.json"
    result = run_module("dimaskdino.evaluate", "--checkpoint", str(out), "--data", f"{json_path}:{images}",
                        "--loader", "torch", "--device", "cpu", "--top-k", str(int(fx["engine/test_top_k"])),
                        "--predictions", str(predictions), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = json.loads(predictions.read_text())

    theirs_scores = fx[f"eval/instances/{IMAGE}/scores"]
    theirs_labels = fx[f"eval/instances/{IMAGE}/labels"]
    assert len(ours) == len(theirs_scores)
    ours.sort(key=lambda r: (-r["score"], r["category_id"]))
    order = sorted(range(len(theirs_scores)), key=lambda i: (-float(theirs_scores[i]), int(theirs_labels[i])))
    np.testing.assert_allclose([r["score"] for r in ours], theirs_scores[order].numpy(), rtol=0, atol=1e-4)
    assert [r["category_id"] - 1 for r in ours] == theirs_labels[order].tolist()
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in ours)])
    np.testing.assert_allclose(boxes, fx[f"eval/instances/{IMAGE}/boxes_xyxy"][order].numpy(), rtol=0, atol=1e-4 * max(height, width))
    masks = np.stack([mask_utils.decode(r["segmentation"]).astype(bool) for r in ours])
    assert (masks != fx[f"eval/instances/{IMAGE}/masks"][order].numpy()).mean() <= 1e-3


def test_converted_checkpoint_loads_for_prediction_and_fine_tuning(tmp_path, authors_pth):
    from dimaskdino.checkpoint import load_checkpoint, load_for_inference
    from dimaskdino.convert import convert
    from dimaskdino.model import build_model

    out = convert(str(authors_pth), str(tmp_path / "converted"), None, convert_args()[2:])
    model, cfg, categories = load_for_inference(out)
    reference = parity.engine_model(KIND).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    assert categories.coco_ids == tuple(range(1, 6))  # not 80 classes: ids 1..C by default
    # train.resume=OUT: weights in, optimizer fresh, step 0 (fine-tuning)
    trainable = build_model(cfg)
    optimizer = torch.optim.AdamW(trainable.parameters())
    meta = load_checkpoint(out, trainable, optimizer)
    assert meta["step"] == 0 and not optimizer.state
    assert all(torch.equal(value, reference[key]) for key, value in trainable.state_dict().items())


def test_default_categories():
    coco = category_state(80, None)
    assert coco["coco_ids"][:3] == [1, 2, 3] and coco["coco_ids"][-1] == 90 and len(set(coco["coco_ids"])) == 80
    assert coco["names"][0] == "person" and len(COCO_CATEGORIES) == 80
    assert category_state(3, None) == {"coco_ids": [1, 2, 3], "names": ["class_1", "class_2", "class_3"]}


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the key, nothing written
# ---------------------------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    return parity.authors_state(KIND)


def _missing(state):
    del state["sem_seg_head.predictor.decoder.layers.1.norm2.weight"]
    return state, "sem_seg_head.predictor.decoder.layers.1.norm2.weight"


def _extra(state):
    state["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(20, 256)
    return state, "sem_seg_head.predictor.query_feat.weight"


def _wrong_shape(state):
    key = "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear1.weight"
    state[key] = torch.zeros(7, 256)
    return state, key


def _differing_copy(state):
    key = "sem_seg_head.predictor.decoder.norm.weight"  # must equal decoder_norm.weight
    state[key] = state[key] + 1
    return state, key


@pytest.mark.parametrize("corrupt", [_missing, _extra, _wrong_shape, _differing_copy])
def test_mismatched_checkpoint_is_one_line_naming_the_key(tmp_path, corrupt):
    state, key = corrupt(dict(_state()))
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    out = tmp_path / "out"
    result = run_module("dimaskdino.convert", str(path), str(out), *convert_args(), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_not_a_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    result = run_module("dimaskdino.convert", str(path), str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "notes.pth" in result.stderr and "not a readable checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


def test_detectron2_pkl_converts_like_the_pth(tmp_path):
    from dimaskdino.convert import read_authors_state

    state = _state()
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)
    loaded = read_authors_state(str(path))
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    # a pickle that would run code is refused
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"x": subprocess.Popen}}, f)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_authors_state(str(evil))


@pytest.mark.parametrize("kind, layers, di", [("dimaskdino", 6, True), ("maskdino", 9, False)])
def test_full_size_authors_keys_convert_to_the_presets(kind, layers, di):
    """Every key and shape of the authors' full R50 COCO models (as their code builds them,
    listed by the fixture maker's harness) maps onto the engine preset the converter picks."""
    from dimaskdino.convert import authors_to_engine, check_against_model, infer_config

    state = {}
    for line in (Path(parity.FIXTURES) / f"keys-{kind}-r50.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        dims = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
        state[key] = torch.zeros(()).expand(dims)  # no memory: only names and shapes matter here
    cfg = infer_config(state, None, [], kind)
    assert (cfg.model.decoder.num_layers, cfg.model.di.enabled, cfg.model.num_classes) == (layers, di, 80)
    assert (cfg.model.backbone.stem_channels, cfg.model.backbone.base_width) == (64, 64)
    converted, source = authors_to_engine(state, cfg, kind)
    check_against_model(converted, source, cfg, kind)
    from dimaskdino.model import build_model

    with torch.device("meta"):
        parameters = dict(build_model(cfg).named_parameters())
    # the counts: every parameter of the engine's full model comes from their checkpoint
    assert sum(converted[name].numel() for name in parameters) == {"dimaskdino": 52_286_232, "maskdino": 52_058_004}[kind]
