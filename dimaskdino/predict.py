"""Images in, COCO-format predictions and overlay pictures out.

    python -m dimaskdino.predict --checkpoint OUT/ photo.jpg scans/ [--output DIR] [--score-threshold 0.3]

writes DIR/predictions.json (COCO result format: one entry per detection with "image_id" = the
image's position among the inputs (1-based), "file_name", "category_id" (the training json's id),
"category_name", "bbox" xywh, "score", "segmentation" RLE) and DIR/<name>_pred.png per image.
Only detections with score >= --score-threshold are written (0 keeps all top-k).

Images are decoded with Pillow (JPEG, PNG, grayscale, palette, EXIF orientation) and resized as
at evaluation (short side cfg.data.test_short_side, long side <= cfg.data.test_max_size, padded to
cfg.model.size_divisibility), by the same code as the PyTorch eval loader. A missing or corrupt
image is reported with its file name and skipped; the exit code is non-zero only when no image
could be predicted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from dimaskdino._optional import import_optional
from dimaskdino.config import TrainConfig

from dimaskdino.data.loader import decode_image, render_image
from dimaskdino.data.transforms import EVAL_PAD_VALUE, eval_geometry, pad_fill, padded_size
from dimaskdino.evaluate import (
    autocast_for,
    default_device,
    eval_mode,
    image_predictions_to_coco,
    load_checkpoint_for_inference,
    run_cli,
)
from dimaskdino.model.postprocess import decoder_output_names, postprocess
from dimaskdino.visualize import overlay

logger = logging.getLogger("dimaskdino.predict")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3); FileNotFoundError / ValueError naming the file when it is missing or
    cannot be decoded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        image = decode_image(path)
    except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, ...)
        raise ValueError(f"{path}: cannot decode image ({e})") from None
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{path}: unexpected decoded shape {image.shape}")
    return image


def prepare_image(image: np.ndarray, *, short_side: int, max_size: int, size_divisibility: int = 32):
    """Test-time input of one image: ((1, 3, H, W) float 0..255 padded to size_divisibility,
    (h, w) of the resized image inside it)."""
    geometry = eval_geometry(image.shape[0], image.shape[1], short_side, max_size)
    canvas = padded_size([geometry.valid_hw], size_divisibility)
    tensor = render_image(image, geometry, canvas, pad_fill(EVAL_PAD_VALUE))
    return tensor[None], tuple(geometry.valid_hw)


@torch.no_grad()
def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    short_side: int,
    max_size: int,
    size_divisibility: int = 32,
    device: torch.device | str = "cpu",
    top_k: int = 100,
) -> dict:
    """The final output's top_k predictions for one RGB uint8 image, at its size, on the CPU:
    {"boxes" (k, 4) xyxy pixels, "scores" (k,), "labels" (k,) contiguous, "masks" (k, H, W) bool}."""
    device = torch.device(device)
    images, valid_size = prepare_image(image, short_side=short_side, max_size=max_size,
                                       size_divisibility=size_divisibility)
    images = images.to(device)
    with eval_mode(model), autocast_for(device):
        outputs = model(images, image_sizes=[valid_size], intermediate_masks=False)
    final = decoder_output_names(outputs)[-1]
    (result,) = postprocess(outputs[final], [valid_size], [tuple(image.shape[:2])], top_k=top_k,
                            padded_size=tuple(images.shape[-2:]))
    return {k: v.cpu() for k, v in result.items()}


def predict_records(model, records, cfg, category_map, device, *, top_k: int = 100, log=None) -> list[tuple]:
    """[(image, prediction)] for dataset records (data.coco.ImageRecord), ready for
    visualize.save_overlay_grid: each prediction also carries "class_names" (the names its
    labels index, from `category_map`). Test-time size from cfg.data; an image that cannot be
    decoded is logged (`log`, default the module logger) and left out. With a sharded (FSDP)
    model every rank must call this: the forward is a collective."""
    log = log or logger.warning
    panels = []
    for record in records:
        try:
            image = load_image(record.path)
        except (OSError, ValueError) as e:
            log(f"error: {e}; skipped")
            continue
        prediction = predict_image(model, image, short_side=cfg.data.test_short_side, max_size=cfg.data.test_max_size,
                                   size_divisibility=cfg.model.size_divisibility, device=device, top_k=top_k)
        prediction["class_names"] = tuple(category_map.names)
        panels.append((image, prediction))
    return panels


def keep_above(result: dict, score_threshold: float) -> dict:
    keep = result["scores"] >= score_threshold
    return {k: v[keep] for k, v in result.items()}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Files as given (a missing one is reported later); a directory -> its image files, sorted."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(sorted(os.path.join(path, name) for name in os.listdir(path)
                                if name.lower().endswith(IMAGE_EXTENSIONS)))
        else:
            files.append(path)
    return files


def _overlay_name(path: str, taken: set[str]) -> str:
    """<stem>_pred.png, made unique when two inputs share a stem (a/1.jpg, b/1.png)."""
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    name, n = f"{stem}_pred.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_pred{n}.png"
    taken.add(name)
    return name


@dataclass
class PredictionRun:
    """What `predict_files` did: COCO results, the pictures written, the files that failed."""

    results: list[dict] = field(default_factory=list)
    overlays: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    num_predicted: int = 0


def predict_files(
    model: torch.nn.Module,
    paths: Sequence[str],
    category_map,
    output_dir: str,
    *,
    short_side: int,
    max_size: int,
    size_divisibility: int = 32,
    device: torch.device | str = "cpu",
    score_threshold: float = 0.3,
    top_k: int = 100,
    log=print,
) -> PredictionRun:
    """Predict every file; write predictions.json and one overlay PNG per image to output_dir.
    Files that cannot be read or decoded are logged and listed in `failures`."""
    os.makedirs(output_dir, exist_ok=True)
    run, taken = PredictionRun(), set()
    for image_id, path in enumerate(paths, start=1):
        try:
            image = load_image(path)
        except (OSError, ValueError) as e:
            run.failures.append((path, str(e)))
            log(f"error: {e}; skipped")
            continue
        result = keep_above(predict_image(model, image, short_side=short_side, max_size=max_size,
                                          size_divisibility=size_divisibility, device=device, top_k=top_k),
                            score_threshold)
        for entry in image_predictions_to_coco(result, image_id, category_map):
            entry["file_name"] = path
            entry["category_name"] = category_map.names[category_map.label(entry["category_id"])]
            run.results.append(entry)
        picture = overlay(image, result.get("masks"), result["boxes"], result["labels"], result["scores"],
                          category_map.names)
        overlay_path = os.path.join(output_dir, _overlay_name(path, taken))
        _save_png(picture, overlay_path)
        run.overlays.append(overlay_path)
        run.num_predicted += 1
        log(f"{path}: {len(result['scores'])} detections -> {overlay_path}")
    with open(os.path.join(output_dir, "predictions.json"), "w") as f:
        json.dump(run.results, f)
    return run


def _save_png(picture: np.ndarray, path: str) -> None:
    Image = import_optional("PIL.Image", "reading images")  # Pillow

    Image.fromarray(picture).save(path, format="PNG")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dimaskdino.predict",
                                     description="Predict boxes and masks for images with a checkpoint.")
    parser.add_argument("--checkpoint", default=TrainConfig.output_dir,
                        help="checkpoint directory, or a training output directory (its latest checkpoint); "
                             f"default: {TrainConfig.output_dir}, where `torchrun -m dimaskdino.train` writes")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--output", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="keep detections with at least this score (default 0.3; 0 keeps all top-k)")
    parser.add_argument("--top-k", type=int, default=100, help="detections per image before the threshold")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    paths = expand_inputs(args.images)
    if not paths:
        print("error: no image files among the inputs", file=sys.stderr)
        return 1
    model, cfg, category_map = load_checkpoint_for_inference(args.checkpoint, device)
    run = predict_files(
        model, paths, category_map, args.output,
        short_side=cfg.data.test_short_side, max_size=cfg.data.test_max_size,
        size_divisibility=cfg.model.size_divisibility, device=device,
        score_threshold=args.score_threshold, top_k=args.top_k,
        log=lambda message: print(message, file=sys.stderr if message.startswith("error") else sys.stdout),
    )
    skipped = f" ({len(run.failures)} skipped)" if run.failures else ""
    print(f"{run.num_predicted} of {len(paths)} images predicted{skipped}, {len(run.results)} detections -> "
          f"{os.path.join(args.output, 'predictions.json')}")
    return 0 if run.num_predicted > 0 else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
