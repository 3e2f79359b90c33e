"""The only home of torch.distributed calls. Every helper works in a single process with no
process group: it then acts as world size 1."""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_minutes: float = 30.0, device: str = "auto") -> torch.device:
    """Start the process group when launched by torchrun; return this process's device.

    nccl on GPU, gloo on CPU; a finite timeout so a dead rank ends the job instead of hanging it.
    ``device``: "auto" (GPU when there is one), "cpu" or "cuda".
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but torch sees no GPU; set run.device=auto or cpu")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    this_device = torch.device("cuda", get_local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(this_device)
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        logger.info("process group: backend=%s rank=%d world_size=%d", backend, get_rank(), get_world_size())
    return this_device


def device_mesh(device: torch.device):
    """A 1-D mesh of every process on ``device``'s type (FSDP's unit of sharding)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (get_world_size(),))


def destroy_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (use for anything derived from time or randomness)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, in memory (no files on a shared disk)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s (as DDP does to a model's weights at start)."""
    if is_dist():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of any rank (itself without a process group)."""
    if not is_dist():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(get_world_size(), dim=0)[get_rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) across ranks along dim 0, keeping gradients.

    The gradients flowing back are summed over ranks, matching DDP's gradient averaging when every
    rank computes the same global loss.
    """
    if not is_dist():
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
