"""Every Triton kernel compiles for Hopper (sm_90a) at the launches the model makes, under the
oldest supported triton (3.6.0, the GPU image's) and the installed one, within the register budget
of benchmarks/triton_compile.py (no spills in any case the model runs, shared memory that fits).
No GPU needed: triton compiles for a target with its bundled ptxas.

Cost on the 2-core development machine: about 40 compiles per triton version, run side by side,
~1.5 CPU-minutes each; triton 3.6.0 is installed once (pip --target, a 188 MB wheel, ~640 MB
unpacked) into the cache of tests/cuda_torch.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cuda_torch import or_skip, pip_target

ROOT = Path(__file__).resolve().parents[1]
OLDEST_TRITON = "3.6.0"
SCRIPT = ROOT / "benchmarks" / "triton_compile.py"


def _start(extra_path: Path | None) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "PYTHONPATH")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.Popen([sys.executable, str(SCRIPT), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def reports() -> dict:
    """{"installed": report, "oldest": report}: both compiled at once (two processes)."""
    oldest = or_skip(pip_target, f"triton=={OLDEST_TRITON}")
    processes = {"installed": _start(None), "oldest": _start(oldest)}
    found = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=1800)
        if not out.strip():
            pytest.fail(f"benchmarks/triton_compile.py ({name} triton) printed nothing; exit {process.returncode}:\n{err[-4000:]}")
        found[name] = json.loads(out)
    return found


def problems(report: dict) -> list[str]:
    return [f"{row['case']} ({row['kernel']}): {'; '.join(row['problems'])}" for row in report["kernels"] if row["problems"]]


@pytest.mark.parametrize("which", ["oldest", "installed"])
def test_every_kernel_compiles_for_sm90a_without_spills(reports, which):
    report = reports[which]
    if which == "oldest":
        assert report["triton_version"] == OLDEST_TRITON
    found = problems(report)
    assert not found, f"triton {report['triton_version']}:\n" + "\n".join(found)
    kernels = {row["kernel"] for row in report["kernels"]}
    assert kernels == {"bato_attention_fwd_kernel", "bato_attention_bwd_kernel", "class_max_scores_kernel",
                       "point_mask_cost_kernel", "point_mask_loss_fwd_kernel", "point_mask_loss_bwd_kernel"}


@pytest.mark.parametrize("which", ["oldest", "installed"])
def test_dots_use_tensor_cores_where_intended(reports, which):
    """16-bit dots become wgmma (warpgroup MMA) in the BATO kernels and the selection scores, the
    fp32 BATO backward's 3xTF32 dots and the bf16 cost GEMM tensor-core MMAs; the loss backward
    scatters with global atomics."""
    rows = {row["case"]: row for row in reports[which]["kernels"]}
    for case in ("bato fwd bfloat16 K=50", "bato bwd bfloat16 K=50", "selection scores bfloat16/float32 weights S=21760"):
        assert rows[case]["wgmma"], case
    for case in ("bato bwd float32 K=50", "mask costs bfloat16 N=20"):
        assert rows[case]["wgmma"] or rows[case]["mma_sync"], case
    assert rows["mask loss bwd float32"]["atomics"]
