"""LSM, teacher top-K local support matching (arXiv 2603.25562), and its support matrix.

At each rollout position S_t is a set of token ids (by default the K ids the teacher likes best).
Both models are renormalised inside S_t and the student minimises the reverse KL there:

    π̂(v) = exp(z_v) / Σ_{u∈S_t} exp(z_u),   q̂(v) = q(v) / Σ_{u∈S_t} q(u)
    ℓ_t = Σ_{v∈S_t} π̂(v) (log π̂(v) − log q̂(v))

The gradient flows through the renormalisation; only the student's logits on S_t are needed
(head cost 2·H·K per token). The matrix of variants, as params:

  support: teacher    S_t = the teacher's top-K (the paper's method)
           student    S_t = π_old's top-K
           union      teacher's top-K ∪ π_old's top-K (up to 2K ids; duplicates masked)
           overlap    teacher's top-K ∩ π_old's top-K (may be empty: then ℓ_t = 0)
  renormalize: true   as above
           false      Σ_{v∈S_t} π(v)(log π(v) − log q(v)) with full-vocabulary π (collapses)
           tail       a (K+1)-th bucket "rest of the vocabulary" with mass π(V∖S) = 1 − Σ_S π(v)
                      (and the same for q), so that the truncated KL is a true KL between two
                      distributions on K+1 outcomes:
                      ℓ_t = Σ_{v∈S_t} π(v) log(π(v)/q(v)) + π(V∖S) log(π(V∖S)/q(V∖S))
                      It is ≥ 0, ≤ the full reverse KL, and equal to it when S_t is the whole
                      vocabulary. π(V∖S) needs the full log-sum-exp: it runs on the dense path.
  add_sampled_token   the sampled token y_t joins S_t as one more slot when not in it

Tail masses are computed as 1 − Σ_S p, floored at the dtype's machine epsilon: below that the
difference is rounding, not mass (a teacher whose top-K holds "all" of its mass in fp32).
"""

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.ranges import PositiveFloat, PositiveInt
from posttrain.losses.objective import STUDENT_TOPK, TEACHER_TOKEN, TEACHER_TOPK, Objective, Support, TokenSignals
from posttrain.losses.support import support_slots

_MASKED = -1e30  # finite stand-in for −inf: exp gives 0 and differences stay finite (no NaN grads)

@dataclass
class Params:
    k: PositiveInt = 32
    renormalize: Literal[True, False, "tail"] = True
    support: Literal["teacher", "student", "union", "overlap"] = "teacher"
    add_sampled_token: bool = False
    # The LSM authors' clip_log_ratio: each log π̂(v) − log q̂(v) in the loss clamped to [−c, c]
    # (their code's c is 5.0 when the flag is on; their scripts leave it off). null: no clamp.
    clip_log_ratio: PositiveFloat | None = None


def needs(params):
    signals = {
        "teacher": {TEACHER_TOPK}, "student": {STUDENT_TOPK},
        "union": {TEACHER_TOPK, STUDENT_TOPK}, "overlap": {TEACHER_TOPK, STUDENT_TOPK},
    }[params.support]
    if params.add_sampled_token:
        signals = signals | {TEACHER_TOKEN}
    return frozenset(signals)


def full_vocab(params):
    return params.renormalize is not True


def support(params):
    return Support(kind=params.support, k=params.k)


def prepare(params, batch, signals: TokenSignals):
    slots = support_slots(params.support, signals)
    ids_BTJ, logq_BTJ, valid_BTJ = slots["ids"], slots["teacher_logprob"], slots["valid"]
    if params.add_sampled_token:
        sampled_BT1 = batch["target_ids"].unsqueeze(-1)
        already_in = ((ids_BTJ == sampled_BT1) & valid_BTJ).any(dim=-1, keepdim=True)
        ids_BTJ = torch.cat([ids_BTJ, sampled_BT1], dim=-1)
        logq_BTJ = torch.cat([logq_BTJ, signals.teacher_token_logprob_BT.unsqueeze(-1)], dim=-1)
        valid_BTJ = torch.cat([valid_BTJ, ~already_in], dim=-1)
    return {"support_ids": ids_BTJ, "support_teacher_logprob": logq_BTJ, "support_valid": valid_BTJ}


def targets(params, logits_CV, inputs, scratch_CV):
    return inputs["support_ids"]


def token_loss(params, scores_CK, ids_CK, inputs):
    valid_CK = inputs["support_valid"]
    logq_CK = inputs["support_teacher_logprob"].to(scores_CK.dtype).masked_fill(~valid_CK, _MASKED)
    scores_CK = scores_CK.masked_fill(~valid_CK, _MASKED)
    stats = {"teacher_mass": logq_CK.logsumexp(dim=1).exp(), "support_size": valid_CK.sum(dim=1).to(scores_CK.dtype)}
    if params.renormalize is True:
        # scores are raw logits (or full log-probs: the renormalisation makes them equivalent)
        logp_hat_CK = scores_CK.log_softmax(dim=1)
        logq_hat_CK = logq_CK.log_softmax(dim=1)
        loss_C = (logp_hat_CK.exp() * _log_ratio(params, logp_hat_CK, logq_hat_CK)).sum(dim=1)
        return loss_C, stats
    # scores are full-vocabulary log-probs: the truncated, unnormalised reverse KL ...
    loss_C = (scores_CK.exp() * _log_ratio(params, scores_CK, logq_CK)).sum(dim=1)
    stats["student_mass"] = scores_CK.exp().sum(dim=1)
    if params.renormalize == "tail":
        # ... plus the rest-of-the-vocabulary bucket, which makes it a KL on K+1 outcomes
        log_tail_p_C = _log_tail(scores_CK.logsumexp(dim=1))
        log_tail_q_C = _log_tail(logq_CK.logsumexp(dim=1))
        loss_C = loss_C + log_tail_p_C.exp() * _log_ratio(params, log_tail_p_C, log_tail_q_C)
    return loss_C, stats


def _log_tail(log_mass_C):
    """log(1 − exp(log_mass)), the mass outside the support, floored at machine epsilon."""
    eps = torch.finfo(log_mass_C.dtype).eps
    return (-torch.expm1(log_mass_C.clamp(max=0.0))).clamp(min=eps).log()


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
    prepare=prepare, support=support,
)
