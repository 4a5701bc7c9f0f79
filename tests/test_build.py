"""Build checks that need no GPU: every CUDA source compiles for Hopper, CMake builds the same
sources, and CI runs exactly the README's test command."""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "**" / "*.cu"), recursive=True))


def nvcc_or_skip() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("DIMASKDINO_REQUIRE_NVCC") == "1":
            pytest.fail("DIMASKDINO_REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("nvcc not found")
    return nvcc


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "no .cu files under csrc/"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cuda_source_compiles_for_sm90a(source, tmp_path):
    """The .cu files are torch-free, so plain nvcc compiles them on a machine without CUDA torch."""
    nvcc = nvcc_or_skip()
    command = [
        nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-warn-spills",
        f"-I{ROOT / 'csrc'}", "-c", source, "-o", str(tmp_path / "out.o"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stderr[-4000:]}"


def test_cmake_builds_the_same_sources(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), *generator,
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DDIMASKDINO_OUTPUT_DIR={tmp_path / 'out'}",
        f"-DPython3_EXECUTABLE={sys.executable}", "-DDIMASKDINO_WITH_CUDA=OFF",
    ]
    for command in (configure, ["cmake", "--build", str(tmp_path / "build")]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (tmp_path / "build" / "compile_commands.json").exists()
    assert list((tmp_path / "out").glob("_C*.so"))


def readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    marker = lines.index("<!-- test-command -->")
    block = lines[marker + 1 : lines.index("```", marker + 2)]
    return "\n".join(line for line in block if not line.startswith("```")).strip()


def test_ci_runs_the_readme_test_command():
    command = readme_test_command()
    assert command and "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text()
