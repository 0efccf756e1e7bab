"""LSM, teacher top-K local support matching (arXiv 2603.25562).

At each rollout position S_t = the K ids the teacher likes best. Both models are renormalised
inside S_t and the student minimises the reverse KL there:

    π̂(v) = exp(z_v) / Σ_{u∈S_t} exp(z_u),   q̂(v) = q(v) / Σ_{u∈S_t} q(u)
    ℓ_t = Σ_{v∈S_t} π̂(v) (log π̂(v) − log q̂(v))

The gradient flows through the renormalisation; only the student's logits on S_t are needed
(head cost 2·H·K per token). Ablations from the paper, as params:
  renormalize: false  → Σ_{v∈S_t} π(v)(log π(v) − log q(v)) with full-vocabulary π (collapses)
  support: student    → S_t = π_old's top-K instead of the teacher's
  add_sampled_token   → the sampled token y_t joins S_t as a (K+1)-th slot when not in it
"""

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.config.ranges import PositiveFloat, PositiveInt
from posttrain.losses.objective import STUDENT_TOPK, TEACHER_TOKEN, TEACHER_TOPK, Objective

_MASKED = -1e30  # finite stand-in for −inf: exp gives 0 and differences stay finite (no NaN grads)


@dataclass
class Params:
    k: PositiveInt = 32
    renormalize: bool = True
    support: Literal["teacher", "student"] = "teacher"
    add_sampled_token: bool = False
    # The LSM authors' clip_log_ratio: each log π̂(v) − log q̂(v) in the loss clamped to [−c, c]
    # (their code's c is 5.0 when the flag is on; their scripts leave it off). null: no clamp.
    clip_log_ratio: PositiveFloat | None = None


def needs(params):
    signals = {TEACHER_TOPK if params.support == "teacher" else STUDENT_TOPK}
    if params.add_sampled_token:
        signals.add(TEACHER_TOKEN)
    return frozenset(signals)


def full_vocab(params):
    return not params.renormalize


def prepare(params, batch, signals):
    if params.support == "teacher":
        ids_BTK, logq_BTK = signals.teacher_topk_ids_BTK, signals.teacher_topk_logprob_BTK
    else:
        ids_BTK, logq_BTK = signals.student_topk_ids_BTK, signals.teacher_logprob_at_student_topk_BTK
    valid_BTK = torch.ones_like(ids_BTK, dtype=torch.bool)
    if params.add_sampled_token:
        sampled_BT1 = batch["target_ids"].unsqueeze(-1)
        already_in = (ids_BTK == sampled_BT1).any(dim=-1, keepdim=True)
        ids_BTK = torch.cat([ids_BTK, sampled_BT1], dim=-1)
        logq_BTK = torch.cat([logq_BTK, signals.teacher_token_logprob_BT.unsqueeze(-1)], dim=-1)
        valid_BTK = torch.cat([valid_BTK, ~already_in], dim=-1)
    return {"support_ids": ids_BTK, "support_teacher_logprob": logq_BTK, "support_valid": valid_BTK}


def targets(params, logits_CV, inputs, scratch_CV):
    return inputs["support_ids"]


def token_loss(params, scores_CK, ids_CK, inputs):
    valid_CK = inputs["support_valid"]
    logq_CK = inputs["support_teacher_logprob"].to(scores_CK.dtype).masked_fill(~valid_CK, _MASKED)
    scores_CK = scores_CK.masked_fill(~valid_CK, _MASKED)
    stats = {"teacher_mass": logq_CK.logsumexp(dim=1).exp()}
    if params.renormalize:
        # scores are raw logits (or full log-probs: the renormalisation makes them equivalent)
        logp_hat_CK = scores_CK.log_softmax(dim=1)
        logq_hat_CK = logq_CK.log_softmax(dim=1)
        loss_C = (logp_hat_CK.exp() * _log_ratio(params, logp_hat_CK, logq_hat_CK)).sum(dim=1)
    else:
        # scores are full-vocabulary log-probs: the truncated, unnormalised reverse KL
        loss_C = (scores_CK.exp() * _log_ratio(params, scores_CK, logq_CK)).sum(dim=1)
        stats["student_mass"] = scores_CK.exp().sum(dim=1)
    return loss_C, stats


def _log_ratio(params, logp_CK, logq_CK):
    ratio_CK = logp_CK - logq_CK
    if params.clip_log_ratio is None:
        return ratio_CK
    # clamp's gradient is zero outside [−c, c]; the π̂ factor in front still carries one. The
    # masked slots (−1e30 on both sides) have a ratio of 0 and weight π̂ = 0, so they stay inert.
    return ratio_CK.clamp(-params.clip_log_ratio, params.clip_log_ratio)


OBJECTIVE = Objective(
    name="lsm", summary="teacher top-K local support matching: reverse KL renormalised on the teacher's top-K",
    Params=Params, token_loss=token_loss, on_policy=True, targets=targets, full_vocab=full_vocab, needs=needs,
    prepare=prepare,
)
