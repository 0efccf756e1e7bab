"""The critic's clipped value loss (PPO's value function; verl's compute_value_loss).

With V_t the value model's prediction at response position t, V_old,t its prediction when the
rollouts were scored (before this step's updates) and R_t the GAE return (losses/ppo.py):

    ℓ_t = ½ · max((V_t − R_t)², (clip(V_t, V_old,t − ε_v, V_old,t + ε_v) − R_t)²)

so, like the policy's ratio clip, a value that has already moved more than ε_v from V_old in the
direction that would lower the loss further gets no gradient (verl's cliprange_value ε_v = 0.5;
ε_v = None: the plain ½ (V − R)²). A token is "clipped" where the clipped term is the larger.
How ℓ_t becomes the update's loss is train.loss_aggregation, as for the policy (verl's critic
takes the actor's loss_agg_mode).
"""

from __future__ import annotations

import torch


def clipped_value_loss(value_N: torch.Tensor, old_value_N: torch.Tensor, return_N: torch.Tensor,
                       clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ_N, clipped_N) at the N trained positions."""
    old_value_N, return_N = old_value_N.to(value_N.dtype), return_N.to(value_N.dtype)
    unclipped_N = (value_N - return_N) ** 2
    if clip is None:
        return 0.5 * unclipped_N, torch.zeros_like(unclipped_N, dtype=torch.bool)
    clipped_value_N = torch.clamp(value_N, old_value_N - clip, old_value_N + clip)
    clipped_N = (clipped_value_N - return_N) ** 2
    return 0.5 * torch.maximum(unclipped_N, clipped_N), clipped_N > unclipped_N
