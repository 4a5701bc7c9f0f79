"""Embedded dataset: COCO-format train/val splits of rendered shapes (the demo's default data).

    python -m dimaskdino.data.synthetic OUT [--seed S] [--train N] [--val M] [--size HxW]

writes OUT/annotations/instances_{train,val}.json and OUT/{train,val}/NNNNNN.jpg.

Six classes (circle, square, triangle, star, ellipse, ring) drawn over textured backgrounds
(smooth noise, stripes, gradients, checkers), sizes from small to large, with overlaps: each
annotation is what stays visible after the shapes drawn later, as a polygon when the shape is
whole (and simple) or as RLE of the visible pixels otherwise; a shape that ends up hidden or tiny
is not annotated. Colours depend on the class but loosely (hue bands that overlap), so the shape
matters. Category ids are deliberately not contiguous (1, 2, 4, 5, 7, 9): the demo then exercises
the id <-> label mapping end to end.

Deterministic: image i of a split depends only on (seed, split, i); the same seed gives
byte-identical json (and, with the same Pillow, identical JPEG bytes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np

from dimaskdino._optional import LazyModule, import_optional
from dimaskdino.data.rasterize import masks_to_boxes, rasterize_polygons

mask_utils = LazyModule("pycocotools.mask", "the synthetic dataset (RLE masks)")  # extra "data"

CATEGORIES = [
    {"id": 1, "name": "circle"},
    {"id": 2, "name": "square"},
    {"id": 4, "name": "triangle"},
    {"id": 5, "name": "star"},
    {"id": 7, "name": "ellipse"},
    {"id": 9, "name": "ring"},
]
_SPLIT_CODE = {"train": 1, "val": 2}
MIN_VISIBLE_PIXELS = 24  # smaller visible remains are not annotated
MIN_VISIBLE_FRACTION = 0.08  # nor are shapes with less than this fraction left visible


@dataclass(frozen=True)
class SyntheticPaths:
    root: str
    train_json: str
    train_images: str
    val_json: str
    val_images: str

    @classmethod
    def under(cls, root: str) -> "SyntheticPaths":
        """Where `make_synthetic_coco(root)` puts each file."""
        root = os.fspath(root)
        return cls(root, annotation_path(root, "train"), os.path.join(root, "train"),
                   annotation_path(root, "val"), os.path.join(root, "val"))


def annotation_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


# ---------------------------------------------------------------------------------------------
# Shapes: polygon parts (K, 2) of (x, y); a ring has a hole (second part subtracted)
# ---------------------------------------------------------------------------------------------


def _regular(n: int, radius_x: float, radius_y: float, angle: float, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    pts = np.stack([radius_x * np.cos(t), radius_y * np.sin(t)], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def shape_outline(kind: str, r: float, angle: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(outer polygon, hole polygon or None) centred at the origin with size ~ r."""
    if kind == "circle":
        return _regular(48, r, r, 0.0), None
    if kind == "square":
        return _regular(4, r, r, angle, np.pi / 4), None
    if kind == "triangle":
        return _regular(3, r, r, angle, -np.pi / 2), None
    if kind == "star":
        outer = _regular(5, r, r, angle, -np.pi / 2)
        inner = _regular(5, 0.42 * r, 0.42 * r, angle, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2), None
    if kind == "ellipse":
        return _regular(48, r, r * rng.uniform(0.4, 0.62), angle), None
    if kind == "ring":
        return _regular(48, r, r, 0.0), _regular(48, 0.55 * r, 0.55 * r, 0.0)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# Colours and textures (vectorized)
# ---------------------------------------------------------------------------------------------


def hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorized HSV (0..1) -> RGB (0..1), last axis RGB."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float) % 1.0, np.asarray(s, float), np.asarray(v, float))
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
    return np.take_along_axis(table, i[None, ..., None], 0)[0]


def _class_colour(label: int, rng: np.random.Generator) -> np.ndarray:
    hue = label / len(CATEGORIES) + rng.uniform(-0.12, 0.12)  # bands of 1/6 overlap at the edges
    return hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)) * 255


