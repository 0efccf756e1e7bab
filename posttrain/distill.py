"""The on-policy loop (`posttrain rl`, alias `posttrain distill`): OPD and LSM distillation, GRPO.

Per step the data flows one way, top to bottom:
  1. prompts (with their data rows: the gold answer, or a code problem's tests) → rollouts from
     the current student (generation backend), samples_per_prompt per prompt; the rollouts of one
     prompt are a group
  2. the special-token mask (LSM paper): the first occurrence of each listed token per response
     is not trained on
  3. the sources the objective declares (objective.needs), no grad, into one TokenSignals: always
     π_old (the student before this step's updates: sampled-token log-prob, entropy); the teacher
     (sampled-token log-prob, top-K supports) only when a teacher signal is declared; the frozen
     reference policy for a KL penalty; the grader on each completion's text (the math grader's
     worker pool on its boxed answer, or the code sandbox on the problem's tests: prompts.reward)
  4. objective.prepare(batch, signals): rewards / advantages / supports, once for the whole batch
  5. PPO epochs × mini-batches; each mini-batch is one optimizer step, its per-token losses
     aggregated over the whole mini-batch (all processes) as train.loss_aggregation says
  6. the new weights reach the generation backend; metrics; checkpoint
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import DistillRecipe
from posttrain.data.templates import clean_dapo_instructions, resolve_template
from posttrain.data.sft import Example, collate, epoch_order, load_rows, micro_batches, render_prompt
from posttrain.errors import UserError
from posttrain.eval.prompts import code_request
from posttrain.generation import SamplingSpec, make_backend
from posttrain.losses import OBJECTIVES
from posttrain import preflight
from posttrain.losses.aggregation import top_entropy_mask
from posttrain.losses.objective import (
    REFERENCE_TOKEN, STUDENT_TOPK, TEACHER_SOURCES, VERIFIABLE_REWARD, TokenSignals,
)
from posttrain.models import load_policy, same_vocabulary
from posttrain.optim import build_scheduler
from posttrain.policy import PolicyLoss
from posttrain.progress import StepProgress, console, summary_table
from posttrain.loop import (
    accumulate_gradients, apply_precision, count_nonfinite, open_logs, open_run, optimizer_step, save_final,
)
from posttrain.runfolder import load_trainer_state, save_checkpoint
from posttrain.runtime import Runtime, make_runtime
from posttrain.memory import check_memory, training_memory
from posttrain.scale import gathered, place_teacher, wrap_for_training
from posttrain.trackers import check_installed
from posttrain.scoring import has_repetition_loop, score_pair, score_tokens, support_diagnostics


def distill(recipe: DistillRecipe, *, resume: bool = False, recipe_path: str = "recipe",
            allow_changed_recipe: bool = False) -> Path:
    objective = OBJECTIVES[recipe.objective.name]
    if not objective.on_policy:
        raise UserError(f"{recipe_path}: key 'objective.name': {objective.name!r} is an offline objective; "
                        "run it with `posttrain train`")
    params = recipe.objective.params
    needs = objective.needs(params)
    _check_sources(recipe, needs, recipe_path)
    check_installed(recipe.report_to, recipe_path)  # trackers.py: a missing tracker package, before anything runs
    runtime = make_runtime(recipe.train.precision, recipe.train.parallel)
    _check_sizes(recipe, runtime, recipe_path)
    prompts, references = _load_prompts(recipe, needs)  # data errors come before the model loads
    check_golds(recipe, references, recipe_path)
    run_dir, checkpoint, student, tokenizer = open_run(recipe, "student", runtime, resume, allow_changed_recipe, recipe_path)
    apply_precision(student, recipe.train.precision)
    prompts = _tokenized_prompts(recipe, prompts, tokenizer)
    sources = Sources.open(recipe, needs, runtime, tokenizer, show=runtime.is_main)
    if sources.teacher is not None:
        _check_k(recipe, student, recipe_path)
    check_memory(training_memory(
        student, tokens_per_micro_batch=recipe.train.micro_batch_size * (recipe.prompts.max_prompt_length + recipe.rollout.max_new_tokens),
        bf16=runtime.matmul_dtype is not None, gradient_checkpointing=recipe.train.gradient_checkpointing,
        world_size=runtime.world_size, sharded=runtime.sharded, head_chunk_tokens=recipe.train.head_chunk_tokens,
        teacher=sources.teacher.model if sources.teacher is not None else sources.reference,
    ), runtime.device, show=runtime.is_main, where=recipe_path)
    mask_ids = _single_token_ids(tokenizer, recipe.train.mask_first_tokens, recipe_path)
    preflight.at_start(recipe, student, tokenizer, sources.teacher, prompts, runtime, recipe_path)  # refuses fatal problems

    rollouts_per_step = recipe.rollout.prompts_per_step * recipe.rollout.samples_per_prompt
    updates_per_step = recipe.train.ppo_epochs * (rollouts_per_step // recipe.train.mini_batch_size)
    policy, optimizer = wrap_for_training(PolicyLoss(student, objective, params, chunk_tokens=recipe.train.head_chunk_tokens,
                                                     matmul_dtype=runtime.matmul_dtype,
                                                     temperature=scoring_temperature(recipe)), recipe.optim, runtime)
    scheduler = build_scheduler(optimizer, recipe.optim, recipe.train.steps * updates_per_step)
    start_step = load_trainer_state(checkpoint, student, optimizer, scheduler, runtime) if checkpoint else 0
    backend = make_backend(recipe.rollout.backend, model=student, model_path=recipe.student.path, tokenizer=tokenizer,
                           vllm_options={"gpu_memory_utilization": recipe.rollout.vllm.gpu_memory_utilization,
                                         "tensor_parallel_size": recipe.rollout.vllm.tensor_parallel_size,
                                         "seed": recipe.seed})
    if checkpoint is not None:
        backend.update_weights(student)

    # rollouts.jsonl: two responses per step
    metrics, rollout_log = open_logs(run_dir, runtime, recipe, f"posttrain rl --recipe {recipe_path}", checkpoint,
                                     start_step, "metrics.jsonl", "rollouts.jsonl")

    started, row, nonfinite_streak = time.time(), {}, 0
    with sources, StepProgress(f"rl {recipe.name}", recipe.train.steps, start_step, enabled=runtime.is_main) as progress:
        for step in range(start_step, recipe.train.steps):
            chosen = _prompts_for_step(prompts, recipe, runtime, step)
            row, texts = distill_step(policy, optimizer, scheduler, backend, sources, runtime, recipe, step,
                                      [prompts[i] for i in chosen], [references[i] for i in chosen], tokenizer, mask_ids)
            backend.update_weights(student)
            row["step"] = step + 1
            skipped = row.pop("skipped")
            row["skipped_updates"] = sum(skipped)
            metrics.append(row)
            rollout_log.append({"step": step + 1, "responses": texts})
            progress.update(step + 1, row, speed_key="rollouts_per_s", speed_unit="rollouts/s")
            nonfinite_streak = count_nonfinite(nonfinite_streak, skipped, recipe.train.max_nonfinite_steps, step + 1,
                                               recipe_path)
            done = step + 1
            # no periodic checkpoint right after a skipped (NaN/inf) update: it would push out older ones
            if recipe.train.save_every and done % recipe.train.save_every == 0 and done < recipe.train.steps \
                    and nonfinite_streak == 0:
                save_checkpoint(run_dir, done, student, tokenizer, optimizer, scheduler, runtime, recipe.train.keep_checkpoints)

    save_final(run_dir, recipe.train.steps, student, tokenizer, optimizer, scheduler, runtime, recipe.train, checkpoint)
    if runtime.is_main:
        summary_table(f"rl {recipe.name} ({objective.name})", _summary_rows(row, recipe, start_step, started, run_dir))
    return run_dir


def _summary_rows(row: dict, recipe: DistillRecipe, start_step: int, started: float, run_dir: Path) -> list:
    """The last step's numbers for the console, only those its sources produced (no teacher: no
    reverse KL row, rather than a 0 that reads as a measurement)."""
    rows = [("steps", f"{recipe.train.steps} ({start_step} before this session)")]
    if "reverse_kl" in row:
        rows += [("reverse KL exact / sampled", f"{row['reverse_kl']:.4f} / {row['reverse_kl_sampled']:.4f}"),
                 ("reward mean / negative share", f"{row['reward_mean']:.3f} / {row['negative_reward_frac']:.2f}")]
    if "verifiable_reward_mean" in row:
        rows += [("verifiable reward mean / std", f"{row['verifiable_reward_mean']:.3f} / {row['verifiable_reward_std']:.3f}"),
                 ("groups with zero advantage", f"{row['zero_advantage_group_frac']:.2f}")]
    if row:
        rows.append(("repetition / truncated", f"{row['repetition_frac']:.2f} / {row['truncated_frac']:.2f}"))
    return rows + [("wall time", f"{time.time() - started:.1f} s"), ("checkpoint", str(run_dir / "final"))]


def distill_step(policy, optimizer, scheduler, backend, sources: Sources, runtime: Runtime, recipe: DistillRecipe,
                 step: int, prompt_ids: list[list[int]], references: list, tokenizer,
                 mask_ids: list[int]) -> tuple[dict, list[str]]:
    objective, params = OBJECTIVES[recipe.objective.name], recipe.objective.params
    lr = scheduler.get_last_lr()[0]
    clock = time.time()

    # 1. rollouts
    spec = SamplingSpec(n=recipe.rollout.samples_per_prompt, temperature=recipe.rollout.temperature,
                        top_p=recipe.rollout.top_p, top_k=recipe.rollout.top_k,
                        max_new_tokens=recipe.rollout.max_new_tokens,
                        seed=(recipe.seed * 1_000_003 + step) * 101 + runtime.rank)
    with gathered(policy):  # under FSDP2 the hf backend runs the student outside its wrapped forward
        completions = _generate_or_stop(backend, prompt_ids, spec, step)
    rollouts = [Example(p + c.token_ids, len(p)) for p, samples in zip(prompt_ids, completions) for c in samples]
    flat = [c for samples in completions for c in samples]
    group_B = torch.arange(len(prompt_ids)).repeat_interleave(torch.tensor([len(s) for s in completions]))
    time_generate = time.time() - clock

    # 2.–4. batch, special-token mask, the declared sources, objective inputs
    clock = time.time()
    batch = {k: v.to(runtime.device) for k, v in collate(rollouts, tokenizer.pad_token_id).items()}
    batch["loss_mask"] &= ~first_occurrence_mask(batch["target_ids"], batch["loss_mask"], mask_ids)
    rollout_references = [references[int(g)] for g in group_B]
    # π_old (and the teacher, the reference) under the autocast the update's forward runs in, so
    # that the first update of a step has ratio 1 exactly
    with runtime.accelerator.autocast():
        signals, diagnostics = fetch_signals(sources, policy, batch, group_B, [c.text for c in flat], rollout_references)
    batch["old_logprob"] = signals.old_logprob_BT  # every on-policy loss reads π_old (ratios, rewards)
    gap_sum = rollout_logprob_gap_sum(flat, rollouts, batch, spec)
    if objective.prepare is not None:
        batch.update(objective.prepare(params, batch, signals))
    response_mask = batch["loss_mask"]
    if recipe.train.entropy_top_ratio is not None:
        # The LSM authors' code: rewards/advantages over the whole response (above), then the loss
        # only on each rollout's top share of π_old's entropy (from the scoring pass).
        batch["loss_mask"] = top_entropy_mask(signals.entropy_BT, response_mask, recipe.train.entropy_top_ratio)
    time_score = time.time() - clock

    # 5. PPO epochs × mini-batches
    clock = time.time()
    stats, losses, grad_norms, skipped = {}, [], [], []
    local_mini = recipe.train.mini_batch_size // runtime.world_size
    for epoch in range(recipe.train.ppo_epochs):
        order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(recipe.seed * 7919 + step * 31 + epoch))
        for start in range(0, len(rollouts), local_mini):
            rows = order[start : start + local_mini]
            loss, grad_norm, was_skipped = ppo_update(policy, optimizer, scheduler, runtime, recipe, batch, rows, stats,
                                                      seed=(step * 1009 + epoch) * 1009 + start)
            losses.append(loss)
            grad_norms.append(grad_norm)
            skipped.append(was_skipped)
    time_train = time.time() - clock

    # 6. metrics (sums over processes, then per-token or per-rollout means) over all response tokens
    mask = response_mask
    sums = {
        "tokens": float(mask.sum()), "rollouts": float(len(rollouts)),
        **teacher_sums(signals, mask), **verifiable_reward_sums(signals),
        "entropy_sum": float(signals.entropy_BT[mask].sum()),
        "length_sum": float(sum(len(c.token_ids) for c in flat)),
        "truncated": float(sum(c.finish_reason == "length" for c in flat)),
        "repetition": float(sum(has_repetition_loop(c.token_ids) for c in flat)),
        "trained_tokens": float(batch["loss_mask"].sum()),
        **({"gap_sum": gap_sum} if gap_sum is not None else {}),
        **{f"diag_{k}": v * float(mask.sum()) for k, v in diagnostics.items()},
        **{f"stat_{k}": float(v) for k, v in stats.items()},
    }
    sums = runtime.sum_across_ranks(sums)
    tokens, count = max(sums["tokens"], 1.0), max(sums["rollouts"], 1.0)
    engine_tokens = max(sums.pop("stat_tokens", 1.0), 1.0)
    row = {
        "loss": sum(losses) / max(len(losses), 1), "lr": lr, "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
        **teacher_metrics(sums, tokens), **verifiable_reward_metrics(sums),
        "entropy": sums["entropy_sum"] / tokens,
        "response_length": sums["length_sum"] / count, "truncated_frac": sums["truncated"] / count,
        "repetition_frac": sums["repetition"] / count, "response_tokens": tokens,
        "trained_token_frac": sums["trained_tokens"] / tokens,
        **({"rollout_logprob_gap": sums["gap_sum"] / tokens} if "gap_sum" in sums else {}),
        **{k[5:]: v / tokens for k, v in sums.items() if k.startswith("diag_")},
        **{f"train_{k[5:]}": v / engine_tokens for k, v in sums.items() if k.startswith("stat_")},
        "time_generate": time_generate, "time_score": time_score, "time_train": time_train,
        "rollouts_per_s": count / max(time_generate + time_score + time_train, 1e-9),
        "skipped": skipped,  # per update: NaN/inf loss or grad norm, not applied
    }
    texts = [tokenizer.decode(r.token_ids[r.prompt_len :]) for r in rollouts[:2]]
    return row, texts


def rollout_logprob_gap_sum(completions, rollouts, batch, spec: SamplingSpec) -> float | None:
    """Σ |log-prob the generation backend recorded − the student's π_old| over the loss positions.
    ≈ 0 unless the engine samples from other weights than the student's (a missed weight sync) or
    with other numerics. Only with plain sampling (temperature 1, no top-k/top-p): otherwise the
    backend records the warped distribution's log-probs, which differ from π_old by design."""
    if spec.temperature != 1.0 or spec.top_p < 1.0 or spec.top_k:
        return None
    recorded_BT = torch.zeros(batch["loss_mask"].shape)
    for row, (completion, rollout) in enumerate(zip(completions, rollouts)):
        start = rollout.prompt_len - 1  # the position that predicts the first response token
        recorded_BT[row, start : start + len(completion.logprobs)] = torch.tensor(completion.logprobs)
    mask_BT = batch["loss_mask"].cpu()
    return float((recorded_BT - batch["old_logprob"].cpu().float())[mask_BT].abs().sum())


