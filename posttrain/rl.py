"""The on-policy loop (`posttrain rl`, alias `posttrain distill`): OPD and LSM distillation, GRPO.

Per step the data flows one way, top to bottom (`rl_step`):
  1. prompts (data/prompts.py: drawn per step, with each row's reference for the grader) →
     rollouts from the current student (generation backend), samples_per_prompt per prompt; the
     rollouts of one prompt are a group
  2. the special-token mask (LSM paper): the first occurrence of each listed token per response
     is not trained on
  3. the sources the objective declares, no grad, into one TokenSignals (signals.fetch_signals)
  4. objective.prepare(batch, signals): rewards / advantages / supports, once for the whole batch
  5. PPO epochs × mini-batches; each mini-batch is one optimizer step, its per-token losses
     aggregated over the whole mini-batch (all processes) as train.loss_aggregation says
     (and, for an objective with a value model, one critic step on the same rows: critic.py)
  6. the new weights reach the generation backend; metrics (rl_metrics.py); checkpoint
Every recipe check is rl_checks.validate, run before any model loads (and by `rl --check`).
May import anything below it: config, data, losses, models, generation, scoring, signals,
rl_checks, rl_metrics, loop, preflight, policy, optim, runfolder, runtime, scale, seeds, progress, critic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import preflight
from posttrain.config import RLRecipe
from posttrain.critic import Critic
from posttrain.data.examples import Example
from posttrain.data.privileged import context_field_of, privileged_prompts
from posttrain.data.prompts import PromptRows, draw_prompts, load_prompt_rows, tokenize_prompts
from posttrain.data.sft import collate, micro_batches
from posttrain.generation import SamplingSpec, make_backend
from posttrain.losses import OBJECTIVES
from posttrain.losses.aggregation import top_entropy_mask
from posttrain.losses.objective import VALUE, VERIFIABLE_REWARD
from posttrain.loop import (
    Saver, accumulate_gradients, apply_precision, check_training_memory, count_nonfinite, open_logs, open_run,
    optimizer_step,
)
from posttrain.models import check_rollout_fits, load_policy
from posttrain.optim import build_scheduler
from posttrain.policy import PolicyLoss
from posttrain.progress import StepProgress, console, summary_table
from posttrain.rl_checks import check_golds, check_k, needs_of, single_token_ids, validate
from posttrain.rl_metrics import rollout_logprob_gap_sum, step_row, step_sums, summary_rows, value_sums
from posttrain.rollouts import sample_groups
from posttrain.rl_shaping import open_history, recorded_logprobs, shape_batch, shaping_metrics
from posttrain.runfolder import load_trainer_state
from posttrain.runtime import Runtime, make_runtime
from posttrain.scale import gathered, wrap_for_training
from posttrain.seeds import micro_batch_seed, ppo_order_seed, rollout_seed
from posttrain.signals import Sources, fetch_signals, scoring_temperature


def load_prompts(recipe: RLRecipe, world_size: int) -> PromptRows:
    """validate(), then the prompt rows and their golds, checked: everything before a model loads."""
    validate(recipe, world_size)
    graded = VERIFIABLE_REWARD in needs_of(recipe)
    rows = load_prompt_rows(recipe.prompts, graded=graded, context_field=context_field_of(recipe))
    check_golds(recipe, rows.golds)
    if graded and recipe.prompts.reward == "code":  # no bubblewrap: refused before any folder
        from posttrain.eval.code_sandbox import WEAK_SANDBOX_KEY, check_strong_sandbox

        check_strong_sandbox(recipe.scoring.allow_weak_sandbox, WEAK_SANDBOX_KEY)
    return rows


@dataclass
class Trainer:
    """What every step uses, built once by `rl`."""

    recipe: RLRecipe
    runtime: Runtime
    policy: object  # PolicyLoss, wrapped for DDP/FSDP2
    optimizer: object
    scheduler: object
    backend: object  # the generation backend (hf, vllm)
    sources: Sources
    tokenizer: object
    mask_ids: list[int]  # train.mask_first_tokens as ids
    pool: tuple[list, list] | None = None  # (prompt ids, references) to draw more from: rollout.dynamic_sampling
    history: object | None = None  # rl_shaping.PromptHistory: each prompt's past rewards (PROMPT_HISTORY, DCPO)


def rl(recipe: RLRecipe, *, resume: bool = False, allow_changed_recipe: bool = False,
       command: list[str] | None = None) -> Path:
    """Run the recipe; `command`: how the CLI was called (after `posttrain`), recorded in config.yaml."""
    runtime = make_runtime(recipe.train.precision, recipe.train.parallel)
    rows = load_prompts(recipe, runtime.world_size)
    run_dir, checkpoint, student, tokenizer = open_run(recipe, "student", runtime, resume, allow_changed_recipe)
    apply_precision(student, recipe.train.precision)
    prompts = tokenize_prompts(recipe.prompts, rows.fields, tokenizer, recipe.rollout.prompts_per_step)
    check_rollout_fits(recipe, max(len(p) for p in prompts if p is not None))  # models.py
    privileged = privileged_prompts(recipe, rows, tokenizer, prompts)  # teacher.source: self (OPSD); else None
    sources = Sources.open(recipe, needs_of(recipe), runtime, tokenizer, show=runtime.is_main, privileged=privileged)
    if sources.scorer.teacher_tokenizer is not None:
        check_k(recipe, student.get_output_embeddings().weight.shape[0])
    check_training_memory(student, recipe.train, runtime,
                          recipe.train.micro_batch_size * (recipe.prompts.max_prompt_length + recipe.rollout.max_new_tokens),
                          frozen=sources.frozen_model, critic=VALUE in sources.needs)
    mask_ids = single_token_ids(tokenizer, recipe.train.mask_first_tokens)
    preflight.at_start(recipe, student, tokenizer, sources.scorer, prompts, runtime)  # refuses fatal problems
    trainer, start_step = _build(recipe, runtime, student, tokenizer, sources, mask_ids, checkpoint)
    trainer.pool = (prompts, rows.references) if recipe.rollout.dynamic_sampling else None
    trainer.history = open_history(run_dir, start_step, runtime, needs_of(recipe))  # None unless declared
    metrics, rollout_log = open_logs(run_dir, runtime, recipe, command or ["rl"], checkpoint, start_step,
                                     "metrics.jsonl", "rollouts.jsonl")  # rollouts.jsonl: two responses per step
    saver = Saver(run_dir, student, tokenizer, trainer.optimizer, trainer.scheduler, runtime, recipe.train,
                  extra_files=sources.critic.checkpoint_files if sources.critic is not None else None)
    started, row, nonfinite_streak = time.time(), {}, 0
    with sources, StepProgress(f"rl {recipe.name}", recipe.train.steps, start_step, enabled=runtime.is_main) as progress:
        for step in range(start_step, recipe.train.steps):
            step_clock = time.time()
            chosen = draw_prompts(prompts, recipe.rollout.prompts_per_step, recipe.seed, step, runtime.rank,
                                  runtime.world_size)
            row, texts = rl_step(trainer, step, [prompts[i] for i in chosen], [rows.references[i] for i in chosen])
            trainer.backend.update_weights(student)
            row["step"], row["time_step"] = step + 1, time.time() - step_clock  # the phases + weight sync + draw
            row["timestamp"] = time.time()  # consecutive rows: the whole iteration, logging and saving included
            skipped = row.pop("skipped")
            row["skipped_updates"] = sum(skipped)
            metrics.append(row)
            rollout_log.append({"step": step + 1, "responses": texts})
            progress.update(step + 1, row, speed_key="rollouts_per_s", speed_unit="rollouts/s")
            nonfinite_streak = count_nonfinite(nonfinite_streak, skipped, recipe.train.max_nonfinite_steps, step + 1)
            saver.periodic(step + 1, recipe.train.steps, nonfinite_streak)
    saver.final(recipe.train.steps, checkpoint)
    if runtime.is_main:
        summary_table(f"rl {recipe.name} ({recipe.objective.name})",
                      summary_rows(row, recipe.train.steps, start_step, started, run_dir))
    return run_dir


def _build(recipe: RLRecipe, runtime: Runtime, student, tokenizer, sources: Sources, mask_ids: list[int],
           checkpoint) -> tuple[Trainer, int]:
    """The policy and its optimizer, schedule and generation backend; (trainer, the step to start at)."""
    objective = OBJECTIVES[recipe.objective.name]
    rollouts_per_step = recipe.rollout.prompts_per_step * recipe.rollout.samples_per_prompt
    updates_per_step = recipe.train.ppo_epochs * (rollouts_per_step // recipe.train.mini_batch_size)
    loss = PolicyLoss(student, objective, recipe.objective.params, chunk_tokens=recipe.train.head_chunk_tokens,
                      matmul_dtype=runtime.matmul_dtype, temperature=scoring_temperature(recipe))
    policy, optimizer = wrap_for_training(loss, recipe.optim, runtime)
    scheduler = build_scheduler(optimizer, recipe.optim, recipe.train.steps * updates_per_step)
    start_step = load_trainer_state(checkpoint, student, optimizer, scheduler, runtime) if checkpoint else 0
    backend = make_backend(recipe.rollout.backend, model=student, model_path=recipe.student.path, tokenizer=tokenizer,
                           vllm_options={"gpu_memory_utilization": recipe.rollout.vllm.gpu_memory_utilization,
                                         "tensor_parallel_size": recipe.rollout.vllm.tensor_parallel_size,
                                         "seed": recipe.seed})
    if checkpoint is not None:
        backend.update_weights(student)
    if VALUE in sources.needs:  # the value model, its optimizer and schedule (posttrain/critic.py)
        sources.critic = Critic.build(recipe, runtime, recipe.train.steps * updates_per_step, checkpoint)
    trainer = Trainer(recipe, runtime, policy, optimizer, scheduler, backend, sources, tokenizer, mask_ids)
    return trainer, start_step


def check(recipe: RLRecipe) -> None:
    """`posttrain rl --check`: the same checks a run makes before training (validate, the prompts
    and golds, the sources), then every pre-flight check of the pair; prints, writes nothing."""
    from rich.markup import escape

    runtime = make_runtime(recipe.train.precision, recipe.train.parallel)
    rows = load_prompts(recipe, runtime.world_size)
    student, tokenizer = load_policy(recipe.student, "student", recipe.seed, runtime.device)
    prompts = tokenize_prompts(recipe.prompts, rows.fields, tokenizer, recipe.rollout.prompts_per_step)
    privileged = privileged_prompts(recipe, rows, tokenizer, prompts)
    with Sources.open(recipe, needs_of(recipe), runtime, tokenizer, privileged=privileged) as sources:
        findings, info = preflight.run_checks(recipe, student, tokenizer, sources.scorer, prompts, models_too=True)
    for line in info:
        console.print(escape(f"pre-flight: {line}"), highlight=False, soft_wrap=True)
    preflight.refuse_or_warn(findings, show=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
    warnings = len(findings)
    console.print(f"pre-flight: {'no problems found' if not warnings else f'{warnings} warning(s)'}; "
                  "the recipe is ready to run", highlight=False, soft_wrap=True)


def rl_step(trainer: Trainer, step: int, prompt_ids: list[list[int]], references: list) -> tuple[dict, list[str]]:
    """One step (see the module docstring); returns (its metrics row, two responses' text)."""
    recipe, runtime = trainer.recipe, trainer.runtime
    objective, params = OBJECTIVES[recipe.objective.name], recipe.objective.params
    lr = trainer.scheduler.get_last_lr()[0]
    clock = time.time()
    # 1. rollouts
    spec = SamplingSpec(n=recipe.rollout.samples_per_prompt, temperature=recipe.rollout.temperature,
                        top_p=recipe.rollout.top_p, top_k=recipe.rollout.top_k,
                        max_new_tokens=recipe.rollout.max_new_tokens, seed=rollout_seed(recipe.seed, step, runtime.rank))
    with gathered(trainer.policy):  # under FSDP2 the hf backend runs the student outside its wrapped forward
        groups = sample_groups(trainer.backend, trainer.sources, spec, step, prompt_ids, references, trainer.pool,
                               recipe.rollout.max_draws)
    prompt_ids, references, completions = groups.prompt_ids, groups.references, groups.completions
    rollouts = [Example(p + c.token_ids, len(p)) for p, samples in zip(prompt_ids, completions) for c in samples]
    flat = [c for samples in completions for c in samples]
    group_B = torch.arange(len(prompt_ids)).repeat_interleave(torch.tensor([len(s) for s in completions]))
    times = {"generate": time.time() - clock}
    # 2.–4. batch, special-token mask, the declared sources, objective inputs
    clock = time.time()
    batch = {k: v.to(runtime.device) for k, v in collate(rollouts, trainer.tokenizer.pad_token_id).items()}
    batch["loss_mask"] &= ~first_occurrence_mask(batch["target_ids"], batch["loss_mask"], trainer.mask_ids)
    # the backend's log-prob of each sampled token: π_old itself (rollout.old_logprob: sampler), the
    # truncated IS weights' denominator, the rollout/trainer gap metric
    recorded_BT = recorded_logprobs(flat, rollouts, batch["loss_mask"].shape, runtime.device)
    sampled_BT = recorded_BT if recipe.rollout.old_logprob == "sampler" else None
    # π_old (and the teacher, the reference) under the autocast the update's forward runs in, so
    # that the first update of a step has ratio 1 exactly; or the sampler's own
    with runtime.accelerator.autocast():
        signals, diagnostics = fetch_signals(trainer.sources, trainer.policy, batch, group_B, [c.text for c in flat],
                                             [references[int(g)] for g in group_B],
                                             None if groups.rewards is None else [r for g in groups.rewards for r in g],
                                             prompt_ids=[prompt_ids[int(g)] for g in group_B], old_logprob_BT=sampled_BT)
    batch["old_logprob"] = signals.old_logprob_BT  # every on-policy loss reads π_old (ratios, rewards)
    gap_sum = rollout_logprob_gap_sum(recorded_BT, batch, spec) if sampled_BT is None else None  # else 0 by definition
    # overlong shaping, truncated IS weights, the prompt history, where asked for (rl_shaping.py)
    shaping = shape_batch(recipe, trainer.history, step, batch, signals, flat, recorded_BT,
                          [prompt_ids[int(g)] for g in group_B])
    if objective.prepare is not None:
        batch.update(objective.prepare(params, batch, signals))
    response_mask = batch["loss_mask"]
    if recipe.train.entropy_top_ratio is not None:
        # The LSM authors' code: rewards/advantages over the whole response (above), then the loss
        # only on each rollout's top share of π_old's entropy (from the scoring pass).
        batch["loss_mask"] = top_entropy_mask(signals.entropy_BT, response_mask, recipe.train.entropy_top_ratio)
    times["score"] = time.time() - clock
    # 5. PPO epochs × mini-batches
    clock = time.time()
    stats, losses, grad_norms, skipped = _ppo_epochs(trainer, batch, len(rollouts), step)
    times["train"] = time.time() - clock
    # 6. metrics (sums over processes, then per-token or per-rollout means) over all response tokens
    sums = step_sums(signals, response_mask, batch["loss_mask"], flat, diagnostics, stats, gap_sum, groups.stats)
    sums.update(value_sums(signals, batch, response_mask))  # the critic's inputs, when there is one
    row = step_row(runtime.sum_across_ranks(sums), losses, grad_norms, lr, times)
    if trainer.sources.critic is not None:
        row.update(trainer.sources.critic.metrics())
    row["skipped"] = skipped  # per update: NaN/inf loss or grad norm, not applied
    row.update(shaping_metrics(runtime.sum_across_ranks(shaping)) if shaping else {})
    texts = [trainer.tokenizer.decode(r.token_ids[r.prompt_len :]) for r in rollouts[:2]]
    return row, texts


def _ppo_epochs(trainer: Trainer, batch: dict, count: int, step: int):
    """train.ppo_epochs passes over this process's rollouts in shuffled mini-batches, one optimizer
    step each; returns (engine stats, losses, grad norms, skipped flags) per update."""
    recipe, runtime = trainer.recipe, trainer.runtime
    stats, losses, grad_norms, skipped = {}, [], [], []
    local_mini = recipe.train.mini_batch_size // runtime.world_size
    for epoch in range(recipe.train.ppo_epochs):
        order = torch.randperm(count, generator=torch.Generator().manual_seed(ppo_order_seed(recipe.seed, step, epoch)))
        for start in range(0, count, local_mini):
            first_micro = (epoch * count + start) // recipe.train.micro_batch_size  # this update's micro-batch indices
            loss, grad_norm, was_skipped = ppo_update(trainer, batch, order[start : start + local_mini], stats,
                                                      step, first_micro)
            losses.append(loss)
            grad_norms.append(grad_norm)
            skipped.append(was_skipped)
    return stats, losses, grad_norms, skipped


def ppo_update(trainer: Trainer, batch: dict, rows, stats: dict, step: int, first_micro: int) -> tuple[float, float, bool]:
    """One optimizer step on the rollouts `rows` of this process's batch (its part of the PPO
    mini-batch); every token's loss carries its train.loss_aggregation weight over the mini-batch.
    Returns (loss, grad norm, skipped)."""
    recipe, runtime, policy = trainer.recipe, trainer.runtime, trainer.policy
    groups = [torch.tensor(g, device=batch["input_ids"].device)
              for g in micro_batches(rows.tolist(), recipe.train.micro_batch_size, None)]

    def forward(index: int, micro: dict) -> torch.Tensor:
        seed = micro_batch_seed(recipe.seed, step, runtime.rank, first_micro + index)
        return policy(micro, generator=torch.Generator(device=runtime.device).manual_seed(seed), stats=stats)

    micro = [_select_rows(batch, g) for g in groups]
    loss_total, _ = accumulate_gradients(policy, runtime, micro, recipe.train.loss_aggregation, forward,
                                         length_norm=recipe.rollout.max_new_tokens)  # L of seq-mean-token-sum-norm
    grad_norm, skipped = optimizer_step(policy, trainer.optimizer, trainer.scheduler, runtime, recipe.optim.grad_clip,
                                        loss_total)
    if trainer.sources.critic is not None:  # the value model regresses on the same rows (VALUE)
        trainer.sources.critic.update(micro)
    return runtime.sum_across_ranks({"l": loss_total})["l"], grad_norm, skipped


def first_occurrence_mask(target_ids_BT, loss_mask_BT, token_ids: list[int]) -> torch.Tensor:
    """True at the first loss position of each response whose target is one of `token_ids`
    (each listed token separately): the LSM paper's special-token mask."""
    out = torch.zeros_like(loss_mask_BT)
    for token in token_ids:
        hits = (target_ids_BT == token) & loss_mask_BT
        first = hits.int().cumsum(dim=1) == 1
        out |= hits & first
    return out


def _select_rows(batch, rows):
    """Rows of every [B, T, ...] tensor, trimmed to the longest attended length among them."""
    width = int(batch["attention_mask"][rows].sum(dim=1).max())
    return {k: v[rows][:, :width] for k, v in batch.items()}
