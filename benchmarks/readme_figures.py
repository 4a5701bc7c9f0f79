"""The README's result tables, rendered from the JSON files under benchmarks/results/, so that the
two cannot drift apart.

    python benchmarks/readme_figures.py            # print every block
    python benchmarks/readme_figures.py --check    # exit 1 where README.md differs (the test suite runs this)
    python benchmarks/readme_figures.py --write    # rewrite the blocks in README.md

A block sits in README.md between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->` and holds
exactly what BLOCKS[NAME] renders, with the file, commit and clean-tree flag it came from. The
prose around a block is written by hand; figures it quotes are read from the block above it.
After `regenerate.py --out benchmarks/results`, `--write` updates the README in one step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.spread import compare, compare_summaries, format_overhead, format_ratio  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


class MissingResult(Exception):
    """A block's JSON file is absent or lacks what the block shows."""


def load(name: str) -> dict:
    path, label = RESULTS / name, f"benchmarks/results/{name}"
    if not path.is_file():
        raise MissingResult(f"{label} is missing (run benchmarks/regenerate.py)")
    data = json.loads(path.read_text())
    if data.get("quick"):
        raise MissingResult(f"{label} holds --quick figures, which mean nothing")
    if data.get("git_dirty") is not False:  # a figure from a dirty or unknown tree is not a result
        state = "a dirty tree" if data.get("git_dirty") else "a tree whose state was not recorded"
        raise MissingResult(f"{label} was written from {state}: regenerate it from a clean one")
    return data


def source(name: str, data: dict) -> str:
    """Where a figure comes from: file, commit (of a clean tree: load checks), device and torch."""
    return (f"`benchmarks/results/{name}`: {data['git_commit'][:7]}, clean tree, {data['device']}, "
            f"torch {data['torch']}")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------------------------------------
# Blocks


def demo() -> str:
    name = "cpu-demo-train.json"
    data = load(name)
    m, wall = data["metrics"], data["wall_clock_s"]
    runs = f"one run" if wall["n"] == 1 else f"median of {wall['n']} runs ({minutes(wall['min'])}-{minutes(wall['max'])})"
    return "\n".join([
        "| command | wall clock | segm AP (AP50) | bbox AP (AP50) |",
        "|---|---|---|---|",
        f"| `{data['train_command']}` | **{minutes(wall['median'])}** ({runs}) | **{m['segm/AP']:.3f}** "
        f"({m['segm/AP50']:.3f}) | **{m['bbox/AP']:.3f}** ({m['bbox/AP50']:.3f}) |",
        "",
        source(name, data) + "."])


def demo_schedule() -> str:
    """The schedule choice: runs of the same preset with other epoch counts, kept with their commits."""
    rows = [("11", "cpu-demo-train-11ep.json"), ("9.5", "cpu-demo-train-9.5ep.json"),
            ("**10 (the preset)**", "cpu-demo-train.json")]
    lines = ["| demo epochs | steps | wall clock | segm AP | bbox AP | result |", "|---|---|---|---|---|---|"]
    for epochs, name in rows:
        data = load(name)
        m = data["metrics"]
        lines.append(f"| {epochs} | {m['steps']:,} | {minutes(data['wall_clock_s']['median'])} | {m['segm/AP']:.3f} | "
                     f"{m['bbox/AP']:.3f} | `{name}` ({data['git_commit'][:7]}) |")
    return "\n".join(lines)


STEP_LABELS = {"off": "off", "hybrid atss,rcnn": "`hybrid_heads=atss,rcnn`",
               "hybrid atss,rcnn + masks": "`hybrid_heads=atss,rcnn hybrid_masks=true`",
               "inter_scene": "`inter_scene=true`", "equivariance": "`equivariance=true`"}


