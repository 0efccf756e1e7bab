"""Where a run executes: device, precision, and its place among processes (via accelerate).

One process on CPU or one GPU is the plain case; `accelerate launch` / `torchrun` makes the same
code run data-parallel (DDP) or sharded (FSDP2, from the launcher's accelerate config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from posttrain.errors import UserError


@dataclass
class Runtime:
    accelerator: object  # accelerate.Accelerator
    device: torch.device
    rank: int
    world_size: int
    matmul_dtype: torch.dtype | None  # dtype of the LM-head matmuls (bf16 under bf16 precision)
    sharded: bool = False  # parameters sharded across processes (FSDP), not replicated (DDP)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        mode = "FSDP2 (sharded)" if self.sharded else ("DDP" if self.world_size > 1 else "single process")
        precision = "bf16 autocast" if self.matmul_dtype is not None else "fp32"
        return f"{self.world_size} process(es), {mode}, {self.device.type}, {precision}"

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


def set_cpu_threads(processes: int = 1) -> None:
    """A fixed CPU thread count per process: POSTTRAIN_THREADS (default: all cores) shared by the
    processes of a run. Jobs running side by side must not ask for more threads than cores:
    oversubscribed OpenMP threads spin and slow everything down many times over."""
    total = int(os.environ.get("POSTTRAIN_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(1, total // processes))


def make_runtime(precision: str, parallel: str = "ddp") -> Runtime:
    """Process group, device and precision (accelerate); `parallel` picks DDP or FSDP2 when
    there are several processes (FSDP2 is applied by posttrain.scale with torch's fully_shard)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    cuda = torch.cuda.is_available()
    bf16 = precision == "bf16" or (precision == "auto" and cuda)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("launch with a plain multi-GPU accelerate config (launch/multi-gpu.yaml) and choose sharding "
                        "in the recipe with train.parallel: fsdp2")
    if not cuda:
        set_cpu_threads(accelerator.num_processes)
    return Runtime(
        accelerator=accelerator, device=accelerator.device, rank=accelerator.process_index,
        world_size=accelerator.num_processes, matmul_dtype=torch.bfloat16 if bf16 else None,
        sharded=parallel == "fsdp2" and accelerator.num_processes > 1,
    )
