"""In-memory training batches for step benchmarks and the fake-GPU step: no data loader, so a step
time measures the model alone (the loader is measured on its own).

`synthetic_batch` gives what the trainer's loaders give (`dimaskdino.train.step_losses` input):
{"images" (B, 3, S, S) float RGB 0..255, "image_sizes", "targets": [{"labels", "boxes" normalized
cxcywh, "masks" (N, S, S) bool, "image_id"}]}, with random axis-aligned ellipses as instances,
and with `second_view` the instance-unique querying's second view made by the project's own code.
"""

from __future__ import annotations

import numpy as np
import torch


def _ellipse_masks(rng: np.random.Generator, count: int, size: int) -> torch.Tensor:
    rows = torch.arange(size, dtype=torch.float32)[:, None]
    cols = torch.arange(size, dtype=torch.float32)[None, :]
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for index in range(count):
        # Radii from 2% to 25% of the side: small to large instances, as in COCO.
        ry, rx = rng.uniform(0.02, 0.25, 2) * size
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        masks[index] = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
    return masks


def _boxes_of(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Normalized cxcywh of each mask's pixel-edge box."""
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x0, x1, y0, y1 = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
        boxes.append([(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, instances: int = 8, seed: int = 0,
                    second_view: bool = False, first_image_id: int = 1) -> dict:
    """A CPU batch of `batch_size` images of `image_size` x `image_size` with `instances` GT each."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.uniform(0, 255, (batch_size, 3, image_size, image_size)).astype(np.float32))
    targets = []
    for index in range(batch_size):
        masks = _ellipse_masks(rng, instances, image_size)
        targets.append({
            "labels": torch.from_numpy(rng.integers(0, num_classes, instances)).long(),
            "boxes": _boxes_of(masks, image_size),
            "masks": masks,
            "image_id": first_image_id + index,
        })
    batch = {"images": images, "image_sizes": [(image_size, image_size)] * batch_size, "targets": targets}
    if second_view:
        from dimaskdino.data.second_view import make_second_view, sample_view_transform

        transforms = [sample_view_transform(rng, (image_size, image_size)) for _ in range(batch_size)]
        view_images, view_targets = make_second_view(images, batch["image_sizes"], targets, transforms)
        batch["second_view"] = {"images": view_images, "image_sizes": list(batch["image_sizes"]),
                                "targets": view_targets, "transforms": transforms}
    return batch
