"""torch.compile of the training forward: compiles the demo model, runs forward + losses + backward
on a fixed batch, and compares the loss with eager mode.

    python benchmarks/compile_check.py [--backend inductor] [--size 128]

Kept out of the test suite because Inductor's first compile takes minutes on a 2-core CPU.
"""

import argparse
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
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
    start = time.time()
    loss = loss_of(compiled)
    loss.backward()
    first = time.time() - start
    start = time.time()
    loss_of(compiled).backward()
    print(f"backend={args.backend}: eager loss {eager:.6f}, compiled loss {loss.item():.6f}; "
          f"first call (compile) {first:.1f} s, second call {time.time() - start:.2f} s")
    if abs(loss.item() - eager) > 1e-3 * abs(eager):
        raise SystemExit("compiled loss differs from eager")


if __name__ == "__main__":
    main()
