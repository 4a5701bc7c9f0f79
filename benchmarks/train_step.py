"""Training-step benchmark: dimaskdino_r50_12ep with its fast ops (impl=auto) and with every op's
PyTorch reference (impl=ref), and HF transformers' Mask2Former R50 where transformers is
installed, on synthetic in-memory batches (the data loader is measured on its own).

    python benchmarks/train_step.py [--out DIR] [--size S] [--batch B] [--steps N] [--warmup W] [--quick]

On a GPU: LSJ 1024x1024, batch 2 (per GPU), bf16 autocast, median step time over --steps after
--warmup, img/s, peak memory per image (torch.cuda.max_memory_allocated / batch), and the share
of the step per component from torch.profiler over one profiled step: record_function ranges
opened by module hooks (backbone, encoder = pixel decoder, selection + TI, decoder with BATO
inside it, BATO alone, matcher, losses = criterion without the matcher) plus backward and
optimizer. On a CPU it runs at a reduced size (--size 256 by default, float32) and says so;
memory is then the process's peak resident set. Each configuration runs in a fresh process.
Results: OUT/<device>-train-step.json via benchmarks/provenance.write_result (no --out: printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

TARGETS = {"img_per_s_per_gpu": 60.0, "speedup_vs_hf_mask2former": 5.0, "peak_bytes_per_image": 2.5e9}
COMPONENTS = ("backbone", "encoder", "selection", "ti", "decoder", "bato", "matcher", "criterion", "backward", "optimizer")


# ---------------------------------------------------------------------------------------------
# Component ranges


def _enter_exit(name: str):
    state = {}

    def pre(module, args, kwargs=None):
        state["range"] = torch.autograd.profiler.record_function(f"step/{name}")
        state["range"].__enter__()

    def post(module, args, output):
        state.pop("range").__exit__(None, None, None)

    return pre, post


def annotate(model, criterion) -> None:
    """record_function ranges around the model's parts (module hooks) and the matcher."""
    parts = {"backbone": model.backbone, "encoder": model.pixel_decoder, "selection": model.token_selection,
             "ti": model.token_interaction, "decoder": model.decoder, "bato": getattr(model.decoder, "bato", None),
             "criterion": criterion}
    for name, module in parts.items():
        if module is not None:
            pre, post = _enter_exit(name)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
    match = criterion.matcher.match

    def timed_match(*args, **kwargs):
        with torch.autograd.profiler.record_function("step/matcher"):
            return match(*args, **kwargs)

    criterion.matcher.match = timed_match


def component_shares(profiler, device_type: str) -> dict:
    """Time per "step/<name>" range (device time on a GPU, CPU time on a CPU), and shares of the
    profiled step (decoder includes BATO; criterion includes the matcher, so losses = criterion -
    matcher; selection+TI = selection + ti)."""
    totals = {}
    for event in profiler.key_averages():
        if event.key.startswith("step/"):
            name = event.key.removeprefix("step/")
            device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            totals[name] = (device_us if device_type == "cuda" and device_us else event.cpu_time_total) / 1e3
    ms = {name: totals.get(name, 0.0) for name in COMPONENTS}
    shares = {"backbone": ms["backbone"], "encoder": ms["encoder"], "selection+TI": ms["selection"] + ms["ti"],
              "decoder (without BATO)": ms["decoder"] - ms["bato"], "BATO": ms["bato"], "matcher": ms["matcher"],
              "losses": ms["criterion"] - ms["matcher"], "backward": ms["backward"], "optimizer": ms["optimizer"]}
    total = ms.get("step", 0.0) or totals.get("step", 0.0)
    return {"ms": {k: round(v, 3) for k, v in shares.items()}, "step_ms": round(total, 3),
            "share": {k: round(v / total, 4) if total else None for k, v in shares.items()},
            "time_kind": "device (CUDA kernels)" if device_type == "cuda" else "CPU"}


# ---------------------------------------------------------------------------------------------
# One configuration (in its own process)


