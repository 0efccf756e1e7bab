"""What `train` and `distill` share: opening (or resuming) a run, and one optimizer step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from posttrain.config import ModelConfig, dump_yaml
from posttrain.losses.aggregation import GlobalCounts
from posttrain.models import load_policy
from posttrain.progress import console
from posttrain.runfolder import (
    MetricsLog, latest_checkpoint, mark_final, prepare_run_dir, save_checkpoint, write_text_atomic,
)
from posttrain.runtime import Runtime
from posttrain.scale import prepare_model, save_merged_lora
from posttrain.trackers import open_trackers


def open_run(recipe, model_key: str, runtime: Runtime, resume: bool):
    """(run_dir, checkpoint to resume or None, model, tokenizer) for a recipe whose trained
    model is `recipe.<model_key>`. Resuming loads the checkpoint's weights through the same path
    as any model; a LoRA checkpoint holds only the adapter, so its base comes from the recipe."""
    run_dir = Path(recipe.out_dir) / recipe.name
    if runtime.is_main:
        prepare_run_dir(recipe.out_dir, recipe.name, resume)
        console.print(f"{recipe.name}: {runtime.describe()}", highlight=False)
    runtime.barrier()
    checkpoint = latest_checkpoint(run_dir) if resume else None
    model_cfg = getattr(recipe, model_key)
    if checkpoint is not None and recipe.train.lora is None:
        model_cfg = ModelConfig(path=str(checkpoint))
    model, tokenizer = load_policy(model_cfg, model_key, recipe.seed, runtime.device)
    return run_dir, checkpoint, prepare_model(model, recipe.train, checkpoint, recipe.seed), tokenizer


def open_logs(run_dir: Path, runtime: Runtime, recipe, command: str, checkpoint, start_step: int,
              *filenames: str) -> list[MetricsLog]:
    """The run's JSONL logs (rows past the resumed step dropped) and its resolved config.yaml,
    headed by the command that made it."""
    logs = [MetricsLog(run_dir / name, enabled=runtime.is_main) for name in filenames]
    if runtime.is_main:  # the trackers get a copy of each metrics row (posttrain/trackers.py)
        logs[0].tee = open_trackers(recipe.report_to, run_dir, recipe.name, dataclasses.asdict(recipe))
    for log in logs:
        log.truncate_after(start_step)
    if runtime.is_main:
        write_text_atomic(run_dir / "config.yaml", f"# {command}\n" + dump_yaml(recipe))
        if checkpoint:
            console.print(f"resuming {run_dir} from {checkpoint.name}")
    return logs


def save_final(run_dir: Path, steps: int, model, tokenizer, optimizer, scheduler, runtime: Runtime, train_cfg) -> None:
    """The last checkpoint (and, for LoRA, the merged model), then runs/<name>/final pointing to it."""
    final = save_checkpoint(run_dir, steps, model, tokenizer, optimizer, scheduler, runtime, train_cfg.keep_checkpoints)
    if train_cfg.lora is not None:
        final = save_merged_lora(run_dir, model, tokenizer, runtime)
    if runtime.is_main:
        mark_final(run_dir, final)


def optimizer_step(policy, optimizer, scheduler, runtime: Runtime, grad_clip: float) -> float:
    """Clip (when grad_clip > 0), step, advance the schedule, clear the gradients; returns the
    global gradient norm before clipping."""
    params = [p for p in policy.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = float(runtime.accelerator.clip_grad_norm_(params, grad_clip))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def global_counts(loss_masks: list[torch.Tensor], runtime: Runtime) -> GlobalCounts:
    """Sizes of the global batch for loss aggregation: this process's micro-batch masks, summed
    over all processes."""
    totals = runtime.sum_across_ranks({
        "tokens": float(sum(int(m.sum()) for m in loss_masks)),
        "sequences": float(sum(m.shape[0] for m in loss_masks)),
        "micro_batches": float(len(loss_masks)),
    })
    return GlobalCounts(tokens=int(totals["tokens"]), sequences=int(totals["sequences"]),
                        micro_batches=int(totals["micro_batches"]))


def apply_precision(model, precision: str) -> None:
    """train.precision: bf16-pure keeps the trained weights (hence gradients and AdamW state) in
    bf16, as the DFT authors' run does (model_dtype=bf16); the other modes keep fp32 weights."""
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
        console.print("precision bf16-pure: weights, gradients and AdamW state in bf16", highlight=False)
