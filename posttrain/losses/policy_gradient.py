"""The clipped policy-gradient surrogate that OPD and GRPO share (PPO-clip, with DAPO's
asymmetric clip-higher), and the two parameters that set it.

    ρ_t = π_θ(y_t) / π_old(y_t)
    ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_lo, 1 + ε_hi))

A token is "clipped" where the clipped term is the larger (its gradient is then zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.ranges import NonNegativeFloat, OpenFraction


@dataclass
class ClipParams:
    """The objectives' params that take the clipped surrogate inherit these two keys."""

    clip_low: OpenFraction = 0.2  # ε_lo: the ratio is clipped below at 1 − ε_lo
    clip_high: NonNegativeFloat = 0.2  # ε_hi (DAPO: 0.28)


def clipped_surrogate(params: ClipParams, logp_C: torch.Tensor, old_logprob_C: torch.Tensor,
                      advantage_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ℓ_C, ρ_C, clipped_C) for the sampled tokens' log-probs under π_θ and π_old."""
    ratio_C = (logp_C - old_logprob_C.to(logp_C.dtype)).exp()
    unclipped_C = -advantage_C * ratio_C
    clipped_C = -advantage_C * ratio_C.clamp(1.0 - params.clip_low, 1.0 + params.clip_high)
    return torch.maximum(unclipped_C, clipped_C), ratio_C, clipped_C > unclipped_C


def dual_clip(loss_C: torch.Tensor, clipped_C: torch.Tensor, advantage_C: torch.Tensor,
              c: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dual clip (Ye et al. 2020; verl's clip_ratio_c): for A < 0 the loss is at most −A·c, so
    one token whose ratio exploded cannot dominate the step. (loss_C, clipped_C); c None: unchanged."""
    if c is None:
        return loss_C, clipped_C
    bound_C = -advantage_C * c
    dual_C = (advantage_C < 0) & (loss_C > bound_C)
    return torch.where(dual_C, bound_C, loss_C), clipped_C | dual_C
