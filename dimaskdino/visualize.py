"""Pictures of predictions: outlined masks, boxes, labels that do not cover each other, a legend.

    picture = display_picture(image, result, class_names)          # one image (predict)
    save_overlay_grid("predictions.png", [(image, result), ...])   # several (end of training)

Inputs are what `model.postprocess.postprocess` returns (torch tensors or numpy arrays): boxes xyxy
in pixels of `image`, masks (k, H, W) bool at the image's size, contiguous labels, scores.

What is drawn is a display choice, made here and never applied to evaluation or to
predictions.json: duplicates are hidden (`remove_duplicates`: class-aware mask NMS, plus one
object named by two classes), the score threshold is chosen from the scores themselves
(`choose_threshold`: a model trained briefly scores its true objects at 0.3-0.5, a long-trained one
at 0.8-0.95, so no fixed number suits both), at most `max_per_image` are kept, and a legend below
the picture says what it shows. Masks are a half-transparent class colour with a solid outline
in the class colour and a thin dark edge, so a mask stays visible on an object of its own colour.
"""

from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dimaskdino._optional import import_optional

MASK_ALPHA = 0.5
OUTLINE_WIDTH = 2
SAME_CLASS_IOU = 0.5  # a second detection of one class over the same object: hidden
ANY_CLASS_IOU = 0.8  # the same object named by two classes: only the higher score is drawn
SAME_CLASS_INSIDE = 0.8  # a part of an object detected again in its class: hidden
MAX_PER_IMAGE = 10
MIN_SCORE = 0.05  # never drawn below this, whatever the distribution says
GRID_CELL = 384  # grid pictures are scaled so that their long side is this many pixels
GRID_GAP = 4
LEGEND_BACKGROUND = (255, 255, 255)
DARK_EDGE = (0, 0, 0)


def _pil(module: str):
    return import_optional(f"PIL.{module}", "drawing predictions")  # Pillow


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


def _font(size: int):
    ImageFont = _pil("ImageFont")

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # Pillow's fixed bitmap font: smaller, still legible


def _font_size(width: int, height: int) -> int:
    return int(min(28, max(11, round(max(width, height) / 32))))


# ---------------------------------------------------------------------------------------------
# What to draw
# ---------------------------------------------------------------------------------------------