def measure_dimaskdino(impl: str, preset: str, size: int, batch_size: int, steps: int, warmup: int) -> dict:
    from benchmarks.synthetic_batch import synthetic_batch
    from dimaskdino.config import apply_overrides, get_preset
    from dimaskdino.model import build_model
    from dimaskdino.model.criterion import build_criterion
    from dimaskdino.train import step_losses

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = apply_overrides(get_preset(preset), [f"impl={impl}", f"data.image_size={size}", f"train.batch_size={batch_size}"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    criterion = build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    batches = [synthetic_batch(batch_size, size, cfg.model.num_classes, instances=8, seed=s, first_image_id=1 + s * batch_size)
               for s in range(2)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(index: int) -> None:
        losses = step_losses(model, criterion, cfg, batches[index % 2], index, device, autocast)
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.profiler.record_function("step/backward"):
            sum(losses.values()).backward()
        with torch.autograd.profiler.record_function("step/optimizer"):
            optimizer.step()

    return _time_steps(step, device, batch_size, steps, warmup, lambda: annotate(model, criterion))


def measure_hf_mask2former(size: int, batch_size: int, steps: int, warmup: int) -> dict:
    """Mask2FormerForUniversalSegmentation with a ResNet-50 backbone config, random weights, 80
    classes, the same batches (GT masks as float), its own losses; nothing is downloaded."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    from benchmarks.synthetic_batch import synthetic_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=80, use_pretrained_backbone=False)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    batches = []
    for s in range(2):
        batch = synthetic_batch(batch_size, size, 80, instances=8, seed=s)
        mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
        std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
        batches.append({"pixel_values": ((batch["images"] - mean) / std).to(device),
                        "mask_labels": [t["masks"].float().to(device) for t in batch["targets"]],
                        "class_labels": [t["labels"].to(device) for t in batch["targets"]]})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(index: int) -> None:
        with autocast:
            loss = model(**batches[index % 2]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _time_steps(step, device, batch_size, steps, warmup, None)


def _time_steps(step, device, batch_size: int, steps: int, warmup: int, annotate_fn) -> dict:
    cuda = device.type == "cuda"
    for index in range(warmup):
        step(index)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup, warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(index)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"median_step_s": statistics.median(times), "min_step_s": min(times), "max_step_s": max(times),
              "steps": steps, "warmup": warmup, "img_per_s": batch_size / statistics.median(times),
              "peak_memory_bytes": peak, "peak_memory_bytes_per_image": peak / batch_size,
              "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (whole process)"}
    if annotate_fn is not None:  # one more step under the profiler, for the component shares
        annotate_fn()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profiler:
            with torch.autograd.profiler.record_function("step/step"):
                step(warmup + steps)
            if cuda:
                torch.cuda.synchronize()
        result["components"] = component_shares(profiler, device.type)
    return result


# ---------------------------------------------------------------------------------------------
# Driver


def run_child(kind: str, args) -> dict:
    command = [sys.executable, __file__, "_one", kind, "--preset", args.preset, "--size", str(args.size), "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        return {"error": result.stderr[-3000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="all", help=argparse.SUPPRESS)
    parser.add_argument("kind", nargs="?", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, help="dimaskdino_r50_12ep (default; --quick: demo)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="the demo preset at 128x128, one timed step: tests the script (the GPU check's dry run), no figures")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.quick:
        args.preset = args.preset or "demo"
        args.size, args.steps, args.warmup = args.size or 128, args.steps or 1, args.warmup if args.warmup is not None else 0
    args.preset = args.preset or "dimaskdino_r50_12ep"
    args.size = args.size or (1024 if gpu else 256)
    args.steps = args.steps or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.mode == "_one":
        if args.kind == "hf-mask2former":
            result = measure_hf_mask2former(args.size, args.batch, args.steps, args.warmup)
        else:
            result = measure_dimaskdino(args.kind.removeprefix("dimaskdino-"), args.preset, args.size, args.batch, args.steps, args.warmup)
        print(json.dumps(result))
        return 0

    rows = {}
    kinds = ["dimaskdino-auto", "dimaskdino-ref"]
    try:
        import transformers  # noqa: F401

        kinds.append("hf-mask2former")
    except ImportError:
        print("note: transformers is not installed: no HF Mask2Former row")
    for kind in kinds:
        rows[kind] = run_child(kind, args)
        row = rows[kind]
        if "error" in row:
            print(f"{kind:18s} failed: {row['error'][-500:]}", flush=True)
            continue
        print(f"{kind:18s} {row['median_step_s'] * 1e3:9.1f} ms/step  {row['img_per_s']:7.2f} img/s  "
              f"peak {row['peak_memory_bytes_per_image'] / 2**30:6.2f} GiB/img ({row['memory_kind']})", flush=True)
        for name, share in (row.get("components") or {}).get("share", {}).items():
            print(f"    {name:24s} {share:7.1%}" if share is not None else f"    {name:24s}       -")
    fast, ref, hf = rows.get("dimaskdino-auto", {}), rows.get("dimaskdino-ref", {}), rows.get("hf-mask2former", {})
    summary = {
        "speedup_fast_vs_ref": ref["median_step_s"] / fast["median_step_s"] if "median_step_s" in fast and "median_step_s" in ref else None,
        "speedup_fast_vs_hf_mask2former": hf["median_step_s"] / fast["median_step_s"] if "median_step_s" in fast and "median_step_s" in hf else None,
    }
    payload = {"preset": args.preset, "quick": args.quick, "image_size": args.size, "batch_size": args.batch,
               "precision": "bf16 autocast" if gpu else "float32", "reduced_size": not gpu and args.size < 1024,
               "note": None if gpu else f"CPU run at a reduced size ({args.size}x{args.size}), not the 1024x1024 of the GPU figures",
               "data": "synthetic in-memory batches (8 instances per image), no loader",
               "targets_on_h100_h200": TARGETS, "rows": rows, "summary": summary}
    print(json.dumps(summary))
    if args.out:
        from benchmarks.provenance import write_result

        name = ("gpu" if gpu else "cpu") + "-train-step.json"
        print(f"written {write_result(args.out, name, payload, device='cuda' if gpu else None)}")
    return 1 if any("error" in row for row in rows.values()) else 0


import torch  # noqa: E402  (after the docstring-level constants; used by every function above)

if __name__ == "__main__":
    sys.exit(main())
