"""Regenerates every figure of the README: runs each benchmark script into one folder.

    python benchmarks/regenerate.py [--out DIR] [--only NAME ...] [--skip NAME ...] [--quick]

Each step is a committed script that writes its JSON through benchmarks/provenance.py (device,
versions, commit, whether the tree was dirty); every one gets `--out DIR` (default
outputs/benchmarks, a scratch folder: the committed benchmarks/results/ is updated only on
purpose, by passing it, and only from a clean tree). `--quick` passes `--quick` to every script:
the same code on tiny inputs, in seconds per script, which is what CI runs to prove the scripts
work; its figures mean nothing. A step whose script has no `--quick`, or that repeats an earlier
step's code path, is skipped in quick mode, with a line that says so. DIR/regenerate.json lists what ran, the commands and their times.

Rough full-run times on the 2-core CPU: kernels a few minutes, model-stats 2-3 min, parity-reverts
under a minute, compile-check about 4 min (cold Inductor cache), training-methods-step 5-10 min, training-methods-ap about
60 min, its seed-1 row 6 min, demo-train 15 min.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.provenance import git_dirty, write_result  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = ROOT / "outputs" / "benchmarks"

# name -> script and arguments (each also gets --out, and --quick in quick mode).
STEPS: dict[str, list[str]] = {
    "kernels": ["benchmarks/kernels.py"],
    "model-stats": ["benchmarks/model_stats.py"],
    "parity-reverts": ["benchmarks/parity_reverts.py"],
    "compile-check": ["benchmarks/compile_check.py", "--cold"],
    "training-methods-step": ["benchmarks/training_methods.py", "step"],
    "training-methods-ap": ["benchmarks/training_methods.py", "ap", "--epochs", "4"],
    "training-methods-ap-seed1": ["benchmarks/training_methods.py", "ap", "--epochs", "4", "--seed", "1", "--only",
                                  "off", "--tag", "ap-seed1-off"],
    "demo-train": ["benchmarks/demo_train.py"],
}

# Left out of --quick: it runs the same script and code path as an earlier step.
QUICK_SKIP = {"training-methods-ap-seed1": "the same code path as training-methods-ap"}


def supports_quick(script: list[str]) -> bool:
    """Whether the script (or its subcommand) lists --quick in its --help."""
    command = [sys.executable, *script[:2 if len(script) > 1 and not script[1].startswith("-") else 1], "--help"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return result.returncode == 0 and "--quick" in result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SCRATCH), help=f"result folder (default {SCRATCH.relative_to(ROOT)})")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="run these steps only")
    parser.add_argument("--skip", nargs="+", choices=list(STEPS), default=[], help="leave these steps out")
    parser.add_argument("--quick", action="store_true", help="every script on tiny inputs, seconds each (CI)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out == RESULTS and (args.quick or git_dirty()):
        raise SystemExit(f"{RESULTS.relative_to(ROOT)} holds the committed results: regenerate them from a clean "
                         "tree (commit first) and without --quick")
    names = [name for name in (args.only or STEPS) if name not in args.skip]
    ran = []
    for name in names:
        command = [sys.executable, *STEPS[name], "--out", str(out)]
        if args.quick:
            reason = QUICK_SKIP.get(name) or (None if supports_quick(STEPS[name]) else f"{STEPS[name][0]} has no --quick")
            if reason:
                print(f"== {name}: skipped in --quick: {reason}", flush=True)
                ran.append({"step": name, "status": f"skipped ({reason})", "command": " ".join(command[1:])})
                continue
            command.append("--quick")
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(command, cwd=ROOT).returncode
        ran.append({"step": name, "status": "ok" if code == 0 else f"failed (exit code {code})",
                    "command": " ".join(command[1:]), "seconds": time.perf_counter() - start})
        if code != 0:  # the other steps still run: a long regeneration is not lost to one failure
            print(f"== {name}: failed with exit code {code}", file=sys.stderr, flush=True)
    path = write_result(out, "regenerate.json", {"quick": args.quick, "steps": ran})
    failed = [step["step"] for step in ran if step["status"].startswith("failed")]
    print(f"== {'failed: ' + ', '.join(failed) if failed else 'done'}; summary in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
