"""GSPO, group sequence policy optimisation (Qwen, arXiv 2507.18071): GRPO's group-normalised
verifiable reward with the importance ratio and its clip at the level of the whole response.

    s_i = exp((1/|y_i|) Σ_t log(π_θ(y_t) / π_old(y_t)))          one ratio per rollout
    J_i = min(s_i A_i, clip(s_i, 1 − ε_lo, 1 + ε_hi) A_i)         loss −(1/G) Σ_i J_i

written per token with the paper's GSPO-token identity (its eq. 13–14)

    s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]                    value s_i, gradient s_i ∇log π_θ(y_t)
    ℓ_t = max(−A_i s_{i,t}, −A_i clip(s_{i,t}, 1 − ε_lo, 1 + ε_hi))

so that with train.loss_aggregation: seq-mean-token-mean (w_t = 1 / (G |y_i|)) the step's loss
and its gradient are GSPO's exactly: Σ_t ∇ℓ_t / |y_i| = −A_i s_i ∇(mean_t log π_θ) = −A_i ∇s_i.
sg[s_i] needs π_θ's CURRENT log-probs of the whole response: Objective.current_policy hands
them over from a no-grad head pass (policy.PolicyLoss), and `current_policy` below reduces
them per sequence. The paper's ε are tiny (3e-4 / 4e-4, its §5.1): a sequence ratio is a
geometric mean and moves little. No KL term (the paper uses none).
"""

from dataclasses import dataclass

import torch

from posttrain.losses.grpo import GroupAdvantageParams, advantage_inputs, reward_needs
from posttrain.losses.objective import Objective
from posttrain.losses.policy_gradient import ClipParams, clipped_surrogate
from posttrain.ranges import NonNegativeFloat, OpenFraction


@dataclass
class Params(GroupAdvantageParams, ClipParams):  # normalize_std, std_epsilon: grpo's group advantage
    clip_low: OpenFraction = 3e-4  # ε_lo on the sequence ratio (GSPO paper §5.1; TRL's GSPO setting)
    clip_high: NonNegativeFloat = 4e-4  # ε_hi (GSPO paper §5.1)


def current_policy(params, logprob_BT, batch):
    """{"sequence_log_ratio": log s_i at every loss position of rollout i}, from π_θ's current
    log-probs (no gradient) and π_old's, both over the rollout's loss positions."""
    mask_BT = batch["loss_mask"]
    log_ratio_BT = (logprob_BT - batch["old_logprob"].to(logprob_BT.dtype)).masked_fill(~mask_BT, 0.0)
    log_s_B = log_ratio_BT.sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1)
    return {"sequence_log_ratio": log_s_B.unsqueeze(1).expand_as(log_ratio_BT)}


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C, advantage_C = logp_CJ[:, 0], inputs["advantage"].to(logp_CJ.dtype)
    # log s_{i,t} = log π_θ − sg[log π_θ] + sg[log s_i]: the difference first, so its value is exactly
    # 0 and the ratio's value exactly s_i (verl orders it the same way, volcengine/verl#2775)
    log_s_C = (logp_C - logp_C.detach()) + inputs["sequence_log_ratio"].to(logp_C.dtype)
    loss_C, ratio_C, clipped_C = clipped_surrogate(params, log_s_C, torch.zeros_like(log_s_C), advantage_C)
    return loss_C, {"clip_frac": clipped_C.to(logp_C.dtype), "ratio": ratio_C.detach(), "advantage": advantage_C}


OBJECTIVE = Objective(
    name="gspo", summary="GSPO: GRPO's group advantage with a sequence-level importance ratio and clip (GSPO-token form)",
    Params=Params, token_loss=token_loss, on_policy=True, needs=reward_needs, prepare=advantage_inputs, current_policy=current_policy,
    exact_aggregation="seq-mean-token-mean",
)
