"""Prediction on image files (decode -> test-time resize -> model -> json + overlay PNGs) with a
tiny model, the command line on a real checkpoint of it, and the pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dimaskdino._optional import LazyModule
from dimaskdino.config import apply_overrides, get_preset
from dimaskdino.data import CategoryMap
from dimaskdino.data.transforms import eval_resize_size
from dimaskdino.model import build_model
from dimaskdino.data import load_coco
from dimaskdino.data.synthetic import make_synthetic_coco
from dimaskdino.predict import (
    expand_inputs,
    load_image,
    main,
    predict_files,
    predict_image,
    predict_records,
    prepare_image,
)
from dimaskdino.visualize import class_colour, overlay, save_overlay_grid

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

# Optional packages, imported by the tests that use them (a missing one skips those tests only).
mask_utils = LazyModule("pycocotools.mask", "this test")
Image = LazyModule("PIL.Image", "this test")

SHORT_SIDE, MAX_SIZE = 96, 160
CATEGORIES = CategoryMap((1, 2, 4, 5, 7, 9), ("circle", "square", "triangle", "star", "ellipse", "ring"))
TINY_MODEL = [
    "model.num_classes=6", "model.hidden_dim=32", "model.num_queries=10", "model.di.num_first_selection=20",
    "model.bato.num_guiding_tokens=4", "model.encoder.num_layers=1", "model.decoder.num_layers=2",
    "model.encoder.dim_feedforward=64", "model.decoder.dim_feedforward=64", "model.di.dim_feedforward=64",
    "model.bato.dim_feedforward=64", "model.di.num_ti_layers=1", "model.encoder.num_heads=2",
    "model.decoder.num_heads=2", "model.di.num_heads=2", "model.bato.num_heads=2",
    f"data.test_short_side={SHORT_SIDE}", f"data.test_max_size={MAX_SIZE}",
]


@pytest.fixture(scope="module")
def tiny():
    cfg = apply_overrides(get_preset("demo"), TINY_MODEL)
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """A JPEG, a grayscale PNG, an RGBA PNG, a corrupt 'JPEG' and a truncated PNG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (70, 110, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (50, 40), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (33, 47, 4), dtype=np.uint8), mode="RGBA").save(folder / "alpha.png")
    (folder / "corrupt.jpg").write_bytes(b"this is not an image")
    good_png = (folder / "gray.png").read_bytes()
    (folder / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    return folder


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_load_image_decodes_any_format_as_rgb(image_files):
    assert load_image(str(image_files / "photo.jpg")).shape == (70, 110, 3)
    gray = load_image(str(image_files / "gray.png"))
    assert gray.shape == (50, 40, 3) and gray.dtype == np.uint8
    assert (gray[..., 0] == gray[..., 1]).all()
    assert load_image(str(image_files / "alpha.png")).shape == (33, 47, 3)
    for name in ("corrupt.jpg", "truncated.png"):
        with pytest.raises(ValueError, match=name):
            load_image(str(image_files / name))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(str(image_files / "missing.jpg"))


@pytest.mark.parametrize("size", [(70, 110), (50, 40), (200, 33)])
def test_prepare_image_resizes_and_pads(size):
    image = np.full((*size, 3), 200, dtype=np.uint8)
    tensor, valid = prepare_image(image, short_side=SHORT_SIDE, max_size=MAX_SIZE, size_divisibility=32)
    assert valid == eval_resize_size(*size, SHORT_SIDE, MAX_SIZE)
    assert min(valid) == SHORT_SIDE or max(valid) <= MAX_SIZE
    assert tensor.shape[:2] == (1, 3) and tensor.shape[2] % 32 == 0 and tensor.shape[3] % 32 == 0
    assert tensor.shape[2] - valid[0] < 32 and tensor.shape[3] - valid[1] < 32
    assert torch.all(tensor[0, :, : valid[0], : valid[1]] == 200)


def test_predict_image_returns_predictions_at_the_original_size(tiny):
    model, cfg = tiny
    model.train()
    image = np.random.default_rng(1).integers(0, 255, (70, 110, 3), dtype=np.uint8)
    result = predict_image(model, image, short_side=SHORT_SIDE, max_size=MAX_SIZE, top_k=15)
    assert model.training  # mode restored
    model.eval()
    assert result["masks"].shape == (15, 70, 110) and result["masks"].dtype == torch.bool
    assert result["boxes"].shape == (15, 4) and result["labels"].max() < 6
    boxes = result["boxes"]
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 110).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 70).all()
    assert torch.all(result["scores"][:-1] >= result["scores"][1:])


