"""Prediction on image files (decode -> test-time resize -> model -> json + overlay PNGs) with a
tiny model, the command line on a real checkpoint of it, and the pictures."""

from __future__ import annotations

import contextlib
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
from dimaskdino.visualize import (
    MASK_ALPHA,
    choose_threshold,
    class_colour,
    display_picture,
    overlay,
    place_labels,
    remove_duplicates,
    save_overlay_grid,
    select_for_display,
)

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
    # original-image pixels, not clipped to the image (the authors' post-processing does not clip)
    assert torch.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert (boxes[:, 0::2].mean() - 55).abs() < 110 and (boxes[:, 1::2].mean() - 35).abs() < 70
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
            # The image's size, with the legend below it.
            assert im.width == expected[1] and im.height > expected[0] and im.mode == "RGB"


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
    expected = np.round(100 * (1 - MASK_ALPHA) + np.array(class_colour(1)) * MASK_ALPHA)
    assert np.abs(inside - expected).max() <= 1
    assert tuple(picture[49, 55]) == class_colour(1)  # the outline band inside the mask's edge
    assert tuple(picture[40, 39]) == (0, 0, 0)  # the dark edge just outside it (left of the box line)
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
        # 3 pictures, each scaled to a long side of 64 -> 2 x 2 grid of 64 x 64 cells, 4-pixel gaps,
        # and the legend below.
        assert im.width == 2 * 64 + 4 and im.height > 2 * 64 + 4
        legend = np.asarray(im)[2 * 64 + 4 :]
        assert (legend == 255).mean() > 0.5 and (legend == 0).any()  # white strip with dark text


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
    path = save_overlay_grid(str(tmp_path / "predictions.png"), panels, score_threshold=0.0, cell_size=96)
    assert drawn == [CATEGORIES.names, CATEGORIES.names]
    with Image.open(path) as im:
        assert im.width == 2 * 96 + 4 and im.height > 64


def test_cli_keeps_an_earlier_predictions_json_when_every_input_is_bad(checkpoint, image_files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text('[{"earlier": true}]')
    code = main(["--checkpoint", checkpoint, str(image_files / "corrupt.jpg"), "--output", str(out), "--device", "cpu"])
    assert code == 1
    assert (out / "predictions.json").read_text() == '[{"earlier": true}]'
    assert "not written" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Safe weights (dimaskdino.export)
# ---------------------------------------------------------------------------------------------


def _rects_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_never_overlap_and_stay_inside_the_image():
    rng = np.random.default_rng(0)
    width, height = 200, 150
    xy = rng.uniform(0, 150, (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (30, 2))], axis=1)
    boxes[10:15] = boxes[9]  # several boxes on the same spot: their labels must still not overlap
    sizes = [(int(rng.integers(30, 70)), 14) for _ in boxes]
    corners = place_labels(boxes, sizes, (width, height))
    rects = [(x, y, x + w, y + h) for corner, (w, h) in zip(corners, sizes) if corner is not None for x, y in [corner]]
    assert len(rects) >= 15  # 30 labels cover 70% of this picture: about two thirds find room
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= width and 0 <= a[1] and a[3] <= height
        assert not any(_rects_overlap(a, b) for b in rects[i + 1 :])
    # The first (highest-scoring) label takes its preferred spot: above the box's top-left corner.
    (first,) = place_labels([[50.0, 40.0, 90.0, 80.0]], [(30, 12)], (width, height))
    assert first == (50.0, 28.0)
    # A label larger than the picture has no room.
    assert place_labels([[0.0, 0.0, 5.0, 5.0]], [(300, 12)], (width, height)) == [None]


