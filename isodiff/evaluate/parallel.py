"""Data-parallel evaluation: the processes of a job share every metric's batches.

A metric's work is a sequence of chunks (EvalContext.map): process r computes the chunks
k with k mod W == r and every process receives all results, in chunk order, through
torch.distributed's object all-gather (k-diffusion's compute_features does the same with
tensors). Each chunk is computed exactly as one process computes it (same rows, same batch,
per-sample seeds), so W processes give one process's numbers. Everything after the gather
runs on every process alike; only rank 0 writes files.

One process (no launcher) is the default and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from isodiff.runs.distributed import export_torch_distributed_env

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's W processes (W = 1: alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    def mine(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def gather(self, parts: dict[int, T], total: int) -> list[T]:
        """Every process's {chunk: result} -> the `total` results in chunk order."""
        if self.world > 1:
            received: list[dict[int, T] | None] = [None] * self.world
            torch.distributed.all_gather_object(received, to_cpu(parts))
            parts = {k: v for part in received for k, v in (part or {}).items()}
        return [parts[k] for k in range(total)]

    def share(self, value: T) -> T:
        """Rank 0's value on every process (a decision all must take alike)."""
        if self.world == 1:
            return value
        box: list[Any] = [value if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def join() -> tuple[Ranks, torch.device | None]:
    """Join the processes a launcher started (torchrun, accelerate launch, SLURM tasks):
    their Ranks and this process's device (None when alone: the caller's choice holds)."""
    export_torch_distributed_env()  # SLURM tasks -> torch's variables (nothing otherwise)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(), None
    from accelerate import PartialState

    # gloo on CPU-only nodes; accelerate picks cuda:LOCAL_RANK and NCCL otherwise
    state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(state.process_index, state.num_processes), state.device


def to_cpu(value: Any) -> Any:
    """Tensors in a (nested) result moved to the CPU, so that they pickle to any rank."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value
