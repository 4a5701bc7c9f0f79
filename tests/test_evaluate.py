"""COCO metrics against pycocotools itself, COCO-result conversion, model evaluation (an oracle
model checks the mapping back to original pixels; a tiny real model the per-layer report), the
rank-0 gather under torch.distributed (gloo, 2 processes) and the command line."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dimaskdino._optional import LazyModule
from dimaskdino.config import apply_overrides, get_preset
from dimaskdino.data import CategoryMap, build_eval_loader, load_coco
from dimaskdino.data.synthetic import make_synthetic_coco
from dimaskdino.evaluate import (
    STAT_NAMES,
    coco_metrics,
    evaluate_model,
    format_layer_table,
    format_metrics,
    main,
    parse_data_argument,
    predictions_to_coco,
)
from dimaskdino.model import build_model

# pycocotools' mask.decode trips a numpy 2 deprecation inside pycocotools; DCP says it saves in
# one process, which is what these tests mean.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

# Optional packages, imported by the tests that use them (a missing one skips those tests only).
mask_utils = LazyModule("pycocotools.mask", "this test")
coco_api = LazyModule("pycocotools.coco", "this test")
cocoeval_api = LazyModule("pycocotools.cocoeval", "this test")

HEIGHT, WIDTH = 90, 120  # resized x2 to 180 x 240, padded to 192 x 256: padding is exercised
SHORT_SIDE, MAX_SIZE = 180, 400

TINY_MODEL = [
    "model.num_classes=6", "model.hidden_dim=32", "model.num_queries=10", "model.di.num_first_selection=20",
    "model.bato.num_guiding_tokens=4", "model.encoder.num_layers=1", "model.decoder.num_layers=2",
    "model.encoder.dim_feedforward=64", "model.decoder.dim_feedforward=64", "model.di.dim_feedforward=64",
    "model.bato.dim_feedforward=64", "model.di.num_ti_layers=1", "model.encoder.num_heads=2",
    "model.decoder.num_heads=2", "model.di.num_heads=2", "model.bato.num_heads=2",
    f"data.test_short_side={SHORT_SIDE}", f"data.test_max_size={MAX_SIZE}",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(str(tmp_path_factory.mktemp("coco")), seed=3, num_train=0, num_val=6,
                               height=HEIGHT, width=WIDTH, image_format="png")


@pytest.fixture(scope="module")
def gt(synthetic):
    with open(synthetic.val_json) as f:
        return json.load(f)


def gt_rle(ann: dict, height: int = HEIGHT, width: int = WIDTH) -> dict:
    segm = ann["segmentation"]
    rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width)) if isinstance(segm, list) else dict(segm)
    if isinstance(rle["counts"], bytes):
        rle["counts"] = rle["counts"].decode("ascii")
    return rle


def perfect_predictions(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9,
             "segmentation": gt_rle(a)} for a in gt["annotations"]]


def noisy_predictions(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered boxes, eroded/dilated/shifted masks, some wrong classes, duplicates and false
    positives, random scores: every part of the AP computation gets exercised."""
    rng = np.random.default_rng(seed)
    category_ids = [c["id"] for c in gt["categories"]]
    out = []
    for a in gt["annotations"]:
        for _ in range(int(rng.integers(1, 3))):  # sometimes a duplicate
            x, y, w, h = a["bbox"]
            box = [x + rng.normal(0, 2), y + rng.normal(0, 2), max(1.0, w + rng.normal(0, 3)),
                   max(1.0, h + rng.normal(0, 3))]
            mask = mask_utils.decode(gt_rle(a)).astype(bool)
            mask = np.roll(mask, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
            if rng.random() < 0.5:  # dilate
                mask = F.max_pool2d(torch.from_numpy(mask)[None, None].float(), 3, 1, 1)[0, 0].numpy() > 0
            category = a["category_id"] if rng.random() < 0.85 else int(rng.choice(category_ids))
            out.append(_result(a["image_id"], category, box, float(rng.random()), mask))
    for image in gt["images"]:  # false positives
        for _ in range(3):
            x, y = rng.uniform(0, WIDTH - 20), rng.uniform(0, HEIGHT - 20)
            mask = np.zeros((HEIGHT, WIDTH), bool)
            mask[int(y) : int(y) + 15, int(x) : int(x) + 18] = True
            out.append(_result(image["id"], int(rng.choice(category_ids)), [x, y, 18, 15], float(rng.random()) * 0.5, mask))
    return out


def _result(image_id, category_id, box, score, mask) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in box], "score": score,
            "segmentation": rle}


