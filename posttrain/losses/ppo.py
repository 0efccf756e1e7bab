"""PPO with a learned value model and GAE (Schulman et al. 2017; GAE: Schulman et al. 2015), as
verl runs it for LLMs (algorithm.adv_estimator: gae) with the grader's verifiable reward.

Token rewards: 0 everywhere except the grader's reward s ∈ {0, 1} at each response's last
position; with kl_coef β > 0 every position also pays β · (log π_old(y_t) − log π_ref(y_t))
(verl's use_kl_in_reward, kl_penalty "kl", a fixed kl_ctrl):

    r_t = s · [t = last] − β · (log π_old(y_t) − log π_ref(y_t))

V_t is the value model's prediction at position t (the state before y_t is emitted; the critic,
posttrain/critic.py), scored without gradient before this step's updates. GAE:

    δ_t = r_t + γ V_{t+1} − V_t            (V after the last position: 0)
    A_t = Σ_{k≥0} (γλ)^k δ_{t+k}            R_t = A_t + V_t   (the critic's regression target)

Positions off the loss mask inside a response (train.mask_first_tokens) are skipped, as verl's
mask-aware GAE skips them: the recursion passes through them unchanged. The advantages are then
whitened over the batch's response tokens (verl's masked_whiten: minus the mean, over the
unbiased std with ε = 1e-8 inside the root); the returns are not. With γ = λ = 1 (verl's
defaults for LLMs) A_t = Σ_{k≥t} r_k − V_t: the reward-to-go minus the value.

The policy loss per token is PPO-clip on A_t, ρ_t = π_θ(y_t) / π_old(y_t), with verl's dual clip
(clip_ratio_c = 3) for A_t < 0:

    ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_lo, 1 + ε_hi)),   for A_t < 0 at most −A_t · c

The critic's own loss (losses/value.py) and optimizer live with the critic; this objective only
declares it needs one (VALUE) and hands it V_old, R_t and the positions to regress on.
The whitening runs over this process's rollouts (with one process: the whole batch, as verl).
"""

from dataclasses import dataclass
from typing import Annotated

import torch

from posttrain.losses.grpo import shaped_rewards
from posttrain.losses.objective import REFERENCE_TOKEN, VALUE, VERIFIABLE_REWARD, Objective
from posttrain.losses.policy_gradient import ClipParams, clipped_surrogate, dual_clip
from posttrain.ranges import Bounds, NonNegativeFloat, Probability

WHITEN_EPSILON = 1e-8  # verl's masked_whiten: rsqrt(var + 1e-8)


@dataclass
class Params(ClipParams):  # clip_low, clip_high (verl: 0.2, 0.2): losses/policy_gradient.py
    dual_clip: Annotated[float, Bounds(low=1, low_open=True)] | None = 3.0  # c (verl's clip_ratio_c); null: none
    gamma: Probability = 1.0  # γ (verl's algorithm.gamma)
    lam: Probability = 1.0  # λ (verl's algorithm.lam)
    kl_coef: NonNegativeFloat = 0.0  # β of the KL penalty in the reward; 0 (verl's use_kl_in_reward: false): no reference


def needs(params):
    return frozenset({VERIFIABLE_REWARD, VALUE} | ({REFERENCE_TOKEN} if params.kl_coef > 0 else set()))


def prepare(params, batch, signals):
    mask_BT = batch["loss_mask"]
    reward_BT = token_rewards(shaped_rewards(signals), mask_BT)  # the grader's r plus rollout.overlong_buffer's shaping
    if params.kl_coef > 0:
        kl_BT = signals.old_logprob_BT.double() - signals.reference_logprob_BT.double()
        reward_BT = reward_BT - params.kl_coef * kl_BT * mask_BT
    value_BT = signals.value_BT.double()
    advantage_BT, return_BT = gae(reward_BT, value_BT, mask_BT, params.gamma, params.lam)
    dtype = signals.old_logprob_BT.dtype
    return {"advantage": whiten(advantage_BT, mask_BT).to(dtype), "value_return": return_BT.to(dtype),
            "old_value": signals.value_BT, "value_mask": mask_BT.clone()}


def token_rewards(score_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """s_i at the last loss position of rollout i, 0 elsewhere (a rollout with none gets nothing)."""
    last_BT = mask_BT & (mask_BT.cumsum(dim=1) == mask_BT.sum(dim=1, keepdim=True))
    return score_B.unsqueeze(1).to(torch.float64) * last_BT


def gae(reward_BT: torch.Tensor, value_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_BT, R_BT) by the backward recursion A_t = δ_t + γλ A_{t+1}, with V_{t+1} and A_{t+1}
    those of the next loss position (0 after the last); zero off the mask."""
    advantage_BT = torch.zeros_like(reward_BT)
    running_B = torch.zeros_like(reward_BT[:, 0])
    next_value_B = torch.zeros_like(running_B)
    columns = mask_BT.any(dim=0).nonzero()
    if len(columns):  # only the response columns: the prompt part of T is never on the mask
        for t in range(int(columns[-1]), int(columns[0]) - 1, -1):
            on_B = mask_BT[:, t]
            delta_B = reward_BT[:, t] + gamma * next_value_B - value_BT[:, t]
            running_B = torch.where(on_B, delta_B + gamma * lam * running_B, running_B)
            next_value_B = torch.where(on_B, value_BT[:, t], next_value_B)
            advantage_BT[:, t] = torch.where(on_B, running_B, 0.0)
    return advantage_BT, (advantage_BT + value_BT) * mask_BT


def whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(x − mean) / sqrt(var + ε) over the mask, var unbiased (verl's masked_whiten); 0 off the mask."""
    count = mask_BT.sum().clamp(min=1)
    mean = (x_BT * mask_BT).sum() / count
    variance = (((x_BT - mean) * mask_BT) ** 2).sum() / (count - 1).clamp(min=1)
    return (x_BT - mean) * torch.rsqrt(variance + WHITEN_EPSILON) * mask_BT


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C, advantage_C = logp_CJ[:, 0], inputs["advantage"].to(logp_CJ.dtype)
    loss_C, ratio_C, clipped_C = clipped_surrogate(params, logp_C, inputs["old_logprob"], advantage_C)
    loss_C, clipped_C = dual_clip(loss_C, clipped_C, advantage_C, params.dual_clip)
    return loss_C, {"clip_frac": clipped_C.to(logp_C.dtype), "ratio": ratio_C, "advantage": advantage_C}


OBJECTIVE = Objective(
    name="ppo", summary="PPO: a learned value model (critic), GAE on the verifiable reward, PPO-clip (verl's gae estimator)",
    Params=Params, token_loss=token_loss, on_policy=True, needs=needs, prepare=prepare,
)
