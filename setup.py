"""Builds the native extension `dimaskdino._C` from csrc/.

C++ CPU kernels are always built. CUDA kernels are added when the installed torch has CUDA and
nvcc is found; otherwise one line says why they were skipped (FORCE_CUDA=1 makes that an error).
Environment: DIMASKDINO_CUDA_ARCHS (default "90", e.g. "80;90a"), MAX_JOBS (honoured by ninja via
torch's BuildExtension), DEBUG=1 for -O0 -g.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _extensions():
    import torch
    from torch.utils import cpp_extension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = ["-std=c++17", *opt, "-fopenmp" if sys.platform.startswith("linux") else ""]
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
    nvcc_flags = ["-std=c++17", *opt, "-lineinfo", *_gencode_flags(archs)]
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


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext_class()})