def _generate_or_stop(backend, prompt_ids, spec, step: int):
    """Rollouts; a student whose weights diverged (finite but huge after a bad update) has a NaN
    sampling distribution, which torch refuses deep inside generate: stop the run in one line."""
    try:
        return backend.generate(prompt_ids, spec)
    except RuntimeError as err:
        if "inf" not in str(err) and "nan" not in str(err):
            raise
        raise UserError(f"stopped at step {step + 1}: the student's next-token probabilities are NaN/inf, so it "
                        "cannot sample (its weights diverged in an earlier update); no checkpoint was written after "
                        "the last finite step; lower optim.lr") from None


def ppo_update(policy, optimizer, scheduler, runtime, recipe, batch, rows, stats, seed) -> tuple[float, float, bool]:
    """One optimizer step on the rollouts `rows` of this process's batch (its part of the PPO
    mini-batch); every token's loss carries its train.loss_aggregation weight over the mini-batch.
    Returns (loss, grad norm, skipped)."""
    groups = [torch.tensor(g, device=batch["input_ids"].device)
              for g in micro_batches(rows.tolist(), recipe.train.micro_batch_size, None)]

    def forward(index: int, micro: dict) -> torch.Tensor:
        generator = torch.Generator(device=runtime.device).manual_seed(seed * 31 + index)
        return policy(micro, generator=generator, stats=stats)

    loss_total, _ = accumulate_gradients(policy, runtime, [_select_rows(batch, g) for g in groups],
                                         recipe.train.loss_aggregation, forward)
    grad_norm, skipped = optimizer_step(policy, optimizer, scheduler, runtime, recipe.optim.grad_clip, loss_total)
    return runtime.sum_across_ranks({"l": loss_total})["l"], grad_norm, skipped