def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """(n, cells + 1) linear interpolation weights from a coarse axis to n samples."""
    t = np.linspace(0, cells, n)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    m = np.zeros((n, cells + 1))
    m[np.arange(n), i0] = 1 - f
    m[np.arange(n), i0 + 1] = f
    return m


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 3) -> np.ndarray:
    """Bilinearly upsampled random grid (h, w, channels) in 0..1 (two small matrix products)."""
    grid = rng.random((cells + 1, cells + 1, channels))
    return np.einsum("yi,ijc,xj->yxc", _interp_matrix(h, cells), grid, _interp_matrix(w, cells), optimize=True)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured background (h, w, 3) float 0..255."""
    kind = rng.integers(4)
    c1 = hsv_to_rgb(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.2, 0.9)) * 255
    c2 = hsv_to_rgb(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.2, 0.9)) * 255
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if kind == 0:  # smooth noise
        t = _smooth_noise(rng, h, w, int(rng.integers(3, 12)))
        img = c1 * (1 - t) + c2 * t
    else:
        angle = rng.uniform(0, np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        if kind == 1:  # stripes
            t = 0.5 + 0.5 * np.sin(u * 2 * np.pi / rng.uniform(6, 40))
        elif kind == 2:  # gradient
            t = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
        else:  # checkers
            cell = rng.uniform(8, 48)
            t = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
        t = t[..., None]
        img = c1.astype(np.float32) * (1 - t) + c2.astype(np.float32) * t
    sigma = np.float32(rng.uniform(2, 12))
    return img.astype(np.float32) + sigma * rng.standard_normal((h, w, 3), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


def render_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[dict]]:
    """(uint8 image (h, w, 3), annotations without ids) of one synthetic scene."""
    img = background(rng, h, w)
    side = min(h, w)
    shapes = []  # (label, outer, hole, full mask)
    for _ in range(int(rng.integers(2, 9))):
        label = int(rng.integers(len(CATEGORIES)))
        r = float(np.exp(rng.uniform(np.log(0.04 * side), np.log(0.33 * side))))
        outer, hole = shape_outline(CATEGORIES[label]["name"], r, rng.uniform(0, 2 * np.pi), rng)
        centre = rng.uniform([r * 0.6, r * 0.6], [w - r * 0.6, h - r * 0.6])
        outer = np.round(outer + centre, 2)  # the json stores 2 decimals: render exactly that
        mask = rasterize_polygons([outer], h, w)
        if hole is not None:
            mask &= ~rasterize_polygons([np.round(hole + centre, 2)], h, w)
        if mask.sum() < MIN_VISIBLE_PIXELS:
            continue
        # Fill: class colour with a soft gradient and a little noise (not a flat colour).
        colour = _class_colour(label, rng)
        ys, xs = np.nonzero(mask)
        direction = rng.normal(size=2) * 0.15 / r  # soft linear shading across the shape
        shade = 1 + (xs - centre[0]) * direction[0] + (ys - centre[1]) * direction[1]
        img[ys, xs] = colour * np.clip(shade, 0.6, 1.4)[:, None] + rng.normal(0, 4, (len(ys), 3))
        shapes.append((label, outer, hole, mask))

    anns = []
    covered = np.zeros((h, w), dtype=bool)
    for label, outer, hole, mask in reversed(shapes):  # later shapes hide earlier ones
        visible = mask & ~covered
        covered |= mask
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS or area < MIN_VISIBLE_FRACTION * mask.sum():
            continue
        if hole is None and area == int(mask.sum()) and _inside(outer, h, w):
            segmentation = [[float(v) for v in outer.ravel()]]
        else:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        x0, y0, x1, y1 = masks_to_boxes(visible[None])[0].tolist()
        anns.append({
            "category_id": CATEGORIES[label]["id"],
            "segmentation": segmentation,
            "area": area,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "iscrowd": 0,
        })
    anns.reverse()  # drawing order
    return np.clip(np.round(img), 0, 255).astype(np.uint8), anns


def _inside(xy: np.ndarray, h: int, w: int) -> bool:
    return bool((xy[:, 0] >= 0).all() and (xy[:, 0] <= w).all() and (xy[:, 1] >= 0).all() and (xy[:, 1] <= h).all())


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------


def encode_png(img: np.ndarray) -> bytes:
    """Minimal PNG writer (8-bit RGB or gray), no dependency beyond zlib."""
    h, w = img.shape[:2]
    colour_type = 2 if img.ndim == 3 else 0
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, -1)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def encode_jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    try:
        Image = import_optional("PIL.Image", "the synthetic dataset (writing images)")  # Pillow
    except ImportError:
        raise ImportError("writing JPEG needs Pillow (pip install pillow), or use --format png") from None
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def write_split(root: str, split: str, count: int, seed: int, h: int, w: int, image_format: str) -> str:
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    ext = "jpg" if image_format == "jpg" else "png"
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        img, anns = render_image(rng, h, w)
        image_id = i + 1
        file_name = f"{image_id:06d}.{ext}"
        data = encode_jpeg(img) if ext == "jpg" else encode_png(img)
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(data)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **a})
    dataset = {
        "info": {"description": f"dimaskdino synthetic shapes ({split}, seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [dict(c, supercategory="shape") for c in CATEGORIES],
    }
    path = annotation_path(root, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dataset, f, separators=(",", ":"))
    return path


def make_synthetic_coco(root: str, *, seed: int = 0, num_train: int = 300, num_val: int = 50,
                        height: int = 320, width: int = 320, image_format: str = "jpg") -> SyntheticPaths:
    """Write the train and val splits under `root` (see the module docstring)."""
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    root = os.fspath(root)
    write_split(root, "train", num_train, seed, height, width, image_format)
    write_split(root, "val", num_val, seed, height, width, image_format)
    return SyntheticPaths.under(root)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 320x320), got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"images must be at least 32x32, got {text!r}")
    return h, w


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dimaskdino.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=300, help="number of training images")
    parser.add_argument("--val", type=int, default=50, help="number of validation images")
    parser.add_argument("--size", type=_parse_size, default=(320, 320), help="HxW (default 320x320)")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    paths = make_synthetic_coco(args.out, seed=args.seed, num_train=args.train, num_val=args.val,
                                height=args.size[0], width=args.size[1], image_format=args.format)
    print(f"wrote {args.train} train + {args.val} val images to {paths.root} "
          f"in {time.perf_counter() - t0:.1f} s:\n  {paths.train_json}\n  {paths.val_json}")


if __name__ == "__main__":
    main()
