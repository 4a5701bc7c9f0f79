#!/usr/bin/env bash
# Downloads benchmarks/gpu_wheels.txt as wheels for the GPU image (CPython 3.12, x86_64
# manylinux) into .whl/ (ignored by git), to carry to a machine without a package index;
# gpu_check.sh installs them from there with --no-index. Dependencies are not fetched: the image
# has numpy, and each listed package needs nothing else it lacks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"${PYTHON:-python3}" -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$root/.whl" -r "$root/benchmarks/gpu_wheels.txt"
du -sh "$root/.whl"