def fetch_signals(sources: Sources, policy, batch, group_B, texts: list[str], references: list):
    """The one place a rollout batch's TokenSignals are built, for every backend: π_old always,
    then each source the objective declared. Returns (signals, support diagnostics).

    A local teacher is scored together with the student in one chunked pass (score_pair), which
    also gives the exact reverse KL; a vLLM teacher returns its own top-K, and the student is
    then scored on it (no exact KL, no student top-K: refused with vllm, see _check_sources)."""
    student = policy.module.model if hasattr(policy, "module") else policy.model
    score = sources.score_settings
    teacher = sources.teacher
    if teacher is not None and teacher.vllm is None:
        with gathered(policy), gathered(teacher.model):
            pair = score_pair(student, teacher.model, batch, k=sources.k, **score)
        signals = TokenSignals(
            old_logprob_BT=pair["old_logprob"], entropy_BT=pair["student_entropy"], group_B=group_B,
            teacher_token_logprob_BT=pair["teacher_token_logprob"],
            teacher_topk_ids_BTK=pair["teacher_topk_ids"], teacher_topk_logprob_BTK=pair["teacher_topk_logprob"],
            student_logprob_at_teacher_topk_BTK=pair["student_logprob_at_teacher_topk"],
            student_topk_ids_BTK=pair["student_topk_ids"], student_topk_logprob_BTK=pair["student_topk_logprob"],
            teacher_logprob_at_student_topk_BTK=pair["teacher_logprob_at_student_topk"],
            exact_reverse_kl_BT=pair["exact_reverse_kl"])
    elif teacher is not None:
        teach = teacher.vllm.score(batch)  # at temperature 1 (_check_sizes refuses at_rollout_temperature)
        with gathered(policy):
            old = score_tokens(student, batch, k=sources.k, at_ids_BTJ=teach["topk_ids"], entropy=True, **score)
        signals = TokenSignals(
            old_logprob_BT=old["token_logprob"], entropy_BT=old["entropy"], group_B=group_B,
            teacher_token_logprob_BT=teach["token_logprob"],
            teacher_topk_ids_BTK=teach["topk_ids"], teacher_topk_logprob_BTK=teach["topk_logprob"],
            student_logprob_at_teacher_topk_BTK=old["at_logprob"],
            student_topk_ids_BTK=old["topk_ids"], student_topk_logprob_BTK=old["topk_logprob"])
    else:
        with gathered(policy):
            old = score_tokens(student, batch, k=0, entropy=True, **score)
        signals = TokenSignals(old_logprob_BT=old["token_logprob"], entropy_BT=old["entropy"], group_B=group_B)
    if sources.reference is not None:
        with gathered(sources.reference):
            signals.reference_logprob_BT = score_tokens(sources.reference, batch, k=0, **score)["token_logprob"]
    if VERIFIABLE_REWARD in sources.needs:
        signals.verifiable_reward_B = torch.tensor(sources.verifiable_rewards(references, texts),
                                                   device=batch["loss_mask"].device)
    return signals, _support_diagnostics(sources, signals, batch["loss_mask"])


