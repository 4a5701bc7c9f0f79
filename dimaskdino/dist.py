"""Process-group setup for torchrun (or a plain `python -m`), and the few collectives training needs."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistInfo:
    """Joins the torchrun group (NCCL on GPU, gloo on CPU); without torchrun, a group of one, so
    that FSDP and the checkpoint code take one path whatever the world size."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"train.device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=torch_device if device == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, torch_device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max_int(value: int, device: torch.device) -> int:
    """The maximum of a host integer over all processes."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def mean_over_processes(value, device: torch.device, minimum: float = 1.0):
    """A loss normalizer (a count or sum: a Python number, or a tensor without gradient) averaged
    over all processes, at least `minimum`: a loss term is then sum / global mean, whose mean
    over processes is the 1-process value. Not distributed: a float (or the tensor), no sync."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=device).detach().clone()
        dist.all_reduce(tensor)
        return (tensor / dist.get_world_size()).clamp(min=minimum)
    if isinstance(value, torch.Tensor):
        return value.detach().clamp(min=minimum)
    return max(float(value), minimum)


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over processes of scalar tensors, in one collective and one host transfer."""
    if not values:
        return {}
    names = list(values)
    stacked = torch.stack([values[n].detach().float() for n in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.cpu().tolist()))


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
