"""The SPEC section 6 training switches, each off/on: step time, peak memory and COCO AP.

    python benchmarks/training_methods.py step            # step time + peak memory per switch
    python benchmarks/training_methods.py ap [--epochs 4] # a training run per switch, then AP

`step`: the demo model on a fixed batch of the embedded dataset (real LSJ batches from the loader),
forward + losses + backward + optimizer step, median of `--steps` after `--warmup`; each switch
runs in a fresh process, so "peak memory" is that process's peak resident set (CPU) or
torch.cuda.max_memory_allocated (GPU). `ap`: `python -m dimaskdino.train` with the demo preset, the
same seed, steps and data for every switch (only the switch differs), then its metrics.json.
Results: benchmarks/results/<device>-training-methods-{step,ap}.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SWITCHES: dict[str, list[str]] = {
    "off": [],
    "hybrid atss,rcnn": ["train.hybrid_heads=atss,rcnn"],
    "hybrid atss,rcnn + masks": ["train.hybrid_heads=atss,rcnn", "train.hybrid_masks=true"],
    "inter_scene": ["train.inter_scene=true"],
    "equivariance": ["train.equivariance=true"],
}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core {platform.machine()} CPU"


def device_slug() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace("nvidia ", "").replace(" ", "-")
    return "cpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# step time and memory (one switch per process)


def measure_one(overrides: list[str], steps: int, warmup: int) -> dict:
    """Runs in a child process: times `steps` training steps of the demo preset with `overrides`."""
    import torch

    from dimaskdino import dist as distributed
    from dimaskdino.config import apply_overrides, get_preset
    from dimaskdino.data import build_train_loader, load_coco
    from dimaskdino.model import build_model
    from dimaskdino.model.criterion import build_criterion
    from dimaskdino.train import resolve_dataset, step_losses
    from dimaskdino.training_methods import InterSceneTerm

    info = distributed.init_distributed("auto")
    cfg = resolve_dataset(apply_overrides(get_preset("demo"), ["model.num_classes=6", *overrides]), info)
    train_set = load_coco(cfg.data.train_json, cfg.data.train_images, for_training=True)
    torch.manual_seed(0)
    model = build_model(cfg).to(info.device).train()
    criterion = build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = build_train_loader(train_set, backend=cfg.data.loader, batch_size=cfg.train.batch_size,
                                image_size=cfg.data.image_size, min_scale=cfg.data.min_scale,
                                max_scale=cfg.data.max_scale, seed=0, num_threads=1,
                                device_id=0 if info.device.type == "cuda" else None)
    if cfg.train.equivariance:
        from dimaskdino.data.second_view import SecondViewLoader

        loader = SecondViewLoader(loader, seed=0, min_scale=cfg.train.equivariance_min_scale)
    inter_scene = InterSceneTerm.from_config(cfg, info.device) if cfg.train.inter_scene else None
    batches = []
    for batch in loader:  # the same batches for every switch (the loader's plan is seeded)
        batches.append(batch)
        if len(batches) == warmup + steps:
            break
    cuda = info.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    times = []
    for index, batch in enumerate(batches):
        if index == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        # The trainer's own step (host-to-device copies included), minus logging and clipping.
        losses = step_losses(model, criterion, cfg, batch, index, info.device, autocast, inter_scene)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times),
            "peak_memory_bytes": peak, "memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
            "num_loss_terms": len(losses), "steps": steps, "warmup": warmup}


def run_step(args) -> None:
    rows = {}
    for name, overrides in SWITCHES.items():
        command = [sys.executable, __file__, "_one", "--steps", str(args.steps), "--warmup", str(args.warmup), "--",
                   *overrides]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(command)} failed:\n{result.stderr[-4000:]}")
        rows[name] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{name:28s} {rows[name]['median_step_s'] * 1e3:8.1f} ms/step  peak {rows[name]['peak_memory_bytes'] / 2**20:8.0f} MiB",
              flush=True)
    base = rows["off"]
    for row in rows.values():
        row["step_time_overhead"] = row["median_step_s"] / base["median_step_s"] - 1
        row["memory_overhead"] = row["peak_memory_bytes"] / base["peak_memory_bytes"] - 1
    write("step", {"command": "python benchmarks/training_methods.py step " + " ".join(sys.argv[2:]),
                   "preset": "demo", "batch_size": 2, "rows": rows})
    print("\n| switch | step time | overhead | peak memory | overhead |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median_step_s'] * 1e3:.0f} ms | {row['step_time_overhead']:+.0%} | "
              f"{row['peak_memory_bytes'] / 2**20:.0f} MiB | {row['memory_overhead']:+.0%} |")


# ---------------------------------------------------------------------------------------------
# AP after the same training budget


def run_ap(args) -> None:
    rows = {}
    names = args.only or list(SWITCHES)
    for name in names:
        output = Path(args.output_root) / name.replace(" ", "_").replace(",", "-").replace("+", "plus")
        command = [sys.executable, "-m", "dimaskdino.train", f"train.output_dir={output}", "train.resume=",
                   f"train.epochs={args.epochs}", f"train.lr_drop_epochs=({args.epochs * 0.85:.3f},)",
                   "train.checkpoint_period=0", f"train.seed={args.seed}", *SWITCHES[name]]
        start = time.time()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        metrics = json.loads((output / "metrics.json").read_text())
        rows[name] = {"command": " ".join(command[1:]), "wall_clock_s": time.time() - start, "steps": metrics["steps"],
                      **{k: metrics[k] for k in ("segm/AP", "segm/AP50", "bbox/AP", "bbox/AP50")}}
        print(f"{name:28s} segm AP {rows[name]['segm/AP']:.3f}  bbox AP {rows[name]['bbox/AP']:.3f}  "
              f"({rows[name]['wall_clock_s'] / 60:.1f} min)", flush=True)
    path = write(args.tag or "ap", {"command": "python benchmarks/training_methods.py ap " + " ".join(sys.argv[2:]),
                                    "preset": "demo", "epochs": args.epochs, "seed": args.seed, "rows": rows})
    print(f"\nwritten {path}\n| switch | segm AP | bbox AP | steps | wall clock |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['segm/AP']:.3f} | {row['bbox/AP']:.3f} | {row['steps']} | {row['wall_clock_s'] / 60:.1f} min |")


def write(kind: str, payload: dict) -> Path:
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{device_slug()}-training-methods-{kind}.json"
    payload = {"device": device_name(), "torch": torch.__version__, "git_commit": git_commit(), **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    step = sub.add_parser("step")
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--warmup", type=int, default=3)
    one = sub.add_parser("_one")  # internal: one switch in a fresh process
    one.add_argument("--steps", type=int, default=10)
    one.add_argument("--warmup", type=int, default=3)
    one.add_argument("overrides", nargs="*")
    ap = sub.add_parser("ap")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-root", default="outputs/training-methods")
    ap.add_argument("--only", nargs="*", choices=list(SWITCHES))
    ap.add_argument("--tag", default="", help="result file suffix instead of 'ap' (partial runs)")
    args = parser.parse_args()
    if args.mode == "_one":
        print(json.dumps(measure_one(args.overrides, args.steps, args.warmup)))
    elif args.mode == "step":
        run_step(args)
    else:
        run_ap(args)


if __name__ == "__main__":
    main()
