"""Every random stream of a run takes its seed from here: the run seed (recipe key `seed`) and the
stream's coordinates (step, process rank, micro-batch, ...) combined by one formula, `mix`, a
mixed-radix number: mix(s, (r1, c1), (r2, c2)) = (s·r1 + c1)·r2 + c2. Each stream names its
radices below; they are the numbers posttrain has always used, so runs (and the pinned losses
of tests/test_pinned.py) replay bit for bit. Two streams never share a seed unless they share
every coordinate; each replays exactly after a resume, whatever ran before it.
Imports nothing of posttrain."""

from __future__ import annotations

STEP_RADIX = 1_000_003  # a prime above any step count


def mix(seed: int, *coordinates: tuple[int, int]) -> int:
    for radix, value in coordinates:
        seed = seed * radix + value
    return seed


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle of an epoch (offline examples, on-policy prompts)."""
    return mix(seed, (STEP_RADIX, epoch))


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """One process's rollouts of one on-policy step (the backend adds the prompt's index)."""
    return mix(seed, (STEP_RADIX, step), (101, rank))


def micro_batch_seed(seed: int, step: int, rank: int, index: int) -> int:
    """Random inputs drawn inside the loss (OTR's draws) for micro-batch `index` (< 101) of a
    step on one process, in both loops."""
    return mix(seed, (STEP_RADIX, step), (10_007, mix(rank, (101, index))))


def ppo_order_seed(seed: int, step: int, epoch: int) -> int:
    """The order of the rollouts within PPO epoch `epoch` of on-policy step `step`."""
    return mix(seed, (7919, mix(step, (31, epoch))))


def dynamic_draw_seed(rollout: int, draw: int) -> int:
    """Draw `draw` (≥ 1) of rollout.dynamic_sampling (its prompts and rollouts), from the step's
    rollout_seed."""
    return mix(rollout, (31, draw))
