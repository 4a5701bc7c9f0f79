"""The authors' DI-MaskDINO and this engine, timed side by side in one process on the same input.

    DIMASKDINO_AUTHORS_DIMASKDINO=/path/DI-MaskDINO DIMASKDINO_AUTHORS_DETECTRON2=/path/detectron2 \
    python benchmarks/authors_side_by_side.py --out benchmarks/results [--size 512] [--reps 5]

Run it with a Python that has detectron2's dependencies (see the README: the authors' venv) from
the repository root, so that this engine imports from the tree. Both models are the full R50
configs (their configs/dimaskdino_r50_4scale_bs16_12ep.yaml, our preset dimaskdino_r50_12ep; the
same 52,286,232 parameters), random weights (speed does not depend on them), fp32, the same
thread count, the same uint8 image(s) and the same ground truth:

- eval: the forward in eval mode under no_grad, including each side's instance post-processing
  (top 100), on a batch of --batch-size images;
- train: the training forward (denoising on) + every loss + backward (no optimizer step).

The two sides run in turn (authors, engine, authors, ...) so that a change in the machine's load
affects both alike; each figure is the median of --reps runs after --warmup, with min and max,
and the load averages before and after are recorded. Writes
cpu-authors-side-by-side.json (via benchmarks/provenance.write_result) into --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import authors_harness as harness  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402

PRESET = "dimaskdino_r50_12ep"


def make_batch(size: int, batch_size: int, num_instances: int, seed: int = 0):
    """uint8 images (3, size, size) and per image {"labels", "boxes_xyxy" (pixels), "masks"}."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    ys = torch.arange(size).view(-1, 1).float() + 0.5
    xs = torch.arange(size).view(1, -1).float() + 0.5
    for _ in range(batch_size):
        coarse = torch.rand(1, 3, size // 16, size // 16, generator=generator) * 255
        image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
        images.append(image.round().clamp(0, 255).to(torch.uint8))
        masks, boxes = [], []
        for _ in range(num_instances):
            cy, cx = (torch.rand(2, generator=generator) * 0.6 + 0.2) * size
            ry, rx = (torch.rand(2, generator=generator) * 0.15 + 0.05) * size
            mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
            rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
            boxes.append(torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32))
            masks.append(mask)
        targets.append({"labels": torch.randint(0, 80, (num_instances,), generator=generator),
                        "boxes_xyxy": torch.stack(boxes), "masks": torch.stack(masks)})
    return images, targets


def timed_alternately(functions: dict, reps: int, warmup: int) -> dict:
    """{name: timing} for callables run in turn (a, b, a, b, ...), so that a change in the machine's
    load during the run affects both sides alike."""
    times = {name: [] for name in functions}
    for index in range(warmup + reps):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t}
            for name, t in times.items()}


def authors_side(images, targets) -> dict:
    cfg = harness.build_cfg("dimaskdino", [])
    torch.manual_seed(0)
    model = harness.build_model("dimaskdino", cfg)
    eval_inputs = harness.batched_inputs(images)
    train_inputs = harness.batched_inputs(images, targets)

    def run_eval():
        model.eval()
        with torch.no_grad(), harness.cpu_only():
            model(eval_inputs)

    def run_train():
        model.train()
        with harness.cpu_only():
            losses = model(train_inputs)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)

    info = {"parameters": harness.parameter_count(model), "config_file": harness.KINDS["dimaskdino"].config_file,
            "commit": harness.checkout_commit("dimaskdino")}
    return info, run_eval, run_train


def engine_side(images, targets) -> dict:
    from dimaskdino.config import get_preset
    from dimaskdino.model import build_model
    from dimaskdino.model.criterion import build_criterion
    from dimaskdino.model.postprocess import postprocess
    from dimaskdino.train import step_losses

    cfg = get_preset(PRESET)
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = build_criterion(cfg)
    batch_images = torch.stack(images).float()
    size = tuple(batch_images.shape[-2:])
    image_sizes = [tuple(image.shape[1:]) for image in images]
    scale = torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
    engine_targets = []
    for index, target in enumerate(targets):
        x0, y0, x1, y1 = target["boxes_xyxy"].unbind(-1)
        boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1) / scale
        engine_targets.append({"labels": target["labels"], "boxes": boxes, "masks": target["masks"],
                               "image_id": index, "orig_size": image_sizes[index]})
    batch = {"images": batch_images, "targets": engine_targets, "image_sizes": image_sizes}
    device = torch.device("cpu")
    no_autocast = torch.autocast("cpu", enabled=False)

    def run_eval():
        model.eval()
        with torch.no_grad():
            outputs = model(batch_images, None, image_sizes)
            postprocess(outputs[model.final_output_key()], image_sizes, image_sizes, top_k=100, padded_size=size)

    def run_train():
        model.train()
        losses = step_losses(model, criterion, cfg, batch, 0, device, no_autocast)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)

    info = {"parameters": sum(p.numel() for p in model.parameters()), "preset": PRESET, "impl": cfg.impl}
    return info, run_eval, run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for cpu-authors-side-by-side.json")
    parser.add_argument("--size", type=int, default=512, help="square image side (a multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--instances", type=int, default=5, help="ground-truth instances per image")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, targets = make_batch(args.size, args.batch_size, args.instances)
    load_before = os.getloadavg()
    sides, runs = {}, {"eval": {}, "train": {}}
    for name, side in (("authors", authors_side), ("engine", engine_side)):
        sides[name], runs["eval"][name], runs["train"][name] = side(images, targets)
    for phase in ("eval", "train"):
        for name, timing in timed_alternately(runs[phase], args.reps, args.warmup).items():
            sides[name][phase] = timing
    for name in sides:
        print(f"{name:8s} eval {sides[name]['eval']['median_s']:.2f} s  train {sides[name]['train']['median_s']:.2f} s "
              f"(median of {args.reps})", flush=True)
    ratios = {phase: sides["authors"][phase]["median_s"] / sides["engine"][phase]["median_s"] for phase in ("eval", "train")}
    print(f"authors / engine: eval {ratios['eval']:.2f}x  train {ratios['train']:.2f}x")
    path = write_result(args.out, "cpu-authors-side-by-side.json", {
        "image_size": [args.size, args.size], "batch_size": args.batch_size, "instances_per_image": args.instances,
        "reps": args.reps, "warmup": args.warmup, "torch_threads": torch.get_num_threads(), "dtype": "float32",
        # Other processes share the cores: the 1/5/15-minute load averages frame the figures.
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "harness_notes": harness.notes(), "authors": sides["authors"], "engine": sides["engine"],
        "speedup_authors_over_engine": ratios,
    })
    print(f"written {path}")


if __name__ == "__main__":
    main()
