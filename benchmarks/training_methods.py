"""The SPEC section 6 training switches, each off/on: step time, peak memory and COCO AP.

    python benchmarks/training_methods.py step --out DIR [--repeats 3]      # step time + memory
    python benchmarks/training_methods.py ap --out DIR [--epochs 4] [--seed 0] [--only off ...]

`step`: the demo model on a fixed batch of the embedded dataset (real LSJ batches from the loader),
forward + losses + backward + optimizer step, median of `--steps` after `--warmup`, in a fresh
process per switch and repeat (switches interleaved, so drift in the machine's load spreads over
all of them); "peak memory" is that process's peak resident set (CPU) or
torch.cuda.max_memory_allocated (GPU). The step time of a switch is the median over repeats with
min/max, and an overhead whose min/max range includes zero is marked not significant. `ap`:
`python -m dimaskdino.train` with the demo preset, the same seed, steps and data for every switch
(only the switch differs), then its metrics.json. Results: DIR/<device>-training-methods-{step,ap}.json
(written with benchmarks/provenance.py) and a markdown table; `--quick` is a seconds-long smoke
run of the same code (CI).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.provenance import device_slug, write_result  # noqa: E402
from benchmarks.spread import compare, format_overhead, summarize  # noqa: E402

SCRATCH = ROOT / "outputs" / "benchmarks"  # a plain run never writes over benchmarks/results
# --quick: a tiny synthetic set of its own (so it neither needs nor touches the demo's cache).
QUICK_DATA = ["data.synthetic_train=4", "data.synthetic_val=2", "train.num_picture_images=1"]

SWITCHES: dict[str, list[str]] = {
    "off": [],
    "hybrid atss,rcnn": ["train.hybrid_heads=atss,rcnn"],
    "hybrid atss,rcnn + masks": ["train.hybrid_heads=atss,rcnn", "train.hybrid_masks=true"],
    "inter_scene": ["train.inter_scene=true"],
    "equivariance": ["train.equivariance=true"],
}


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


def selected(args) -> list[str]:
    return args.only or list(SWITCHES)


def quick_overrides(args) -> list[str]:
    return [*QUICK_DATA, f"data.cache_dir={Path(args.out) / 'quick-cache'}"] if args.quick else []


def run_step(args) -> None:
    names = selected(args)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:  # interleaved: each repeat measures every switch once
            command = [sys.executable, __file__, "_one", "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--", *SWITCHES[name], *quick_overrides(args)]
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if result.returncode != 0:
                raise SystemExit(f"{name}: {' '.join(command)} failed:\n{result.stderr[-4000:]}")
            samples[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {name:28s} {samples[name][-1]['median_step_s'] * 1e3:8.1f} ms/step  "
                  f"peak {samples[name][-1]['peak_memory_bytes'] / 2**20:8.0f} MiB", flush=True)
    base = "off" if "off" in names else names[0]
    rows = {}
    for name, runs in samples.items():
        times = [run["median_step_s"] for run in runs]
        memory = [run["peak_memory_bytes"] for run in runs]
        rows[name] = {"step_s": summarize(times), "peak_memory_bytes": summarize(memory),
                      "memory_kind": runs[0]["memory_kind"], "num_loss_terms": runs[0]["num_loss_terms"],
                      "step_time_vs_" + base: compare([r["median_step_s"] for r in samples[base]], times),
                      "memory_vs_" + base: compare([r["peak_memory_bytes"] for r in samples[base]], memory)}
    path = write_result(args.out, f"{device_slug()}-training-methods-step.json", {
        "preset": "demo", "batch_size": 2, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "quick": args.quick, "baseline": base,
        "method": "each repeat runs every switch in a fresh process; a sample is that process's median step time; "
                  "overhead = ratio of medians with the min/max range over sample pairs",
        "rows": rows})
    print(f"\nwritten {path}\n| switch | step time (median, min-max of {args.repeats}) | overhead | peak memory | overhead |"
          "\n|---|---|---|---|---|")
    for name, row in rows.items():
        step, memory = row["step_s"], row["peak_memory_bytes"]
        overheads = ["", ""] if name == base else [format_overhead(row[f"{kind}_vs_{base}"]) for kind in ("step_time", "memory")]
        print(f"| {name} | {step['median'] * 1e3:.0f} ms ({step['min'] * 1e3:.0f}-{step['max'] * 1e3:.0f}) | "
              f"{overheads[0]} | {memory['median'] / 2**20:,.0f} MiB | {overheads[1]} |")


# ---------------------------------------------------------------------------------------------
# AP after the same training budget


def run_ap(args) -> None:
    rows = {}
    for name in selected(args):
        output = Path(args.output_root) / name.replace(" ", "_").replace(",", "-").replace("+", "plus")
        command = [sys.executable, "-m", "dimaskdino.train", f"train.output_dir={output}", "train.resume=",
                   f"train.epochs={args.epochs}", f"train.lr_drop_epochs=({args.epochs * 0.85:.3f},)",
                   "train.checkpoint_period=0", f"train.seed={args.seed}", *SWITCHES[name]]
        if args.quick:
            command += ["train.max_steps=2", *quick_overrides(args)]
        start = time.time()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        metrics = json.loads((output / "metrics.json").read_text())
        rows[name] = {"command": " ".join(command[1:]), "wall_clock_s": time.time() - start, "steps": metrics["steps"],
                      **{k: metrics[k] for k in ("segm/AP", "segm/AP50", "bbox/AP", "bbox/AP50")}}
        print(f"{name:28s} segm AP {rows[name]['segm/AP']:.3f}  bbox AP {rows[name]['bbox/AP']:.3f}  "
              f"({rows[name]['wall_clock_s'] / 60:.1f} min)", flush=True)
    path = write_result(args.out, f"{device_slug()}-training-methods-{args.tag or 'ap'}.json", {
        "preset": "demo", "epochs": args.epochs, "seed": args.seed, "quick": args.quick,
        "note": "one training run per switch; the run-to-run spread is measured by repeating 'off' with another "
                "seed (--seed 1 --only off --tag ap-seed1-off)",
        "rows": rows})
    print(f"\nwritten {path}\n| switch | segm AP | bbox AP | steps | wall clock |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['segm/AP']:.3f} | {row['bbox/AP']:.3f} | {row['steps']} | {row['wall_clock_s'] / 60:.1f} min |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=str(SCRATCH), help=f"result folder (default {SCRATCH.relative_to(ROOT)})")
    common.add_argument("--only", nargs="*", choices=list(SWITCHES), help="these switches only")
    common.add_argument("--quick", action="store_true", help="a seconds-long smoke run (CI), not a measurement")
    step = sub.add_parser("step", parents=[common])
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--warmup", type=int, default=3)
    step.add_argument("--repeats", type=int, default=3, help="fresh processes per switch")
    one = sub.add_parser("_one")  # internal: one switch in a fresh process
    one.add_argument("--steps", type=int, default=10)
    one.add_argument("--warmup", type=int, default=3)
    one.add_argument("overrides", nargs="*")
    ap = sub.add_parser("ap", parents=[common])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-root", default=None, help="training output folders (default OUT/training-methods-runs)")
    ap.add_argument("--tag", default="", help="result file suffix instead of 'ap' (partial runs)")
    args = parser.parse_args()
    if args.mode == "_one":
        print(json.dumps(measure_one(args.overrides, args.steps, args.warmup)))
        return
    if args.quick and args.mode == "step":
        args.steps, args.warmup, args.repeats = 1, 0, 1
    if args.quick:
        args.only = args.only or ["off"]
        args.epochs = 1
    if args.mode == "step":
        run_step(args)
    else:
        args.output_root = args.output_root or str(Path(args.out) / "training-methods-runs")
        run_ap(args)


if __name__ == "__main__":
    main()