def test_predict_files_writes_json_and_overlays_and_skips_bad_files(tiny, image_files, tmp_path):
    model, cfg = tiny
    paths = expand_inputs([str(image_files)]) + [str(image_files / "missing.jpg")]
    messages = []
    run = predict_files(model, paths, CATEGORIES, str(tmp_path / "out"), short_side=SHORT_SIDE,
                        max_size=MAX_SIZE, score_threshold=0.0, top_k=5, log=messages.append)
    assert run.num_predicted == 3
    assert sorted(p.split("/")[-1] for p, _ in run.failures) == ["corrupt.jpg", "missing.jpg", "truncated.png"]
    assert sum("error" in m and "corrupt.jpg" in m for m in messages) == 1
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert written == run.results and len(written) == 15
    sizes = {str(image_files / "photo.jpg"): (70, 110), str(image_files / "gray.png"): (50, 40),
             str(image_files / "alpha.png"): (33, 47)}
    for entry in written:
        assert entry["file_name"] in sizes
        assert entry["image_id"] == paths.index(entry["file_name"]) + 1
        assert entry["category_id"] in CATEGORIES.coco_ids
        assert entry["category_name"] == CATEGORIES.names[CATEGORIES.label(entry["category_id"])]
        assert tuple(entry["segmentation"]["size"]) == sizes[entry["file_name"]]
        assert mask_utils.decode(entry["segmentation"]).shape == sizes[entry["file_name"]]
        assert len(entry["bbox"]) == 4 and 0 <= entry["score"] <= 1
    assert sorted(p.split("/")[-1] for p in run.overlays) == ["alpha_pred.png", "gray_pred.png", "photo_pred.png"]
    for overlay_path in run.overlays:
        with Image.open(overlay_path) as im:
            name = overlay_path.split("/")[-1].replace("_pred.png", "")
            expected = next(s for f, s in sizes.items() if f.split("/")[-1].startswith(name + "."))
            assert (im.height, im.width) == expected and im.mode == "RGB"


