"""The README's first-use figure: `torchrun -m dimaskdino.train` with no arguments, timed.

    python benchmarks/demo_train.py --out DIR [--repeats 1] [--keep-runs]

Each repeat runs exactly the README's command in a fresh, empty working folder (so the default
output folder `outputs/run` is new and nothing resumes), times it wall clock, and reads the run's
metrics.json. Writes DIR/<device>-demo-train.json (benchmarks/provenance.py: device, versions,
commit, dirty tree) with every run's wall clock, the median and min/max over repeats, the AP of
each run and whether the run had to generate the synthetic dataset first, and copies the first
run's predictions.png to DIR/<device>-demo-predictions.png (the picture the README shows).
About 15 minutes per repeat on a 2-core CPU. `--quick` (CI) runs the same code for 2 steps on a
tiny synthetic set of its own, in seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.provenance import device_slug, write_result  # noqa: E402
from benchmarks.spread import summarize  # noqa: E402

COMMAND = ["torchrun", "-m", "dimaskdino.train"]  # the README's, verbatim
QUICK_OVERRIDES = ["train.max_steps=2", "data.synthetic_train=4", "data.synthetic_val=2", "train.num_picture_images=2"]
GENERATING = "generating the embedded synthetic dataset"  # what train logs when the cache is empty


def torchrun() -> list[str]:
    """`torchrun` of this Python (the one on PATH may belong to another environment)."""
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def run_once(work_dir: Path, overrides: list[str]) -> dict:
    command = [*torchrun(), *COMMAND[1:], *overrides]
    log_path = work_dir / "train.log"  # not captured in memory: `tail -f` it to watch a long run
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        code = subprocess.run(command, cwd=work_dir, stdout=log_file, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    log = log_path.read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} (in {work_dir}) failed with exit code {code}:\n{log[-4000:]}")
    run_dir = work_dir / "outputs" / "run"
    return {"wall_clock_s": wall, "generated_dataset": GENERATING in log,
            "metrics": json.loads((run_dir / "metrics.json").read_text()), "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"), help="result folder")
    parser.add_argument("--repeats", type=int, default=1, help="runs (about 15 min each on a 2-core CPU)")
    parser.add_argument("--work-dir", default=None, help="where the runs' folders go (default: a new temporary folder)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the runs' output folders")
    parser.add_argument("--quick", action="store_true", help="2 steps on a tiny dataset: a smoke run (CI)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work_root = Path(tempfile.mkdtemp(prefix="demo-train-", dir=args.work_dir))
    overrides = [*QUICK_OVERRIDES, f"data.cache_dir={work_root / 'cache'}"] if args.quick else []
    runs = []
    try:
        for repeat in range(args.repeats):
            work_dir = work_root / f"run{repeat}"
            work_dir.mkdir()
            print(f"run {repeat + 1}/{args.repeats}: log in {work_dir / 'train.log'}", flush=True)
            runs.append(run_once(work_dir, overrides))
            metrics = runs[-1]["metrics"]
            print(f"run {repeat + 1}/{args.repeats}: {runs[-1]['wall_clock_s'] / 60:.1f} min, segm AP "
                  f"{metrics.get('segm/AP', float('nan')):.3f}, bbox AP {metrics.get('bbox/AP', float('nan')):.3f}",
                  flush=True)
        slug = device_slug()
        picture = Path(runs[0]["run_dir"]) / "predictions.png"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picture, out / f"{slug}-demo-predictions.png")
        path = write_result(out, f"{slug}-demo-train.json", {
            "train_command": " ".join(COMMAND + overrides), "quick": args.quick, "repeats": args.repeats,
            "wall_clock_s": summarize([run["wall_clock_s"] for run in runs]),
            "runs": [{key: run[key] for key in ("wall_clock_s", "generated_dataset", "metrics")} for run in runs],
            "metrics": runs[0]["metrics"], "picture": f"{slug}-demo-predictions.png"})
        print(f"written {path}")
    finally:
        if not args.keep_runs:
            shutil.rmtree(work_root, ignore_errors=True)


if __name__ == "__main__":
    main()