def training_methods_step() -> str:
    name = "cpu-training-methods-step.json"
    data = load(name)
    if "step_s" not in data["rows"].get("off", {}):
        raise MissingResult(f"benchmarks/results/{name} predates the repeated-runs format (no step_s spread)")
    base = data["baseline"]
    lines = [f"| switch | step time: median (min-max of {data['repeats']} runs) | overhead (range) | "
             "peak memory | overhead (range) |", "|---|---|---|---|---|"]
    for key, row in data["rows"].items():
        step, memory = row["step_s"], row["peak_memory_bytes"]
        if key == base:
            overheads = ["", ""]
        else:
            overheads = [format_overhead(row[f"{kind}_vs_{base}"]) for kind in ("step_time", "memory")]
        lines.append(f"| {STEP_LABELS.get(key, key)} | {step['median'] * 1e3:,.0f} ms ({step['min'] * 1e3:,.0f}-"
                     f"{step['max'] * 1e3:,.0f}) | {overheads[0]} | {memory['median'] / 2**20:,.0f} MiB | {overheads[1]} |")
    lines += ["", source(name, data) + f"; {data['steps']} timed steps after {data['warmup']} per run."]
    return "\n".join(lines)


def training_methods_ap() -> str:
    name, seed_name = "cpu-training-methods-ap.json", "cpu-training-methods-ap-seed1-off.json"
    data, seed = load(name), load(seed_name)
    base = data["rows"]["off"]
    lines = ["| switch (seed 0) | segm AP | bbox AP | vs off: segm / bbox | wall clock (2-core CPU) |",
             "|---|---|---|---|---|"]
    for key, row in [*data["rows"].items(), ("off, seed 1", seed["rows"]["off"])]:
        delta = "" if key == "off" else f"{row['segm/AP'] - base['segm/AP']:+.3f} / {row['bbox/AP'] - base['bbox/AP']:+.3f}"
        lines.append(f"| {STEP_LABELS.get(key, key)} | {row['segm/AP']:.3f} | {row['bbox/AP']:.3f} | {delta} | "
                     f"{minutes(row['wall_clock_s'])} |")
    lines += ["", f"{source(name, data)}; the seed-1 row: {source(seed_name, seed)}. "
                  f"Steps per run: {base['steps']}."]
    return "\n".join(lines)


def timing_cell(row: dict | None) -> str:
    return "-" if row is None else f"{row['median_ms']:.1f} ms ({row['min_ms']:.1f}-{row['max_ms']:.1f})"


def ratio_cell(base: dict, new: dict) -> str:
    """How many times faster `new` is than `base` (kernel rows store only median, min and max)."""
    def times(row: dict) -> dict:
        return {key: row[f"{key}_ms"] for key in ("median", "min", "max")}

    return format_ratio(compare_summaries(times(new), times(base)))


def mask_loss_cpu() -> str:
    name = "cpu-mask_loss.json"
    data = load(name)
    cases: dict[str, dict] = {}
    for row in data["rows"]:
        cases.setdefault(row["mode"], {})[row["impl"]] = row
    lines = ["| case | reference | torch.compile(reference) | fused PyTorch | largest tensor: reference / fused | "
             "fused vs reference (range) |", "|---|---|---|---|---|---|"]
    for case, impls in cases.items():
        ref, fused = impls["reference"], impls["fused-pytorch"]
        lines.append(f"| {case} | {timing_cell(ref)} | {timing_cell(impls.get('reference+compile'))} | "
                     f"{timing_cell(fused)} | {ref['largest_tensor_mb']:.1f} / {fused['largest_tensor_mb']:.1f} MB | "
                     f"{ratio_cell(ref, fused)} |")
    lines += ["", source(name, data) + f"; float32, median (min-max) of {data['reps']}."]
    return "\n".join(lines)


MSDA_IMPLS = (("reference", "reference"), ("reference+compile", "torch.compile(reference)"), ("dimaskdino-cpu", "C++ CPU"))


