"""Non-finite steps: skipped on the device, counted, and a run that keeps producing them stopped.

Every step, before the optimizer step, a flag says whether the loss or the gradient norm is not
finite (all processes agree: the flag is reduced with MAX, since a loss is local to a process).
The optimizer step reads it on the device: torch.optim's fused AdamW takes `found_inf` (the
protocol torch.amp.GradScaler uses) and then leaves the weights, the moments and the step count
untouched. So skipping costs no host synchronization; the flag (with the loss and gradient norm)
is copied to the host without blocking and read one step later, when the step that follows has
synchronized anyway. The lr is a function of the step number, so a skipped step cannot disturb
the schedule.

`max_bad_steps` consecutive skipped steps raise TrainingDiverged naming the step and the last
checkpoint (every checkpoint is finite: save_checkpoint refuses non-finite state).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dimaskdino.cli import TrainingDiverged

logger = logging.getLogger("dimaskdino.train")


def skip_flag(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """float32 0-dim: 1.0 when the loss or the gradient norm is not finite on any process."""
    finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.detach())
    flag = (~finite).to(torch.float32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), which does nothing where `skip` is 1 (read on the device)."""
    if not optimizer.defaults.get("fused"):
        raise ValueError("optimizer_step needs a fused optimizer (fused=True): only those read found_inf")
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@dataclass
class _Pending:
    step: int
    values: torch.Tensor  # host: (flag, loss, grad norm)
    event: torch.cuda.Event | None


class NonFiniteGuard:
    """Counts skipped steps and stops the run after `max_bad_steps` in a row."""

    def __init__(self, max_bad_steps: int, skipped_before: int = 0, report: bool = True):
        self.max_bad_steps = max_bad_steps
        self.report = report  # log each skipped step (rank 0: all ranks skip the same steps)
        self.skipped = skipped_before  # over the whole run, resumed runs included
        self.consecutive = 0
        self.last_checkpoint: Path | None = None  # set by the trainer after each save / resume
        self._pending: list[_Pending] = []

    def record(self, step: int, skip: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Queues the step's flag for the host (no wait) and accounts for the earlier ones."""
        values = torch.stack([skip, loss.detach().float(), grad_norm.detach().float()])
        if values.is_cuda:
            host = torch.empty(3, dtype=torch.float32, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = values, None
        self.flush()
        self._pending.append(_Pending(step, host, event))
        if event is None:
            self.flush()

    def flush(self) -> None:
        """Accounts for every queued step (waits for the device where it has not finished)."""
        pending, self._pending = self._pending, []
        for item in pending:
            if item.event is not None:
                item.event.synchronize()
            flag, loss, grad_norm = item.values.tolist()
            self._account(item.step, flag > 0, loss, grad_norm)

    def _account(self, step: int, bad: bool, loss: float, grad_norm: float) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.report:
            logger.warning("step %d: loss %s, gradient norm %s: step skipped (%d in a row; the run stops at %d)",
                           step, _fmt(loss), _fmt(grad_norm), self.consecutive, self.max_bad_steps)
        if self.consecutive >= self.max_bad_steps:
            checkpoint = (f"the last checkpoint, with finite weights, is {self.last_checkpoint} (resume from it with "
                          f"a lower train.lr)") if self.last_checkpoint is not None else "no checkpoint was written"
            raise TrainingDiverged(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or gradient norm "
                f"(last: loss {_fmt(loss)}, gradient norm {_fmt(grad_norm)}); training stopped; {checkpoint}")


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)