def _support_diagnostics(sources: Sources, signals: TokenSignals, mask_BT) -> dict[str, float]:
    """Each model's mass on the objective's support (LSM's `support`; the teacher's top-K for
    objectives without one) and the top-K overlap; only where a teacher was scored."""
    if signals.teacher_topk_ids_BTK is None:
        return {}
    return support_diagnostics(signals, sources.support, mask_BT)


def teacher_sums(signals: TokenSignals, mask_BT) -> dict[str, float]:
    """Per-process sums for the teacher metrics (none without a teacher)."""
    if signals.teacher_token_logprob_BT is None:
        return {}
    reward_N = (signals.teacher_token_logprob_BT - signals.old_logprob_BT)[mask_BT]
    exact_kl = signals.exact_reverse_kl_BT[mask_BT].sum() if signals.exact_reverse_kl_BT is not None else float("nan")
    return {"reward_sum": float(reward_N.sum()), "exact_kl_sum": float(exact_kl),
            "negative_sum": float((reward_N < 0).sum())}


def teacher_metrics(sums: dict, tokens: float) -> dict[str, float]:
    if "reward_sum" not in sums:
        return {}
    return {
        # exact Σ_v π(log π − log q) at the visited positions (local teacher), and the sampled-token
        # (k1) estimate E_y[log π_old(y) − log q(y)] that most tools report
        "reverse_kl": sums["exact_kl_sum"] / tokens, "reverse_kl_sampled": -sums["reward_sum"] / tokens,
        "reward_mean": sums["reward_sum"] / tokens, "negative_reward_frac": sums["negative_sum"] / tokens,
    }


