"""Data-parallel training over processes started by torchrun (torch.distributed, env:// rendezvous).

Every process builds the same models from the same seed and draws the same global batch; each then
computes the loss of its own slice of rows, scaled to its share of the batch mean, and the gradients
are summed over processes. Stage 2 draws its noise for the whole global batch, so its update is
single-process training on that batch up to the order of float additions; stage 1 samples the codec's
posterior per chunk (see CodecTrainer). Batch-norm statistics are averaged after each step.
Gradients are summed with one flattened all_reduce after the last micro-batch, which keeps the code
exact and simple; it does not overlap communication with the backward pass as DDP's buckets do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from latentgen.devices import resolve_device


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among `world_size` data-parallel processes (rank 0 writes the files)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, batch_size: int, what: str) -> slice:
        """This process's rows of a global batch of `batch_size`."""
        if batch_size % self.world_size:
            raise ValueError(f"{what} {batch_size} does not split over {self.world_size} processes; make it a "
                             f"multiple of {self.world_size} (it is the global batch, shared by all processes)")
        size = batch_size // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over processes (one all_reduce of the flattened gradients)."""
        parameters = [p for p in parameters if p.requires_grad]
        if not self.distributed or not parameters:
            return
        # A parameter unused on one process but used on another gets a zero gradient there, so
        # every process reduces the same list.
        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.uint8, device=parameters[0].device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        for parameter, used in zip(parameters, present.tolist()):
            if used and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(summed)

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average floating buffers (e.g. batch-norm statistics) so every process keeps the same ones."""
        if not self.distributed:
            return
        buffers = [b for b in module.buffers() if b.dtype.is_floating_point]
        if buffers:
            flat = torch._utils._flatten_dense_tensors(buffers)
            dist.all_reduce(flat)
            flat /= self.world_size
            for buffer, mean in zip(buffers, torch._utils._unflatten_dense_tensors(flat, buffers)):
                buffer.copy_(mean)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor summed over processes (every process gets the same result)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def start(device_name: str | None) -> tuple[ProcessGroup, torch.device, bool]:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), initialized if needed, and this process's device. The flag says whether
    this call initialized the group (and so should `stop` it). Without torchrun: one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup(), resolve_device(device_name), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process on each node
    started = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        started = True
    return ProcessGroup(dist.get_rank(), dist.get_world_size()), device, started


def stop(started: bool) -> None:
    if started and dist.is_initialized():
        dist.destroy_process_group()
