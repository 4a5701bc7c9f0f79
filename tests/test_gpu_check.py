"""The prepared GPU check (benchmarks/gpu_check.sh) runs on the CPU in its --dry-run mode: the same
steps at toy sizes, GPU-only tools skipped with a message; its deadline skips what would overrun;
the Deformable-DETR baseline patches are the minimal API renames."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_check(tmp_path, *args, timeout):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the check sets it where it needs it
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path), *args],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    return result, summary


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    result, summary = run_check(tmp_path, "--dry-run", timeout=900)
    steps = summary["steps"]
    assert result.returncode == 0, result.stdout + result.stderr + json.dumps(steps, indent=1)[-4000:]
    assert list(steps) == ["environment", "nvidia-smi", "wheels", "build", "baseline build", "gpu tests", "sanitizer", "kernels", "train step"]
    assert steps["nvidia-smi"] == {"status": "skipped", "reason": "dry run"}
    for name in ("environment", "build", "gpu tests", "sanitizer", "kernels", "train step"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert steps["environment"]["versions"]["torch"]
    assert "every kernel matches its float64 reference" in steps["sanitizer"]["output_tail"]
    assert summary["git_commit"] and "device" in summary  # provenance
    written = {p.name for p in tmp_path.iterdir()}
    assert {"gpu-check.json", "gpu-check.log", "cpu-msda.json", "cpu-bato.json", "cpu-train-step.json"} <= written
    train = json.loads((tmp_path / "cpu-train-step.json").read_text())
    assert train["reduced_size"] and train["rows"]["dimaskdino-auto"]["median_step_s"] > 0


def test_gpu_check_deadline_skips_what_would_overrun(tmp_path):
    result, summary = run_check(tmp_path, "--dry-run", "--deadline-s", "1", timeout=120)
    assert result.returncode == 0, result.stderr
    for name, step in summary["steps"].items():
        assert step["status"] == "skipped", (name, step)
        if name not in ("nvidia-smi", "wheels", "baseline build"):
            assert step["reason"].startswith("deadline"), (name, step)


def test_deformable_detr_patches_are_minimal(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "baseline"))
    import deformable_detr

    (tmp_path / "cuda").mkdir()
    (tmp_path / "vision.cpp").write_text("// entry\n")
    source = (
        'AT_ASSERTM(value.type().is_cuda(), "value must be a CUDA tensor");\n'
        'AT_DISPATCH_FLOATING_TYPES(value.type(), "ms_deform_attn_forward_cuda", ([&] {\n'
        "    f(value.data<scalar_t>() + n, spatial_shapes.data<int64_t>());\n"
        "}));\n"
        'AT_ERROR("Not implemented on the cpu");\n'
        "int unchanged = other.size(0);\n"
    )
    (tmp_path / "cuda" / "kernel.cu").write_text(source)
    assert deformable_detr.patch_tree(tmp_path) == {"cuda/kernel.cu": 5}
    assert (tmp_path / "cuda" / "kernel.cu").read_text() == (
        'AT_ASSERTM(value.is_cuda(), "value must be a CUDA tensor");\n'
        'AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", ([&] {\n'
        "    f(value.data_ptr<scalar_t>() + n, spatial_shapes.data_ptr<int64_t>());\n"
        "}));\n"
        'TORCH_CHECK(false, "Not implemented on the cpu");\n'
        "int unchanged = other.size(0);\n"
    )
    assert deformable_detr.patch_tree(tmp_path) == {}  # idempotent
