"""TDPO, token-level direct preference optimisation (Zeng et al., arXiv 2404.11999), offline on the
same (chosen y_w, rejected y_l) pairs as DPO, with the sequential KL over the full vocabulary

    Δ(y) = Σ_t [log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)]              (as in DPO)
    D(y) = Σ_t KL(π_ref(·| x, y_<t) ‖ π_θ(·| x, y_<t)) = Σ_t Σ_v π_ref(v) [log π_ref(v) − log π_θ(v)]

    TDPO1: L = −log σ(β [Δ(y_w) − Δ(y_l) − (D(y_l) − D(y_w))])
    TDPO2: L = −log σ(β [Δ(y_w) − Δ(y_l) − α (D(y_l) − sg[D(y_w)])])

exactly as the authors' code writes it (Vance0124/Token-level-Direct-Preference-Optimization,
trainers.py tdpo_loss: logits = Δ_w − Δ_l + α(sg[D_w] − D_l) for TDPO2, Δ_w − Δ_l + D_w − D_l
for TDPO1, loss −logsigmoid(β·logits); their defaults: TDPO2, α = 0.5, β = 0.1). Rewards, as
theirs: β(Δ + D) of each response.

Per token (the DPO surrogate, losses/dpo.py, with one more sequence sum):

    ℓ_t = L / n_s + 2 ∂L/∂Δ · (log π_θ(y_t) − sg) + 2 ∂L/∂D · (KL_t − sg[KL_t])

where KL_t needs π_θ's whole row: the scores are the log-probs of all V ids (plus the target),
and ∂L/∂Δ, ∂L/∂D come from the current sums (Objective.current_policy_probe gives KL_t, no grad).

Cost: π_ref's full distribution at every response token, computed once before training and kept
as fp32 [tokens, V] (4·V bytes per token: 1.5 KB for the mini vocabulary of 384, 600 KB for
Qwen2.5's 151,936, i.e. ~60 GB for 100k response tokens: posttrain/preference.py refuses past its
budget), and a [chunk, V + 1] autograd tensor per head chunk instead of [chunk, 1]. At a real
vocabulary TDPO needs a frozen reference model scoring each micro-batch (the authors' way), which
posttrain does not build: this implementation is exact, and practical at small vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.losses.dpo import PAIR_STATS, PAIRS, check_pairs, pair_losses_and_gradients, per_token_inputs, sequence_sums
from posttrain.losses.objective import Objective
from posttrain.ranges import NonNegativeFloat, PositiveFloat

REFERENCE_VOCAB = "reference_vocab_logprob"  # [B, T, V]: log π_ref(v) at each response position


@dataclass
class Params:
    beta: PositiveFloat = 0.1  # β (the authors' config/loss/tdpo.yaml)
    alpha: NonNegativeFloat = 0.5  # α, the weight of the KL difference (TDPO2 only; the authors' 0.5)
    variant: Literal["tdpo1", "tdpo2"] = "tdpo2"  # the authors' default: if_tdpo2 true


def unused_keys(params):
    return {"alpha": "by variant tdpo1 (α weighs TDPO2's KL term only)"} if params.variant == "tdpo1" else {}


def pair_loss(params, delta_P2: torch.Tensor, kl_P2: torch.Tensor) -> torch.Tensor:
    """L per pair from [Δ(y_w), Δ(y_l)] and [D(y_w), D(y_l)]."""
    margin_P = delta_P2[:, 0] - delta_P2[:, 1]
    if params.variant == "tdpo1":
        logits_P = margin_P + kl_P2[:, 0] - kl_P2[:, 1]
    else:
        logits_P = margin_P + params.alpha * (kl_P2[:, 0].detach() - kl_P2[:, 1])
    return -torch.nn.functional.logsigmoid(params.beta * logits_P)


def position_kl(reference_logprob_CV: torch.Tensor, logp_CV: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) at each position over the full vocabulary ([C])."""
    reference = reference_logprob_CV.to(logp_CV.dtype)
    return (reference.exp() * (reference - logp_CV)).sum(dim=1)


def probe(params, logp_CV, inputs):
    return {"policy_kl": position_kl(inputs[REFERENCE_VOCAB], logp_CV)}


def current_policy(params, logprob_BT, batch):
    mask_BT = batch["loss_mask"]
    check_pairs(batch)
    delta_B = sequence_sums(logprob_BT - batch["reference_logprob"].to(logprob_BT.dtype), mask_BT)
    kl_B = sequence_sums(batch["policy_kl"], mask_BT)
    loss_P, grads = pair_losses_and_gradients(pair_loss, params, {"delta_P2": delta_B, "kl_P2": kl_B})
    coefficients = {"dpo_coefficient": grads["delta_P2"], "kl_coefficient": grads["kl_P2"]}
    return per_token_inputs(loss_P, coefficients, params.beta * (delta_B + kl_B).view(-1, 2), mask_BT)


def targets(params, logits_CV, inputs, scratch_CV):
    """The sampled token, then every id of the vocabulary (KL_t reads the whole row)."""
    every_CV = torch.arange(logits_CV.shape[1], device=logits_CV.device).expand(logits_CV.shape[0], -1)
    return torch.cat([inputs["target_ids"].unsqueeze(1), every_CV], dim=1)


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C, logp_CV = logp_CJ[:, 0], logp_CJ[:, 1:]
    kl_C = position_kl(inputs[REFERENCE_VOCAB], logp_CV)
    # both differences are exactly 0 in value: the loss share is the value, the coefficients the gradient
    loss_C = (inputs["dpo_value"].to(logp_C.dtype)
              + inputs["dpo_coefficient"].to(logp_C.dtype) * (logp_C - logp_C.detach())
              + inputs["kl_coefficient"].to(logp_C.dtype) * (kl_C - kl_C.detach()))
    return loss_C, {"kl_reference": kl_C.detach(), **{key: inputs[key] for key in (PAIRS, *PAIR_STATS)}}


OBJECTIVE = Objective(
    name="tdpo", summary="TDPO1/TDPO2: DPO with the sequential full-vocabulary KL(π_ref ‖ π_θ) of each response",
    Params=Params, token_loss=token_loss, targets=targets, current_policy=current_policy,
    current_policy_probe=probe, preference_pairs="vocab", unused_keys=unused_keys,
)
