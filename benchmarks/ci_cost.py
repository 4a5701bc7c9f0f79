"""What the CI tests added for issue 13 cost on this machine: wall and CPU seconds of each group,
each run as its own `python -m pytest -q` (as the README test command runs them, one after the
other).

    python benchmarks/ci_cost.py [--cold] [--out benchmarks/results]

--cold first empties the caches those tests fill (the FORCE_CUDA=1 build of the extension and the
triton 3.6.0 package under $DIMASKDINO_CACHE or ~/.cache/dimaskdino), so the first CI run on a new
machine is measured; the CUDA torch venv is kept unless DIMASKDINO_CUDA_PYTHON is unset and it is
missing (then its creation is part of the CUDA build group).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

GROUPS = {
    "cuda extension build + load (CUDA torch)": ["tests/test_build.py::test_cuda_extension_builds_and_loads_against_cuda_torch"],
    "Triton kernels for sm_90a, triton 3.6.0 and installed": ["tests/test_triton_compile.py"],
    "offline install / optional packages": ["tests/test_optional_dependencies.py"],
    "setup.py C++ standard and CUDA_HOME": ["tests/test_build.py::test_setup_uses_cxx20_from_torch_2_14",
                                           "tests/test_build.py::test_setup_finds_the_toolkit_behind_an_nvcc_wrapper"],
    "defect tests (1, 3, 7)": ["tests/test_mask_loss.py::test_cuda_backward_alerts_under_deterministic_algorithms",
                               "tests/test_ms_deform_attn.py::test_no_cuda_test_asks_for_float64",
                               "tests/test_triton_plumbing.py"],
}


def empty_caches() -> list[str]:
    from cuda_torch import cache_root

    removed = []
    for folder in (cache_root("cuda-torch"), cache_root("packages")):
        for entry in folder.glob("*") if folder.exists() else []:
            if entry.name.startswith(("build-", "pkg-", "triton==")):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
                removed.append(str(entry))
    return removed


def run_group(node_ids: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *node_ids],
                            capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"tests": node_ids, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "exit_code": result.returncode,
            "summary": result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="empty the build and package caches first")
    parser.add_argument("--out", help="write cpu-ci-cost[-cold].json (with provenance) into this folder")
    args = parser.parse_args()
    removed = empty_caches() if args.cold else []
    rows = {}
    for name, node_ids in GROUPS.items():
        rows[name] = run_group(node_ids)
        print(f"{name}: {rows[name]['wall_s']} s wall, {rows[name]['cpu_s']} s CPU, {rows[name]['summary']}", flush=True)
    total = {"wall_s": round(sum(r["wall_s"] for r in rows.values()), 1), "cpu_s": round(sum(r["cpu_s"] for r in rows.values()), 1)}
    print(f"total: {total['wall_s']} s wall, {total['cpu_s']} s CPU")
    if args.out:
        from benchmarks.provenance import write_result

        name = "cpu-ci-cost-cold.json" if args.cold else "cpu-ci-cost.json"
        write_result(args.out, name, {"cold": args.cold, "caches_emptied": removed, "groups": rows, "total": total,
                                      "note": "2-core machine shared with other jobs: wall times include waiting"})


if __name__ == "__main__":
    main()