def pairwise_overlaps(masks: np.ndarray | None, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, n) IoU and intersection over the smaller area of the masks (of the boxes when masks
    is None)."""
    if masks is not None:
        flat = masks.reshape(len(masks), masks[0].size if len(masks) else 0).astype(np.float32)
        inter = flat @ flat.T
        area = flat.sum(1)
    else:
        boxes = boxes.astype(np.float64)
        lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
        rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
        area = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    union = area[:, None] + area[None, :] - inter
    smaller = np.minimum(area[:, None], area[None, :])
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    inside = np.where(smaller > 0, inter / np.maximum(smaller, 1e-12), 0.0)
    return iou, inside


def remove_duplicates(masks, boxes, labels, scores, same_class_iou: float = SAME_CLASS_IOU,
                      any_class_iou: float = ANY_CLASS_IOU, same_class_inside: float = SAME_CLASS_INSIDE) -> np.ndarray:
    """Indices to draw, highest score first: greedy mask NMS (box overlaps without masks) that
    hides a detection overlapping a kept one of its class by IoU > same_class_iou or lying within
    it (or it within the detection) by > same_class_inside of the smaller area (a partial
    detection of the same object), or overlapping a kept one of any class by IoU > any_class_iou.
    For pictures only: evaluation keeps every detection."""
    labels, scores = _numpy(labels).reshape(-1), _numpy(scores).reshape(-1)
    iou, inside = pairwise_overlaps(None if masks is None else _numpy(masks).astype(bool),
                                    _numpy(boxes).reshape(-1, 4))
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        duplicate = any(iou[i, j] > any_class_iou or (labels[j] == labels[i] and (
            iou[i, j] > same_class_iou or inside[i, j] > same_class_inside)) for j in kept)
        if not duplicate:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def choose_threshold(scores, floor: float = MIN_SCORE) -> float:
    """A display threshold from the scores themselves: Otsu's split of the scores >= floor into a
    low group (the unmatched queries' background scores) and a high one (the objects); the
    threshold is the lowest score of the high group. Returns floor when fewer than two scores are
    above it (everything above the floor is then drawn)."""
    values = np.sort(_numpy(scores).reshape(-1).astype(np.float64))
    values = values[values >= floor]
    if len(values) < 2 or values[0] == values[-1]:
        return float(floor)
    n = len(values)
    prefix = np.cumsum(values)
    k = np.arange(1, n)  # the low group is values[:k]
    low_mean, high_mean = prefix[k - 1] / k, (prefix[-1] - prefix[k - 1]) / (n - k)
    between = k * (n - k) * (high_mean - low_mean) ** 2  # between-group variance, times n^2
    between[values[k] == values[k - 1]] = -1  # a split must fall between different scores
    return float(values[int(np.argmax(between)) + 1])


@dataclass(frozen=True)
class DisplayChoice:
    """How the detections of a picture were chosen, for its legend."""

    threshold: float
    automatic: bool  # chosen from the scores (else given)
    max_per_image: int

    def describe(self) -> str:
        how = "chosen from the scores" if self.automatic else "given"
        return (f"shown: score >= {self.threshold:.2f} ({how}), top {self.max_per_image} per image; hidden as "
                f"duplicates: mask IoU > {SAME_CLASS_IOU:g} (or {SAME_CLASS_INSIDE:.0%} inside) with a higher score "
                f"of the same class, > {ANY_CLASS_IOU:g} of any class; label: class score")


def select_for_display(predictions: Sequence[dict], score_threshold: float | None = None,
                       max_per_image: int = MAX_PER_IMAGE) -> tuple[list[np.ndarray], DisplayChoice]:
    """For each prediction dict ({"boxes", "labels", "scores", "masks"?}), the indices to draw
    (highest score first), and the choice made: duplicates removed per image, then one threshold
    for all images (from all their remaining scores when score_threshold is None), then the top
    max_per_image of each."""
    kept = [remove_duplicates(p.get("masks"), p["boxes"], p["labels"], p["scores"]) for p in predictions]
    remaining = [_numpy(p["scores"]).reshape(-1)[k] for p, k in zip(predictions, kept)]
    automatic = score_threshold is None
    threshold = choose_threshold(np.concatenate(remaining) if remaining else []) if automatic else score_threshold
    chosen = [k[scores >= threshold][:max_per_image] for k, scores in zip(kept, remaining)]
    return chosen, DisplayChoice(float(threshold), automatic, max_per_image)


# ---------------------------------------------------------------------------------------------
# Label placement
# ---------------------------------------------------------------------------------------------


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes, label_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> list:
    """Top-left corners (x, y) for labels of size (w, h), one per box (xyxy), so that no two
    labels overlap and each lies inside the image (width, height); None where a label finds no
    room. Boxes come in priority order (highest score first): each label takes the first free
    spot among above / inside the top / below / inside the bottom of its box, left then right
    aligned, then slides down along the box's left edge and the image."""
    width, height = image_size
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for box, (w, h) in zip(_numpy(boxes).reshape(-1, 4), label_sizes):
        x0, y0, x1, y1 = (float(v) for v in box)
        if w > width or h > height:
            corners.append(None)
            continue
        candidates = [(x, y) for y in (y0 - h, y0, y1, y1 - h) for x in (x0, x1 - w)]
        candidates += [(x0, y) for y in np.arange(max(0.0, y0 - h), height - h + 1, max(1, h // 2))]
        candidates += [(x1 - w, y) for y in np.arange(0, height - h + 1, max(1, h // 2))]
        spot = None
        for x, y in candidates:
            x, y = min(max(0.0, x), width - w), min(max(0.0, y), height - h)
            rect = (x, y, x + w, y + h)
            if not any(_overlaps(rect, other) for other in placed):
                spot = (x, y)
                placed.append(rect)
                break
        corners.append(spot)
    return corners


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of `mask` within `width` pixels of its border (3x3 erosion, repeated)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _dilate(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _draw_masks(image: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Half-transparent class-colour fills (lowest score first), then every outline on top: a
    dark edge just outside the mask and a solid class-colour band inside it."""
    out = image.astype(np.float32)
    for mask, label in zip(masks, labels):
        colour = np.asarray(class_colour(int(label)), dtype=np.float32)
        out[mask] = out[mask] * (1 - MASK_ALPHA) + colour * MASK_ALPHA
    for mask, label in zip(masks, labels):
        out[_dilate(mask) & ~mask] = DARK_EDGE
        out[_edge(mask, OUTLINE_WIDTH)] = class_colour(int(label))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _text_size(draw, text: str, font) -> tuple[int, int, int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top, left, top


def overlay(image, masks, boxes, labels, scores, class_names: Sequence[str] | None = None,
            score_threshold: float = 0.0) -> np.ndarray:
    """uint8 (H, W, 3) picture of the given detections with score >= score_threshold over
    `image` (no duplicate filtering: `display_picture` chooses what to draw): outlined
    class-colour masks, box outlines and "name score" labels placed so they do not overlap
    (a label with no room is left out). masks may be None (boxes only)."""
    Image, ImageDraw = _pil("Image"), _pil("ImageDraw")

    image = _check_image(image)
    boxes = _numpy(boxes).reshape(-1, 4).astype(np.float64)
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
    order = np.asarray([i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold], dtype=np.int64)
    picture = _draw_masks(image, masks[order], labels[order]) if masks is not None else image.copy()
    picture = Image.fromarray(picture)
    draw = ImageDraw.Draw(picture)
    for i in order:
        x0, y0, x1, y1 = boxes[i]
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=class_colour(int(labels[i])), width=1)
    font = _font(_font_size(*picture.size))
    by_priority = order[::-1]  # labels: highest score first
    texts = [f"{_class_name(int(labels[i]), class_names)} {scores[i]:.2f}" for i in by_priority]
    sizes = [_text_size(draw, text, font) for text in texts]
    corners = place_labels(boxes[by_priority], [(w + 4, h + 4) for w, h, _, _ in sizes], picture.size)
    for i, text, (w, h, left, top), corner in zip(by_priority, texts, sizes, corners):
        if corner is None:
            continue
        x, y = corner
        draw.rectangle([x, y, x + w + 3, y + h + 3], fill=class_colour(int(labels[i])), outline=DARK_EDGE)
        draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def with_legend(picture: np.ndarray, labels: Sequence[int], class_names: Sequence[str] | None,
                choice: DisplayChoice) -> np.ndarray:
    """`picture` with a strip below it: a colour swatch and name for each class drawn, and the
    rule that chose the detections (`DisplayChoice.describe`), wrapped to the picture's width."""
    Image, ImageDraw = _pil("Image"), _pil("ImageDraw")

    width = picture.shape[1]
    font = _font(_font_size(width, 0) if width < 640 else 14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", font)[1] + 6
    items = [(class_colour(label), _class_name(label, class_names)) for label in sorted(set(int(l) for l in labels))]
    if not items:
        items = [(None, "nothing above the threshold")]
    # Lay out swatch + name items and the words of the description, each wrapped to the width.
    placements, x, y = [], 4, 4
    for colour, name in items:
        item_w = line_h + 4 + _text_size(probe, name, font)[0] + 12
        if x + item_w > width and x > 4:
            x, y = 4, y + line_h
        placements.append((x, y, colour, name))
        x += item_w
    x, y = 4, y + line_h
    for word in choice.describe().split(" "):
        word_w = _text_size(probe, word + " ", font)[0]
        if x + word_w > width and x > 4:
            x, y = 4, y + line_h
        placements.append((x, y, "text", word))
        x += word_w
    strip = Image.new("RGB", (width, y + line_h + 4), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for x, y, colour, text in placements:
        if colour == "text":
            draw.text((x, y), text, fill=(0, 0, 0), font=font)
            continue
        if colour is not None:
            draw.rectangle([x, y + 1, x + line_h - 4, y + line_h - 4], fill=colour, outline=DARK_EDGE)
            x += line_h + 2
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return np.concatenate([picture, np.asarray(strip)], axis=0)


def _subset(prediction: dict, keep: np.ndarray) -> dict:
    return {k: _numpy(prediction[k])[keep] for k in ("boxes", "labels", "scores", "masks") if prediction.get(k) is not None}


def _draw_chosen(image, prediction: dict, keep: np.ndarray, class_names) -> np.ndarray:
    chosen = _subset(prediction, keep)
    return overlay(image, chosen.get("masks"), chosen["boxes"], chosen["labels"], chosen["scores"], class_names)


def display_picture(image, prediction: dict, class_names: Sequence[str] | None = None,
                    score_threshold: float | None = None, max_per_image: int = MAX_PER_IMAGE) -> np.ndarray:
    """One image with its predictions as `select_for_display` chooses them, and a legend below;
    the picture's width is the image's, its height the image's plus the legend's."""
    (keep,), choice = select_for_display([prediction], score_threshold, max_per_image)
    picture = _draw_chosen(image, prediction, keep, class_names)
    return with_legend(picture, _numpy(prediction["labels"]).reshape(-1)[keep], class_names, choice)


def _scaled(image: np.ndarray, prediction: dict, cell: int) -> tuple[np.ndarray, dict]:
    """The image and its predictions resized so the long side is `cell` pixels (labels are then
    drawn at a size that suits the cell, whatever the image's resolution)."""
    Image = _pil("Image")

    height, width = image.shape[:2]
    scale = cell / max(height, width)
    if scale == 1.0:
        return image, prediction
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    scaled = dict(prediction, boxes=_numpy(prediction["boxes"]).reshape(-1, 4) * scale)
    if prediction.get("masks") is not None:
        masks = _numpy(prediction["masks"]).astype(np.uint8)
        scaled["masks"] = np.zeros((len(masks), size[1], size[0]), dtype=bool)
        for i, mask in enumerate(masks):
            scaled["masks"][i] = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)) > 0
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), scaled


def save_overlay_grid(
    path: str,
    images_and_predictions: Sequence[tuple],
    *,
    class_names: Sequence[str] | None = None,
    score_threshold: float | None = None,
    max_per_image: int = MAX_PER_IMAGE,
    columns: int | None = None,
    cell_size: int = GRID_CELL,
) -> str:
    """Several images with their predictions in one PNG with one legend; returns the path.

    images_and_predictions: [(image uint8 (H, W, 3), {"boxes", "labels", "scores", "masks"?,
    "class_names"?}), ...] (predictions at the image's size, as postprocess returns them; a
    prediction's own "class_names" is used when `class_names` is not given, as
    predict.predict_records provides). What is drawn: `select_for_display` over all images (one
    threshold, chosen from their scores unless score_threshold is given). Each picture is scaled
    so its long side is cell_size; columns default to a near-square grid.
    """
    Image = import_optional("PIL.Image", "writing images")  # Pillow

    if not images_and_predictions:
        raise ValueError("save_overlay_grid: no images")
    names = class_names if class_names is not None else images_and_predictions[0][1].get("class_names")
    predictions = [prediction for _, prediction in images_and_predictions]
    chosen, choice = select_for_display(predictions, score_threshold, max_per_image)
    pictures, drawn_labels = [], []
    for (image, prediction), keep in zip(images_and_predictions, chosen):
        image, prediction = _scaled(_check_image(image), _subset(prediction, keep), cell_size)
        pictures.append(_draw_chosen(image, prediction, np.arange(len(keep)), names))
        drawn_labels.extend(_numpy(prediction["labels"]).tolist())
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
    grid = with_legend(grid, drawn_labels, names, choice)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path