def verifiable_reward_sums(signals: TokenSignals) -> dict[str, float]:
    """Per-process sums for the grader's metrics: rewards, their squares, and the groups (the
    rollouts of one prompt) whose rewards are all equal, which give GRPO no signal."""
    if signals.verifiable_reward_B is None:
        return {}
    reward_B, group_B = signals.verifiable_reward_B.cpu().double(), signals.group_B.cpu()
    groups = group_B.unique()
    flat = sum(bool((reward_B[group_B == g] == reward_B[group_B == g][0]).all()) for g in groups)
    return {"vr_sum": float(reward_B.sum()), "vr_square_sum": float((reward_B**2).sum()),
            "vr_rollouts": float(len(reward_B)), "vr_groups": float(len(groups)), "vr_flat_groups": float(flat)}


def verifiable_reward_metrics(sums: dict) -> dict[str, float]:
    if "vr_sum" not in sums:
        return {}
    count = max(sums["vr_rollouts"], 1.0)
    mean = sums["vr_sum"] / count
    variance = max(sums["vr_square_sum"] / count - mean**2, 0.0)
    return {"verifiable_reward_mean": mean, "verifiable_reward_std": variance**0.5,
            "zero_advantage_group_frac": sums["vr_flat_groups"] / max(sums["vr_groups"], 1.0)}


@dataclass
class Sources:
    """What the loop fetches per rollout batch, opened once from the recipe: exactly the
    sources the objective declares, and the scoring settings bound once for all of them."""

    needs: frozenset[str]
    score_settings: dict  # chunk_tokens, matmul_dtype, temperature for every no-grad scoring pass
    k: int  # top-K of the teacher's and the student's supports (objective.k or scoring.diagnostics_k)
    support: str  # whose top-K the support diagnostics measure (LSM's `support`; else the teacher's)
    teacher: Teacher | None = None
    reference: torch.nn.Module | None = None  # the starting student, frozen (KL to a reference)
    grader: object | None = None  # eval.math_grader.MathGrader (a worker pool): prompts.reward math
    sandbox: object | None = None  # eval.code_sandbox.CodeSandbox: prompts.reward code

    @classmethod
    def open(cls, recipe: DistillRecipe, needs: frozenset[str], runtime: Runtime, tokenizer,
             show: bool = True) -> Sources:
        temperature = scoring_temperature(recipe)
        params = recipe.objective.params
        sources = cls(needs=needs, k=getattr(params, "k", recipe.scoring.diagnostics_k),
                      support=getattr(params, "support", "teacher"),
                      score_settings=dict(chunk_tokens=recipe.scoring.chunk_tokens,
                                          matmul_dtype=runtime.matmul_dtype, temperature=temperature))
        if needs & TEACHER_SOURCES:
            sources.teacher = Teacher(recipe, runtime, tokenizer)
        if REFERENCE_TOKEN in needs:
            # the trained student's weight dtype (fp32 unless bf16-pure), so the KL starts at 0
            dtype = torch.bfloat16 if recipe.train.precision == "bf16-pure" else torch.float32
            model, _ = load_policy(recipe.student, "student", recipe.seed, "cpu", dtype=dtype)
            sources.reference = place_teacher(model.eval().requires_grad_(False), runtime)
        if VERIFIABLE_REWARD in needs and recipe.prompts.reward == "code":
            from posttrain.eval.code_sandbox import CodeSandbox

            sources.sandbox = CodeSandbox(workers=recipe.scoring.grader_workers)
            if show and sources.sandbox.warning():  # as `posttrain eval` says it: a weak sandbox, up front
                console.print(sources.sandbox.warning(), highlight=False)
        elif VERIFIABLE_REWARD in needs:
            from posttrain.eval.math_grader import MathGrader

            sources.grader = MathGrader(workers=recipe.scoring.grader_workers)
        return sources

    def verifiable_rewards(self, references: list, texts: list[str]) -> list[float]:
        """1/0 per completion: the math grader's verdict on its boxed answer against the gold
        answer (reference: a string), or whether it passed the problem's tests in the code sandbox
        (reference: {prompt, test, entry_point}), graded exactly as `posttrain eval` grades."""
        if self.sandbox is not None:
            return [float(v["passed"]) for v in self.sandbox.grade(references, texts)]
        return [float(v["correct"]) for v in self.grader.grade(references, texts)]

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc) -> None:
        if self.grader is not None:
            self.grader.close()
        if self.sandbox is not None:
            self.sandbox.close()


