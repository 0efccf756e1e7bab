"""Where a run executes: device, precision, and its place among processes (via accelerate).

One process on CPU or one GPU is the plain case; `accelerate launch` / `torchrun` makes the same
code run data-parallel (DDP) or sharded (FSDP2, from the launcher's accelerate config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Runtime:
    accelerator: object  # accelerate.Accelerator
    device: torch.device
    rank: int
    world_size: int
    matmul_dtype: torch.dtype | None  # dtype of the LM-head matmuls (bf16 under bf16 precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return dict(zip(keys, tensor.tolist()))

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def make_runtime(precision: str) -> Runtime:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    bf16 = precision == "bf16" or (precision == "auto" and cuda)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda)
    if not cuda:
        # Reproducible CPU runs: a fixed thread count per process (2 processes share the cores).
        torch.set_num_threads(max(1, int(os.environ.get("POSTTRAIN_THREADS", os.cpu_count() or 1)) // accelerator.num_processes))
    return Runtime(
        accelerator=accelerator, device=accelerator.device, rank=accelerator.process_index,
        world_size=accelerator.num_processes, matmul_dtype=torch.bfloat16 if bf16 else None,
    )
