"""The second view g(I) of a training image, for the equivariance term of instance-unique
querying (dimaskdino.model.instance_unique).

The image content occupies the top-left valid region (vh, vw) = image_sizes[b] of the canvas.
g is: an optional horizontal flip of the valid region (within it, so the padding stays at the
bottom/right), then a crop of side s * (vh, vw) (one s ~ U(min_scale, 1) for both sides) at a
uniform position inside the flipped region, zoomed back to (vh, vw). g maps the valid region
onto itself, so image sizes do not change.

Coordinates are continuous pixel-edge coordinates (pixel i spans [i, i + 1), centre i + 0.5). A
point (y, x) of the second view's valid region comes from the first view's point
    y1 = oy + s * y,   x1 = ox + s * x, then x1 -> vw - x1 when flipped,
with (oy, ox) = origin_yx the crop's top-left corner in the flipped region. `view_grid` turns
that into grid_sample coordinates, for the image (one cell per pixel) and for the stride-4 mask
features (one cell per feature) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dimaskdino.data.transforms import TRAIN_PAD_VALUE, pad_fill
from dimaskdino.model.box_ops import box_xyxy_to_cxcywh, masks_to_boxes

VIEW_RNG_TAG = 7  # last word of the view's seed: keeps it apart from the loader's other draws


@dataclass(frozen=True)
class ViewTransform:
    """g of one image: flip, then crop of side scale * valid_hw at origin_yx (pixels, in the
    flipped valid region), zoomed back to valid_hw."""

    flip: bool
    scale: float
    origin_yx: tuple[float, float]
    valid_hw: tuple[int, int]


def sample_view_transform(
    rng: np.random.Generator, valid_hw: tuple[int, int], min_scale: float = 0.5, flip_prob: float = 0.5
) -> ViewTransform:
    """Draws flip (probability flip_prob), scale ~ U(min_scale, 1) and a uniform crop position
    inside the valid region, in that order."""
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"sample_view_transform: min_scale must be in (0, 1], got {min_scale}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"sample_view_transform: flip_prob must be in [0, 1], got {flip_prob}")
    height, width = (int(v) for v in valid_hw)
    if height < 1 or width < 1:
        raise ValueError(f"sample_view_transform: valid_hw must be positive, got {valid_hw}")
    flip = bool(rng.random() < flip_prob)
    scale = float(rng.uniform(min_scale, 1.0))
    origin_y = float(rng.uniform(0.0, (1.0 - scale) * height))
    origin_x = float(rng.uniform(0.0, (1.0 - scale) * width))
    return ViewTransform(flip, scale, (origin_y, origin_x), (height, width))


def _cell_centres(canvas_size: int, cells: int, device) -> torch.Tensor:
    """Centres, in canvas pixels, of `cells` equal cells covering a canvas side (float64)."""
    return (torch.arange(cells, device=device, dtype=torch.float64) + 0.5) * (canvas_size / cells)


def _check_canvas(transform: ViewTransform, canvas_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    (vh, vw), (height, width) = transform.valid_hw, canvas_hw
    if not (0 < vh <= height and 0 < vw <= width):
        raise ValueError(f"view_grid: transform.valid_hw {transform.valid_hw} must fit in canvas_hw {tuple(canvas_hw)}")
    if out_hw[0] < 1 or out_hw[1] < 1:
        raise ValueError(f"view_grid: out_hw must be positive, got {tuple(out_hw)}")


def view_grid(
    transform: ViewTransform, canvas_hw: tuple[int, int], out_hw: tuple[int, int], device=None
) -> torch.Tensor:
    """(out_h, out_w, 2) float32 normalized (x, y) into the FIRST view's canvas (grid_sample,
    align_corners=False) of the centre of every cell of an out_hw grid covering the SECOND view's
    canvas. out_hw = canvas_hw samples the image; out_hw = the stride-4 feature size samples the
    mask features (whose cells cover the canvas: a canvas side a multiple of 4).

    Points are clamped to the centres of the valid region's edge pixels, so bilinear sampling
    never mixes in padding (the valid region's border is replicated instead). Cells in the
    second view's padding get a point too, meaningless: mask them with `view_valid_cells`.
    """
    _check_canvas(transform, canvas_hw, out_hw)
    (height, width), (vh, vw) = canvas_hw, transform.valid_hw
    scale, (origin_y, origin_x) = transform.scale, transform.origin_yx
    # Separable: rows depend on y only, columns on x only; float64 keeps pixel centres exact.
    ys = origin_y + scale * _cell_centres(height, out_hw[0], device)
    xs = origin_x + scale * _cell_centres(width, out_hw[1], device)
    if transform.flip:
        xs = vw - xs
    ys = ys.clamp(0.5, vh - 0.5)
    xs = xs.clamp(0.5, vw - 0.5)
    grid_y = (2.0 * ys / height - 1.0).float()
    grid_x = (2.0 * xs / width - 1.0).float()
    return torch.stack(torch.broadcast_tensors(grid_x[None, :], grid_y[:, None]), dim=-1)


def view_valid_cells(
    transform: ViewTransform, canvas_hw: tuple[int, int], out_hw: tuple[int, int], device=None
) -> torch.Tensor:
    """(out_h, out_w) bool: the cell centre lies in the (second view's) valid region."""
    _check_canvas(transform, canvas_hw, out_hw)
    (height, width), (vh, vw) = canvas_hw, transform.valid_hw
    rows = _cell_centres(height, out_hw[0], device) < vh
    cols = _cell_centres(width, out_hw[1], device) < vw
    return rows[:, None] & cols[None, :]


def view_grids(
    transforms: list[ViewTransform], canvas_hw: tuple[int, int], out_hw: tuple[int, int], device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `view_grid` and `view_valid_cells`: (B, out_h, out_w, 2), (B, out_h, out_w)."""
    grids = [view_grid(t, canvas_hw, out_hw, device) for t in transforms]
    valid = [view_valid_cells(t, canvas_hw, out_hw, device) for t in transforms]
    return torch.stack(grids), torch.stack(valid)


# ---------------------------------------------------------------------------------------------
# Applying g to a batch
# ---------------------------------------------------------------------------------------------


def resample_masks(masks: torch.Tensor, grid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """masks (N, H, W) bool -> (N, out_h, out_w) bool: bilinear on 0/1 at the grid points,
    >= 0.5, False outside the valid cells."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *grid.shape[:2]), dtype=torch.bool)
    values = F.grid_sample(masks.float()[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)
    return (values[0] >= 0.5) & valid


def normalized_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of masks (N, H, W) as float32 cxcywh normalized by the canvas (W, H)."""
    height, width = masks.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=masks.device)
    return box_xyxy_to_cxcywh(masks_to_boxes(masks) / scale)


def transform_target(target: dict, grid: torch.Tensor, valid: torch.Tensor) -> dict:
    """g(target): masks resampled, instances left empty dropped (labels with them), boxes of
    the new masks; every other key copied as is."""
    masks = target["masks"]
    new_masks = resample_masks(masks, grid.to(masks.device), valid.to(masks.device))
    keep = new_masks.flatten(1).any(dim=1)
    new_masks = new_masks[keep]  # the one host transfer: how many instances remain
    labels = target["labels"][keep.to(target["labels"].device)]
    return {**target, "labels": labels, "boxes": normalized_boxes(new_masks), "masks": new_masks}


def make_second_view(
    images: torch.Tensor,
    image_sizes: list[tuple[int, int]],
    targets: list[dict],
    transforms: list[ViewTransform],
    pad_value=TRAIN_PAD_VALUE,
) -> tuple[torch.Tensor, list[dict]]:
    """g(images) (B, 3, H, W) on the images' device and dtype, and g(targets).

    Images are resampled bilinearly with `view_grid` at full resolution; cells outside the valid
    region get pad_value (one number or one per channel). Masks use the same grid (bilinear on
    0/1, >= 0.5); instances whose mask becomes empty are dropped; boxes are the tight boxes of the
    new masks (normalized cxcywh of the canvas). image_sizes are unchanged by g.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"make_second_view: images must be (B, 3, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    for name, values in (("image_sizes", image_sizes), ("targets", targets), ("transforms", transforms)):
        if len(values) != batch:
            raise ValueError(f"make_second_view: {name} has {len(values)} entries for {batch} images")
    for b, (size, transform) in enumerate(zip(image_sizes, transforms)):
        if tuple(transform.valid_hw) != tuple(int(v) for v in size):
            raise ValueError(
                f"make_second_view: transforms[{b}].valid_hw {transform.valid_hw} differs from image_sizes[{b}] {tuple(size)}"
            )
    grid, valid = view_grids(transforms, (height, width), (height, width), images.device)
    sampled = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fill = torch.tensor(pad_fill(pad_value), dtype=sampled.dtype, device=images.device).view(1, 3, 1, 1)
    second = torch.where(valid[:, None], sampled, fill)
    if not images.is_floating_point():
        second = second.round().clamp(0, 255)
    second = second.to(images.dtype)
    second_targets = [transform_target(t, grid[b], valid[b]) for b, t in enumerate(targets)]
    return second, second_targets


# ---------------------------------------------------------------------------------------------
# Loader wrapper
# ---------------------------------------------------------------------------------------------


def view_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The generator of one image's view: a function of (seed, epoch, image) only, so a resumed
    run, another batch split or another process count draws the same view."""
    return np.random.default_rng([int(seed), int(epoch), int(image_id), VIEW_RNG_TAG])


class SecondViewLoader:
    """Adds batch["second_view"] = {"images", "image_sizes", "targets", "transforms"} to the
    batches of a training loader (build_train_loader's result or anything iterable with len()
    and an .epoch attribute). Other attributes (position, epoch, problems, ...) are the wrapped
    loader's. The epoch of a batch is read from the loader just before the batch is produced
    (the loaders advance .position after making a batch), so a view depends on (seed, epoch,
    image_id) only."""

    def __init__(self, loader, seed: int, min_scale: float = 0.5, pad_value=TRAIN_PAD_VALUE, flip_prob: float = 0.5):
        if int(seed) < 0:
            raise ValueError(f"SecondViewLoader: seed must be non-negative, got {seed}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"SecondViewLoader: min_scale must be in (0, 1], got {min_scale}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"SecondViewLoader: flip_prob must be in [0, 1], got {flip_prob}")
        self.loader = loader
        self.seed, self.min_scale, self.flip_prob = int(seed), float(min_scale), float(flip_prob)
        self.pad_value = pad_fill(pad_value)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            epoch = self.loader.epoch
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield self.add_second_view(batch, epoch)

    def view_transforms(self, image_sizes: list[tuple[int, int]], image_ids: list[int], epoch: int) -> list[ViewTransform]:
        return [
            sample_view_transform(view_rng(self.seed, epoch, image_id), size, self.min_scale, self.flip_prob)
            for size, image_id in zip(image_sizes, image_ids)
        ]

    def add_second_view(self, batch: dict, epoch: int) -> dict:
        sizes = [tuple(int(v) for v in s) for s in batch["image_sizes"]]
        transforms = self.view_transforms(sizes, [t["image_id"] for t in batch["targets"]], epoch)
        images, targets = make_second_view(batch["images"], sizes, batch["targets"], transforms, self.pad_value)
        view = {"images": images, "image_sizes": list(batch["image_sizes"]), "targets": targets, "transforms": transforms}
        return {**batch, "second_view": view}
