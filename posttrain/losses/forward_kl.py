"""Forward KL to the teacher on its top-K (the distillation loss verl's forward_kl_topk and
NeMo-RL's top-K distillation train): at each rollout position S_t = the teacher's K most likely
ids, both distributions renormalised on S_t, and the student minimises

    q̂(v) = q(v) / Σ_{u∈S_t} q(u),   π̂(v) = exp(z_v) / Σ_{u∈S_t} exp(z_u)
    ℓ_t = KL(q̂ ‖ π̂) = Σ_{v∈S_t} q̂(v) (log q̂(v) − log π̂(v))      ∂ℓ_t/∂z_v = π̂(v) − q̂(v)

(mode-covering, where LSM's reverse KL is mode-seeking). Only the student's logits on S_t are
needed (head cost 2·H·K per token). renormalize: false keeps the full-vocabulary log π(v) and the
teacher's unnormalised q(v) on S_t: Σ_{v∈S_t} q(v) (log q(v) − log π(v)).
"""

from dataclasses import dataclass

from posttrain.losses.objective import TEACHER_TOPK, Objective, Support
from posttrain.ranges import PositiveInt


@dataclass
class Params:
    k: PositiveInt = 32
    renormalize: bool = True


def needs(params):
    return frozenset({TEACHER_TOPK})


def support(params):
    return Support(kind="teacher", k=params.k)


def full_vocab(params):
    return not params.renormalize


def prepare(params, batch, signals):
    return {"support_ids": signals.teacher_topk_ids_BTK, "support_teacher_logprob": signals.teacher_topk_logprob_BTK}


def targets(params, logits_CV, inputs, scratch_CV):
    return inputs["support_ids"]


def token_loss(params, scores_CK, ids_CK, inputs):
    logq_CK = inputs["support_teacher_logprob"].to(scores_CK.dtype)
    stats = {"teacher_mass": logq_CK.logsumexp(dim=1).exp()}
    if params.renormalize:  # scores are raw logits: the log-softmax over S_t is log π̂
        logq_CK, scores_CK = logq_CK.log_softmax(dim=1), scores_CK.log_softmax(dim=1)
    return (logq_CK.exp() * (logq_CK - scores_CK)).sum(dim=1), stats


OBJECTIVE = Objective(
    name="forward_kl", summary="forward KL(teacher ‖ student) on the teacher's top-K, both renormalised there",
    Params=Params, token_loss=token_loss, on_policy=True, targets=targets, full_vocab=full_vocab, needs=needs,
    prepare=prepare, support=support,
)
