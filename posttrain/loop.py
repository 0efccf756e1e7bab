"""What `train` and `rl` share: opening (or resuming) a run and its logs (config.yaml records the
command as data), the memory check, the micro-batch accumulation, one optimizer step, the
periodic and final saves, the NaN/inf stop. May import: config, losses, data, models, runfolder,
runtime, scale, memory, trackers, progress."""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import ModelConfig, dump_yaml
from posttrain.losses.aggregation import GlobalCounts, micro_batch_aggregation
from posttrain.errors import UserError
from posttrain.memory import check_memory, training_memory
from posttrain.models import load_policy
from posttrain.progress import console
from posttrain.runfolder import (
    MetricsLog, check_run_dir, describe_changes, logged_steps, mark_final, newest_intact_checkpoint, prepare_run_dir,
    recipe_changes, record_recipe_changes, record_versions, save_checkpoint, write_text_atomic,
)
from posttrain.runtime import Runtime
from posttrain.scale import prepare_model, save_merged_lora
from posttrain.trackers import open_trackers


def open_run(recipe, model_key: str, runtime: Runtime, resume: bool, allow_changed_recipe: bool = False):
    """(run_dir, checkpoint to resume or None, model, tokenizer) for a recipe whose trained
    model is `recipe.<model_key>`. Resuming loads the checkpoint's weights through the same path
    as any model; a LoRA checkpoint holds only the adapter, so its base comes from the recipe.
    Resuming with a recipe that differs from the run's config.yaml is refused unless allowed."""
    run_dir = Path(recipe.out_dir) / recipe.name
    if allow_changed_recipe and not resume:
        raise UserError("--allow-changed-recipe only applies together with --resume")
    if resume:
        check_same_recipe(run_dir, recipe, allow_changed_recipe)
        for log in ("metrics.jsonl", "rollouts.jsonl"):  # their rows are cut back by step on resume
            logged_steps(run_dir / log)
        if runtime.is_main and not (run_dir / "config.yaml").exists():  # make's DAG resumes runs that never started
            console.print(f"--resume: {run_dir} has no run yet; starting it", highlight=False)
    # Nothing is written until the model has loaded: a run refused here leaves no folder behind.
    check_run_dir(recipe.out_dir, recipe.name, resume)
    checkpoint = newest_intact_checkpoint(run_dir, say=_say if runtime.is_main else _quiet) if resume else None
    model_cfg = getattr(recipe, model_key)
    if checkpoint is not None and recipe.train.lora is None:
        model_cfg = ModelConfig(path=str(checkpoint))
    model, tokenizer = load_policy(model_cfg, model_key, recipe.seed, runtime.device)
    if runtime.is_main:
        prepare_run_dir(recipe.out_dir, recipe.name, resume)
        console.print(f"{recipe.name}: {runtime.describe()}", highlight=False)
    runtime.barrier()
    return run_dir, checkpoint, prepare_model(model, recipe.train, checkpoint, recipe.seed), tokenizer


def open_logs(run_dir: Path, runtime: Runtime, recipe, command: list[str], checkpoint, start_step: int,
              *filenames: str) -> list[MetricsLog]:
    """The run's JSONL logs (rows past the resumed step dropped) and its resolved config.yaml,
    headed by the command that made it (`command`: its name and arguments after `posttrain`), as
    a comment for the reader and as data (`command: {name, args}`; runfolder.command_kind)."""
    logs = [MetricsLog(run_dir / name, enabled=runtime.is_main) for name in filenames]
    if runtime.is_main:  # the trackers get a copy of each metrics row (posttrain/trackers.py)
        logs[0].tee = open_trackers(recipe.report_to, run_dir, recipe.name, dataclasses.asdict(recipe))
    for log in logs:
        log.truncate_after(start_step)
    if runtime.is_main:
        changes = recipe_changes(run_dir, recipe)  # only here when allowed (see open_run)
        if changes:
            record_recipe_changes(run_dir, changes, start_step, f"posttrain {shlex.join(command)}")
            console.print(f"recipe changed on resume (recorded in config_changes.jsonl): {describe_changes(changes)}",
                          highlight=False)
        record = dump_yaml({"command": {"name": command[0], "args": command[1:]}})
        write_text_atomic(run_dir / "config.yaml", f"# posttrain {shlex.join(command)}\n" + record + dump_yaml(recipe))
        # versions.json (runfolder.package_versions)
        record_versions(run_dir, start_step, f"posttrain {shlex.join(command)}", say=_say)
        if checkpoint:
            console.print(f"resuming {run_dir} from {checkpoint.name}")
    return logs


def check_same_recipe(run_dir: Path, recipe, allowed: bool) -> None:
    """A resumed run continues the recipe in its config.yaml; a different one (another lr or
    objective) would make that record lie, so it needs --allow-changed-recipe (then recorded)."""
    changes = recipe_changes(run_dir, recipe)
    if changes and not allowed:
        raise UserError(f"--resume with a recipe that differs from {run_dir / 'config.yaml'}: "
                        f"{describe_changes(changes)}; resume with the same recipe, or add --allow-changed-recipe "
                        "(the change is recorded in config_changes.jsonl)", recipe=True)


