"""Generalised Jensen-Shannon divergence to the teacher on its top-K (GKD, Agarwal et al. 2024,
eq. 1; TRL's GKDTrainer.generalized_jsd_loss). At each rollout position S_t = the teacher's K
most likely ids, both distributions renormalised on S_t as in forward_kl.py (q̂ the teacher's,
π̂ the student's), and with the mixture m = β q̂ + (1 − β) π̂:

    ℓ_t = JSD_β(q̂ ‖ π̂) = β KL(q̂ ‖ m) + (1 − β) KL(π̂ ‖ m)       0 < β < 1
    ℓ_t = KL(q̂ ‖ π̂)   (forward KL, = forward_kl)                  β = 0
    ℓ_t = KL(π̂ ‖ q̂)   (reverse KL on the teacher's top-K)         β = 1

TRL's convention (trl/experimental/gkd/gkd_trainer.py): P = the teacher, Q = the student, the
mixture weighs the teacher by β, and β = 0 / β = 1 are special-cased to the forward / reverse KL
exactly. The formula itself goes to 0 at both ends; it is JSD_β / β that tends to the forward KL
as β → 0 and JSD_β / (1 − β) to the reverse KL as β → 1 (Huszár 2015), so training at a small β
follows the forward KL's direction at β times its size. TRL's default is β = 0.5.

renormalize: false, as in forward_kl: the full-vocabulary log π(v) and the teacher's unnormalised
q(v) on S_t, with the same formula on those masses. Only the student's logits on S_t are needed
when renormalised (head cost 2·H·K per token).
"""

from dataclasses import dataclass

import torch

from posttrain.losses import forward_kl
from posttrain.losses.objective import Objective
from posttrain.ranges import Probability


@dataclass
class Params(forward_kl.Params):  # k: the teacher's top-K; renormalize: forward_kl.py
    beta: Probability = 0.5  # β: 0 forward KL, 1 reverse KL (TRL's GKDConfig default 0.5)


def divergence(beta: float, logq_CK: torch.Tensor, logp_CK: torch.Tensor) -> torch.Tensor:
    """JSD_β(q ‖ p) per row from log-masses on the support (the module docstring's formula; the
    caller has renormalised them, or not). Differentiable in logp_CK."""
    q_CK, p_CK = logq_CK.exp(), logp_CK.exp()
    if beta == 0.0:
        return (q_CK * (logq_CK - logp_CK)).sum(dim=1)
    if beta == 1.0:
        return (p_CK * (logp_CK - logq_CK)).sum(dim=1)
    # log m = log(β q + (1 − β) p), in log space so that tiny masses do not underflow to log 0
    beta_t = logq_CK.new_tensor(beta)
    logm_CK = torch.logaddexp(logq_CK + beta_t.log(), logp_CK + torch.log1p(-beta_t))
    return beta * (q_CK * (logq_CK - logm_CK)).sum(dim=1) + (1 - beta) * (p_CK * (logp_CK - logm_CK)).sum(dim=1)


def support_divergence(params, scores_CK, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ℓ_t on the teacher's top-K given in inputs (support_teacher_logprob), from the student's
    scores there (raw logits when renormalised, else full-vocabulary log-probs); shared by this
    objective and the offline kd_topk (the same numbers whether the teacher is live or cached)."""
    logq_CK = inputs["support_teacher_logprob"].to(scores_CK.dtype)
    stats = {"teacher_mass": logq_CK.logsumexp(dim=1).exp()}
    if params.renormalize:  # scores are raw logits: the log-softmax over S_t is log π̂
        logq_CK, scores_CK = logq_CK.log_softmax(dim=1), scores_CK.log_softmax(dim=1)
    return divergence(params.beta, logq_CK, scores_CK), stats


def token_loss(params, scores_CK, ids_CK, inputs):
    return support_divergence(params, scores_CK, inputs)


OBJECTIVE = Objective(
    name="jsd", summary="generalised JSD_β(teacher ‖ student) on the teacher's top-K (TRL GKD: β=0 forward, 1 reverse KL)",
    Params=Params, token_loss=token_loss, on_policy=True, targets=forward_kl.targets, full_vocab=forward_kl.full_vocab,
    needs=forward_kl.needs, prepare=forward_kl.prepare, support=forward_kl.support,
)
