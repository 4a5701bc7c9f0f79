"""Mixed precision of a training run (`train.amp`).

- "bf16" (default): bf16 autocast on a GPU, no loss scaling. A deliberate difference from the
  authors: bf16 has fp32's exponent range, so gradients cannot underflow (no loss scaler) and no
  layer needs to be kept in fp32 to avoid overflow; Hopper runs bf16 at the fp16 rate, and the
  engine's kernels (deformable attention, BATO attention, point-sampled mask loss) read bf16, which
  halves their memory traffic where the authors' fp32 islands would double it.
- "fp16": the authors' recipe (detectron2 AMPTrainer): fp16 autocast with a dynamic loss scaler,
  and their fp32 islands: the pixel decoder, the TI layers and every decoder layer run in fp32
  (the model is built with them, see `float32_under_autocast`); evaluation in fp32.
- "fp32": no autocast.
Autocast applies on CUDA; on a CPU training runs in fp32 whatever the mode (as before), unless
`on_cpu` (tests).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dimaskdino.step_guard import optimizer_step

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class MixedPrecision:
    def __init__(self, mode: str, device: torch.device, on_cpu: bool = False):
        if mode not in _DTYPES:
            raise ValueError(f"train.amp must be one of {', '.join(_DTYPES)}, got '{mode}'")
        self.mode, self.device = mode, torch.device(device)
        enabled = _DTYPES[mode] is not None and (self.device.type == "cuda" or on_cpu)
        self.dtype = _DTYPES[mode] if enabled else None
        # fp16 gradients underflow without loss scaling (the authors' GradScaler).
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_and_clip(self, optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> torch.Tensor:
        """Clips the whole model's gradient norm (of the unscaled gradients); returns the norm
        before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return nn.utils.clip_grad_norm_(list(parameters), max_norm)

    def step(self, optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
        """The optimizer step, which does nothing where `skip` (a device flag: the loss or the
        gradient norm is not finite) is set. With loss scaling the scaler makes the same decision
        from the unscaled gradients (and lowers the scale)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer_step(optimizer, skip)
