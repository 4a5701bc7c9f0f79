"""The GPU check: one command that, on one H200 in at most 9 minutes, validates and benchmarks
everything, writing results as it goes (run it through benchmarks/gpu_check.sh).

Steps, in order, each with a time budget; a deadline (default 540 s after the start) skips a step
that could not get its minimum time, and cuts a step's budget to what is left:

 1. environment   versions (python, torch, CUDA, triton, nvcc) and nvidia-smi
 2. wheels        pip install --no-index --no-deps of the wheels brought in .whl/
                  (benchmarks/gpu_wheels.txt, fetched by benchmarks/fetch_gpu_wheels.sh)
 3. build         FORCE_CUDA=1 build of the extension with every core, for sm_90a; then the
                  original Deformable-DETR kernel from .baseline/ (benchmarks/baseline/)
 4. gpu tests     pytest -m gpu (pytest-xdist)
 5. sanitizer     compute-sanitizer --tool memcheck on benchmarks/sanitize_kernels.py (every
                  kernel, forward and backward, small shapes, checked against float64)
 6. kernels       benchmarks/kernels.py (correctness first, then do_bench + CUDA graphs)
 7. train step    benchmarks/train_step.py (dimaskdino_r50_12ep 1024x1024, fast vs ref vs HF)

--dry-run runs the same steps on the CPU at toy sizes, so CI tests the script: GPU-only tools
(nvidia-smi, compute-sanitizer, the CUDA build) are skipped with a message or replaced by their
CPU equivalent (setup.py's extension plan instead of the build, the kernels in the Triton
interpreter, pytest --collect-only). Results: OUT/gpu-check.json (every step: status, exit code,
seconds, budget, the end of its output; rewritten after every step), OUT/gpu-check.log (all
output), and the JSON files of steps 6 and 7 in OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))


@dataclass
class Step:
    name: str
    budget_s: float  # at most this long
    min_s: float  # skipped when less than this is left before the deadline
    command: list[str] | None  # None: skipped, with `skip_reason`
    env: dict = field(default_factory=dict)
    skip_reason: str = ""


def _python_snippet_versions() -> str:
    return (
        "import json, platform, shutil, subprocess, torch\n"
        "v = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "     'cuda_available': torch.cuda.is_available()}\n"
        "try:\n    import triton; v['triton'] = triton.__version__\nexcept ImportError as e:\n    v['triton'] = repr(e)\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    v.update(device=p.name, capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))\n"
        "nvcc = shutil.which('nvcc')\n"
        "v['nvcc'] = subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else None\n"
        "print(json.dumps(v))\n"
    )


def plan(dry_run: bool, out: Path) -> list[Step]:
    python = sys.executable
    wheels = sorted((ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else []
    steps = [Step("environment", 30, 5, [python, "-c", _python_snippet_versions()])]
    nvidia_smi = shutil.which("nvidia-smi")
    if dry_run or nvidia_smi is None:
        steps.append(Step("nvidia-smi", 15, 2, None, skip_reason="dry run" if dry_run else "nvidia-smi not found"))
    else:
        steps.append(Step("nvidia-smi", 15, 2, [nvidia_smi]))
    if wheels:
        install = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
        if dry_run:  # the wheels are for the GPU image's CPython 3.12: check that pip would take them there
            install += ["--dry-run", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any",
                        "--target", str(out / "wheel-check")]
        steps.append(Step("wheels", 60, 10, install + [str(w) for w in wheels]))
    else:
        steps.append(Step("wheels", 60, 10, None, skip_reason="no .whl/ folder (bash benchmarks/fetch_gpu_wheels.sh, then carry .whl)"))
    cores = str(os.cpu_count() or 1)
    if dry_run:
        # The plan setup.py would build (it needs no compiler); the suite builds the CPU extension.
        steps.append(Step("build", 120, 10, [python, "-c", "import runpy, sys; sys.argv = ['setup.py', '--name']; "
                                                       f"runpy.run_path({str(ROOT / 'setup.py')!r}, run_name='__main__')"]))
        steps.append(Step("baseline build", 90, 30, None, skip_reason="dry run: the original Deformable-DETR kernel is CUDA only"))
        steps.append(Step("gpu tests", 150, 20, [python, "-m", "pytest", "-m", "gpu", "-q", "--collect-only", "-p", "no:cacheprovider", "tests"]))
        steps.append(Step("sanitizer", 90, 20, [python, str(ROOT / "benchmarks" / "sanitize_kernels.py"), "--device", "cpu"],
                          env={"TRITON_INTERPRET": "1"}))
        steps.append(Step("kernels", 180, 30, [python, str(ROOT / "benchmarks" / "kernels.py"), "--quick", "--out", str(out)]))
        steps.append(Step("train step", 240, 30, [python, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--out", str(out)]))
        return steps
    steps.append(Step("build", 150, 60, [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--disable-pip-version-check",
                                         "-e", str(ROOT)], env={"FORCE_CUDA": "1", "MAX_JOBS": cores, "DIMASKDINO_CUDA_ARCHS": "90a"}))
    if (ROOT / ".baseline" / "Deformable-DETR").is_dir():
        steps.append(Step("baseline build", 90, 30, [python, str(ROOT / "benchmarks" / "baseline" / "deformable_detr.py"), "--build"],
                          env={"MAX_JOBS": cores}))
    else:
        steps.append(Step("baseline build", 90, 30, None, skip_reason="no .baseline/ (bash benchmarks/baseline/fetch_deformable_detr.sh, then carry .baseline)"))
    steps.append(Step("gpu tests", 120, 30, [python, "-m", "pytest", "-m", "gpu", "-q", "-x", "-n", "8", "-p", "no:cacheprovider", "tests"]))
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        steps.append(Step("sanitizer", 60, 20, None, skip_reason="compute-sanitizer not found"))
    else:
        steps.append(Step("sanitizer", 90, 20, [sanitizer, "--tool", "memcheck", "--error-exitcode", "1",
                                                python, str(ROOT / "benchmarks" / "sanitize_kernels.py")]))
    steps.append(Step("kernels", 150, 60, [python, str(ROOT / "benchmarks" / "kernels.py"), "--out", str(out)]))
    steps.append(Step("train step", 120, 45, [python, str(ROOT / "benchmarks" / "train_step.py"), "--out", str(out)]))
    return steps


def run_step(step: Step, timeout: float, log) -> dict:
    log.write(f"\n===== {step.name} (budget {timeout:.0f} s): {' '.join(step.command)}\n")
    log.flush()
    env = {**os.environ, **step.env}
    started = time.monotonic()
    # Own process group: a timeout ends the step and everything it started.
    process = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = "timeout"
    log.write(output or "")
    log.flush()
    return {"status": status, "returncode": process.returncode, "seconds": round(time.monotonic() - started, 1),
            "budget_s": round(timeout, 1), "output_tail": (output or "")[-3000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="total time (default 9 minutes)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu-check"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.provenance import write_result

    start = time.monotonic()
    results: dict[str, dict] = {}
    summary = {"dry_run": args.dry_run, "deadline_s": args.deadline_s, "steps": results}
    with open(out / "gpu-check.log", "w") as log:
        for step in plan(args.dry_run, out):
            left = args.deadline_s - (time.monotonic() - start)
            if step.command is None:
                results[step.name] = {"status": "skipped", "reason": step.skip_reason}
            elif left < step.min_s:
                results[step.name] = {"status": "skipped", "reason": f"deadline: {left:.0f} s left, needs at least {step.min_s:.0f} s"}
            else:
                results[step.name] = run_step(step, min(step.budget_s, left), log)
                if step.name == "environment" and results[step.name]["status"] == "ok":
                    results[step.name]["versions"] = json.loads(results[step.name]["output_tail"].strip().splitlines()[-1])
            line = f"{step.name:12s} {results[step.name]['status']:8s} " + (
                f"{results[step.name]['seconds']:6.1f} s" if "seconds" in results[step.name] else results[step.name]["reason"])
            print(line, flush=True)
            summary["elapsed_s"] = round(time.monotonic() - start, 1)
            write_result(out, "gpu-check.json", summary)
    failed = [name for name, r in results.items() if r["status"] in ("failed", "timeout")]
    print(f"gpu check {'dry run ' if args.dry_run else ''}done in {summary['elapsed_s']:.0f} s; "
          f"{'failed: ' + ', '.join(failed) if failed else 'no step failed'}; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
