"""SAPO, soft adaptive policy optimisation (Qwen, arXiv 2511.20347): GRPO's group-normalised
verifiable reward, with PPO's hard clip replaced by a smooth sigmoid gate on the token ratio.

    ρ_t = π_θ(y_t) / π_old(y_t)
    f(ρ) = (4 / τ) · σ(τ (ρ − 1))                 τ = τ_pos if A_i > 0 else τ_neg
    ℓ_t = −f(ρ_t) · A_i

∇ℓ_t = −A_i · 4 σ(1 − σ) · ρ_t ∇log π_θ(y_t): at ρ = 1 the gate's weight is exactly 1 (the
on-policy policy gradient), and it decays smoothly as ρ leaves 1 instead of dropping to 0 at a
band edge. τ_neg > τ_pos makes negative-advantage updates decay faster (the paper: they raise
many unsampled tokens' logits and destabilise training). Defaults τ_pos = 1.0, τ_neg = 1.05:
the paper's, as verl's and Trinity-RFT's `sapo` loss and ms-swift's `--loss_type sapo` default
them. The "gate_weight" stat is 4σ(1 − σ), the factor the gradient carries relative to plain PG.
"""

from dataclasses import dataclass

import torch

from posttrain.losses.grpo import GroupAdvantageParams, advantage_inputs, reward_needs
from posttrain.losses.objective import Objective
from posttrain.ranges import PositiveFloat


@dataclass
class Params(GroupAdvantageParams):  # normalize_std, std_epsilon: grpo's group advantage
    tau_pos: PositiveFloat = 1.0  # τ for positive advantages
    tau_neg: PositiveFloat = 1.05  # τ for negative (and zero) advantages


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C, advantage_C = logp_CJ[:, 0], inputs["advantage"].to(logp_CJ.dtype)
    ratio_C = (logp_C - inputs["old_logprob"].to(logp_C.dtype)).exp()
    # full_like, not torch.where on Python floats (those become fp32: τ_neg = 1.05 would be rounded)
    tau_C = torch.where(advantage_C > 0, torch.full_like(logp_C, params.tau_pos), torch.full_like(logp_C, params.tau_neg))
    gate_C = torch.sigmoid(tau_C * (ratio_C - 1.0))
    loss_C = -(4.0 / tau_C) * gate_C * advantage_C
    gate = gate_C.detach()
    return loss_C, {"ratio": ratio_C.detach(), "gate_weight": 4.0 * gate * (1.0 - gate), "advantage": advantage_C}


OBJECTIVE = Objective(
    name="sapo", summary="SAPO: GRPO's group advantage, a sigmoid gate (4/τ)σ(τ(ρ−1)) instead of the hard clip",
    Params=Params, token_loss=token_loss, on_policy=True, needs=reward_needs, prepare=advantage_inputs,
)
