"""DCPO, dynamic clipping policy optimisation (arXiv 2509.02333): GRPO's verifiable reward with
two changes, each a flag here.

Dynamic-adaptive clipping (DAC, the paper's §4.1): the ratio's band depends on the token's old
probability q = π_old(y_t): the band bounds the change of the token's probability weighted by its
new probability, |ρ − 1| · ρ q ≤ ε (ρ q = π_θ(y_t); a quadratic in ρ), instead of |ρ − 1| ≤ ε.
Its roots, with the lower one floored at 0.5 where 4 ε_lo > q:

    0.5 + ½ √max(1 − 4 ε_lo / q, 0)  ≤  ρ_t  ≤  0.5 + ½ √(1 + 4 ε_hi / q)

(a confident token keeps about PPO's band, a rare one gets a much wider one), then
ℓ_t = max(−A ρ_t, −A clip(ρ_t, lo_t, hi_t)) and, for A < 0, at most −A · c (dual clip). The
official code (lime-RL/DCPO, core_algos.get_clip_low_high) also caps hi_t at max(c, 10).

Smooth advantage standardisation (SAS, §4.2): besides this step's group statistics (A_new), the
rewards of ALL the prompt's rollouts so far, this step's included, give A_total = (r − μ_total)/σ_total.
With i = the number of steps the prompt has been drawn in (this one included):

    SA_new = ((i − 1)/i) A_new + (1/i) A_total,   SA_total = (1/i) A_new + ((i − 1)/i) A_total
    A = SA_new if |SA_new| < |SA_total| else SA_total

so a prompt whose rollouts all agree this step still trains (with (1/i) A_total) once it has
disagreed before. The history is an explicit input (signals.reward_history, declared by the
PROMPT_HISTORY need): per rollout, its prompt's past steps, rollouts, Σr and Σr², kept by the
loop (rl_shaping.py) and replayed on resume. We keep the exact sums, so σ_total is the unbiased
std of every reward seen (as GRPO's group std); the official code merges per-step means and
stds as equal-weight mixtures, which gives the same μ_total and a σ_total that differs only in
the n/(n − 1) convention. A std of 0 gives an advantage of 0 (as the official code).

The paper's loss aggregation (OTM, token mean per response) is train.loss_aggregation:
seq-mean-token-mean. Defaults: the official run script (recipe/dcpo/run_dcpo.sh): clip_ratio_low
0.2 (run_base.sh), clip_ratio_high 0.28, clip_ratio_c 10 (the paper's worked example in its
README uses ε_lo 0.16, ε_hi 0.2).
"""

from dataclasses import dataclass
from typing import Annotated

import torch

from posttrain.losses.grpo import group_advantages, shaped_rewards
from posttrain.losses.objective import PROMPT_HISTORY, VERIFIABLE_REWARD, Objective
from posttrain.losses.policy_gradient import dual_clip
from posttrain.ranges import Bounds, NonNegativeFloat, PositiveFloat

MIN_RATIO_CAP = 10.0  # the official code's upper bound never exceeds max(c, 10)


@dataclass
class Params:
    clip_low: NonNegativeFloat = 0.2  # ε_lo of the dynamic band (official script: clip_ratio_low 0.2)
    clip_high: NonNegativeFloat = 0.28  # ε_hi (official script: clip_ratio_high 0.28)
    dual_clip: Annotated[float, Bounds(low=1, low_open=True)] = 10.0  # c: for A < 0 the loss is at most −A·c
    dynamic_clip: bool = True  # false: PPO's fixed band [1 − ε_lo, 1 + ε_hi] (with the dual clip)
    smooth_std: bool = True  # false: this step's group statistics only (GRPO's advantage)
    std_epsilon: PositiveFloat = 1e-6


def needs(params):
    return frozenset({VERIFIABLE_REWARD} | ({PROMPT_HISTORY} if params.smooth_std else set()))


