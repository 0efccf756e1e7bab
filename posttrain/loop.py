"""What `train` and `distill` share: opening (or resuming) a run, and one optimizer step."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.config import ModelConfig
from posttrain.models import load_policy
from posttrain.progress import console
from posttrain.runfolder import latest_checkpoint, prepare_run_dir
from posttrain.runtime import Runtime
from posttrain.scale import prepare_model


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
