"""The README's model figures: parameter counts and forward FLOPs of the R50 presets.

    python benchmarks/model_stats.py --out DIR [--quick]

Parameter counts of every preset and FlopCounterMode FLOPs (2 per multiply-add; the deformable
sampling is not counted, see `python -m dimaskdino.model --help`) of one eval forward of the
R50 presets at 800x1333 and 800x1067, with masks for every decoder output and for the final one
only. Writes DIR/model-stats.json (benchmarks/provenance.py); counts do not depend on the device.
A few minutes on a 2-core CPU; `--quick` (CI) counts the demo preset at 64x64.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.provenance import write_result  # noqa: E402
from dimaskdino.config import PRESETS, get_preset  # noqa: E402
from dimaskdino.model import build_model  # noqa: E402
from dimaskdino.model.__main__ import count_parameters, forward_flops  # noqa: E402

FLOP_PRESETS = ("dimaskdino_r50_12ep", "maskdino_r50_12ep")
SIZES = ((800, 1333), (800, 1067))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"), help="result folder")
    parser.add_argument("--quick", action="store_true", help="the demo preset at 64x64 only: a smoke run (CI)")
    args = parser.parse_args(argv)
    param_presets = ["demo"] if args.quick else sorted(PRESETS)
    flop_presets, sizes = (("demo",), ((64, 64),)) if args.quick else (FLOP_PRESETS, SIZES)
    parameters, flops = {}, {}
    for name in param_presets:
        torch.manual_seed(0)
        model = build_model(get_preset(name))
        parameters[name] = count_parameters(model)
        print(f"{name}: {parameters[name]:,} parameters", flush=True)
        if name not in flop_presets:
            continue
        for height, width in sizes:
            for label, intermediate in (("every_output", True), ("final_masks_only", False)):
                with torch.no_grad():
                    count = forward_flops(model, height, width, intermediate_masks=intermediate)
                flops[f"{name}/{height}x{width}/{label}"] = {"flops": count, "gmac": count / 2e9}
                print(f"  {height}x{width} {label}: {count / 2e9:.1f} G multiply-adds", flush=True)
    path = write_result(args.out, "model-stats.json", {
        "quick": args.quick, "parameters": parameters, "forward_flops": flops,
        "flop_convention": "FlopCounterMode: 2 FLOPs per multiply-add (gmac = flops / 2e9); deformable sampling "
                           "and elementwise ops not counted; one random image, eval mode"})
    print(f"written {path}")


if __name__ == "__main__":
    main()