def prepare(params, batch, signals):
    reward_B = shaped_rewards(signals)
    group_B = signals.group_B.to(reward_B.device)
    if params.smooth_std:
        history = {k: v.to(reward_B) for k, v in signals.reward_history.items()}
        advantage_B = smooth_advantages(reward_B, group_B, history, params.std_epsilon)
    else:
        advantage_B = group_advantages(reward_B, group_B, True, params.std_epsilon)
    mask_BT = batch["loss_mask"].to(signals.old_logprob_BT.dtype)
    return {"advantage": advantage_B.to(mask_BT.dtype).unsqueeze(1) * mask_BT}


def smooth_advantages(reward_B, group_B, history: dict, epsilon: float) -> torch.Tensor:
    """SAS (module docstring). history: per rollout, its prompt's PAST "steps", "count" (rollouts),
    "sum" (Σr) and "square_sum" (Σr²), all float64 [B]."""
    new_B = group_advantages(reward_B, group_B, True, epsilon)
    groups, index_B = group_B.unique(return_inverse=True)
    zeros_G = torch.zeros(len(groups), dtype=reward_B.dtype, device=reward_B.device)
    count_G = zeros_G.index_add(0, index_B, torch.ones_like(reward_B))
    sum_G = zeros_G.index_add(0, index_B, reward_B)
    square_G = zeros_G.index_add(0, index_B, reward_B**2)
    # the prompt's history is the same on each of its rollouts: read it off the group's first
    first_G = torch.zeros(len(groups), dtype=torch.long, device=reward_B.device).scatter_reduce(
        0, index_B, torch.arange(len(reward_B), device=reward_B.device), reduce="amin", include_self=False)
    n_G = history["count"][first_G] + count_G
    mean_G = (history["sum"][first_G] + sum_G) / n_G
    variance_G = ((history["square_sum"][first_G] + square_G) - n_G * mean_G**2).clamp(min=0) / (n_G - 1).clamp(min=1)
    std_B = variance_G.sqrt()[index_B]
    centred_B = reward_B - mean_G[index_B]
    total_B = torch.where((std_B == 0) | (centred_B == 0), 0.0, centred_B / (std_B + epsilon))
    i_B = history["steps"][first_G][index_B] + 1
    smooth_new_B = ((i_B - 1) * new_B + total_B) / i_B
    smooth_total_B = (new_B + (i_B - 1) * total_B) / i_B
    return torch.where(smooth_new_B.abs() < smooth_total_B.abs(), smooth_new_B, smooth_total_B)


def ratio_bounds(params, old_logprob_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo_t, hi_t): DAC's band from q = π_old(y_t), or PPO's fixed one (dynamic_clip: false)."""
    if not params.dynamic_clip:
        return (torch.full_like(old_logprob_C, 1.0 - params.clip_low), torch.full_like(old_logprob_C, 1.0 + params.clip_high))
    q_C = old_logprob_C.exp().clamp(min=torch.finfo(old_logprob_C.dtype).tiny)
    low_C = 0.5 + 0.5 * (1.0 - 4.0 * params.clip_low / q_C).clamp(min=0.0).sqrt()
    high_C = 0.5 + 0.5 * (1.0 + 4.0 * params.clip_high / q_C).sqrt()
    return low_C, high_C.clamp(max=max(params.dual_clip, MIN_RATIO_CAP))


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C, advantage_C = logp_CJ[:, 0], inputs["advantage"].to(logp_CJ.dtype)
    old_C = inputs["old_logprob"].to(logp_C.dtype)
    ratio_C = (logp_C - old_C).exp()
    low_C, high_C = ratio_bounds(params, old_C)
    unclipped_C = -advantage_C * ratio_C
    clipped_C = -advantage_C * torch.minimum(torch.maximum(ratio_C, low_C), high_C)
    loss_C, clipped = dual_clip(torch.maximum(unclipped_C, clipped_C), clipped_C > unclipped_C, advantage_C,
                                params.dual_clip)
    return loss_C, {"clip_frac": clipped.to(logp_C.dtype), "ratio": ratio_C.detach(),
                    "clip_low_bound": low_C, "clip_high_bound": high_C, "advantage": advantage_C}


OBJECTIVE = Objective(
    name="dcpo", summary="DCPO: probability-dependent clip bounds, smooth advantage standardisation over the prompt's history",
    Params=Params, token_loss=token_loss, on_policy=True, needs=needs, prepare=prepare,
)
