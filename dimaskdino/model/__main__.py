"""Parameter count and forward FLOPs of a preset:

    python -m dimaskdino.model --preset dimaskdino_r50_12ep [--size 800 1333] [key=value ...]

FLOPs come from torch.utils.flop_counter.FlopCounterMode, which counts a multiply-add as 2 FLOPs
(fvcore, whose count gives MaskDINO's published 286 "GFLOPs", counts 1 per multiply-add); both
figures are printed. Only ops with a FLOP formula are counted (convolutions, matmuls, attention);
the deformable-attention sampling itself is not, nor are elementwise ops. The published 286 was
measured by detectron2's analyze_model, which averages over resized COCO val images (mostly
800x1067, about 20% fewer encoder tokens than 800x1333) and computes masks only for the final
output at inference: compare with the "final masks only" line at `--size 800 1067`.
"""

from __future__ import annotations

import argparse

import torch


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, height: int, width: int, intermediate_masks: bool = True) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward of a single random image."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.rand(1, 3, height, width) * 255
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images, intermediate_masks=intermediate_masks)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    from dimaskdino.config import PRESETS, apply_overrides, get_preset
    from dimaskdino.model import build_model

    parser = argparse.ArgumentParser(prog="python -m dimaskdino.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="dimaskdino_r50_12ep", choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--no-flops", action="store_true", help="only count parameters")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)

    cfg = apply_overrides(get_preset(args.preset), args.overrides)
    model = build_model(cfg)
    params = count_parameters(model)
    print(f"preset: {args.preset}")
    print(f"parameters: {params:,} ({params / 1e6:.2f} M)")
    if not args.no_flops:
        height, width = args.size
        for label, intermediate in (("every output with masks", True), ("final masks only", False)):
            flops = forward_flops(model, height, width, intermediate_masks=intermediate)
            print(
                f"forward at {height}x{width} ({label}): {flops / 1e9:.1f} GFLOPs counting a multiply-add "
                f"as 2 (FlopCounterMode) = {flops / 2e9:.1f} G multiply-adds (fvcore's convention)"
            )


if __name__ == "__main__":
    main()
