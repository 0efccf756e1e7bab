"""OPD, sampled-token on-policy distillation (the LSM paper's baseline; Qwen3, Thinking Machines).

Per-token reward r_t = log q(y_t) − log π_old(y_t), a constant per rollout batch, applied as a
policy gradient. With discount γ the advantage is the reward-to-go A_t = Σ_{k≥t} γ^{k−t} r_k
(γ = 0: token-level, the default).
  plain:    ℓ_t = −A_t · log π_θ(y_t)
  PPO-clip: ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε_lo, 1+ε_hi)), ρ_t = π_θ(y_t)/π_old(y_t),
            and for A_t < 0 at most −A_t · c (dual clip).
The expected plain gradient over y ~ π equals the gradient of KL(π ‖ q).

The reward above is −k1 of verl's distillation estimators (verl/trainer/distillation/losses.py,
loss_mode k1 with use_policy_gradient, the recommended OPD setting); `estimator` picks another of
verl's per-token estimators (core_algos.kl_penalty, with d = log π_old(y_t) − log q(y_t)):
  k1: r_t = −d                    k2: r_t = −½ d²                 k3: r_t = −(e^{−d} + d − 1)
(k3 ≥ 0 is Schulman's low-variance estimate; verl clamps it to ≤ 10 and the log-ratio to ±20;
here clip_log_ratio clamps d first, for every estimator). verl's other mode, back-propagating k3
itself through log π_θ (use_policy_gradient false), is not this objective.
"""

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from posttrain.losses.objective import TEACHER_TOKEN, Objective
from posttrain.losses.policy_gradient import ClipParams, clipped_surrogate, dual_clip
from posttrain.ranges import Bounds, PositiveFloat, Probability


@dataclass
class Params(ClipParams):  # clip_low, clip_high: losses/policy_gradient.py
    ppo_clip: bool = True  # false: plain policy gradient −A log π
    dual_clip: Annotated[float, Bounds(low=1, low_open=True)] | None = 3.0  # c > 1; null: no dual clip
    discount: Probability = 0.0  # γ for the reward-to-go
    # The LSM authors' clip_log_ratio: the reward log q − log π_old clamped to [−c, c] (their
    # code's c is 5.0 when the flag is on; it is off in their OPD scripts). null: no clamp.
    clip_log_ratio: PositiveFloat | None = None
    estimator: Literal["k1", "k2", "k3"] = "k1"  # the reward −k(d): verl's loss_mode (k1: log q − log π_old)


def needs(params):
    return frozenset({TEACHER_TOKEN})


def prepare(params, batch, signals):
    mask_BT = batch["loss_mask"].to(signals.old_logprob_BT.dtype)
    reward_BT = signals.teacher_token_logprob_BT - signals.old_logprob_BT
    if params.clip_log_ratio is not None:
        reward_BT = reward_BT.clamp(-params.clip_log_ratio, params.clip_log_ratio)
    reward_BT = estimator_reward(reward_BT, params.estimator) * mask_BT
    return {"reward": reward_BT, "advantage": reward_to_go(reward_BT, params.discount)}


def estimator_reward(log_ratio_BT: torch.Tensor, estimator: str) -> torch.Tensor:
    """−k(d) from r = log q − log π_old = −d: k1 gives r itself (the default, bit for bit)."""
    if estimator == "k1":
        return log_ratio_BT
    if estimator == "k2":
        return -0.5 * log_ratio_BT.square()
    return -(log_ratio_BT.exp() - log_ratio_BT - 1)


def reward_to_go(reward_BT: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = Σ_{k≥t} γ^{k−t} r_k along the time axis (masked rewards are already zero)."""
    if discount == 0.0:
        return reward_BT.clone()
    advantage_BT = torch.zeros_like(reward_BT)
    running_B = torch.zeros_like(reward_BT[:, 0])
    for t in range(reward_BT.shape[1] - 1, -1, -1):
        running_B = reward_BT[:, t] + discount * running_B
        advantage_BT[:, t] = running_B
    return advantage_BT


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C, adv_C = logp_CJ[:, 0], inputs["advantage"].to(logp_CJ.dtype)
    reward_C = inputs["reward"]
    stats = {"reward": reward_C, "negative_reward_frac": (reward_C < 0).to(logp_C.dtype)}
    if not params.ppo_clip:
        return -adv_C * logp_C, stats
    loss_C, ratio_C, clipped = clipped_surrogate(params, logp_C, inputs["old_logprob"], adv_C)
    loss_C, clipped = dual_clip(loss_C, clipped, adv_C, params.dual_clip)
    return loss_C, {**stats, "clip_frac": clipped.to(logp_C.dtype), "ratio": ratio_C}


OBJECTIVE = Objective(
    name="opd", summary="sampled-token on-policy distillation: reward log q − log π_old, PPO-clip or plain PG",
    Params=Params, token_loss=token_loss, on_policy=True, needs=needs, prepare=prepare,
)
