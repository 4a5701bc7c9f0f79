"""The original Deformable-DETR MSDA extension as a baseline: minimal patches for torch >= 2.11,
and its build (torch.utils.cpp_extension.load, into a folder under .baseline/).

    python benchmarks/baseline/deformable_detr.py .baseline/Deformable-DETR/models/ops/src   # patch
    python benchmarks/baseline/deformable_detr.py --build                                    # build (GPU)

Only API renames, no change to what the kernels compute (the baseline must stay the original):
- `AT_DISPATCH_FLOATING_TYPES(x.type(), ...)` -> `x.scalar_type()` (dispatch on a ScalarType);
- `t.data<T>()` -> `t.data_ptr<T>()` (Tensor::data<T>() was removed);
- `t.type().is_cuda()` -> `t.is_cuda()` (the deprecated type properties);
- `AT_ERROR(msg)` -> `TORCH_CHECK(false, msg)` (AT_ERROR was removed).
Idempotent: a patched tree stays as it is. Prints what it changed per file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PATCHES = [
    (re.compile(r"AT_DISPATCH_FLOATING_TYPES\((\w+)\.type\(\)"), r"AT_DISPATCH_FLOATING_TYPES(\1.scalar_type()"),
    (re.compile(r"\.data<(\w+)>\(\)"), r".data_ptr<\1>()"),
    (re.compile(r"(\w+)\.type\(\)\.is_cuda\(\)"), r"\1.is_cuda()"),
    (re.compile(r"\bAT_ERROR\("), r"TORCH_CHECK(false, "),
]


def patch_tree(src: Path) -> dict[str, int]:
    if not (src / "vision.cpp").is_file():
        raise SystemExit(f"patch_deformable_detr: {src} is not Deformable-DETR's models/ops/src (no vision.cpp)")
    changed = {}
    for path in sorted(src.rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".h", ".cuh"):
            continue
        text = path.read_text()
        total = 0
        for pattern, replacement in PATCHES:
            text, count = pattern.subn(replacement, text)
            total += count
        if total:
            path.write_text(text)
            changed[str(path.relative_to(src))] = total
    return changed


def sources(src: Path, with_cuda: bool) -> list[str]:
    """The files torch.utils.cpp_extension.load builds (as the repository's setup.py does)."""
    files = [src / "vision.cpp", *sorted((src / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((src / "cuda").glob("*.cu"))
    return [str(f) for f in files]


SRC = Path(__file__).resolve().parents[2] / ".baseline" / "Deformable-DETR" / "models" / "ops" / "src"


def load(src: Path = SRC, verbose: bool = False, with_cuda: bool | None = None):
    """The built extension module (MultiScaleDeformableAttention: ms_deform_attn_forward/backward),
    or raises with why. The original has no CPU kernel (its CPU functions raise), so this is for a
    GPU (with_cuda defaults to torch.cuda.is_available()); C++ standard as the project's setup.py."""
    import torch
    from torch.utils import cpp_extension

    if not (src / "vision.cpp").is_file():
        raise FileNotFoundError(f"{src} not found: run benchmarks/baseline/fetch_deformable_detr.sh first")
    patch_tree(src)
    with_cuda = torch.cuda.is_available() if with_cuda is None else with_cuda
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"
    build = src.parents[3] / f"build-torch{torch.__version__.replace('+', '-')}"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="MultiScaleDeformableAttention", sources=sources(src, with_cuda), build_directory=str(build),
        extra_cflags=["-O3", std] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3", std, "-DWITH_CUDA", "-gencode=arch=compute_90,code=sm_90"],
        extra_include_paths=[str(src)], with_cuda=with_cuda, verbose=verbose,
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--build"]:  # the GPU check builds it before the kernel benchmarks
        print(f"built {load(verbose=True).__file__}")
        sys.exit(0)
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for name, count in patch_tree(Path(sys.argv[1])).items():
        print(f"patched {name}: {count} replacements")