def scoring_temperature(recipe: DistillRecipe) -> float:
    """The temperature π_old, the teacher and the trained π_θ are all scored at (scoring.at_rollout_temperature)."""
    return recipe.rollout.temperature if recipe.scoring.at_rollout_temperature else 1.0


def _frozen_dtype(recipe: DistillRecipe, runtime: Runtime) -> torch.dtype:
    bf16 = runtime.matmul_dtype == torch.bfloat16 or recipe.train.precision == "bf16-pure"
    return torch.bfloat16 if bf16 else torch.float32


class Teacher:
    """The frozen teacher: a local transformers model (`model`) or a vLLM engine (`vllm`)."""

    def __init__(self, recipe: DistillRecipe, runtime: Runtime, student_tokenizer):
        model, tokenizer = load_policy(recipe.teacher, "teacher", recipe.seed + 1, "cpu", dtype=_frozen_dtype(recipe, runtime))
        if not same_vocabulary(tokenizer, student_tokenizer) or (
            model.get_output_embeddings().weight.shape[0] < len(student_tokenizer)
        ):
            raise UserError("teacher and student tokenizers differ (recipe keys 'teacher' and 'student'); "
                            "token-level objectives need one shared vocabulary")
        self.model = self.vllm = None
        self.tokenizer = tokenizer  # for the pre-flight checks (preflight.py)
        if recipe.scoring.backend == "vllm":
            from posttrain.generation.vllm import VLLMTeacher

            k = getattr(recipe.objective.params, "k", recipe.scoring.diagnostics_k)
            self.vllm = VLLMTeacher(recipe.teacher.path, k=k, gpu_memory_utilization=recipe.scoring.gpu_memory_utilization)
        else:
            self.model = place_teacher(model.eval().requires_grad_(False), runtime)


def _check_sources(recipe: DistillRecipe, needs: frozenset[str], recipe_path: str) -> None:
    """A teacher exactly when the objective declares a teacher signal; vllm scoring only for what
    it can return."""
    name = recipe.objective.name
    if needs & TEACHER_SOURCES and recipe.teacher is None:
        raise UserError(f"{recipe_path}: key 'teacher' is required: {name} learns from a teacher's "
                        "log-probs; give teacher.path")
    if not needs & TEACHER_SOURCES and recipe.teacher is not None:
        raise UserError(f"{recipe_path}: key 'teacher': {name} uses no teacher signal, so the teacher would be "
                        "ignored; remove the teacher section")
    if STUDENT_TOPK in needs and recipe.scoring.backend == "vllm":
        raise UserError(f"{recipe_path}: key 'scoring.backend': vllm returns only the teacher's own top-K, "
                        "so it cannot score the student's top-K support; use scoring.backend: hf")
    if not needs & TEACHER_SOURCES and recipe.scoring.backend == "vllm":
        raise UserError(f"{recipe_path}: key 'scoring.backend': vllm scoring serves a teacher, and {name} has "
                        "none; use scoring.backend: hf")
    _check_code_reward(recipe, needs, recipe_path)
    if VERIFIABLE_REWARD in needs:  # grpo: each rollout's advantage is relative to its prompt's other rollouts
        if recipe.rollout.samples_per_prompt < 2:
            raise UserError(f"{recipe_path}: key 'rollout.samples_per_prompt': {name} compares each rollout with the "
                            "other rollouts of its prompt; with 1 every advantage is 0 and nothing trains; use ≥ 2")
        if recipe.rollout.temperature == 0:
            raise UserError(f"{recipe_path}: key 'rollout.temperature': greedy rollouts of one prompt are identical, "
                            f"so every {name} advantage is 0; sample at temperature > 0")


def _check_code_reward(recipe: DistillRecipe, needs: frozenset[str], recipe_path: str) -> None:
    """prompts.reward code: an objective that is graded, and prompts rendered as eval renders HumanEval."""
    cfg = recipe.prompts
    if cfg.reward != "code":
        return
    if VERIFIABLE_REWARD not in needs:
        raise UserError(f"{recipe_path}: key 'prompts.reward': code grades completions for a verifiable reward, and "
                        f"{recipe.objective.name} has none; remove prompts.reward")
    for key, value, unset in (("template", cfg.template, None), ("clean", cfg.clean, "none")):
        if value != unset:
            raise UserError(f"{recipe_path}: key 'prompts.{key}': code prompts are the function stub in a python "
                            "block, as `posttrain eval --prompt chat` asks HumanEval; remove it")


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


def _single_token_ids(tokenizer, tokens: list[str], recipe_path) -> list[int]:
    ids = []
    for token in tokens:
        encoded = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if encoded is None:
            pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise UserError(f"{recipe_path}: key 'train.mask_first_tokens': {token!r} is {len(pieces)} tokens "
                                "for this tokenizer; list single tokens")
            encoded = pieces[0]
        ids.append(encoded)
    return ids


