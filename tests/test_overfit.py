"""The demo model overfits 2 fixed images (3 objects each): matched masks reach IoU > 0.7 within
300 steps on a 2-core CPU. A model, matcher or loss that is wired wrong does not get there."""

import math
import time

import torch
import torch.nn.functional as F

from dimaskdino.config import apply_overrides, get_preset
from dimaskdino.model import build_model
from dimaskdino.model.criterion import build_criterion
from dimaskdino.train import param_groups

SIZE = 192
STEPS = 300
TIME_LIMIT_S = 180


def draw_scene(generator: torch.Generator, size: int = SIZE):
    """A noisy background with a disc, a rectangle and a triangle of distinct colours (one per
    class) at random places; returns the image (3, H, W) 0..255 and its targets."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    image = 90 + 40 * torch.rand(3, size, size, generator=generator)
    masks = []
    for label in range(3):
        cx, cy = (0.25 + 0.5 * torch.rand(2, generator=generator)) * size
        r = (0.12 + 0.1 * torch.rand(1, generator=generator)).item() * size
        if label == 0:
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 < r**2
        elif label == 1:
            mask = ((xs - cx).abs() < r) & ((ys - cy).abs() < 0.6 * r)
        else:
            mask = (ys > cy - r) & (ys < cy + r) & ((xs - cx).abs() < (ys - (cy - r)) / 2)
        for visible in masks:  # later shapes cover earlier ones
            visible &= ~mask
        masks.append(mask)
    colours = torch.tensor([[220.0, 40, 40], [40, 200, 60], [50, 70, 230]])
    for label, mask in enumerate(masks):
        image = torch.where(mask, colours[label][:, None, None], image)
    masks = torch.stack(masks)
    boxes = []
    for mask in masks:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
        boxes.append(torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]).float() / size)
    return image, {"labels": torch.arange(3), "boxes": torch.stack(boxes), "masks": masks}


def matched_mask_iou(outputs: dict, final: str, matches, targets) -> float:
    ious = []
    for image_index, (pred_idx, gt_idx) in enumerate(matches):
        logits = outputs[final]["masks"][image_index, pred_idx]
        gt = targets[image_index]["masks"][gt_idx]
        pred = F.interpolate(logits[None].float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)[0] > 0
        inter = (pred & gt).flatten(1).sum(1).float()
        union = (pred | gt).flatten(1).sum(1).float()
        ious.append(inter / union.clamp(min=1))
    return torch.cat(ious).mean().item()


def test_demo_overfits_two_images():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    scenes = [draw_scene(generator) for _ in range(2)]
    images = torch.stack([image for image, _ in scenes])
    targets = [target for _, target in scenes]
    cfg = apply_overrides(get_preset("demo"), ["model.num_classes=3", "data.image_size=192"])
    model = build_model(cfg)
    criterion = build_criterion(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_mult))
    final = model.final_output_key()
    start = time.time()
    iou = 0.0
    for step in range(STEPS):
        outputs = model(images, targets)
        losses = criterion(outputs, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        assert math.isfinite(loss.item()), f"step {step}: loss {loss.item()}"
        if step % 25 == 24 or step == STEPS - 1:
            iou = matched_mask_iou(outputs, final, criterion.final_matches(), targets)
            print(f"step {step + 1}: loss {loss.item():.3f}, matched mask IoU {iou:.3f}, {time.time() - start:.0f} s")
            if iou > 0.7:
                break
    elapsed = time.time() - start
    assert iou > 0.7, f"matched mask IoU {iou:.3f} after {step + 1} steps"
    assert elapsed < TIME_LIMIT_S, f"{elapsed:.0f} s"