def pycocotools_stats(gt_json: str, predictions: list[dict], iou_type: str) -> np.ndarray:
    """pycocotools used directly. Mask results are given without their boxes, the standard way
    (with a box, loadRes would take the box area for the small/medium/large ranges)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_api.COCO(gt_json)
        if iou_type == "segm":
            results = [{k: v for k, v in p.items() if k != "bbox"} for p in predictions]
        else:
            results = [{k: v for k, v in p.items() if k != "segmentation"} for p in predictions]
        evaluator = cocoeval_api.COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


# ---------------------------------------------------------------------------------------------
# coco_metrics
# ---------------------------------------------------------------------------------------------


def test_coco_metrics_equal_pycocotools(synthetic, gt):
    predictions = noisy_predictions(gt)
    before = copy.deepcopy(predictions)
    metrics = coco_metrics(synthetic.val_json, predictions)
    assert predictions == before  # the caller's results are not modified
    for iou_type in ("bbox", "segm"):
        expected = pycocotools_stats(synthetic.val_json, predictions, iou_type)
        got = np.array([metrics[f"{iou_type}/{name}"] for name in STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, err_msg=iou_type)
        assert 0.05 < metrics[f"{iou_type}/AP"] < 0.95  # a non-trivial case
    assert all(isinstance(v, float) for v in metrics.values())
    json.dumps(metrics)


def test_perfect_predictions_give_ap_one(synthetic, gt):
    metrics = coco_metrics(synthetic.val_json, perfect_predictions(gt))
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}/AP"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}/AP50"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}/AR100"] == pytest.approx(1.0)


def test_empty_predictions_give_zero(synthetic):
    metrics = coco_metrics(synthetic.val_json, [])
    assert set(metrics) == {f"{t}/{n}" for t in ("bbox", "segm") for n in STAT_NAMES}
    for key, value in metrics.items():
        assert value == 0.0 or (value == -1.0 and key[-1] in "sml"), key  # -1: no GT in that area range
    assert metrics["bbox/AP"] == 0.0 and metrics["segm/AP"] == 0.0


def test_image_ids_restrict_the_evaluation(synthetic, gt):
    subset = {1, 2, 3}
    predictions = [p for p in perfect_predictions(gt) if p["image_id"] in subset]
    assert coco_metrics(synthetic.val_json, predictions)["bbox/AR100"] < 1.0  # other images' GT missed
    restricted = coco_metrics(synthetic.val_json, predictions, image_ids=subset)
    assert restricted["bbox/AP"] == pytest.approx(1.0) and restricted["segm/AP"] == pytest.approx(1.0)


def test_bad_predictions_raise_clear_errors(synthetic, gt):
    good = perfect_predictions(gt)[0]
    with pytest.raises(ValueError, match="image ids absent"):
        coco_metrics(synthetic.val_json, [dict(good, image_id=999)])
    with pytest.raises(ValueError, match=r"category ids absent.*\[3\]"):
        coco_metrics(synthetic.val_json, [dict(good, category_id=3)])  # 3 is not a synthetic id
    no_mask = {k: v for k, v in good.items() if k != "segmentation"}
    with pytest.raises(ValueError, match=r"predictions\[0\]: missing segmentation"):
        coco_metrics(synthetic.val_json, [no_mask])
    assert "bbox/AP" in coco_metrics(synthetic.val_json, [no_mask], iou_types=("bbox",))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_metrics("/nonexistent/nope.json", [])


def test_ground_truth_without_area_and_iscrowd(tmp_path, gt, synthetic):
    stripped = copy.deepcopy(gt)
    for ann in stripped["annotations"]:
        del ann["area"], ann["iscrowd"]
    path = tmp_path / "stripped.json"
    path.write_text(json.dumps(stripped))
    predictions = noisy_predictions(gt, seed=1)
    assert coco_metrics(str(path), predictions) == pytest.approx(coco_metrics(synthetic.val_json, predictions))
    del stripped["annotations"][2]["bbox"]
    path.write_text(json.dumps(stripped))
    with pytest.raises(ValueError, match=r"annotations\[2\]\.bbox: missing in .*stripped.json"):
        coco_metrics(str(path), predictions)


# ---------------------------------------------------------------------------------------------
# predictions_to_coco
# ---------------------------------------------------------------------------------------------


def test_predictions_to_coco_maps_ids_and_round_trips_rle():
    category_map = CategoryMap((1, 2, 4, 5, 7, 9), ("a", "b", "c", "d", "e", "f"))
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((3, 17, 23)) < 0.3)
    results = [
        {"boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 23.0, 17.0], [5.5, 6.5, 6.5, 8.0]]),
         "scores": torch.tensor([0.9, 0.5, 0.1]), "labels": torch.tensor([0, 2, 5]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
         "masks": torch.zeros(0, 17, 23, dtype=torch.bool)},
    ]
    coco = predictions_to_coco(results, [42, 43], category_map)
    assert [r["category_id"] for r in coco] == [1, 4, 9]
    assert all(r["image_id"] == 42 for r in coco)
    assert coco[0]["bbox"] == [1.0, 2.0, 10.0, 5.0]  # xyxy -> xywh
    assert coco[2]["bbox"] == pytest.approx([5.5, 6.5, 1.0, 1.5])
    assert [r["score"] for r in coco] == pytest.approx([0.9, 0.5, 0.1])
    for r, mask in zip(coco, masks.numpy()):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [17, 23]
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]).astype(bool), mask)
    json.dumps(coco)
    with pytest.raises(ValueError, match="label 6 outside 0..5"):
        predictions_to_coco([dict(results[0], labels=torch.tensor([0, 6, 1]))], [1], category_map)
    with pytest.raises(ValueError, match="2 results for 1 image ids"):
        predictions_to_coco(results, [1], category_map)


# ---------------------------------------------------------------------------------------------
# evaluate_model
# ---------------------------------------------------------------------------------------------


class OracleModel(torch.nn.Module):
    """Returns the ground truth of each image it is shown (looked up by its pixels): the outputs
    follow the model's conventions (boxes normalized cxcywh of the padded input, stride-4 mask
    logits), so evaluation must find them again in original pixels."""

    def __init__(self, batches: list[dict], num_classes: int, num_queries: int = 12):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.num_classes, self.num_queries = num_classes, num_queries
        self.targets = {self._key(b["images"][i]): t for b in batches for i, t in enumerate(b["targets"])}

    @staticmethod
    def _key(image: torch.Tensor) -> float:
        return round(float(image.double().mul(torch.arange(image.numel()).view(image.shape) % 97).sum()), 1)

    def forward(self, images, targets=None, image_sizes=None, intermediate_masks=True):
        batch, _, height, width = images.shape
        logits = torch.full((batch, self.num_queries, self.num_classes), -10.0)
        boxes = torch.full((batch, self.num_queries, 4), 0.05)
        masks = torch.full((batch, self.num_queries, height // 4, width // 4), -10.0)
        for b in range(batch):
            target = self.targets.get(self._key(images[b]))
            if target is None:  # an image it was not given: no detection
                continue
            n = len(target["labels"])
            logits[b, torch.arange(n), target["labels"]] = 5.0
            boxes[b, :n] = target["boxes"]
            coarse = F.avg_pool2d(target["masks"][:, None].float(), 4)[:, 0]
            masks[b, :n] = (coarse - 0.5) * 20
        pred = {"logits": logits, "boxes": boxes, "masks": masks}
        return {"interm": pred, "init": pred, "dec0": pred, "dec1": pred, "dn": None}


@pytest.fixture(scope="module")
def dataset(synthetic):
    return load_coco(synthetic.val_json, synthetic.val_images, for_training=False)


def eval_batches(dataset, batch_size: int = 2) -> list[dict]:
    loader = build_eval_loader(dataset, backend="torch", batch_size=batch_size, short_side=SHORT_SIDE,
                               max_size=MAX_SIZE, size_divisibility=32)
    return list(loader)


def test_evaluate_model_maps_predictions_back_to_original_pixels(dataset, synthetic):
    batches = eval_batches(dataset)
    assert tuple(batches[0]["images"].shape[-2:]) == (192, 256) and batches[0]["image_sizes"][0] == (180, 240)
    model = OracleModel(batches, dataset.categories.num_classes)
    model.train()
    metrics = evaluate_model(model, batches, dataset.categories, synthetic.val_json, per_layer=True, device="cpu")
    assert model.training  # mode restored
    # Boxes come from the 2x-resized masks: almost exact. Masks pass through stride 4.
    assert metrics["bbox/AP50"] == pytest.approx(1.0) and metrics["bbox/AP"] > 0.85
    assert metrics["segm/AP50"] > 0.9 and metrics["segm/AP"] > 0.75
    for name in ("init", "dec0", "dec1"):
        assert metrics[f"layers/{name}/bbox/AP"] == metrics["bbox/AP"]
        assert metrics[f"layers/{name}/segm/AP"] == metrics["segm/AP"]
    assert "layers/interm/bbox/AP" not in metrics
    table = format_layer_table(metrics)
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["init", "dec0", "dec1"]
    assert format_metrics(metrics).splitlines()[1].split()[0] == "bbox"


def test_evaluate_model_counts_a_repeated_image_once(dataset, synthetic):
    batches = eval_batches(dataset, batch_size=1)
    model = OracleModel(batches, dataset.categories.num_classes)
    once = evaluate_model(model, batches, dataset.categories, synthetic.val_json, device="cpu")
    twice = evaluate_model(model, batches + batches[:2], dataset.categories, synthetic.val_json, device="cpu")
    assert twice == once


def tiny_model_and_config():
    cfg = apply_overrides(get_preset("demo"), TINY_MODEL)
    torch.manual_seed(0)
    return build_model(cfg), cfg


def test_evaluate_model_with_a_real_model_per_layer(dataset, synthetic):
    model, _ = tiny_model_and_config()
    batches = eval_batches(dataset)[:1]
    metrics = evaluate_model(model, batches, dataset.categories, synthetic.val_json, per_layer=True, top_k=20)
    for name in ("init", "dec0", "dec1"):
        for iou_type in ("bbox", "segm"):
            assert -1.0 <= metrics[f"layers/{name}/{iou_type}/AP"] <= 1.0
    assert metrics["layers/dec1/bbox/AP"] == metrics["bbox/AP"]
    assert model.training  # build_model returns a model in training mode; evaluation gives it back


@pytest.mark.gpu
def test_evaluate_model_on_cuda_with_bf16_autocast(dataset, synthetic):
    model, _ = tiny_model_and_config()
    model = model.cuda()
    batches = eval_batches(dataset)[:2]
    metrics = evaluate_model(model, batches, dataset.categories, synthetic.val_json, per_layer=True, top_k=20)
    assert set(metrics) >= {"bbox/AP", "segm/AP", "layers/init/bbox/AP", "layers/dec1/segm/AP"}
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# Distributed: each rank evaluates its shard, rank 0 gets the metrics
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectiveOracle(OracleModel):
    """An oracle whose forward is a collective, as a sharded (FSDP) model's is: ranks running
    different numbers of forward passes would fail (gloo timeout) instead of finishing."""

    def forward(self, images, targets=None, image_sizes=None, intermediate_masks=True):
        torch.distributed.all_reduce(torch.ones(1))
        return super().forward(images, targets, image_sizes, intermediate_masks)


def _distributed_worker(rank, world, port, val_json, batches_pickle, out_dir):
    import datetime
    import pickle

    torch.set_num_threads(1)  # two processes on a 2-core machine
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        with open(batches_pickle, "rb") as f:
            all_batches, category_map = pickle.load(f)
        model = CollectiveOracle(sum(all_batches, []), category_map.num_classes)
        metrics = evaluate_model(model, all_batches[rank], category_map, val_json, per_layer=True, device="cpu")
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(metrics, f)
    finally:
        torch.distributed.destroy_process_group()


def test_evaluate_model_distributed_gathers_to_rank_zero(dataset, synthetic, tmp_path):
    """Two ranks with uneven shards (rank 1 has one batch less): rank 0 gets the metrics of all
    the images evaluated, the other rank {}."""
    import pickle

    shards = [list(build_eval_loader(dataset, backend="torch", batch_size=2, short_side=SHORT_SIDE,
                                     max_size=MAX_SIZE, size_divisibility=32, shard_id=rank, num_shards=2))
              for rank in range(2)]
    shards[1] = shards[1][:1]
    oracle = OracleModel(shards[0] + shards[1], dataset.categories.num_classes)
    expected = evaluate_model(oracle, shards[0] + shards[1], dataset.categories, synthetic.val_json,
                              per_layer=True, device="cpu")
    batches_file = tmp_path / "batches.pkl"
    batches_file.write_bytes(pickle.dumps((shards, dataset.categories)))
    torch.multiprocessing.spawn(_distributed_worker, nprocs=2,
                                args=(2, _free_port(), synthetic.val_json, str(batches_file), str(tmp_path)))
    assert json.loads((tmp_path / "rank1.json").read_text()) == {}
    assert json.loads((tmp_path / "rank0.json").read_text()) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def write_checkpoint(directory, cfg, category_map) -> str:
    """A real checkpoint (dimaskdino.checkpoint) of a tiny model, as training writes it."""
    from dimaskdino.checkpoint import save_checkpoint
    from dimaskdino.config import config_to_dict

    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    meta = dict(config=config_to_dict(cfg), categories=category_map.state_dict())
    return str(save_checkpoint(directory, 1, model, optimizer, meta))


@pytest.fixture
def single_process_env(monkeypatch):
    """The CLI joins a process group (of one without torchrun); keep its variables to the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_cli_writes_metrics_and_tables(single_process_env, dataset, synthetic, tmp_path, capsys, loader):
    cfg = apply_overrides(get_preset("demo"), TINY_MODEL)
    write_checkpoint(tmp_path / "run" / "checkpoints", cfg, dataset.categories)
    output = tmp_path / "out" / "metrics.json"
    code = main(["--checkpoint", str(tmp_path / "run"), "--data", f"{synthetic.val_json}:{synthetic.val_images}",
                 "--per-layer", "--loader", loader, "--batch-size", "3", "--device", "cpu", "--top-k", "20",
                 "--output", str(output)])
    assert code == 0
    metrics = json.loads(output.read_text())
    assert "bbox/AP" in metrics and "segm/APl" in metrics and "layers/init/segm/AP" in metrics
    printed = capsys.readouterr().out
    assert "AP50" in printed and "box AP" in printed and "dec1" in printed


