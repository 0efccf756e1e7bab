"""`posttrain train`: offline objectives (SFT, DFT, OTR) on demonstrations.

Read top to bottom: load → data → optimizer → (resume) → steps → checkpoints. One optimizer step
takes `batch_size` examples (over all processes), runs them as micro-batches, and weights every
token's loss by the recipe's aggregation (train.loss_aggregation; the default token-mean divides
by the step's total number of response tokens), so any split into micro-batches or processes
gives the same update for every mode defined independently of the split.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from posttrain.config import TrainRecipe
from posttrain.data.sft import build_examples, collate, epoch_order, load_rows, micro_batches
from posttrain.errors import UserError
from posttrain.losses import OBJECTIVES
from posttrain.losses.aggregation import LENGTH_NORM, top_entropy_mask
from posttrain.losses.dpo import PAIR_STATS, PAIRS
from posttrain.losses.engine import head_entropy
from posttrain.optim import build_scheduler
from posttrain.policy import PolicyLoss
from posttrain.progress import StepProgress, summary_table
from posttrain.loop import (
    Saver, accumulate_gradients, apply_precision, check_training_memory, count_nonfinite, open_logs, open_run,
    optimizer_step,
)
from posttrain.runfolder import load_trainer_state, write_text_atomic
from posttrain.runtime import Runtime, make_runtime
from posttrain.scale import gathered, wrap_for_training
from posttrain.seeds import micro_batch_seed
from posttrain.scoring import hidden_at_loss_positions, score_tokens
from posttrain.trackers import check_installed
from posttrain import teacher_cache_reader
from posttrain.data.packing import best_fit, check_packing, collate_packed
from posttrain.data.preference import PreferencePair, build_pairs, check_pair_rows, collate_pairs, sequences
from posttrain.preference import attach_reference_logprobs


def validate(recipe: TrainRecipe) -> None:
    """Every check of a train recipe that needs no model: refused in one line naming its key."""
    objective = OBJECTIVES[recipe.objective.name]
    if objective.on_policy:
        raise UserError(f": {objective.name!r} is an on-policy objective; run it with `posttrain rl`",
                        key="objective.name")
    if objective.prepare is not None:  # per-batch inputs from scored signals: only the on-policy loop fetches them
        raise UserError(f": {objective.name!r} prepares its inputs from on-policy signals, which `posttrain train` "
                        "does not fetch; run it with `posttrain rl`", key="objective.name")
    teacher_cache_reader.check_recipe(recipe)  # kd_topk ⇔ data.teacher_cache
    check_packing(recipe.train)
    if recipe.train.loss_aggregation == LENGTH_NORM:  # Dr. GRPO's constant L: the rollouts' max_new_tokens
        raise UserError(f": {LENGTH_NORM} divides by a constant response length L (Dr. GRPO: the rollouts' "
                        "max_new_tokens), and offline data has none; use seq-mean-token-sum or token-mean",
                        key="train.loss_aggregation")
    _check_preference(recipe, objective)
    check_installed(recipe.report_to)  # trackers.py: a missing tracker package, before anything runs


def train(recipe: TrainRecipe, *, resume: bool = False, allow_changed_recipe: bool = False,
          command: list[str] | None = None) -> Path:
    """`command`: how the CLI was called (after `posttrain`), recorded in config.yaml."""
    validate(recipe)
    objective = OBJECTIVES[recipe.objective.name]
    # the data's rows first: a missing, empty or non-UTF-8 file is refused before any model is built
    rows = load_rows(recipe.data.source, recipe.data.split, recipe.data.synthetic, recipe.data.max_examples, "data.source")
    pairs = recipe.data.format == "preference"  # dpo: the unit of data is a (chosen, rejected) pair
    if pairs:
        check_pair_rows(rows, recipe.data)
    runtime = make_runtime(recipe.train.precision, recipe.train.parallel)
    cache = teacher_cache_reader.open_cache(recipe, rows) if recipe.data.teacher_cache else None  # all checks, nothing written
    run_dir, checkpoint, model, tokenizer = open_run(recipe, "model", runtime, resume, allow_changed_recipe)
    apply_precision(model, recipe.train.precision)
    _record_rft_source(run_dir, rows, runtime)
    check_training_memory(model, recipe.train, runtime, recipe.train.micro_batch_tokens
                          or recipe.train.micro_batch_size * recipe.data.max_length * (2 if pairs else 1))

    examples, data_counts = (build_pairs if pairs else build_examples)(rows, tokenizer, recipe.data)
    if pairs:  # π_ref: the start model's log-probs, once, before any update (posttrain/preference.py)
        attach_reference_logprobs(model, examples, tokenizer.pad_token_id, runtime, recipe.train.micro_batch_size,
                                  run_dir, resumed=checkpoint is not None, kind=objective.preference_pairs)
    batch_size = recipe.train.batch_size
    steps_per_epoch, total_steps = _step_counts(recipe, len(examples), runtime.world_size)
    examples = cache.attach(examples) if cache is not None else examples  # the teacher's top-K per response token

    loss = PolicyLoss(model, objective, recipe.objective.params, chunk_tokens=recipe.train.head_chunk_tokens,
                      matmul_dtype=runtime.matmul_dtype)
    policy, optimizer = wrap_for_training(loss, recipe.optim, runtime)
    scheduler = build_scheduler(optimizer, recipe.optim, total_steps)
    start_step = load_trainer_state(checkpoint, model, optimizer, scheduler, runtime) if checkpoint else 0

    [metrics] = open_logs(run_dir, runtime, recipe, command or ["train"], checkpoint, start_step, "metrics.jsonl")
    saver = Saver(run_dir, model, tokenizer, optimizer, scheduler, runtime, recipe.train)
    probe = (sequences(examples) if pairs else examples)[: recipe.train.token_probs_examples]  # the same training examples before and after
    if checkpoint is None and probe:
        _write_token_probs(run_dir, runtime, "initial", token_probability_histogram(policy, model, probe, tokenizer, runtime),
                          len(probe))

    started, last_row, order_cache, nonfinite_streak = time.time(), {}, {}, 0
    with StepProgress(f"train {recipe.name}", total_steps, start_step, enabled=runtime.is_main) as progress:
        for step in range(start_step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in order_cache:
                order_cache = {epoch: epoch_order(len(examples), recipe.seed, epoch)}
            step_examples = [examples[i] for i in order_cache[epoch][index * batch_size : (index + 1) * batch_size]]
            last_row = train_step(policy, optimizer, scheduler, runtime, recipe, step, step_examples, tokenizer.pad_token_id)
            last_row.update(step=step + 1, epoch=epoch)
            metrics.append(last_row)
            progress.update(step + 1, last_row)
            nonfinite_streak = count_nonfinite(nonfinite_streak, [last_row["skipped"]], recipe.train.max_nonfinite_steps,
                                               step + 1)
            saver.periodic(step + 1, total_steps, nonfinite_streak)

    saver.final(total_steps, checkpoint)
    if probe and start_step < total_steps:
        _write_token_probs(run_dir, runtime, "final", token_probability_histogram(policy, model, probe, tokenizer, runtime),
                          len(probe))
    if runtime.is_main:
        summary_table(f"train {recipe.name} ({objective.name})", [
            ("steps", f"{total_steps} ({start_step} before this session)"),
            ("examples", f"{data_counts['examples']} ({data_counts['truncated']} truncated, {data_counts['dropped']} dropped)"),
            ("last loss", f"{last_row.get('loss', float('nan')):.4f}" if last_row else "-"),
            ("tokens/s", f"{last_row.get('tokens_per_s', 0):,.0f}" if last_row else "-"),
            ("wall time", f"{time.time() - started:.1f} s"), ("checkpoint", str(run_dir / "final"))])
    return run_dir


def _check_preference(recipe: TrainRecipe, objective) -> None:
    """dpo/tdpo train on pairs (data.format: preference) and average over pairs (seq-mean-token-sum:
    losses/dpo.py); a pair is two rows of one micro-batch, which packing and the per-response
    entropy mask would break."""
    pairs = recipe.data.format == "preference"
    if objective.preference_pairs and not pairs:
        raise UserError(f": {objective.name!r} trains on preference pairs; set data.format: preference (with "
                        "data.chosen_field and data.rejected_field; `posttrain pref-data` writes such rows)", key="data.format")
    if pairs and not objective.preference_pairs:
        raise UserError(f": preference pairs train only a preference objective (dpo, tdpo), not {objective.name!r}",
                        key="data.format")
    if not pairs:
        return
    if recipe.train.loss_aggregation != "seq-mean-token-sum":
        raise UserError(f": {objective.name!r} averages its loss over pairs; set train.loss_aggregation: "
                        f"seq-mean-token-sum (got {recipe.train.loss_aggregation!r})", key="train.loss_aggregation")
    if recipe.train.packing or recipe.train.entropy_top_ratio is not None:
        raise UserError(f": not with {objective.name!r}: a pair's loss needs both whole responses as rows of one "
                        "micro-batch", key="train.packing" if recipe.train.packing else "train.entropy_top_ratio")


def _step_counts(recipe: TrainRecipe, examples: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for `examples` training examples."""
    batch_size = recipe.train.batch_size
    if batch_size < world_size:
        raise UserError(f"({batch_size}) must be at least the number of processes", key="train.batch_size")
    steps_per_epoch = examples // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"({batch_size}) is larger than the data ({examples} examples)", key="train.batch_size")
    total_steps = steps_per_epoch * recipe.train.epochs
    return steps_per_epoch, min(total_steps, recipe.train.max_steps) if recipe.train.max_steps else total_steps