def test_duplicates_are_hidden_for_display():
    masks = np.zeros((6, 40, 40), dtype=bool)
    masks[0, 0:20, 0:20] = True  # object A
    masks[1, 0:20, 0:19] = True  # A again, same class, lower score: hidden
    masks[2, 0:20, 0:18] = True  # A named by another class (IoU 0.9): hidden
    masks[3, 0:20, 0:12] = True  # another class, IoU 0.6 with A: kept (could be a different object)
    masks[4, 25:35, 25:35] = True  # object B, same class as A: kept
    masks[5, 0:10, 0:10] = True  # a part of A in A's class (IoU 0.25, all inside A): hidden
    labels = np.array([1, 1, 2, 3, 1, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    boxes = np.array([[0, 0, 20, 20], [0, 0, 19, 20], [0, 0, 18, 20], [0, 0, 12, 20], [25, 25, 35, 35],
                      [0, 0, 10, 10]], dtype=float)
    assert remove_duplicates(masks, boxes, labels, scores).tolist() == [0, 3, 4]
    # Highest score first whatever the input order; box overlaps without masks.
    order = np.array([5, 4, 3, 2, 1, 0])
    assert remove_duplicates(masks[order], boxes[order], labels[order], scores[order]).tolist() == [5, 2, 1]
    assert remove_duplicates(None, boxes, labels, scores).tolist() == [0, 3, 4]
    # A small object of the class inside a large one is hidden only when mostly inside it.
    masks[5] = False
    masks[5, 15:25, 15:25] = True  # a quarter inside A
    assert remove_duplicates(masks, boxes, labels, scores).tolist() == [0, 3, 4, 5]


def test_threshold_is_chosen_between_objects_and_background():
    rng = np.random.default_rng(0)
    background = rng.uniform(0.01, 0.15, 90)
    weak_model = np.concatenate([rng.uniform(0.30, 0.47, 10), background])  # the demo model after minutes
    assert choose_threshold(weak_model) == weak_model[:10].min()
    strong_model = np.concatenate([rng.uniform(0.8, 0.95, 6), rng.uniform(0.01, 0.3, 94)])
    assert choose_threshold(strong_model) == strong_model[:6].min()
    assert choose_threshold([0.01, 0.02]) == 0.05  # nothing above the floor: nothing drawn
    assert choose_threshold([0.4, 0.4, 0.4]) == 0.05  # no split: everything above the floor
    assert choose_threshold([]) == 0.05


def test_select_for_display_applies_one_threshold_and_a_cap_per_image():
    def prediction(scores):
        n = len(scores)
        boxes = np.array([[i * 10.0, 0.0, i * 10.0 + 8, 8.0] for i in range(n)])  # disjoint
        return {"boxes": boxes, "labels": np.zeros(n, dtype=int), "scores": np.asarray(scores)}

    predictions = [prediction([0.45, 0.4, 0.35, 0.05, 0.04]), prediction([0.42, 0.06, 0.05])]
    chosen, choice = select_for_display(predictions)
    assert [c.tolist() for c in chosen] == [[0, 1, 2], [0]] and choice.automatic
    assert f"{choice.threshold:.2f}" in choice.describe()
    chosen, choice = select_for_display(predictions, score_threshold=0.05, max_per_image=2)
    assert [c.tolist() for c in chosen] == [[0, 1], [0, 1]] and not choice.automatic


def test_display_picture_shows_a_mask_on_an_object_of_its_own_colour():
    colour = class_colour(2)
    image = np.full((64, 64, 3), colour, dtype=np.uint8)  # the object and the mask's tint alike
    masks = np.zeros((1, 64, 64), dtype=bool)
    masks[0, 20:40, 20:40] = True
    picture = display_picture(image, {"masks": masks, "boxes": np.array([[20.0, 20.0, 40.0, 40.0]]),
                                      "labels": np.array([2]), "scores": np.array([0.4])}, CATEGORIES.names)
    assert picture.shape[1] == 64 and picture.shape[0] > 64  # legend below
    assert (picture[19, 25:35] == 0).all()  # the dark edge around the mask


@contextlib.contextmanager
def no_unpickling(calls: list):
    """Every way of unpickling (pickle.load / loads / Unpickler, torch.load) raises inside the
    block; the attempts are appended to `calls`."""
    import pickle

    def forbidden(name):
        def guard(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: unpickling while loading")
        return guard

    with pytest.MonkeyPatch.context() as patch:
        for name in ("load", "loads", "Unpickler"):
            patch.setattr(pickle, name, forbidden(f"pickle.{name}"))
        patch.setattr(torch, "load", forbidden("torch.load"))
        yield


def test_safetensors_export_loads_in_predict_without_pickle(checkpoint, image_files, tmp_path, capsys):
    from dimaskdino.export import main as export_main

    exported = tmp_path / "weights.safetensors"
    assert export_main([checkpoint, str(exported)]) == 0  # reads the (trusted) DCP checkpoint
    common = [str(image_files / "photo.jpg"), "--score-threshold", "0", "--device", "cpu", "--top-k", "5"]
    assert main(["--checkpoint", checkpoint, "--output", str(tmp_path / "dcp"), *common]) == 0

    calls = []
    with no_unpickling(calls):
        assert main(["--checkpoint", str(exported), "--output", str(tmp_path / "safe"), *common]) == 0
    assert calls == []
    with no_unpickling(calls), pytest.raises(BaseException):  # the guard does catch DCP's unpickling
        main(["--checkpoint", checkpoint, "--output", str(tmp_path / "guarded"), *common])
    assert "pickle.load" in calls

    safe = json.loads((tmp_path / "safe" / "predictions.json").read_text())
    assert len(safe) == 5 and safe == json.loads((tmp_path / "dcp" / "predictions.json").read_text())


def test_safetensors_export_refuses_and_rejects_bad_files(checkpoint, tmp_path):
    from safetensors.torch import save_file

    from dimaskdino.export import export_safetensors, load_safetensors_for_inference

    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_safetensors(checkpoint, tmp_path / "weights.pt")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors: safetensors metadata format"):
        load_safetensors_for_inference(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors: not a readable safetensors file"):
        load_safetensors_for_inference(garbage)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_safetensors_for_inference(tmp_path / "missing.safetensors")
    # Weights that do not fit the model of the metadata's config: the error names the file.
    good = tmp_path / "good.safetensors"
    export_safetensors(checkpoint, good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "mismatch.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="mismatch.safetensors: weights do not match"):
        load_safetensors_for_inference(tmp_path / "mismatch.safetensors")
