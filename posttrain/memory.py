"""Before a run starts: the memory one process will need, and whether the device has it.

An estimate, printed as a table (parameters, gradients, AdamW state, activations, the LM-head
chunk, the teacher), checked against the device's memory (CUDA) or available RAM (CPU). It is
meant to catch "this cannot fit" before minutes of loading, not to be exact: activations use a
per-layer count of the tensors a Llama/Qwen2 block saves for backward (attention by SDPA, so no
[seq, seq] scores), and everything transient besides the head chunk is ignored.
"""

from __future__ import annotations

import torch
from rich.table import Table

from posttrain.errors import UserError
from posttrain.losses.engine import HEAD_BUFFER_BYTES
from posttrain.progress import console

GiB = 2**30


def training_memory(model, *, tokens_per_micro_batch: int, bf16: bool, gradient_checkpointing: bool,
                    world_size: int, sharded: bool, head_chunk_tokens: int | None, teacher=None,
                    critic: bool = False) -> list[tuple[str, float]]:
    """[(component, bytes per process)] for one training (or distillation) process. `critic`: a
    value model of the same body is trained beside it (ppo): its weights, gradients and AdamW
    state; its activations are not added (its update runs after the policy's has freed them)."""
    config = model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv_dim = getattr(config, "num_key_value_heads", heads) * (hidden // heads)
    vocab = model.get_output_embeddings().weight.shape[0]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param_bytes = next(model.parameters()).element_size()
    split = world_size if sharded else 1
    act_bytes = 2 if bf16 else 4
    per_token_layer = act_bytes * (9 * hidden + 4 * intermediate + 2 * kv_dim)
    if gradient_checkpointing:  # each block keeps its input; one block is recomputed at a time
        activations = tokens_per_micro_batch * (layers * hidden * act_bytes + per_token_layer)
    else:
        activations = tokens_per_micro_batch * layers * per_token_layer
    chunk = min(head_chunk_tokens or HEAD_BUFFER_BYTES // (4 * vocab), tokens_per_micro_batch)
    rows = [
        ("parameters", total * param_bytes / split),
        ("gradients", trainable * 4 / split),
        ("AdamW state (2 moments, fp32)", trainable * 8 / split),
        ("activations (one micro-batch)", activations),
        ("LM-head chunk buffer" + (" + bf16 head copy" if bf16 else ""), chunk * vocab * 4 + (vocab * hidden * 2 if bf16 else 0)),
    ]
    if teacher is not None:
        teacher_params = sum(p.numel() for p in teacher.parameters()) * (2 if bf16 else 4)
        rows.append(("teacher (frozen" + (", sharded)" if world_size > 1 else ")"), teacher_params / world_size))
    if critic:  # the student's body and a scalar head, fully trained (posttrain/critic.py)
        body = sum(p.numel() for p in model.get_decoder().parameters()) + hidden + 1
        rows.append(("value model: weights, gradients, AdamW state", body * (param_bytes + 4 + 8) / split))
    return rows


def available_bytes(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return float(total), f"{torch.cuda.get_device_name(device)}, {total / GiB:.1f} GiB"
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return float(info.get("MemAvailable", info.get("MemTotal", 0))), "CPU RAM available"


def check_memory(rows: list[tuple[str, float]], device: torch.device, show: bool) -> None:
    """Print the plan (main process) and refuse to start when it cannot fit."""
    need = sum(value for _, value in rows)
    have, label = available_bytes(device)
    if show:
        table = Table(title=f"memory plan per process (estimate) — {label}", title_justify="left")
        table.add_column("component")
        table.add_column("GiB", justify="right")
        for name, value in rows:
            table.add_row(name, f"{value / GiB:.3g}")
        table.add_row("total", f"{need / GiB:.3g}", style="bold")
        console.print(table)
    if have and need > 0.95 * have:
        raise UserError(
            f"needs about {need / GiB:.1f} GiB per process but {have / GiB:.1f} GiB is available; "
            "lower train.micro_batch_size or the sequence length, set train.gradient_checkpointing: true, "
            "use train.lora, or shard over more GPUs (FSDP2)", recipe=True
        )
