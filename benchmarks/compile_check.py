"""torch.compile of the training forward: compiles the demo model, runs forward + losses + backward
on a fixed batch, and compares the loss with eager mode.

    python benchmarks/compile_check.py --out DIR [--backend inductor] [--size 128] [--repeats 5] [--cold]

Writes DIR/<device>-compile-check.json (benchmarks/provenance.py): the eager and compiled losses,
the first compiled call (the compile), and the median and min/max of `--repeats` further calls
of each mode. `--cold` compiles into a fresh, empty Inductor cache (the first call then includes
every kernel compile; without it a warm cache from an earlier run shortens it). Kept out of the
test suite because Inductor's first compile takes minutes on a 2-core CPU; `--quick` (CI) runs
the same code with the "eager" backend on a small image, in seconds.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.provenance import device_slug, write_result  # noqa: E402
from benchmarks.spread import summarize  # noqa: E402
from dimaskdino.config import apply_overrides, get_preset
from dimaskdino.model import build_model
from dimaskdino.model.criterion import build_criterion


def fixed_batch(size: int):
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    targets = []
    for _ in range(2):
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        boxes = []
        for i, (y0, x0, h, w) in enumerate([(size // 12, size // 6, size // 3, size // 2), (size // 2, size // 4, size // 2, size // 2)]):
            masks[i, y0:y0 + h, x0:x0 + w] = True
            boxes.append([(x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size])
        targets.append({"labels": torch.tensor([0, 2]), "boxes": torch.tensor(boxes), "masks": masks})
    return images, targets


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"), help="result folder")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first, per mode")
    parser.add_argument("--cold", action="store_true", help="compile into a fresh, empty Inductor cache")
    parser.add_argument("--quick", action="store_true", help="backend 'eager', 64x64, 1 repeat: a smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.backend, args.size, args.repeats = "eager", 64, 1
    cache = tempfile.mkdtemp(prefix="inductor-cold-") if args.cold else None
    if cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    cfg = apply_overrides(get_preset("demo"), ["model.num_classes=3"])
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = build_criterion(cfg)
    images, targets = fixed_batch(args.size)

    def loss_of(module):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        outputs = module(images, targets, generators=generators, dn_max_gt=2)
        losses = criterion(outputs, targets, generators=[torch.Generator().manual_seed(i) for i in range(2)])
        return sum(losses.values())

    eager = loss_of(model).item()
    compiled = torch.compile(model, backend=args.backend)
    start = time.perf_counter()
    loss = loss_of(compiled)
    loss.backward()
    first = time.perf_counter() - start
    compiled_times = [timed(lambda: loss_of(compiled).backward()) for _ in range(args.repeats)]
    eager_times = [timed(lambda: loss_of(model).backward()) for _ in range(args.repeats)]
    difference = abs(loss.item() - eager)
    path = write_result(args.out, f"{device_slug()}-compile-check.json", {
        "backend": args.backend, "size": args.size, "batch": 2, "preset": "demo", "quick": args.quick,
        "inductor_cache": "fresh (cold)" if cache else "default (may be warm)",
        "eager_loss": eager, "compiled_loss": loss.item(), "abs_difference": difference,
        "first_call_s": first, "compiled_call_s": summarize(compiled_times), "eager_call_s": summarize(eager_times)})
    print(f"backend={args.backend}: eager loss {eager:.6f}, compiled loss {loss.item():.6f}; first call (compile) "
          f"{first:.1f} s, then {summarize(compiled_times)['median']:.2f} s per call (eager "
          f"{summarize(eager_times)['median']:.2f} s); written {path}")
    if difference > 1e-3 * abs(eager):
        raise SystemExit("compiled loss differs from eager")


if __name__ == "__main__":
    main()
