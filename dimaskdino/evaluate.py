"""COCO box and mask AP (pycocotools), and the per-decoder-layer imbalance diagnostic (SPEC 7).

    python -m dimaskdino.evaluate --checkpoint OUT/ [--data instances_val.json:val/] [--per-layer]

    metrics = evaluate_model(model, loader, category_map, gt_json_path, per_layer=True)
    metrics["bbox/AP"], metrics["segm/AP"], metrics["layers/dec0/bbox/AP"], ...

Metric values are FRACTIONS in [0, 1], exactly pycocotools' `COCOeval.stats` (not percentages,
as Detectron2 reports them); the printed tables show percentages. -1 means "undefined", as in
pycocotools: no ground truth in that area range (e.g. `bbox/APs` on a set without small objects).
Keys: `{bbox,segm}/{AP,AP50,AP75,APs,APm,APl,AR1,AR10,AR100,ARs,ARm,ARl}`, plus with per_layer
`layers/<output>/{bbox,segm}/AP` for every decoder output ("init", "dec0", ..., final last).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from dimaskdino._optional import LazyModule
from dimaskdino.config import TrainConfig

from dimaskdino.model.postprocess import decoder_output_names, postprocess

logger = logging.getLogger("dimaskdino.evaluate")

# pycocotools (extra "eval" / "data"): imported when an evaluation runs, not when this module is.
mask_utils = LazyModule("pycocotools.mask", "COCO evaluation")
coco_api = LazyModule("pycocotools.coco", "COCO evaluation")
cocoeval_api = LazyModule("pycocotools.cocoeval", "COCO evaluation")

IOU_TYPES = ("bbox", "segm")
# Names of COCOeval.stats in its order (maxDets 100 unless said otherwise).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


def _gt_error(path: str, where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message} in {path}")


def _check_and_complete_gt(data: Any, path: str) -> None:
    """The fields COCOeval reads, checked with messages naming the field (pycocotools fails with a
    bare KeyError). Missing `iscrowd` is taken as 0; missing `segmentation` as the box (as
    `data.coco` does for training); missing `area` is filled in after indexing."""
    if not isinstance(data, dict):
        raise _gt_error(path, "(top level)", f"expected an object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _gt_error(path, key, "missing" if key not in data else "expected a list")
    for i, image in enumerate(data["images"]):
        for key in ("id", "height", "width"):
            if not isinstance(image, dict) or key not in image:
                raise _gt_error(path, f"images[{i}].{key}", "missing")
    for i, ann in enumerate(data["annotations"]):
        for key in ("image_id", "category_id", "bbox"):
            if not isinstance(ann, dict) or key not in ann:
                raise _gt_error(path, f"annotations[{i}].{key}", "missing")
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise _gt_error(path, f"annotations[{i}].bbox", f"expected 4 numbers (x, y, w, h), got {bbox!r}")
        ann.setdefault("iscrowd", 0)
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            # pycocotools cannot rasterize a part with < 3 points (it takes 4 numbers for a box);
            # training drops such polygons (data.coco), evaluation keeps the instance as its box.
            ann["segmentation"] = [part for part in segmentation if isinstance(part, list) and len(part) >= 6]
        if not ann.get("segmentation"):
            x, y, w, h = bbox
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        ann.setdefault("id", i + 1)


def load_ground_truth(gt_json_path) -> "COCO":
    """A pycocotools COCO of the json (quietly), checked and completed for COCOeval. A COCO
    object is returned as it is (load once, evaluate many times: per-layer evaluation)."""
    if isinstance(gt_json_path, coco_api.COCO):
        return gt_json_path
    path = os.fspath(gt_json_path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"ground-truth json not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"ground-truth json is not valid json ({e}): {path}") from None
    _check_and_complete_gt(data, path)
    gt = coco_api.COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    for ann in gt.dataset["annotations"]:
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(gt.annToRLE(ann)))
    return gt


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _check_predictions(predictions: Sequence[dict], gt: "COCO", iou_types: Sequence[str]) -> None:
    """Clear errors for results pycocotools would reject with a bare assertion (or mis-score)."""
    required = {"image_id", "category_id", "score"}
    if "bbox" in iou_types:
        required.add("bbox")
    if "segm" in iou_types:
        required.add("segmentation")
    for i, p in enumerate(predictions):
        missing = sorted(required - set(p))
        if missing:
            raise ValueError(f"predictions[{i}]: missing {', '.join(missing)} (needed for {'/'.join(iou_types)} AP)")
    image_ids = {p["image_id"] for p in predictions}
    unknown = sorted(image_ids - set(gt.getImgIds()))
    if unknown:
        raise ValueError(f"predictions name {len(unknown)} image ids absent from the ground truth, e.g. {unknown[:5]}")
    category_ids = {p["category_id"] for p in predictions}
    unknown = sorted(category_ids - set(gt.getCatIds()))
    if unknown:
        raise ValueError(
            f"predictions name category ids absent from the ground truth: {unknown[:10]} "
            "(labels must be mapped back to the json's category ids: predictions_to_coco)"
        )


def _empty_results(gt: "COCO") -> "COCO":
    """A result set without detections (pycocotools' loadRes cannot take an empty list)."""
    res = coco_api.COCO()
    res.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                   "annotations": []}
    res.createIndex()
    return res


