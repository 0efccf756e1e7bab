"""GRPO, group-relative policy optimisation with a verifiable reward (DeepSeekMath; DAPO's options).

Each prompt's rollouts form a group; rollout i gets the grader's reward r_i ∈ {0, 1} (its boxed
answer against the prompt's gold answer) and the advantage

    A_i = (r_i − mean_group r) / (std_group r + ε)      (normalize_std: false → r_i − mean, Dr. GRPO)

at every token of its response. The loss per token is PPO-clip with ρ_t = π_θ(y_t) / π_old(y_t):

    ℓ_t = max(−A ρ_t, −A clip(ρ_t, 1 − ε_lo, 1 + ε_hi))   (DAPO's clip-higher: ε_hi > ε_lo)
          + β · KL_t(π_θ ‖ π_ref)                          (kl_coef β > 0 only)

with the KL to the starting student estimated at the sampled token, k1 = log π_θ − log π_ref or
k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 (≥ 0, unbiased). A group whose rollouts
all got the same reward has A = 0: it trains nothing (the loop reports the share of such groups).
How ℓ_t becomes the step's loss is train.loss_aggregation (DAPO: token-mean; GRPO paper:
seq-mean-token-mean).
"""

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.losses.objective import REFERENCE_TOKEN, VERIFIABLE_REWARD, Objective
from posttrain.losses.policy_gradient import ClipParams, clipped_surrogate
from posttrain.ranges import NonNegativeFloat, PositiveFloat


@dataclass
class Params(ClipParams):  # clip_low ε_lo, clip_high ε_hi (DAPO: 0.28): losses/policy_gradient.py
    normalize_std: bool = True  # false: A = r − group mean (Dr. GRPO)
    std_epsilon: PositiveFloat = 1e-6  # ε in the std normalisation
    kl_coef: NonNegativeFloat = 0.0  # β; 0: no reference policy is loaded
    kl_estimator: Literal["k1", "k3"] = "k3"


@dataclass
class GroupAdvantageParams:
    """The group-advantage keys of the objectives graded on a verifiable reward that reuse grpo's
    advantage as it is (gspo, cispo, sapo): their Params inherit these two."""

    normalize_std: bool = True  # false: A = r − group mean (Dr. GRPO)
    std_epsilon: PositiveFloat = 1e-6  # ε in the std normalisation


def reward_needs(params):
    """The needs of an objective trained on the verifiable reward alone (gspo, cispo, sapo)."""
    return frozenset({VERIFIABLE_REWARD})


def unused_keys(params):
    return {"kl_estimator": "with kl_coef 0 (no KL term)"} if params.kl_coef == 0 else {}


def needs(params):
    return reward_needs(params) | ({REFERENCE_TOKEN} if params.kl_coef > 0 else set())


def prepare(params, batch, signals):
    inputs = advantage_inputs(params, batch, signals)
    if params.kl_coef > 0:
        inputs["reference_logprob"] = signals.reference_logprob_BT
    return inputs


def shaped_rewards(signals) -> torch.Tensor:
    """r_i, float64: the grader's verdict plus any reward shaping the loop added (DAPO's overlong
    penalty, signals.reward_shaping_B): what every verifiable-reward objective's advantage reads."""
    reward_B = signals.verifiable_reward_B.double()
    if signals.reward_shaping_B is not None:
        reward_B = reward_B + signals.reward_shaping_B.to(reward_B)
    return reward_B


def advantage_inputs(params, batch, signals) -> dict[str, torch.Tensor]:
    """{"advantage": A_i at every loss position of rollout i}: the group-normalised shaped reward
    (params.normalize_std, params.std_epsilon), shared by the objectives graded on a verifiable reward."""
    reward_B = shaped_rewards(signals)
    advantage_B = group_advantages(reward_B, signals.group_B.to(reward_B.device), params.normalize_std, params.std_epsilon)
    mask_BT = batch["loss_mask"].to(signals.old_logprob_BT.dtype)
    return {"advantage": advantage_B.to(mask_BT.dtype).unsqueeze(1) * mask_BT}


def group_advantages(reward_B: torch.Tensor, group_B: torch.Tensor, normalize_std: bool, epsilon: float) -> torch.Tensor:
    """(r − group mean) / (group std + ε), the std unbiased as in the GRPO paper's code (a group
    of one rollout has std 0)."""
    groups, index_B = group_B.unique(return_inverse=True)
    count_G = torch.zeros(len(groups), dtype=reward_B.dtype, device=reward_B.device).index_add_(0, index_B, torch.ones_like(reward_B))
    mean_G = torch.zeros_like(count_G).index_add_(0, index_B, reward_B) / count_G
    centred_B = reward_B - mean_G[index_B]
    if not normalize_std:
        return centred_B
    square_sum_G = torch.zeros_like(count_G).index_add_(0, index_B, centred_B**2)
    std_G = (square_sum_G / (count_G - 1).clamp(min=1)).sqrt()
    # a group whose rewards are all equal has centred rewards of exactly 0: its advantage is 0
    return torch.where(centred_B == 0, 0.0, centred_B / (std_G[index_B] + epsilon))


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C, advantage_C = logp_CJ[:, 0], inputs["advantage"].to(logp_CJ.dtype)
    loss_C, ratio_C, clipped_C = clipped_surrogate(params, logp_C, inputs["old_logprob"], advantage_C)
    stats = {"clip_frac": clipped_C.to(logp_C.dtype), "ratio": ratio_C, "advantage": advantage_C}
    if params.kl_coef > 0:
        log_ref_ratio_C = inputs["reference_logprob"].to(logp_C.dtype) - logp_C  # log π_ref − log π_θ
        kl_C = -log_ref_ratio_C if params.kl_estimator == "k1" else log_ref_ratio_C.exp() - log_ref_ratio_C - 1
        loss_C = loss_C + params.kl_coef * kl_C
        stats["kl_reference"] = kl_C
    return loss_C, stats


OBJECTIVE = Objective(
    name="grpo", summary="GRPO: group-normalised verifiable reward, PPO-clip (DAPO clip-higher), optional KL to the start",
    Params=Params, token_loss=token_loss, on_policy=True, needs=needs, prepare=prepare, unused_keys=unused_keys,
)
