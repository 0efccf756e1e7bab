"""OTR, One-Token Rollout (arXiv 2509.26313): every position is a one-step RL episode.

Under no grad, draw K tokens a_1..a_K i.i.d. (with replacement) from softmax(z_t / κ); reward
r(a) = 1 if a = x_t else β. The loss, with log π at temperature 1, is

    L = −Σ_t m_t · (1/K) Σ_j r(a_j) · log π_θ(a_j | s_t) / N.

Duplicates count with multiplicity (the engine's scatter-add sums them). If x_t is never drawn
its term is zero. With κ = 1 the expected gradient is (1 − β) × the DFT gradient.
"""

from dataclasses import dataclass

import torch

from posttrain.ranges import PositiveInt, PositiveFloat
from posttrain.losses.engine import inverse_cdf_draws
from posttrain.losses.objective import Objective


@dataclass
class Params:
    k: PositiveInt = 256  # draws per position
    kappa: PositiveFloat = 1.3  # sampling temperature of the exploration policy (> 1 explores)
    beta: float = -0.1  # reward of a drawn token that is not the ground truth


def sample_inputs(params, n_tokens, generator, device):
    # K uniforms per position, drawn once for the whole call so draws do not depend on chunking.
    return {"otr_uniforms": torch.rand(n_tokens, params.k, generator=generator, device=device)}


def targets(params, logits_CV, inputs, scratch_CV):
    return inverse_cdf_draws(logits_CV, params.kappa, inputs["otr_uniforms"], scratch_CV)


def token_loss(params, logp_CK, draws_CK, inputs):
    hit_CK = draws_CK == inputs["target_ids"].unsqueeze(1)
    reward_CK = torch.where(hit_CK, 1.0, params.beta).to(logp_CK.dtype)
    loss_C = -(reward_CK * logp_CK).sum(dim=1) / params.k
    return loss_C, {"n_gt_frac": hit_CK.to(logp_CK.dtype).mean(dim=1)}


OBJECTIVE = Objective(
    name="otr", summary="one-token rollout: K draws per position from π^(1/κ), reward 1 for the target else β",
    Params=Params, token_loss=token_loss, targets=targets, sample_inputs=sample_inputs,
)
