"""Polygon rasterization and mask helpers (vectorized numpy; DALI has no polygon-to-mask operator).

Convention (the one pycocotools uses, checked in tests/test_data.py): pixel (row r, column c)
covers [c, c+1) x [r, r+1) and belongs to a polygon when its centre (c + 0.5, r + 0.5) is inside.
A part is filled with the even-odd rule; the parts of one instance are united (as
`pycocotools.mask.merge` does for COCO multi-part polygons).

Algorithm (scanline parity, no per-pixel Python): every edge is intersected with the pixel-centre
rows it spans; a crossing at x toggles the parity of every pixel whose centre lies right of x,
i.e. from column ceil(x - 0.5) on. Counting toggles per (row, column) with one `bincount` and a
cumulative sum along the row gives the parity image, computed only inside the part's bounding box.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def polygon_area(xy: np.ndarray) -> float:
    """Absolute shoelace area of a (K, 2) vertex array."""
    x, y = xy[:, 0], xy[:, 1]
    twice = x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0]
    return 0.5 * abs(float(twice))


def _edge_row_crossings(xy: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (int) and x positions (float) where the polygon's edges cross pixel-centre rows.

    An edge from y0 to y1 crosses the centre y = r + 0.5 of row r when min <= y < max (half-open,
    so a vertex shared by two edges is counted once and horizontal edges never count).
    """
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.concatenate([x0[1:], x0[:1]]), np.concatenate([y0[1:], y0[:1]])
    lo = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, height).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, height).astype(np.int64)
    count = hi - lo
    total = int(count.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    edge = np.repeat(np.arange(len(xy)), count)
    start = np.cumsum(count) - count
    rows = lo[edge] + (np.arange(total) - start[edge])
    yc = rows + 0.5
    dy = y1[edge] - y0[edge]  # never 0 here: a horizontal edge spans no row
    x = x0[edge] + (yc - y0[edge]) * (x1[edge] - x0[edge]) / dy
    return rows, x


def _fill_part(out: np.ndarray, xy: np.ndarray) -> None:
    """OR the even-odd interior of one closed polygon part into the bool image `out` (H, W)."""
    height, width = out.shape
    rows, x = _edge_row_crossings(xy, height)
    if rows.size == 0:
        return
    cols = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
    c0, c1 = int(cols.min()), int(cols.max())
    r0, r1 = int(rows.min()), int(rows.max())
    if c1 <= c0:
        return  # every crossing toggles the same pixels: parity 0 everywhere
    # Pixels left of c0 see no toggle, pixels from c1 on see all of them (an even number).
    local_w = c1 - c0 + 1
    idx = (rows - r0) * local_w + (cols - c0)
    toggles = np.bincount(idx, minlength=(r1 - r0 + 1) * local_w).reshape(r1 - r0 + 1, local_w)
    inside = (np.cumsum(toggles, axis=1) & 1).astype(bool)[:, : c1 - c0]
    out[r0 : r1 + 1, c0:c1] |= inside


def rasterize_polygons(parts: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Bool mask (height, width) of the union of polygon parts, each a (K, 2) array of (x, y).

    Coordinates may lie outside the image (the outside is clipped); parts with fewer than three
    vertices contribute nothing.
    """
    out = np.zeros((height, width), dtype=bool)
    for xy in parts:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if len(xy) >= 3:
            _fill_part(out, xy)
    return out


def rasterize_instances(
    instances: Sequence[Sequence[np.ndarray]], height: int, width: int
) -> np.ndarray:
    """Bool masks (N, height, width), one per instance (each a list of polygon parts)."""
    out = np.zeros((len(instances), height, width), dtype=bool)
    for i, parts in enumerate(instances):
        for xy in parts:
            xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
            if len(xy) >= 3:
                _fill_part(out[i], xy)
    return out


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes (N, 4) float32 xyxy in pixel-edge coordinates of bool masks (N, H, W).

    A mask covering columns c0..c1 gets x0 = c0, x1 = c1 + 1 (the box encloses whole pixels).
    Empty masks get (0, 0, 0, 0).
    """
    n, h, w = masks.shape
    if n == 0:
        return np.zeros((0, 4), np.float32)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    nonempty = rows.any(axis=1)
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    boxes[~nonempty] = 0.0
    return boxes


def clip_polygon(xy: np.ndarray, width: float, height: float) -> np.ndarray:
    """The part of polygon xy (K, 2) inside [0, width] x [0, height] (Sutherland-Hodgman against
    the four edges; (0, 2) when nothing is inside). For a concave polygon the result may hold
    zero-width bridges along the border, but its vertices are exactly the points of the true
    intersection's outline, so its bounding box is the intersection's."""
    points = np.asarray(xy, dtype=np.float64)
    # Each edge: (axis, bound, keep_below): keep points with coordinate <= bound, or >= bound.
    for axis, bound, keep_below in ((0, 0.0, False), (0, float(width), True), (1, 0.0, False), (1, float(height), True)):
        if len(points) == 0:
            break
        inside = points[:, axis] <= bound if keep_below else points[:, axis] >= bound
        previous, previous_inside = points[-1], inside[-1]
        kept = []
        for point, point_inside in zip(points, inside):
            if point_inside != previous_inside:  # the edge crosses the bound: add the crossing
                t = (bound - previous[axis]) / (point[axis] - previous[axis])
                kept.append(previous + t * (point - previous))
            if point_inside:
                kept.append(point)
            previous, previous_inside = point, point_inside
        points = np.asarray(kept, dtype=np.float64).reshape(-1, 2)
    return points


def polygon_boxes(instances: Sequence[Sequence[np.ndarray]], width: float, height: float) -> np.ndarray:
    """xyxy boxes (N, 4) float32 of polygon instances (each a list of (K, 2) parts) clipped to
    [0, width] x [0, height]: detectron2's crop of the polygons, then PolygonMasks'
    get_bounding_boxes, which is where the authors' training takes its GT boxes. An instance with
    nothing inside gets (0, 0, 0, 0)."""
    boxes = np.zeros((len(instances), 4), np.float32)
    for index, parts in enumerate(instances):
        clipped = [c for c in (clip_polygon(part, width, height) for part in parts) if len(c)]
        if clipped:
            points = np.concatenate(clipped)
            boxes[index] = (*points.min(axis=0), *points.max(axis=0))
    return boxes


def xyxy_to_normalized_cxcywh(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """xyxy pixel boxes (N, 4) -> cxcywh normalized by the canvas (width, height), float32."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    out = np.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], 1)
    return out.astype(np.float32)
