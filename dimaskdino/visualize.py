"""Pictures of predictions: coloured masks, box outlines and labels over an image.

    picture = overlay(image, result["masks"], result["boxes"], result["labels"], result["scores"],
                      class_names, score_threshold=0.3)
    save_overlay_grid("predictions.png", [(image, result), ...], class_names=names)

Inputs are what `model.postprocess.postprocess` returns (torch tensors or numpy arrays): boxes xyxy
in pixels of `image`, masks (k, H, W) bool at the image's size, contiguous labels.
"""

from __future__ import annotations

import colorsys
import math
import os
from typing import Sequence

import numpy as np

from dimaskdino._optional import import_optional

MASK_ALPHA = 0.45
GRID_CELL = 384  # grid cells are at most this many pixels on their long side
GRID_GAP = 4


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def class_colour(label: int) -> tuple[int, int, int]:
    """A stable, well separated colour per class (golden-ratio hue steps)."""
    hue = (0.13 + 0.618034 * int(label)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _check_image(image) -> np.ndarray:
    image = _numpy(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay: image must be (H, W, 3) (or (H, W) gray), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"overlay: image must be uint8, got {image.dtype}")
    return image


def _blend_masks(image: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each mask tinted with its class colour; later masks are drawn over earlier ones."""
    out = image.astype(np.float32)
    for mask, label in zip(masks, labels):
        colour = np.asarray(class_colour(int(label)), dtype=np.float32)
        out[mask] = out[mask] * (1 - MASK_ALPHA) + colour * MASK_ALPHA
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _draw_boxes_and_labels(picture, boxes, labels, scores, class_names) -> None:
    ImageDraw = import_optional("PIL.ImageDraw", "drawing predictions")  # Pillow
    ImageFont = import_optional("PIL.ImageFont", "drawing predictions")

    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    width, height = picture.size
    for box, label, score in zip(boxes, labels, scores):
        colour = class_colour(int(label))
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=2)
        text = f"{_class_name(int(label), class_names)} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        # Above the box when there is room, else just inside it; kept within the image.
        tx = min(max(0.0, x0), max(0.0, width - text_w - 2))
        ty = y0 - text_h - 3 if y0 - text_h - 3 >= 0 else min(max(0.0, y0), max(0.0, height - text_h - 3))
        draw.rectangle([tx, ty, tx + text_w + 2, ty + text_h + 3], fill=colour)
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0), font=font)


def overlay(
    image,
    masks,
    boxes,
    labels,
    scores,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
) -> np.ndarray:
    """uint8 (H, W, 3) picture of the predictions with score >= score_threshold over `image`:
    semi-transparent class-coloured masks, box outlines and "name score" labels (Pillow's default
    font). masks may be None (boxes only)."""
    Image = import_optional("PIL.Image", "writing images")  # Pillow

    image = _check_image(image)
    boxes = _numpy(boxes).reshape(-1, 4)
    labels = _numpy(labels).reshape(-1).astype(np.int64)
    scores = _numpy(scores).reshape(-1).astype(np.float64)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"overlay: {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores")
    if masks is not None:
        masks = _numpy(masks).astype(bool)
        if masks.shape != (len(labels), *image.shape[:2]):
            raise ValueError(f"overlay: masks must be ({len(labels)}, {image.shape[0]}, {image.shape[1]}), "
                             f"got {masks.shape}")
    # Lowest score first, so the most confident predictions end up on top.
    order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold]
    picture = _blend_masks(image, masks[order], labels[order]) if masks is not None else image.copy()
    picture = Image.fromarray(picture)
    _draw_boxes_and_labels(picture, boxes[order], labels[order], scores[order], class_names)
    return np.asarray(picture)


def _fit(picture: np.ndarray, cell: int) -> np.ndarray:
    """Downscale so the long side is at most `cell` (never upscale)."""
    Image = import_optional("PIL.Image", "writing images")  # Pillow

    height, width = picture.shape[:2]
    scale = min(1.0, cell / max(height, width))
    if scale == 1.0:
        return picture
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))


def save_overlay_grid(
    path: str,
    images_and_predictions: Sequence[tuple],
    *,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    columns: int | None = None,
    cell_size: int = GRID_CELL,
) -> str:
    """Several images with their predictions, side by side in one PNG; returns the path.

    images_and_predictions: [(image uint8 (H, W, 3), {"boxes", "labels", "scores", "masks"?,
    "class_names"?}), ...] (predictions at the image's size, as postprocess returns them; a
    prediction's own "class_names" is used when `class_names` is not given, as
    predict.predict_records provides). Each picture is scaled to fit a cell_size square; columns
    default to a near-square grid.
    """
    Image = import_optional("PIL.Image", "writing images")  # Pillow

    if not images_and_predictions:
        raise ValueError("save_overlay_grid: no images")
    pictures = []
    for image, pred in images_and_predictions:
        names = class_names if class_names is not None else pred.get("class_names")
        picture = overlay(image, pred.get("masks"), pred["boxes"], pred["labels"], pred["scores"], names,
                          score_threshold)
        pictures.append(_fit(picture, cell_size))
    columns = columns or math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / columns)
    cell_h = max(p.shape[0] for p in pictures)
    cell_w = max(p.shape[1] for p in pictures)
    grid = np.full((rows * cell_h + (rows - 1) * GRID_GAP, columns * cell_w + (columns - 1) * GRID_GAP, 3),
                   255, dtype=np.uint8)
    for index, picture in enumerate(pictures):
        row, col = divmod(index, columns)
        y, x = row * (cell_h + GRID_GAP), col * (cell_w + GRID_GAP)
        grid[y : y + picture.shape[0], x : x + picture.shape[1]] = picture
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path
