"""DPO, direct preference optimisation (Rafailov et al., arXiv 2305.18290, eq. 7), offline on
(chosen y_w, rejected y_l) pairs of one prompt x:

    Δ(y) = Σ_t [log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)]     summed over response tokens
    L    = −log σ(β [Δ(y_w) − Δ(y_l)])                                  averaged over pairs

π_ref is the frozen start model; its per-token log-probs are computed once, in a no-grad pass
before training (posttrain/preference.py), and travel with the batch as `reference_logprob`.

The head engine sums per-token losses, but L is a function of whole-sequence sums. The current
policy's Δ comes from Objective.current_policy (a no-grad head pass on the hidden states the
forward already has, policy.PolicyLoss), and each token gets the surrogate

    ℓ_t = L / n_s + 2 · ∂L/∂Δ(y) · (log π_θ(y_t) − sg[log π_θ(y_t)])      (n_s: tokens of t's sequence)

whose values sum to L over each of the pair's two sequences and whose gradient is exact: with
train.loss_aggregation: seq-mean-token-sum every one of the step's 2P sequences weighs 1/(2P),
so the step's loss is (1/P) Σ_pairs L and its gradient (1/P) Σ_pairs ∇L (the 2 undoes the pair's
two sequences). A pair is two adjacent rows (chosen, then rejected) of one micro-batch; a split
pair is refused. Metrics (DPO's usual): rewards r = β Δ of the chosen and rejected responses,
their margin and the reward accuracy (share of pairs with r_w > r_l), means over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.losses.objective import Objective
from posttrain.ranges import PositiveFloat

# per-pair metrics: each token holds its pair's value / (the pair's tokens), so their sums over a
# step are sums over pairs; the train loop divides them by the sum of PAIRS (train.py)
PAIRS = "pairs"
PAIR_STATS = ("pair_reward_chosen", "pair_reward_rejected", "pair_reward_margin", "pair_reward_accuracy")


@dataclass
class Params:
    beta: PositiveFloat = 0.1  # β, the strength of the implicit KL to π_ref (the DPO paper's 0.1)


def pair_loss(params, delta_P2: torch.Tensor) -> torch.Tensor:
    """L per pair from the summed log-ratios [Δ(y_w), Δ(y_l)] of each pair."""
    return -torch.nn.functional.logsigmoid(params.beta * (delta_P2[:, 0] - delta_P2[:, 1]))


def sequence_sums(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Σ_t over each row's loss positions, float64."""
    return values_BT.double().masked_fill(~mask_BT, 0.0).sum(dim=1)


def check_pairs(batch) -> torch.Tensor:
    """The chosen flag of each row; refuses a micro-batch whose rows are not (chosen, rejected)
    pairs: a pair split across micro-batches would see only half of its loss."""
    chosen_B = batch["preference_chosen"][:, 0] > 0
    rows = chosen_B.shape[0]
    if rows % 2 or not bool(chosen_B[0::2].all()) or bool(chosen_B[1::2].any()):
        raise ValueError(f"a DPO micro-batch must hold whole pairs as (chosen, rejected) rows; got chosen flags "
                         f"{chosen_B.int().tolist()}: a pair was split across micro-batches")
    return chosen_B


def pair_losses_and_gradients(loss_of, params, sums_B: dict[str, torch.Tensor]):
    """(L per pair [P], {name: ∂L/∂sum [P, 2]}) for a pair loss `loss_of(params, **{name: [P, 2]})`
    of per-sequence sums, by autograd on those few numbers (a stop-gradient inside loss_of gives 0)."""
    leaves = {name: value_B.view(-1, 2).detach().requires_grad_(True) for name, value_B in sums_B.items()}
    with torch.enable_grad():
        loss_P = loss_of(params, **leaves)
        grads = torch.autograd.grad(loss_P.sum(), list(leaves.values()), allow_unused=True)
    return loss_P.detach(), {name: torch.zeros_like(leaf) if grad is None else grad
                             for (name, leaf), grad in zip(leaves.items(), grads)}


def current_policy(params, logprob_BT, batch):
    """Each token's share of its pair's loss, the exact gradient coefficient, and the pair metrics'
    shares, from π_θ's current log-probs (no gradient) and π_ref's."""
    mask_BT = batch["loss_mask"]
    check_pairs(batch)
    delta_B = sequence_sums(logprob_BT - batch["reference_logprob"].to(logprob_BT.dtype), mask_BT)
    loss_P, grads = pair_losses_and_gradients(pair_loss, params, {"delta_P2": delta_B})
    return per_token_inputs(loss_P, {"dpo_coefficient": grads["delta_P2"]}, params.beta * delta_B.view(-1, 2), mask_BT)


def per_token_inputs(loss_P, coefficients: dict[str, torch.Tensor], reward_P2, mask_BT) -> dict[str, torch.Tensor]:
    """The per-row quantities spread over each row's loss positions ([B, T], zero elsewhere): the
    loss share L / n_s, each coefficient 2 ∂L/∂(sequence sum) (the 2: see the module docstring),
    and the pair metrics' shares value / (the pair's tokens)."""
    tokens_B = mask_BT.sum(dim=1).double().clamp(min=1)
    pair_tokens_B = tokens_B.view(-1, 2).sum(dim=1).repeat_interleave(2)
    per_pair = {PAIRS: torch.ones_like(loss_P), "pair_reward_chosen": reward_P2[:, 0],
                "pair_reward_rejected": reward_P2[:, 1], "pair_reward_margin": reward_P2[:, 0] - reward_P2[:, 1],
                "pair_reward_accuracy": (reward_P2[:, 0] > reward_P2[:, 1]).double()}
    per_row = {"dpo_value": loss_P.repeat_interleave(2) / tokens_B,
               **{name: 2.0 * grad_P2.reshape(-1) for name, grad_P2 in coefficients.items()}}
    per_row.update({key: value.repeat_interleave(2) / pair_tokens_B for key, value in per_pair.items()})
    mask = mask_BT.double()
    return {key: value.unsqueeze(1) * mask for key, value in per_row.items()}


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C = logp_CJ[:, 0]
    # (log π − sg[log π]) is exactly 0: the value is the pair's share, the gradient the coefficient's
    loss_C = inputs["dpo_value"].to(logp_C.dtype) + inputs["dpo_coefficient"].to(logp_C.dtype) * (logp_C - logp_C.detach())
    return loss_C, {key: inputs[key] for key in (PAIRS, *PAIR_STATS)}


OBJECTIVE = Objective(
    name="dpo", summary="DPO: −log σ(β[(log π/π_ref)(chosen) − (log π/π_ref)(rejected)]) on preference pairs",
    Params=Params, token_loss=token_loss, current_policy=current_policy, preference_pairs="token",
)
