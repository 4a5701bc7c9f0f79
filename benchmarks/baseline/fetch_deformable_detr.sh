#!/usr/bin/env bash
# Fetches the original Deformable-DETR MSDA extension (models/ops of
# github.com/fundamentalvision/Deformable-DETR, Apache-2.0) into the ignored .baseline/ folder and
# applies the minimal patches that make it build on torch >= 2.11 (deformable_detr.py).
# Its source is never committed: benchmarks/kernels.py builds it from .baseline/ at run time
# (torch.utils.cpp_extension.load) as the "deformable-detr" row. The GPU machine has no network:
# run this on a machine that has one, then carry .baseline/ along (gpu_check.sh says how).
#   bash benchmarks/baseline/fetch_deformable_detr.sh [--from LOCAL_CLONE]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="$root/.baseline/Deformable-DETR"
url="https://github.com/fundamentalvision/Deformable-DETR"
commit="11169a60c33333af00a4849f1808023eba96a931"  # the repository's last commit (2021)
source="$url"
if [[ "${1:-}" == "--from" ]]; then source="$2"; fi
rm -rf "$dest" && mkdir -p "$root/.baseline"
git clone --quiet "$source" "$dest"
git -C "$dest" checkout --quiet "$commit" 2>/dev/null || git -C "$dest" checkout --quiet FETCH_HEAD 2>/dev/null || true
echo "fetched $(git -C "$dest" rev-parse HEAD) into $dest"
"${PYTHON:-python3}" "$root/benchmarks/baseline/deformable_detr.py" "$dest/models/ops/src"