def test_cli_default_data_is_the_checkpoint_config_validation_set(single_process_env, dataset, synthetic, tmp_path,
                                                                   capsys):
    cfg = apply_overrides(get_preset("demo"), TINY_MODEL)
    without = write_checkpoint(tmp_path / "without", cfg, dataset.categories)
    with pytest.raises(ValueError, match="cfg.data.val_json"):
        main(["--checkpoint", without, "--loader", "torch", "--device", "cpu"])
    cfg = apply_overrides(cfg, [f"data.val_json={synthetic.val_json}", f"data.val_images={synthetic.val_images}"])
    with_val = write_checkpoint(tmp_path / "with", cfg, dataset.categories)
    assert main(["--checkpoint", with_val, "--loader", "torch", "--device", "cpu", "--top-k", "10"]) == 0
    assert f"{synthetic.val_json}: 6 images" in capsys.readouterr().out


def test_cli_rejects_a_dataset_with_other_classes(single_process_env, synthetic, tmp_path):
    cfg = apply_overrides(get_preset("demo"), TINY_MODEL)
    other = CategoryMap((1, 2, 3, 4, 5, 6), tuple("abcdef"))
    checkpoint = write_checkpoint(tmp_path / "ckpt", cfg, other)
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        main(["--checkpoint", checkpoint, "--data", f"{synthetic.val_json}:{synthetic.val_images}",
              "--loader", "torch", "--device", "cpu"])


def test_parse_data_argument():
    assert parse_data_argument("/a/b.json:/c/d") == ("/a/b.json", "/c/d")
    assert parse_data_argument("/a:x/b.json:/c:d") == ("/a:x/b.json", "/c:d")
    assert parse_data_argument("ann.txt:imgs") == ("ann.txt", "imgs")
    with pytest.raises(Exception, match="JSON:IMAGE_DIR"):
        parse_data_argument("only.json")