def train_step(policy, optimizer, scheduler, runtime: Runtime, recipe: TrainRecipe, step: int, step_examples, pad_id) -> dict:
    """One optimizer step over `step_examples` (the whole global batch); returns its metrics.

    Each micro-batch's tokens carry their aggregation weights (train.loss_aggregation), computed
    from the sizes of the whole global batch, so the step's loss is the recipe's aggregate
    whatever the split."""
    started = time.time()
    response_tokens = sum(ex.loss_tokens for ex in step_examples)  # every rank sees the whole batch
    local = step_examples[runtime.rank :: runtime.world_size]
    if recipe.train.packing:  # data/packing.py: best-fit rows of ≤ micro_batch_tokens, no padding
        batches = [collate_packed(group, pad_id) for group in best_fit(local, recipe.train.micro_batch_tokens)]
    else:
        collate_fn = collate_pairs if isinstance(local[0], PreferencePair) else collate  # a pair stays in one micro-batch
        batches = [collate_fn(group, pad_id) for group in micro_batches(local, recipe.train.micro_batch_size,
                                                                        recipe.train.micro_batch_tokens)]
    if recipe.train.entropy_top_ratio is not None:
        for batch in batches:
            batch["loss_mask"] = _top_entropy_loss_mask(policy, batch, recipe, runtime)
    stats = {}

    def forward(index: int, batch: dict) -> torch.Tensor:
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        generator = torch.Generator(device=runtime.device).manual_seed(micro_batch_seed(recipe.seed, step, runtime.rank, index))
        return policy(batch, generator=generator, stats=stats)

    loss_total, counts = accumulate_gradients(policy, runtime, batches, recipe.train.loss_aggregation, forward)
    seen_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    lr = scheduler.get_last_lr()[0]
    grad_norm, skipped = optimizer_step(policy, optimizer, scheduler, runtime, recipe.optim.grad_clip, loss_total)
    totals = runtime.sum_across_ranks({"loss": loss_total, "seen_tokens": seen_tokens,
                                       **{k: float(v) for k, v in stats.items()}})
    seconds = time.time() - started
    row = {"loss": totals.pop("loss"), "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
           "response_tokens": response_tokens, "tokens_per_s": totals.pop("seen_tokens") / seconds, "step_seconds": seconds}
    if recipe.train.entropy_top_ratio is not None:
        row["trained_tokens"] = counts.tokens
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    pair_count = totals.pop(PAIRS, None)  # dpo: per-pair metrics are means over pairs (losses/dpo.py)
    if pair_count:
        row.update({key: totals.pop(key) / pair_count for key in PAIR_STATS if key in totals})
    row.update({k: v / tokens for k, v in totals.items()})  # per-token means of the objective's stats
    return row