def msda_cpu() -> str:
    name = "cpu-msda.json"
    data = load(name)
    table: dict[tuple, dict] = {}
    shapes = {}
    for row in data["rows"]:
        key = (row["shape"]["name"], row["mode"])
        shapes[row["shape"]["name"]] = row["shape"]
        table.setdefault(key, {})[row["impl"]] = row
    lines = ["| shape | mode | " + " | ".join(label for _, label in MSDA_IMPLS) + " | C++ vs reference (range) |",
             "|---|---|" + "---|" * len(MSDA_IMPLS) + "---|"]
    for (shape, mode), impls in table.items():
        cells = [timing_cell(impls.get(impl)) for impl, _ in MSDA_IMPLS]
        lines.append(f"| {shape} (Q={shapes[shape]['queries']:,}) | {mode} | " + " | ".join(cells) +
                     f" | {ratio_cell(impls['reference'], impls['dimaskdino-cpu'])} |")
    s = shapes["encoder"]
    levels = "/".join(str(h) for h, _ in s["levels"])
    lines += ["", f"{source(name, data)}; B={s['batch']}, levels {levels} (S={sum(h * w for h, w in s['levels']):,}), "
                  f"H={s['heads']}, D={s['channels']}, P={s['points']}, float32, median (min-max) of {data['reps']}; "
                  f"the machine's measured copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s."]
    return "\n".join(lines)


def compile_check() -> str:
    name = "cpu-compile-check.json"
    data = load(name)
    compiled, eager = data["compiled_call_s"], data["eager_call_s"]
    verdict = format_ratio(compare(compiled["samples"], eager["samples"]), digits=2)  # > 1: compiled is faster
    return "\n".join([
        f"| backend | eager loss | compiled loss | first call (compile) | compiled call | eager call | eager / compiled |",
        "|---|---|---|---|---|---|---|",
        f"| {data['backend']} | {data['eager_loss']:.6f} | {data['compiled_loss']:.6f} | {data['first_call_s']:.0f} s | "
        f"{compiled['median']:.2f} s ({compiled['min']:.2f}-{compiled['max']:.2f}) | {eager['median']:.2f} s "
        f"({eager['min']:.2f}-{eager['max']:.2f}) | {verdict} |",
        "",
        source(name, data) + f"; demo preset, batch {data['batch']} at {data['size']}x{data['size']}, training forward "
        f"+ backward, Inductor cache {data['inductor_cache']}, median (min-max) of {compiled['n']}."])


def model_stats() -> str:
    name = "model-stats.json"
    data = load(name)
    params = data["parameters"]
    lines = ["| preset | parameters | G multiply-adds: 800x1333, every output's masks / final only | "
             "800x1067, every output's masks / final only |", "|---|---|---|---|"]
    for preset in sorted({key.split("/")[0] for key in data["forward_flops"]}):
        gmac = {key.split("/", 1)[1]: value["gmac"] for key, value in data["forward_flops"].items()
                if key.startswith(preset + "/")}
        cells = [f"{gmac[f'{size}/every_output']:.0f} / {gmac[f'{size}/final_masks_only']:.0f}"
                 for size in ("800x1333", "800x1067")]
        lines.append(f"| `{preset}` | {params[preset]:,} | {cells[0]} | {cells[1]} |")
    lines += ["", source(name, data) + "; " + data["flop_convention"] + "."]
    return "\n".join(lines)


REVERT_LABELS = {"none": "nothing (the engine as it is)",
                 "1_decoder_norm_once": "decoder_norm once before the class/mask heads",
                 "2_proposal_sizes_fine_first": "proposal sizes from the stride-8 level up",
                 "3_ti_outputs_plain": "TI-loss outputs without decoder_norm and second delta",
                 "4_mask_boxes_plus_one": "mask-to-box with +1 (pixel edges)"}


