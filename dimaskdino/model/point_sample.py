"""Bilinear point sampling of mask maps and uncertainty-based point selection (PointRend style).

Points are normalized (x, y) in [0, 1] over the whole map; the pixel coordinate of a point is
`x * W - 0.5` (the `grid_sample(align_corners=False)` convention, zero outside the map), so a
prediction at stride 4 and a GT mask at the input resolution sampled at the same normalized point
look at the same place in the image.

Two implementations of the same sampling (tested equal):
- `point_sample`: `F.grid_sample`, one fused pass; float32 maps (lower precision is cast to float32
  first, since a bf16 grid would move points by up to a pixel);
- `point_sample_rows`: four gathers with float32 weights, for maps of any dtype (bool GT masks are
  read as they are, with no float copy at the input resolution) sampled at a few points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weight_dtype(maps: torch.Tensor) -> torch.dtype:
    return torch.float64 if maps.dtype == torch.float64 else torch.float32


def _bilinear_corners(points: torch.Tensor, height: int, width: int, dtype: torch.dtype):
    """The four bilinear corners of each point: [(flat index (..., P) int64, weight (..., P))],
    weight zero for corners outside the map (zero padding)."""
    points = points.to(dtype)
    px = points[..., 0] * width - 0.5
    py = points[..., 1] * height - 0.5
    x0f = px.floor()
    y0f = py.floor()
    fx = px - x0f
    fy = py - y0f
    x0 = x0f.long()
    y0 = y0f.long()
    corners = []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi = x0 + dx
            yi = y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            index = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
            corners.append((index, wx * wy * inside))
    return corners


def point_sample(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of `features` (N, C, H, W) at `points` (N, P, 2) -> (N, C, P), float32
    (float64 for float64 features). All C channels of item n share item n's points."""
    if features.dim() != 4:
        raise ValueError(f"point_sample: features must be (N, C, H, W), got {tuple(features.shape)}")
    if points.dim() != 3 or points.shape[-1] != 2 or points.shape[0] != features.shape[0]:
        raise ValueError(
            f"point_sample: points must be (N, P, 2) with N = {features.shape[0]}, got {tuple(points.shape)}"
        )
    features = features.to(_weight_dtype(features))
    grid = (2.0 * points.to(features.dtype) - 1.0).unsqueeze(2)  # (N, P, 1, 2) in [-1, 1]
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.squeeze(3)


def point_sample_rows(maps: torch.Tensor, points: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear samples of selected maps, float32 (float64 for float64 maps).

    maps: (M, H, W), any dtype (bool GT masks are fine); differentiable when floating.
    points: (P, 2) shared by every map -> (M, P); or (R, P, 2) with `rows` (R,) int64 indices into
    M (one point set per selected map) -> (R, P). Without `rows`, R must equal M.
    """
    if maps.dim() != 3:
        raise ValueError(f"point_sample_rows: maps must be (M, H, W), got {tuple(maps.shape)}")
    num_maps, height, width = maps.shape
    shared = points.dim() == 2
    if shared:
        if points.shape[-1] != 2:
            raise ValueError(f"point_sample_rows: points must be (P, 2) or (R, P, 2), got {tuple(points.shape)}")
        if rows is not None:
            raise ValueError("point_sample_rows: rows is only used with per-row points (R, P, 2)")
    else:
        if points.dim() != 3 or points.shape[-1] != 2:
            raise ValueError(f"point_sample_rows: points must be (P, 2) or (R, P, 2), got {tuple(points.shape)}")
        if rows is None and points.shape[0] != num_maps:
            raise ValueError("point_sample_rows: without rows, points must have one point set per map")
        if rows is not None and rows.shape != points.shape[:1]:
            raise ValueError(f"point_sample_rows: rows must be ({points.shape[0]},), got {tuple(rows.shape)}")

    dtype = _weight_dtype(maps)
    flat = maps.reshape(num_maps, height * width)
    out = None
    for index, weight in _bilinear_corners(points, height, width, dtype):
        if shared:
            values = flat[:, index]  # (M, P)
        elif rows is None:
            values = torch.gather(flat, 1, index)
        else:
            values = flat[rows.unsqueeze(1), index]  # (R, P)
        term = values.to(dtype) * weight
        out = term if out is None else out + term
    return out


def rand_per_image(
    rows_per_image: list[int], tail: tuple[int, ...], device, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """torch.rand of shape (sum(rows_per_image), *tail) where image i's rows come from
    generators[i]: the draws of an image do not depend on the rest of its batch (so a batch split
    over processes, or a resumed run, draws the same numbers). generators=None: the global RNG."""
    if generators is None:
        return torch.rand((sum(rows_per_image), *tail), device=device)
    if len(generators) != len(rows_per_image):
        raise ValueError(f"rand_per_image: {len(generators)} generators for {len(rows_per_image)} images")
    return torch.cat([
        torch.rand((rows, *tail), device=device, generator=generator)
        for rows, generator in zip(rows_per_image, generators)
    ])


@torch.no_grad()
def uncertainty_points(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generators: list[torch.Generator] | None = None,
    rows_per_image: list[int] | None = None,
) -> torch.Tensor:
    """Points where the masks are least certain, plus uniform ones (SPEC section 5).

    Draws int(num_points * oversample_ratio) uniform candidates per mask, keeps the
    int(importance_sample_ratio * num_points) with the smallest |logit| (bilinear logit at the
    candidate), and adds num_points minus that many uniform points.

    mask_logits: (R, H, W), ordered by image with rows_per_image[i] rows of image i (needed with
    generators, one per image). Returns (R, num_points, 2) normalized (x, y). No gradient.
    """
    num_masks = mask_logits.shape[0]
    device = mask_logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    if not 0 <= num_uncertain <= num_candidates:
        raise ValueError(
            f"uncertainty_points: importance_sample_ratio * num_points = {num_uncertain} must be in "
            f"[0, num_points * oversample_ratio = {num_candidates}]"
        )

    rows = rows_per_image if rows_per_image is not None else [num_masks]
    if sum(rows) != num_masks:
        raise ValueError(f"uncertainty_points: rows_per_image sums to {sum(rows)}, but there are {num_masks} masks")
    candidates = rand_per_image(rows, (num_candidates, 2), device, generators)
    logits = point_sample(mask_logits.unsqueeze(1), candidates).squeeze(1)  # (R, num_candidates)
    most_uncertain = (-logits.abs()).topk(num_uncertain, dim=1).indices
    chosen = torch.gather(candidates, 1, most_uncertain.unsqueeze(-1).expand(-1, -1, 2))
    uniform = rand_per_image(rows, (num_random, 2), device, generators)
    return torch.cat((chosen, uniform), dim=1)


def rank_within_group(group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int]:
    """Position of every element among the elements of its group (in input order), and the largest
    group size (one host sync). Packs rows of different groups into the slots of one batched
    grid_sample: the RoIs of each image, the pairs that share a GT mask."""
    counts = torch.bincount(group, minlength=num_groups)
    order = torch.sort(group, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=group.device) - starts[group[order]]
    return rank, int(counts.max())