@dataclass
class Saver:
    """What a loop checkpoints: the run folder, the trained model and its tokenizer, the optimizer
    and schedule, the runtime, and the recipe's `train` section (save_every, keep_checkpoints, lora)."""

    run_dir: Path
    model: object
    tokenizer: object
    optimizer: object
    scheduler: object
    runtime: Runtime
    train_cfg: object
    # {file name: state} saved in each checkpoint beside the model, gathered by every process at
    # save time (rl: the critic's critic.pt); None: nothing more
    extra_files: Callable[[], dict[str, dict]] | None = None

    def periodic(self, done: int, total: int, nonfinite_streak: int) -> None:
        """train.save_every: a checkpoint after every save_every steps before the last, but never
        right after a skipped (NaN/inf) update: it would push out older ones."""
        every = self.train_cfg.save_every
        if every and done % every == 0 and done < total and nonfinite_streak == 0:
            save_checkpoint(self.run_dir, done, self.model, self.tokenizer, self.optimizer, self.scheduler, self.runtime,
                            self.train_cfg.keep_checkpoints, self._extra())

    def _extra(self) -> dict[str, dict]:
        return self.extra_files() if self.extra_files is not None else {}

    def final(self, steps: int, resumed_from: Path | None = None) -> None:
        """The last checkpoint (and, for LoRA, the merged model), then runs/<name>/final pointing to
        it. Resuming a finished run leaves its checkpoint and `final` as they are."""
        run_dir = self.run_dir
        if resumed_from is not None and resumed_from.name == f"step-{steps:06d}" and (run_dir / "final").exists():
            return
        final = save_checkpoint(run_dir, steps, self.model, self.tokenizer, self.optimizer, self.scheduler, self.runtime,
                                self.train_cfg.keep_checkpoints, self._extra())
        if self.train_cfg.lora is not None:
            final = save_merged_lora(run_dir, self.model, self.tokenizer, self.runtime)
        if self.runtime.is_main:
            mark_final(run_dir, final)


def check_training_memory(model, train_cfg, runtime: Runtime, tokens_per_micro_batch: int, frozen=None,
                          critic: bool = False) -> None:
    """The memory plan of a training process (printed by the main one); refused when it cannot fit.
    `frozen`: a no-grad model held beside the trained one (the teacher, or the reference policy);
    `critic`: a value model trained beside it (ppo)."""
    check_memory(training_memory(
        model, tokens_per_micro_batch=tokens_per_micro_batch, bf16=runtime.matmul_dtype is not None,
        gradient_checkpointing=train_cfg.gradient_checkpointing, world_size=runtime.world_size, sharded=runtime.sharded,
        head_chunk_tokens=train_cfg.head_chunk_tokens, **({"teacher": frozen} if frozen is not None else {}),
        critic=critic), runtime.device, show=runtime.is_main)


def optimizer_step(policy, optimizer, scheduler, runtime: Runtime, grad_clip: float,
                   local_loss_sum: float = 0.0) -> tuple[float, bool]:
    """Clip (when grad_clip > 0), step, advance the schedule, clear the gradients; returns the
    global gradient norm before clipping, and whether the update was skipped: a NaN/inf loss
    (summed over processes, so every process decides alike) or gradient norm is never applied.
    The schedule advances either way, so step numbers and the learning rate stay those of an
    unskipped run."""
    params = [p for p in policy.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = float(runtime.accelerator.clip_grad_norm_(params, grad_clip))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    loss_sum = runtime.sum_across_ranks({"loss": float(local_loss_sum)})["loss"]
    skipped = not (math.isfinite(grad_norm) and math.isfinite(loss_sum))
    if not skipped:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def accumulate_gradients(policy, runtime: Runtime, micro_batches: list[dict], loss_aggregation: str,
                         forward, length_norm: int | None = None) -> tuple[float, GlobalCounts]:
    """The one micro-batch accumulation of every loop: each micro-batch's tokens get their
    train.loss_aggregation weights from the sizes of the whole global batch (all micro-batches of
    all processes), `forward(index, micro_batch)` returns its Σ_t w_t ℓ_t, and backward runs per
    micro-batch with the gradient all-reduce only on the last. Returns (this process's weighted
    loss sum, the global counts). length_norm: the constant L of seq-mean-token-sum-norm (rl)."""
    counts = dataclasses.replace(global_counts([b["loss_mask"] for b in micro_batches], runtime), length_norm=length_norm)
    loss_total = 0.0
    for i, batch in enumerate(micro_batches):
        weights, divisor = micro_batch_aggregation(loss_aggregation, batch["loss_mask"], counts)
        if weights is not None:
            batch["loss_weight"] = weights
        last = i == len(micro_batches) - 1
        with nullcontext() if last else runtime.accelerator.no_sync(policy):
            weighted_loss = forward(i, batch) / divisor
            # DDP/FSDP average gradients over processes; × world_size turns that into the sum.
            runtime.accelerator.backward(weighted_loss * runtime.world_size)
        loss_total += weighted_loss.item()
    return loss_total, counts


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


def count_nonfinite(streak: int, skipped_updates: list[bool], limit: int, step: int) -> int:
    """The number of updates skipped in a row after this step's updates; stops the run (one line,
    non-zero exit) when it reaches `limit` (recipe key train.max_nonfinite_steps). Called after the
    step's metrics row is written, so the skipped updates are in metrics.jsonl."""
    for skipped in skipped_updates:
        streak = streak + 1 if skipped else 0
    if streak >= limit:
        raise UserError(f"stopped at step {step}: {streak} updates in a row had a NaN/inf loss or "
                        f"gradient norm and were skipped (train.max_nonfinite_steps: {limit}); no checkpoint was "
                        "written after them; lower optim.lr or check the data and objective", recipe=True)
    return streak


def _say(message: str) -> None:
    console.print(message, highlight=False)


def _quiet(message: str) -> None:
    pass