def parity_reverts() -> str:
    name = "cpu-parity-reverts.json"
    data = load(name)
    rows: dict[str, dict[str, dict]] = {}
    for key, row in data["rows"].items():
        revert, model = key.split("/")
        rows.setdefault(revert, {})[model] = row
    lines = ["| reverted | max abs diff: logits / boxes / mask logits, DI-MaskDINO; MaskDINO | parity test |",
             "|---|---|---|"]
    for revert, models in rows.items():
        cells = []
        for model in ("dimaskdino", "maskdino"):
            if model in models:
                diff = models[model]["max_abs_diff"]
                cells.append(" / ".join(f"{diff[kind]:.2g}" for kind in ("logits", "boxes", "masks")))
            else:
                cells.append("(no such part)")
        fails = {models[m]["test_fails"] for m in models}
        verdict = "fails" if fails == {True} else "passes" if fails == {False} else "fails for one model"
        lines.append(f"| {REVERT_LABELS.get(revert, revert)} | {'; '.join(cells)} | {verdict} |")
    tolerance = data["tolerances"]
    lines += ["", source(name, data) + f"; tolerances {tolerance['logits']:g} (logits, boxes) and "
                  f"{tolerance['masks']:g} (mask logits)."]
    return "\n".join(lines)


def fake_gpu_memory() -> str:
    name = "fake-gpu-step.json"
    data = load(name)
    labels = {"base": "`{preset}`", "all": "with every SPEC 6 switch (the second view doubles the images)"}
    lines = ["| step (1024x1024, batch 2, bf16) | saved for backward | peak estimate per image | target |",
             "|---|---|---|---|"]
    for key, run in data["runs"].items():
        memory = run["memory"]
        target = f"<= {memory['target_bytes_per_image'] / 1e9:.1f} GB/img" if key == "base" else ""
        lines.append(f"| {labels.get(key, key).format(preset=run['preset'])} | "
                     f"{memory['saved_activation_bytes_per_image'] / 2**30:.2f} GiB/img | "
                     f"{memory['peak_estimate_bytes_per_image'] / 1e9:.2f} GB/img | {target} |")
    lines += ["", source(name, data) + "."]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "demo": demo, "demo-schedule": demo_schedule, "training-methods-step": training_methods_step,
    "training-methods-ap": training_methods_ap, "msda-cpu": msda_cpu, "compile-check": compile_check,
    "model-stats": model_stats, "parity-reverts": parity_reverts,
    "fake-gpu-memory": fake_gpu_memory, "mask-loss-cpu": mask_loss_cpu,
}


# ---------------------------------------------------------------------------------------------
# README


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- figures:{re.escape(name)} -->\n)(.*?)\n?(<!-- /figures:{re.escape(name)} -->)", re.S)


def differences(readme: str) -> list[str]:
    """One line per block that is missing from the README or differs from its rendering."""
    problems = []
    for name, render in BLOCKS.items():
        found = block_pattern(name).search(readme)
        if found is None:
            problems.append(f"README.md has no block <!-- figures:{name} -->")
            continue
        try:
            expected = render()
        except MissingResult as error:
            problems.append(f"{name}: {error}")
            continue
        if found.group(2) != expected:
            problems.append(f"{name}: README.md differs from the results (run benchmarks/readme_figures.py --write)")
    return problems


def rewritten(readme: str) -> str:
    for name, render in BLOCKS.items():
        pattern = block_pattern(name)
        if pattern.search(readme) is None:
            raise SystemExit(f"README.md has no block <!-- figures:{name} -->: add the two marker lines first")
        text = render()
        readme = pattern.sub(lambda match: match.group(1) + text + "\n" + match.group(3), readme, count=1)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="exit 1 where README.md differs from the results")
    action.add_argument("--write", action="store_true", help="rewrite the blocks in README.md")
    args = parser.parse_args(argv)
    readme = README.read_text()
    if args.check:
        problems = differences(readme)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if args.write:
        README.write_text(rewritten(readme))
        print(f"updated {len(BLOCKS)} blocks in {README.relative_to(ROOT)}")
        return 0
    for name, render in BLOCKS.items():
        try:
            print(f"<!-- figures:{name} -->\n{render()}\n<!-- /figures:{name} -->\n")
        except MissingResult as error:
            print(f"{name}: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
