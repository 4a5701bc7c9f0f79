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
CUDA_GLUE_SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "**" / "*_cuda.cpp"), recursive=True))


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


def test_cuda_kernels_reject_levels_outside_value(tmp_path):
    """The CUDA kernels check every level of spatial_shapes / level_start_index against value's
    token count while staging it (no host sync), and trap before any read. The check itself is
    host-callable, so a host program built by nvcc runs it here on the cases that matter."""
    nvcc = nvcc_or_skip()
    program = tmp_path / "level_fits.cu"
    program.write_text(
        '#include "ms_deform_attn/cuda/ms_deform_attn_device.cuh"\n'
        "using dimaskdino::msda::detail::level_fits;\n"
        "int main() {\n"
        "  const long long big = 1LL << 40;\n"
        "  const bool ok = level_fits(32, 32, 0, 1360) && level_fits(4, 4, 1344, 1360)\n"
        "      && level_fits(1, 1, 0, 1)\n"
        "      && !level_fits(4, 5, 1344, 1360)     /* last level one row past the end */\n"
        "      && !level_fits(32, 32, -1, 1360)     /* negative start */\n"
        "      && !level_fits(0, 32, 0, 1360) && !level_fits(32, -2, 0, 1360)\n"
        "      && !level_fits(1, 1, 1360, 1360)     /* starts at the end */\n"
        "      && !level_fits(big, big, 0, 1360)    /* h * w would overflow int64 */\n"
        "      && !level_fits(-big, -big, 0, 1360);\n"
        "  return ok ? 0 : 1;\n"
        "}\n")
    binary = tmp_path / "level_fits"
    build = subprocess.run([nvcc, "-std=c++17", f"-I{ROOT / 'csrc'}", str(program), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    assert subprocess.run([str(binary)]).returncode == 0, "level_fits accepted a bad level or rejected a good one"
    kernels = (ROOT / "csrc" / "ms_deform_attn" / "cuda" / "ms_deform_attn_kernels.cu").read_text()
    assert kernels.count("stage_levels(p.spatial_shapes, p.level_start, d.levels, d.num_value)") == 2


@pytest.mark.parametrize("source", CUDA_GLUE_SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cuda_glue_compiles_against_torch_headers(source, tmp_path):
    """The torch side of the CUDA kernels, compiled (not linked) with the host compiler. A CPU build
    of torch ships the c10/cuda headers but not the one generated at CUDA build time, so a stub
    stands in for it."""
    nvcc = nvcc_or_skip()
    from torch.utils.cpp_extension import include_paths

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(os.path.realpath(nvcc)).parents[1], "/usr/local/cuda"]
    includes = [Path(c) / "include" for c in candidates if c and (Path(c) / "include" / "cuda_runtime.h").exists()]
    if not includes:
        pytest.fail(f"nvcc at {nvcc} but no CUDA include dir among {candidates}")
    cuda_include = includes[0]
    stub = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    command = [
        "g++", "-std=c++17", "-fsyntax-only", "-Wall", "-DDIMASKDINO_WITH_CUDA=1",
        f"-I{ROOT / 'csrc'}", f"-I{tmp_path / 'include'}", f"-I{cuda_include}",
        *[f"-I{path}" for path in include_paths()], source,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"g++ failed on {source}:\n{result.stderr[-4000:]}"


def setup_module_functions():
    """setup.py's functions, without running setup()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dimaskdino_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_uses_cxx20_from_torch_2_14():
    cxx_standard = setup_module_functions().cxx_standard
    assert cxx_standard("2.14.1+cu130") == "c++20"
    assert cxx_standard("2.15.0.dev20260101") == "c++20"
    assert cxx_standard("3.0.0") == "c++20"
    assert cxx_standard("2.13.0+cpu") == "c++17"
    assert cxx_standard("2.11.0") == "c++17"


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper(tmp_path):
    """Where the nvcc on PATH is a wrapper script outside the toolkit, torch would take its parent
    folder as CUDA_HOME and miss cuda_runtime.h; setup.py asks nvcc where it runs from."""
    real_nvcc = nvcc_or_skip()
    setup = setup_module_functions()
    toolkit = setup.toolkit_of_nvcc(real_nvcc)
    assert toolkit is not None and (Path(toolkit) / "include" / "cuda_runtime.h").exists()
    wrapper = tmp_path / "wrappers" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {os.path.realpath(real_nvcc)} "$@"\n')
    wrapper.chmod(0o755)
    home, how = setup.cuda_home({"PATH": f"{wrapper.parent}:/usr/bin:/bin"})
    assert home == toolkit and str(wrapper) in how
    assert setup.cuda_home({"PATH": "/usr/bin", "CUDA_HOME": "/opt/x"}) == ("/opt/x", "CUDA_HOME from the environment")


CUDA_EXTENSION_CHECK = """
import os, subprocess, torch
import dimaskdino._C
from dimaskdino import _extension
from dimaskdino.ops import ms_deform_attn  # noqa: F401  (registers the fake kernels and autograd)

assert torch.version.cuda is not None, torch.__version__
assert os.path.samefile(dimaskdino._C.__file__, os.environ["DIMASKDINO_CUDA_EXTENSION"]), dimaskdino._C.__file__
assert _extension.load_error() is None, _extension.load_error()
for op in ("dimaskdino::ms_deform_attn", "dimaskdino::_ms_deform_attn_backward"):
    for key in ("CUDA", "CPU"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
# The kernels inside are Hopper code (the .cu files compiled and linked, not just the glue).
import triton
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
listing = subprocess.run([cuobjdump, "--list-elf", dimaskdino._C.__file__], capture_output=True, text=True, check=True).stdout
assert "sm_90a" in listing, listing
print("ok", torch.__version__, listing.strip().splitlines()[0])
"""


def test_cuda_extension_builds_and_loads_against_cuda_torch():
    """FORCE_CUDA=1 build of the whole extension (glue + every .cu, linked) against a CUDA build of
    torch with this machine's nvcc, then the ops load from it with CUDA kernels registered. The
    build is cached (tests/cuda_torch.py); under CI a failure to build fails here."""
    from cuda_torch import cuda_torch_or_skip

    python, env = cuda_torch_or_skip()
    result = subprocess.run([python, "-c", CUDA_EXTENSION_CHECK], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.startswith("ok ")


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
