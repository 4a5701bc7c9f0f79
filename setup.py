"""Builds the native extension `dimaskdino._C` from csrc/.

C++ CPU kernels are always built. CUDA kernels are added when the installed torch has CUDA and
nvcc is found; otherwise one line says why they were skipped (FORCE_CUDA=1 makes that an error).
Environment: DIMASKDINO_CUDA_ARCHS (default "90", e.g. "80;90a"), MAX_JOBS (honoured by ninja via
torch's BuildExtension), DEBUG=1 for -O0 -g, CUDA_HOME (else found from nvcc, see cuda_home()).

The functions are importable (tests/test_build.py checks them); setup() runs only as a script.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def cxx_standard(torch_version: str) -> str:
    """C++20 from torch 2.14 on (its ATen headers require it), C++17 before (what older torch
    headers and their nvcc front ends were tested with)."""
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def toolkit_of_nvcc(nvcc: str) -> str | None:
    """The CUDA toolkit root that `nvcc` really runs from. nvcc's dry run prints its own location
    (`TOP=<toolkit>/bin/..`), so a wrapper script elsewhere on the PATH (e.g. /usr/local/bin/nvcc
    doing `exec /usr/local/cuda-13.0/bin/nvcc`) still leads to the toolkit."""
    try:
        result = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    if match is None:
        return None
    top = os.path.realpath(match.group(1).strip())
    return top if _is_toolkit(top) else None


def _is_toolkit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and os.path.isfile(os.path.join(path, "bin", "nvcc"))


def cuda_home(environ=os.environ) -> tuple[str | None, str]:
    """(toolkit root or None, how it was chosen). CUDA_HOME / CUDA_PATH when set; else the toolkit
    behind the `nvcc` on PATH, else /usr/local/cuda. torch's own guess (the parent of the PATH
    nvcc's folder) is wrong when that nvcc is a wrapper outside the toolkit, and the build then
    misses cuda_runtime.h."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(variable):
            return environ[variable], f"{variable} from the environment"
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc is not None:
        top = toolkit_of_nvcc(nvcc)
        if top is not None:
            return top, f"the toolkit that {nvcc} runs (nvcc --dryrun)"
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "the default /usr/local/cuda"
    return None, "no nvcc on PATH, CUDA_HOME unset and no /usr/local/cuda"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _cuda_build_possible(torch, cpp_extension):
    if torch.version.cuda is None:
        return False, f"the installed torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")) is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, ""


def _gencode_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _use_cuda_home() -> None:
    """Chooses the toolkit before torch.utils.cpp_extension reads CUDA_HOME (at its import)."""
    home, how = cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home
        print(f"dimaskdino: CUDA toolkit {home} ({how})", flush=True)


def _extensions():
    _use_cuda_home()
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("CUDA_HOME"):  # in case cpp_extension was imported before CUDA_HOME was set
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    std = f"-std={cxx_standard(torch.__version__)}"
    cxx_flags = [std, *opt, "-fopenmp" if sys.platform.startswith("linux") else ""]
    cxx_flags = [f for f in cxx_flags if f]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cpp_sources = [s for s in _sources("csrc/**/*.cpp") if not s.endswith("_cuda.cpp")]

    with_cuda, why_not = _cuda_build_possible(torch, cpp_extension)
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    if not with_cuda:
        if force_cuda:
            raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
        print(f"dimaskdino: building CPU kernels only: {why_not}", flush=True)
        return [
            cpp_extension.CppExtension(
                "dimaskdino._C", cpp_sources, include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
            )
        ]

    archs = os.environ.get("DIMASKDINO_CUDA_ARCHS", "90")
    sources = cpp_sources + _sources("csrc/**/*_cuda.cpp") + _sources("csrc/**/*.cu")
    nvcc_flags = [std, *opt, "-lineinfo", *_gencode_flags(archs)]
    return [
        cpp_extension.CUDAExtension(
            "dimaskdino._C", sources, include_dirs=include_dirs,
            define_macros=[("DIMASKDINO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__":  # pip (setuptools.build_meta) runs this file as __main__ too
    from setuptools import setup

    setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext_class()})