def _top_entropy_loss_mask(policy, batch, recipe: TrainRecipe, runtime: Runtime) -> torch.Tensor:
    """train.entropy_top_ratio: the loss mask cut to each response's highest-entropy tokens under
    the current weights (a no-grad pre-pass; the head's entropy comes from the chunked engine)."""
    model = policy.module.model if hasattr(policy, "module") else policy.model
    on_device = {k: v.to(runtime.device) for k, v in batch.items()}
    with torch.no_grad(), runtime.accelerator.autocast(), gathered(policy):
        hidden_NH, weight_VH = hidden_at_loss_positions(model, on_device)
        loss = policy.module if hasattr(policy, "module") else policy
        entropy_N = head_entropy(hidden_NH, weight_VH, chunk_tokens=loss.chunk_tokens, matmul_dtype=loss.matmul_dtype)
    entropy_BT = torch.zeros(batch["loss_mask"].shape, dtype=entropy_N.dtype)
    entropy_BT[batch["loss_mask"]] = entropy_N.cpu()
    return top_entropy_mask(entropy_BT, batch["loss_mask"], recipe.train.entropy_top_ratio)


LOG10_EDGES = [-8.0 + 0.25 * i for i in range(33)]  # histogram bins of log10 p, [-8, 0]


def token_probability_histogram(policy, model, examples, tokenizer, runtime: Runtime) -> list[float]:
    """Counts of the model's probability of each response token of `examples` (the DFT paper's
    Figure 2 looks at this distribution on the training data), binned in log10 p."""
    counts = torch.zeros(len(LOG10_EDGES) - 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for group in micro_batches(examples, 32, None):
        batch = {k: v.to(runtime.device) for k, v in collate(group, tokenizer.pad_token_id).items()}
        with runtime.accelerator.autocast(), gathered(policy):
            logp = score_tokens(model, batch, matmul_dtype=runtime.matmul_dtype)["token_logprob"][batch["loss_mask"]]
        log10 = (logp.double() / math.log(10)).clamp(LOG10_EDGES[0], -1e-12).cpu()
        counts += torch.histc(log10, bins=len(counts), min=LOG10_EDGES[0], max=LOG10_EDGES[-1])
    model.train(was_training)
    return counts.tolist()


def _record_rft_source(run_dir: Path, rows: list[dict], runtime: Runtime) -> None:
    """rft_source.json: the eval folder an RFT run's data (`posttrain rft-data` rows) was sampled
    in, kept in the run folder so that `posttrain report` knows the run is RFT even after the
    data file moves."""
    sources = {row.get("rft_source") for row in rows}
    if runtime.is_main and len(sources) == 1 and None not in sources:
        write_text_atomic(run_dir / "rft_source.json", json.dumps({"rft_source": sources.pop()}))


def _write_token_probs(run_dir: Path, runtime: Runtime, key: str, counts: list[float], examples: int) -> None:
    if not runtime.is_main:
        return
    path = run_dir / "token_probs.json"
    data = json.loads(path.read_text()) if path.exists() else {"log10_edges": LOG10_EDGES}
    data[key] = counts
    data["examples"] = examples
    write_text_atomic(path, json.dumps(data))