def test_score_threshold_filters_json(tiny, image_files, tmp_path):
    model, _ = tiny
    run = predict_files(model, [str(image_files / "photo.jpg")], CATEGORIES, str(tmp_path), short_side=SHORT_SIDE,
                        max_size=MAX_SIZE, score_threshold=1.01, top_k=5, log=lambda m: None)
    assert run.num_predicted == 1 and run.results == []


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A real checkpoint (dimaskdino.checkpoint) of the tiny model, as training writes it."""
    from dimaskdino.checkpoint import save_checkpoint
    from dimaskdino.config import config_to_dict

    model, cfg = tiny
    meta = dict(config=config_to_dict(cfg), categories=CATEGORIES.state_dict())
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    save_checkpoint(directory, 7, model, torch.optim.AdamW(model.parameters()), meta)
    return str(directory.parent)  # a training output folder: its latest checkpoint is used


def test_cli_predicts_and_reports_bad_files(checkpoint, tiny, image_files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--checkpoint", checkpoint, str(image_files / "photo.jpg"), str(image_files / "corrupt.jpg"),
                 str(image_files / "photo.jpg"), "--output", str(out), "--score-threshold", "0", "--device", "cpu",
                 "--top-k", "3"])
    assert code == 0
    captured = capsys.readouterr()
    assert "corrupt.jpg" in captured.err and "2 of 3 images predicted (1 skipped)" in captured.out
    results = json.loads((out / "predictions.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [1, 3]
    # The checkpoint's weights were loaded: same predictions as the in-memory model.
    model, _ = tiny
    expected = predict_image(model, load_image(str(image_files / "photo.jpg")), short_side=SHORT_SIDE,
                             max_size=MAX_SIZE, top_k=3)
    first = [r for r in results if r["image_id"] == 1]
    assert [r["score"] for r in first] == pytest.approx(expected["scores"].tolist(), rel=1e-5)
    assert [r["category_id"] for r in first] == [CATEGORIES.coco_id(int(l)) for l in expected["labels"]]
    assert sorted(p.name for p in out.iterdir()) == ["photo_pred.png", "photo_pred2.png", "predictions.json"]


def test_cli_fails_when_nothing_could_be_predicted(checkpoint, image_files, tmp_path, capsys):
    code = main(["--checkpoint", checkpoint, str(image_files / "corrupt.jpg"), str(image_files / "missing.jpg"),
                 "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err and "missing.jpg" in err


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def test_overlay_draws_masks_boxes_and_respects_the_threshold():
    image = np.full((60, 80, 3), 100, dtype=np.uint8)
    masks = np.zeros((2, 60, 80), dtype=bool)
    masks[0, 30:50, 40:70] = True
    masks[1, 5:15, 5:15] = True
    boxes = np.array([[40.0, 30.0, 70.0, 50.0], [5.0, 5.0, 15.0, 15.0]])
    picture = overlay(image, masks, boxes, np.array([1, 3]), np.array([0.9, 0.2]), CATEGORIES.names,
                      score_threshold=0.5)
    assert picture.shape == image.shape and picture.dtype == np.uint8
    assert (image == 100).all()  # the input is not modified
    inside = picture[40, 55].astype(int)  # inside mask 0, away from its outline and label
    expected = np.round(100 * 0.55 + np.array(class_colour(1)) * 0.45)
    assert np.abs(inside - expected).max() <= 1
    assert (picture[10, 10] == 100).all()  # below the threshold: not drawn
    assert (picture[30, 40:70] != 100).any(axis=-1).all()  # box outline
    boxes_only = overlay(image, None, boxes, [1, 3], [0.9, 0.2], None)
    assert (boxes_only[40, 55] == 100).all() and (boxes_only[5, 5:15] != 100).any()
    with pytest.raises(ValueError, match="masks must be"):
        overlay(image, masks[:, :10], boxes, [1, 3], [0.9, 0.2], None)


def test_save_overlay_grid(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for height, width in ((60, 80), (100, 50), (30, 30)):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        items.append((image, {"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "scores": torch.tensor([0.8]),
                              "labels": torch.tensor([2]), "masks": torch.ones(1, height, width, dtype=torch.bool)}))
    path = save_overlay_grid(str(tmp_path / "sub" / "grid.png"), items, class_names=CATEGORIES.names, cell_size=64)
    with Image.open(path) as im:
        # 3 pictures -> 2 x 2 grid of cells of the largest scaled picture (64 x 64), 4-pixel gaps.
        assert (im.width, im.height) == (2 * 64 + 4, 2 * 64 + 4)


def test_predict_records_feed_the_overlay_grid_with_class_names(tiny, tmp_path, monkeypatch):
    """What training does at the end: a few val records -> one picture, labelled with names."""
    model, cfg = tiny
    paths = make_synthetic_coco(str(tmp_path / "coco"), num_train=0, num_val=3, height=64, width=96,
                                image_format="png")
    records = load_coco(paths.val_json, paths.val_images, for_training=False).records
    (tmp_path / "coco" / "val" / records[1].file_name).write_bytes(b"gone bad")  # after loading
    messages = []
    panels = predict_records(model, records, cfg, CATEGORIES, "cpu", top_k=4, log=messages.append)
    assert len(panels) == 2 and records[1].file_name in messages[0]
    for image, prediction in panels:
        assert image.shape == (64, 96, 3) and prediction["masks"].shape == (4, 64, 96)
        assert prediction["class_names"] == CATEGORIES.names
    drawn = []
    real_overlay = overlay

    def spy(image, masks, boxes, labels, scores, class_names=None, score_threshold=0.0):
        drawn.append(class_names)
        return real_overlay(image, masks, boxes, labels, scores, class_names, score_threshold)

    monkeypatch.setattr("dimaskdino.visualize.overlay", spy)
    path = save_overlay_grid(str(tmp_path / "predictions.png"), panels, score_threshold=0.0)
    assert drawn == [CATEGORIES.names, CATEGORIES.names]
    with Image.open(path) as im:
        assert (im.width, im.height) == (2 * 96 + 4, 64)