def _results_for(predictions: Sequence[dict], iou_type: str) -> list[dict]:
    """Copies (loadRes writes into them) with the fields pycocotools should see. For segm the
    box is dropped, so that the area ranges (small/medium/large) use the mask area, not the box's
    (loadRes takes the box area whenever a box is present; Detectron2 does the same)."""
    if iou_type == "segm":
        return [{k: v for k, v in p.items() if k != "bbox"} for p in predictions]
    return [dict(p) for p in predictions]


def _run_cocoeval(gt: "COCO", predictions: Sequence[dict], iou_type: str, image_ids) -> tuple[np.ndarray, str]:
    """COCOeval stats (12,) and pycocotools' summary table, its printing captured."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        dt = gt.loadRes(_results_for(predictions, iou_type)) if predictions else _empty_results(gt)
        evaluator = cocoeval_api.COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary = "\n".join(line for line in captured.getvalue().splitlines() if line.lstrip().startswith("Average"))
    return np.asarray(evaluator.stats, dtype=np.float64), summary


def coco_metrics(
    gt_json_path,
    predictions: Sequence[dict],
    *,
    iou_types: Sequence[str] = IOU_TYPES,
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """COCO AP/AR of results against a ground-truth json: {"bbox/AP": 0.41, ..., "segm/ARl": ...}.

    gt_json_path: the json path, or a COCO from `load_ground_truth` (to load it once).
    predictions: COCO result format, [{"image_id", "category_id", "bbox" xywh, "score",
    "segmentation" RLE}] with the json's category ids. Empty predictions give 0 (or -1 where
    undefined), not an error. image_ids: evaluate only these images (default: every image of the
    json). Values are fractions (pycocotools' stats); verbose prints pycocotools' tables.
    """
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_types: expected a subset of {IOU_TYPES}, got {iou_type!r}")
    gt = load_ground_truth(gt_json_path)
    predictions = list(predictions)
    _check_predictions(predictions, gt, iou_types)
    if image_ids is not None:
        image_ids = set(image_ids)
        if not image_ids:
            raise ValueError("image_ids is empty: no image to evaluate")
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        stats, summary = _run_cocoeval(gt, predictions, iou_type, image_ids)
        if verbose:
            print(f"COCO {iou_type} ({len(predictions)} detections):\n{summary}")
        metrics.update({f"{iou_type}/{name}": float(v) for name, v in zip(STAT_NAMES, stats)})
    return metrics


# ---------------------------------------------------------------------------------------------
# Predictions -> COCO results
# ---------------------------------------------------------------------------------------------


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def encode_masks(masks) -> list[dict]:
    """Bool masks (k, H, W) -> compressed RLEs with `counts` as str (json-ready)."""
    masks = _numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (k, H, W), got shape {masks.shape}")
    if len(masks) == 0:
        return []
    # pycocotools wants (H, W, k) Fortran-ordered uint8.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def image_predictions_to_coco(result: dict, image_id: int, category_map) -> list[dict]:
    """One image's postprocess output -> COCO results (see `predictions_to_coco`)."""
    boxes = _numpy(result["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(result["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(result["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"image {image_id}: boxes, scores and labels differ in length ({len(boxes)}, {len(scores)}, {len(labels)})"
        )
    bad = labels[(labels < 0) | (labels >= category_map.num_classes)]
    if len(bad):
        raise ValueError(f"image {image_id}: label {int(bad[0])} outside 0..{category_map.num_classes - 1} "
                         f"(the category map has {category_map.num_classes} classes)")
    category_ids = category_map.labels_to_coco_ids(labels)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    rles = encode_masks(result["masks"]) if result.get("masks") is not None else None
    if rles is not None and len(rles) != len(labels):
        raise ValueError(f"image {image_id}: {len(rles)} masks for {len(labels)} labels")
    out = []
    for i in range(len(labels)):
        entry = {
            "image_id": int(image_id),
            "category_id": int(category_ids[i]),
            "bbox": [float(v) for v in xywh[i]],
            "score": float(scores[i]),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        out.append(entry)
    return out


def predictions_to_coco(results: Sequence[dict], image_ids: Sequence[int], category_map) -> list[dict]:
    """Per-image `postprocess` outputs ({"boxes" (k, 4) xyxy original pixels, "scores" (k,),
    "labels" (k,) contiguous, "masks" (k, Ho, Wo) bool, optional}) -> COCO results with the
    original category ids (`category_map`: a data.CategoryMap) and RLE masks."""
    if len(results) != len(image_ids):
        raise ValueError(f"predictions_to_coco: {len(results)} results for {len(image_ids)} image ids")
    out = []
    for result, image_id in zip(results, image_ids):
        out.extend(image_predictions_to_coco(result, image_id, category_map))
    return out


# ---------------------------------------------------------------------------------------------
# Model evaluation
# ---------------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """model.eval() inside, its previous train/eval mode back afterwards (training evaluates
    mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (as training runs), plain fp32 elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _forward(model, batch: dict, device: torch.device, per_layer: bool) -> dict:
    """The model's outputs for one loader batch (intermediate masks only when per_layer)."""
    images = batch["images"].to(device, non_blocking=True)
    image_sizes = [tuple(int(v) for v in s) for s in batch["image_sizes"]]
    with torch.no_grad(), autocast_for(device):
        return model(images, image_sizes=image_sizes, intermediate_masks=per_layer)


def _postprocess_batch(outputs: dict, batch: dict, per_layer: bool, top_k: int) -> dict[str, list[dict]]:
    """{output name: per-image results on the CPU at the original size}: every decoder output
    with per_layer, else the final one only."""
    names = decoder_output_names(outputs)
    if not names:
        raise RuntimeError("evaluate: the model returned no decoder output ('init', 'dec0', ...)")
    targets = batch["targets"]
    # The valid region of an eval image is its resized size; the loader records both.
    valid_sizes = [tuple(t.get("resized_size", s)) for t, s in zip(targets, batch["image_sizes"])]
    original_sizes = [tuple(t["orig_size"]) for t in targets]
    padded_size = tuple(batch["images"].shape[-2:])
    results = {}
    for name in names if per_layer else names[-1:]:
        per_image = postprocess(outputs[name], valid_sizes, original_sizes, top_k=top_k, padded_size=padded_size)
        results[name] = [{k: v.cpu() for k, v in r.items()} for r in per_image]
    return results


def _dummy_batch(size: int = 64) -> dict:
    return {"images": torch.zeros(1, 3, size, size), "image_sizes": [(size, size)],
            "targets": [{"image_id": -1, "orig_size": (size, size), "resized_size": (size, size)}]}


def _batches_in_lockstep(loader: Iterable[dict], device: torch.device):
    """(batch, real) pairs. Under torch.distributed every rank runs as many forward passes as
    the rank with the most batches (shards differ by up to one image, and batch counts with
    them): a rank whose shard is done repeats a batch whose results are dropped, because the
    forward of a sharded (FSDP) model is a collective that every rank must enter."""
    rank, world = _distributed()
    if world == 1:
        for batch in loader:
            yield batch, True
        return
    flag_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    iterator, last = iter(loader), None
    while True:
        batch = next(iterator, None)
        more = torch.tensor([int(batch is not None)], dtype=torch.int32, device=flag_device)
        torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MAX)
        if not int(more.item()):
            return
        if batch is not None:
            last = batch
            yield batch, True
        else:
            yield (last if last is not None else _dummy_batch()), False


def _collect(model, loader, category_map, device, per_layer: bool, top_k: int) -> tuple[dict, list[int]]:
    """This rank's COCO results per output name, and the image ids it evaluated. Results are
    encoded batch by batch: full-size bool masks of a whole dataset would not fit in memory."""
    predictions: dict[str, list[dict]] = {}
    seen: list[int] = []
    seen_set: set[int] = set()
    for batch, real in _batches_in_lockstep(loader, device):
        outputs = _forward(model, batch, device, per_layer)
        if not real:
            continue
        per_output = _postprocess_batch(outputs, batch, per_layer, top_k)
        # A loader replaces an undecodable image by another one: never count an image twice.
        fresh = []
        for index, target in enumerate(batch["targets"]):
            image_id = int(target["image_id"])
            if image_id not in seen_set:
                seen_set.add(image_id)
                seen.append(image_id)
                fresh.append((index, image_id))
        for name, per_image in per_output.items():
            bucket = predictions.setdefault(name, [])
            for index, image_id in fresh:
                bucket.extend(image_predictions_to_coco(per_image[index], image_id, category_map))
    return predictions, seen


def _gather_to_rank0(part):
    """[part of every rank] on rank 0, None on the others; [part] without torch.distributed."""
    rank, world = _distributed()
    if world == 1:
        return [part]
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(part, gathered, dst=0)
    return gathered


def _merge(parts) -> tuple[dict[str, list[dict]], list[int]]:
    """Concatenate the ranks' results; an image evaluated by two ranks counts once."""
    predictions: dict[str, list[dict]] = {}
    image_ids: list[int] = []
    seen: set[int] = set()
    for rank_predictions, rank_ids in parts:
        new = {i for i in rank_ids if i not in seen}
        seen |= new
        image_ids.extend(i for i in rank_ids if i in new)
        for name, results in rank_predictions.items():
            predictions.setdefault(name, []).extend(r for r in results if r["image_id"] in new)
    return predictions, image_ids


def metrics_from_predictions(
    gt_json_path, predictions: dict[str, list[dict]], image_ids: Sequence[int], *,
    per_layer: bool = False, verbose: bool = False,
) -> dict[str, float]:
    """Metrics of the final output (the last decoder output name) and, with per_layer, the box
    and mask AP of every output. predictions: {output name: COCO results}; image_ids: the images
    that were evaluated (AP is computed over these only)."""
    if not image_ids:
        raise ValueError("evaluate: no image was evaluated (empty loader or dataset)")
    gt = load_ground_truth(gt_json_path)
    num_gt_images = len(gt.getImgIds())
    if len(set(image_ids)) < num_gt_images:
        logger.warning("evaluate: %d of the %d images of the ground truth were evaluated; AP is over those only",
                       len(set(image_ids)), num_gt_images)
    names = decoder_output_names(dict.fromkeys(predictions))
    if not names:
        raise ValueError(f"evaluate: no decoder output among the predictions ({', '.join(predictions)})")
    final = names[-1]
    metrics = coco_metrics(gt, predictions[final], image_ids=image_ids, verbose=verbose)
    if per_layer:
        for name in names:
            layer = metrics if name == final else coco_metrics(gt, predictions[name], image_ids=image_ids)
            for iou_type in IOU_TYPES:
                metrics[f"layers/{name}/{iou_type}/AP"] = layer[f"{iou_type}/AP"]
    return metrics


def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable[dict],
    category_map,
    gt_json_path,
    *,
    per_layer: bool = False,
    device: torch.device | str | None = None,
    top_k: int = 100,
    verbose: bool = False,
) -> dict[str, float]:
    """COCO box and mask metrics of `model` on the images of `loader` (see the module docstring).

    loader: eval batches {"images", "image_sizes", "targets" with "image_id", "orig_size",
    "resized_size"} (data.build_eval_loader). The model runs in eval mode under no_grad (bf16
    autocast on CUDA) and gets its train/eval mode back afterwards. device: where the images go
    (default: the model's). per_layer: also `layers/<output>/{bbox,segm}/AP` of every decoder
    output (SPEC 7: the detection-segmentation imbalance per layer).

    Under torch.distributed every rank calls this with its shard of the data (a loader built with
    shard_id=rank, num_shards=world); ranks run the same number of forward passes (FSDP), the
    results are gathered to rank 0 (gather_object: with NCCL the current CUDA device must be
    set), which returns the metrics; the other ranks return {}.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    with eval_mode(model):
        part = _collect(model, loader, category_map, device, per_layer, top_k)
    parts = _gather_to_rank0(part)
    if parts is None:
        return {}
    predictions, image_ids = _merge(parts)
    return metrics_from_predictions(gt_json_path, predictions, image_ids, per_layer=per_layer, verbose=verbose)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    if value is None or value < 0 or not math.isfinite(value):
        return "-"  # undefined (pycocotools' -1) or absent
    return f"{100 * value:.1f}"


def format_metrics(metrics: dict[str, float]) -> str:
    """AP table in percent: rows bbox / segm, columns AP AP50 AP75 APs APm APl."""
    columns = STAT_NAMES[:6]
    lines = [f"{'':6}" + "".join(f"{c:>7}" for c in columns)]
    for iou_type in IOU_TYPES:
        if f"{iou_type}/AP" in metrics:
            lines.append(f"{iou_type:6}" + "".join(f"{_percent(metrics.get(f'{iou_type}/{c}')):>7}" for c in columns))
    return "\n".join(lines)


def format_layer_table(metrics: dict[str, float]) -> str:
    """Per-layer table in percent: rows = decoder outputs, columns box AP, mask AP, gap (box -
    mask; the paper's imbalance: negative when detection lags segmentation)."""
    names = decoder_output_names({key.split("/")[1]: None for key in metrics if key.startswith("layers/")})
    lines = [f"{'output':8}{'box AP':>8}{'mask AP':>9}{'gap':>7}"]
    for name in names:
        box, mask = metrics.get(f"layers/{name}/bbox/AP"), metrics.get(f"layers/{name}/segm/AP")
        gap = box - mask if box is not None and mask is not None and box >= 0 and mask >= 0 else None
        gap_text = "-" if gap is None else f"{100 * gap:+.1f}"
        lines.append(f"{name:8}{_percent(box):>8}{_percent(mask):>9}{gap_text:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def load_checkpoint_for_inference(path: str, device: torch.device):
    """(model, cfg, category_map) from `dimaskdino.checkpoint.load_for_inference`: a checkpoint
    directory, or a training output directory (its latest checkpoint)."""
    from dimaskdino.checkpoint import load_for_inference

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with warnings.catch_warnings():
        # DCP says it loads in a single process: that is the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        return load_for_inference(path, device)


def parse_data_argument(text: str) -> tuple[str, str]:
    """JSON:IMAGE_DIR -> (json path, image dir); split after '.json' when present, so that
    either path may contain a colon."""
    marker = text.lower().find(".json:")
    if marker >= 0:
        json_path, image_dir = text[: marker + 5], text[marker + 6 :]
    else:
        json_path, _, image_dir = text.partition(":")
    if not json_path or not image_dir:
        raise argparse.ArgumentTypeError(f"--data expects JSON:IMAGE_DIR, got {text!r}")
    return json_path, image_dir


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _validation_set(args, cfg) -> tuple[str, str]:
    if args.data is not None:
        return args.data
    data_cfg = getattr(cfg, "data", None)
    json_path, image_dir = getattr(data_cfg, "val_json", ""), getattr(data_cfg, "val_images", "")
    if not json_path or not image_dir:
        raise ValueError("no --data JSON:IMAGE_DIR given and the checkpoint's config names no validation set "
                         "(cfg.data.val_json / cfg.data.val_images)")
    return json_path, image_dir


def _check_categories(checkpoint_map, dataset_map, json_path: str) -> None:
    if tuple(checkpoint_map.coco_ids) != tuple(dataset_map.coco_ids):
        raise ValueError(
            f"{json_path}: categories {list(dataset_map.coco_ids)} differ from the checkpoint's "
            f"{list(checkpoint_map.coco_ids)}: the model was trained on other classes"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dimaskdino.evaluate",
                                     description="COCO box and mask AP of a checkpoint.")
    parser.add_argument("--checkpoint", default=TrainConfig.output_dir,
                        help="checkpoint directory, or a training output directory (its latest checkpoint); "
                             f"default: {TrainConfig.output_dir}, where `torchrun -m dimaskdino.train` writes")
    parser.add_argument("--data", type=parse_data_argument, default=None, metavar="JSON:IMAGE_DIR",
                        help="COCO json and image folder (default: the validation set of the checkpoint's config)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also box and mask AP of every decoder output (the imbalance diagnostic)")
    parser.add_argument("--loader", choices=["dali", "torch"], default="dali")
    parser.add_argument("--batch-size", type=int, default=1, help="images per batch per process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--top-k", type=int, default=100, help="detections per image")
    parser.add_argument("--output", default=None, help="write the metrics to this json file")
    parser.add_argument("--verbose", action="store_true", help="print pycocotools' tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    from dimaskdino import dist
    from dimaskdino.data import build_eval_loader, load_coco

    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Under torchrun each process evaluates its shard; without it, a group of one.
    info = dist.init_distributed(args.device or default_device())
    device, rank, world = info.device, info.rank, info.world_size
    try:
        model, cfg, category_map = load_checkpoint_for_inference(args.checkpoint, device)
        json_path, image_dir = _validation_set(args, cfg)
        dataset = load_coco(json_path, image_dir, for_training=False)
        _check_categories(category_map, dataset.categories, json_path)
        loader = build_eval_loader(
            dataset, backend=args.loader, batch_size=args.batch_size,
            short_side=cfg.data.test_short_side, max_size=cfg.data.test_max_size,
            size_divisibility=cfg.model.size_divisibility, shard_id=rank, num_shards=world,
            device_id=device.index if device.type == "cuda" else None,
        )
        metrics = evaluate_model(model, loader, category_map, json_path, per_layer=args.per_layer,
                                 device=device, top_k=args.top_k, verbose=args.verbose and rank == 0)
    finally:
        dist.cleanup()
    if rank != 0:
        return 0
    print(f"{json_path}: {len(dataset)} images; {dataset.problems.summary()}")
    print(f"COCO AP (%), {args.checkpoint}:\n{format_metrics(metrics)}")
    if args.per_layer:
        print(f"AP per decoder output (%), gap = box AP - mask AP:\n{format_layer_table(metrics)}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"wrote {args.output}")
    return 0


def run_cli(main_fn) -> int:
    """Runs a CLI main: bad input (missing files, malformed json, a mismatched checkpoint) is one
    `error:` line and exit code 2, not a traceback."""
    try:
        return main_fn()
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli(main))
