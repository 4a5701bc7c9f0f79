#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py for the steps, budgets and outputs).
#
# On a machine with a package index and network, once:
#   bash benchmarks/fetch_gpu_wheels.sh                    # wheels the GPU image lacks -> .whl/
#   bash benchmarks/baseline/fetch_deformable_detr.sh      # original MSDA kernel -> .baseline/
# On the H200 (carry .whl and .baseline; results in $OUT):
#   bash benchmarks/gpu_check.sh                           # at most 9 minutes
# Anywhere, as CI does (the same steps on the CPU at toy sizes):
#   bash benchmarks/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
