"""An on-policy step's rollouts: `samples_per_prompt` completions of each drawn prompt (a group),
and, with rollout.dynamic_sampling (DAPO), only groups that carry a signal.

DAPO's dynamic sampling: a group whose rewards are all equal (every rollout right, or every one
wrong) has advantage 0 and trains nothing, so it is dropped, and more prompts are drawn (a
shuffled batch of the prompts that fit, seeded by step, process and draw) until the step has its
prompts_per_step groups, at most rollout.max_draws batches per step. When the cap is reached the
batch is filled with dropped groups (advantage 0: they add nothing but keep every update the same
size); the metrics row says how many draws, dropped and filled groups the step had.
May import: generation, seeds, errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from posttrain.errors import UserError
from posttrain.generation import SamplingSpec
from posttrain.seeds import dynamic_draw_seed


@dataclass
class Groups:
    """The step's groups: each prompt's ids, reference and completions; their rewards when they
    were graded here (dynamic sampling), else None (graded with the other signals)."""

    prompt_ids: list[list[int]]
    references: list
    completions: list
    rewards: list[list[float]] | None = None
    stats: dict[str, float] = field(default_factory=dict)


def generate_or_stop(backend, prompt_ids, spec: SamplingSpec, step: int):
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


def sample_groups(backend, sources, spec: SamplingSpec, step: int, prompt_ids: list, references: list,
                  pool: tuple[list, list] | None = None, max_draws: int = 1) -> Groups:
    """The step's groups. `pool`: (all prompts' ids, None where too long; their references) to
    draw more from with dynamic sampling (None: no dynamic sampling, one draw)."""
    completions = generate_or_stop(backend, prompt_ids, spec, step)
    if pool is None:
        return Groups(prompt_ids, references, completions)
    needed, kept, dropped, draws = len(prompt_ids), [], [], 1
    batch = list(zip(prompt_ids, references, completions))
    while True:
        for ids, reference, samples in batch:
            rewards = sources.verifiable_rewards([reference] * len(samples), [c.text for c in samples])
            (dropped if len(set(rewards)) == 1 else kept).append((ids, reference, samples, rewards))
        if len(kept) >= needed or draws >= max_draws:
            break
        batch = _draw_more(backend, pool, spec, step, draws, needed)
        draws += 1
    filled = max(needed - len(kept), 0)
    chosen = (kept + dropped[:filled])[:needed]
    return Groups([c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen], [c[3] for c in chosen],
                  stats={"dynamic_draws": float(draws), "dynamic_dropped_groups": float(len(dropped)),
                         "dynamic_filled_groups": float(filled)})


def _draw_more(backend, pool, spec: SamplingSpec, step: int, draw: int, count: int) -> list:
    """`count` more prompts, drawn among those that fit, and their completions."""
    prompts, references = pool
    fitting = [i for i, p in enumerate(prompts) if p is not None]
    seed = dynamic_draw_seed(spec.seed, draw)
    order = torch.randperm(len(fitting), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    chosen = [fitting[i] for i in order]
    completions = generate_or_stop(backend, [prompts[i] for i in chosen], replace(spec, seed=seed), step)
    return [(prompts[i], references[i], samples) for i, samples in zip(chosen, completions)]