def _load_prompts(recipe: DistillRecipe, needs: frozenset[str]) -> tuple[list, list]:
    """The prompt fields of the data rows, and each row's reference for the grader when the
    objective needs a verifiable reward (else None): its gold answer (prompts.answer_field), or
    with prompts.reward code the problem {prompt: the prompt field, test, entry_point}."""
    cfg = recipe.prompts
    rows = load_rows(cfg.source, cfg.split, cfg.synthetic, cfg.max_examples, "prompts.source",
                     dedupe_field=cfg.prompt_field if cfg.dedupe else None)
    if rows and cfg.prompt_field not in rows[0]:
        raise UserError(f"recipe key 'prompts.prompt_field': the data has no field {cfg.prompt_field!r}; "
                        f"fields: {', '.join(rows[0])}")
    prompt_fields = [row[cfg.prompt_field] for row in rows]
    bad = next((i for i, field in enumerate(prompt_fields) if not _is_prompt(field)), None)
    if bad is not None:  # str(None) or str(42) would otherwise become the prompt text
        raise UserError(f"recipe key 'prompts.prompt_field': row {bad}'s {cfg.prompt_field!r} is "
                        f"{prompt_fields[bad]!r}; a prompt is non-empty text, or a list of chat messages "
                        "{role, content} with text values")
    if VERIFIABLE_REWARD not in needs:
        return prompt_fields, [None] * len(rows)
    if cfg.reward == "code":
        return prompt_fields, _code_problems(rows, cfg.prompt_field)
    missing = next((i for i, row in enumerate(rows) if not _is_gold(row.get(cfg.answer_field))), None)
    if missing is not None:
        code_hint = " (code problems? set prompts.reward: code)" if {"test", "entry_point"} <= set(rows[missing]) else ""
        raise UserError(f"recipe key 'prompts.answer_field': row {missing} has {cfg.answer_field!r} = "
                        f"{rows[missing].get(cfg.answer_field)!r}, not a gold answer (text or a number) the grader can "
                        f"compare with{code_hint}; fields: {', '.join(k for k, v in rows[missing].items() if v is not None)}")
    return prompt_fields, [str(row[cfg.answer_field]).strip() for row in rows]


def check_golds(recipe: DistillRecipe, references: list, recipe_path: str) -> None:
    """Before any model loads, every distinct gold answer parsed once (math reward only): a gold
    the grader cannot parse would give its prompt reward 0 in every rollout, silently (refused);
    one that parses only as text matches only the same text (warned: GSM8K's "... #### 2")."""
    if not references or not isinstance(references[0], str):  # no golds: no verifiable reward, or code problems
        return
    from posttrain.eval.math_grader import gold_kinds

    kinds = gold_kinds(references, recipe.scoring.grader_workers)
    for kind in ("none", "text"):
        golds = [gold for gold in references if kinds[gold] == kind]
        if not golds:
            continue
        example = f"{len(set(golds))} gold answer(s) {'the math grader cannot parse' if kind == 'none' else 'that parse only as text'}, " \
                  f"e.g. {golds[0]!r} (row {references.index(golds[0])})"
        if kind == "none":
            raise UserError(f"{recipe_path}: key 'prompts.answer_field': {example}; every rollout of such a prompt "
                            "would get reward 0. Give the final answer only")
        console.print(f"warning: {recipe_path}: key 'prompts.answer_field': {example}; a rollout matches them "
                      "only by the same text. If they are answers with extra words (GSM8K's '#### 2'), give the "
                      "final answer only", highlight=False)


def _is_prompt(field) -> bool:
    if isinstance(field, str):
        return bool(field.strip())
    return isinstance(field, list) and bool(field) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in field)


def _is_gold(value) -> bool:
    """Text or a number; a bool, a list or a mapping would reach the grader as Python's str()."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _code_problems(rows: list[dict], prompt_field: str) -> list[dict]:
    """HumanEval-style problems for the sandbox: the prompt field is the function stub the
    completion's code continues or replaces, `test` the checker's code, `entry_point` its name."""
    for index, row in enumerate(rows):
        for key in (prompt_field, "test", "entry_point"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"recipe key 'prompts.reward': code runs each row's tests, and row {index} has no "
                                f"text field {key!r} (HumanEval rows: prompt, test, entry_point; or use "
                                f"prompts.reward: math); fields: {', '.join(row)}")
        try:  # a test that does not compile, or defines no check(), fails every sample: reward 0, silently
            compile(row["test"], f"row {index} test", "exec")
        except SyntaxError as err:
            raise UserError(f"recipe key 'prompts.reward': row {index}'s test does not compile ({err.msg}, line "
                            f"{err.lineno})") from None
        if not re.search(r"^def\s+check\s*\(", row["test"], flags=re.MULTILINE):
            raise UserError(f"recipe key 'prompts.reward': row {index}'s test defines no check(candidate) "
                            "(HumanEval's form: the sandbox calls check(entry_point))")
        # a field that is not the stub (task_id, a docstring) would fail every test: reward 0, silently
        if not re.search(rf"^\s*def\s+{re.escape(row['entry_point'])}\s*\(", row[prompt_field], flags=re.MULTILINE):
            raise UserError(f"recipe key 'prompts.prompt_field': row {index}'s {prompt_field!r} does not define its "
                            f"entry_point {row['entry_point']!r} (def {row['entry_point']}(...)); it must be the "
                            "function stub the completion completes (HumanEval: prompt)")
    return [{"prompt": row[prompt_field], "test": row["test"], "entry_point": row["entry_point"]} for row in rows]


def _tokenized_prompts(recipe: DistillRecipe, prompt_fields: list, tokenizer) -> list[list[int] | None]:
    """Token ids of each prompt (templated); None for a prompt longer than prompts.max_prompt_length
    (skipped: the step's prompts are drawn among the others)."""
    cfg = recipe.prompts
    template = None
    if cfg.template is not None:
        try:
            template = resolve_template(cfg.template)
        except ValueError as err:
            raise UserError(f"recipe key 'prompts.template' {err}") from None
    if cfg.reward == "code":  # the user turn `posttrain eval --prompt chat` writes for HumanEval
        prompts = [render_prompt(tokenizer, code_request(field), cfg.system_prompt) for field in prompt_fields]
    else:
        prompts = [render_prompt(tokenizer, prompt_of(field, cfg.clean, template, index), cfg.system_prompt)
                   for index, field in enumerate(prompt_fields)]
    prompts = [p if len(p) <= cfg.max_prompt_length else None for p in prompts]
    fitting = sum(p is not None for p in prompts)
    if fitting < recipe.rollout.prompts_per_step:
        raise UserError(f"recipe key 'rollout.prompts_per_step': only {fitting} prompts fit "
                        f"prompts.max_prompt_length={cfg.max_prompt_length}")
    return prompts


def prompt_of(value, clean: str, template: str | None, index: int):
    """The user turn for one row: unchanged without cleaning or template; else the question
    text (the first user message of a message list, as the LSM authors' script reads DAPO's
    `prompt`), cleaned, then formatted into the template."""
    if clean == "none" and template is None:
        return value
    question = value
    if isinstance(value, list):
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise UserError(f"recipe key 'prompts.prompt_field': row {index}'s message list has no user turn")
        question = users[0].get("content", "")
    question = str(question)
    if clean == "dapo-instructions":
        question = clean_dapo_instructions(question)
        if not question:
            raise UserError(f"recipe key 'prompts.clean': row {index} is empty once its instruction lines are dropped")
    return template.format(question=question) if template is not None else question


def _prompts_for_step(prompts: list[list[int] | None], recipe: DistillRecipe, runtime, step) -> list[int]:
    """Indices of this process's prompts for `step` (an epoch-shuffled order over the prompts that fit)."""
    fitting = [i for i, p in enumerate(prompts) if p is not None]
    per_step = recipe.rollout.prompts_per_step
    steps_per_epoch = len(fitting) // per_step
    epoch, index = divmod(step, steps_per_epoch)
    order = epoch_order(len(fitting), recipe.seed, epoch)[index * per_step : (index + 1) * per_step]
    return [fitting[i] for i in order][runtime.rank :: runtime.world_size]


def _check_k(recipe: DistillRecipe, student, recipe_path) -> None:
    """Top-K supports need K ≤ the vocabulary (torch.topk would fail mid-run otherwise)."""
    vocab = student.get_output_embeddings().weight.shape[0]
    k = getattr(recipe.objective.params, "k", None)
    key = "objective.k" if k is not None else "scoring.diagnostics_k"
    k = recipe.scoring.diagnostics_k if k is None else k
    if k > vocab:
        raise UserError(f"{recipe_path}: key '{key}' ({k}) must be at most the vocabulary size ({vocab})")


def _check_sizes(recipe: DistillRecipe, runtime, recipe_path) -> None:
    if recipe.prompts.template is not None:
        try:
            resolve_template(recipe.prompts.template)
        except ValueError as err:
            raise UserError(f"{recipe_path}: key 'prompts.template' {err}") from None
    if recipe.scoring.at_rollout_temperature and recipe.rollout.temperature == 0:
        raise UserError(f"{recipe_path}: key 'scoring.at_rollout_temperature': rollout.temperature is 0 (greedy); "
                        "log-probs at temperature 0 are undefined")
    if recipe.scoring.at_rollout_temperature and recipe.scoring.backend == "vllm":
        raise UserError(f"{recipe_path}: key 'scoring.at_rollout_temperature': the vllm scoring backend returns "
                        "log-probs at temperature 1 only; use scoring.backend: hf")
    rollouts = recipe.rollout.prompts_per_step * recipe.rollout.samples_per_prompt
    if recipe.rollout.prompts_per_step % runtime.world_size:
        raise UserError(f"{recipe_path}: key 'rollout.prompts_per_step' ({recipe.rollout.prompts_per_step}) must be "
                        f"a multiple of the number of processes ({runtime.world_size})")
    if rollouts % recipe.train.mini_batch_size or recipe.train.mini_batch_size % runtime.world_size:
        raise UserError(f"{recipe_path}: key 'train.mini_batch_size' ({recipe.train.mini_batch_size}) must divide the "
                        f"rollouts per step ({rollouts}) and be a multiple of the number of processes")

