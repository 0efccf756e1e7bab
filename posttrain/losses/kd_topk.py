"""Offline distillation on a teacher cache (`posttrain teacher-cache`): the student, trained on a
fixed prompt/response set, matches the teacher's top-K stored for each response token, with the
same per-token loss as the on-policy jsd / forward_kl (jsd.support_divergence):

    ℓ_t = JSD_β(q̂ ‖ π̂) on S_t = the cached top-K, both renormalised there
          (β = 0, the default: the forward KL Σ_{v∈S_t} q̂(v)(log q̂(v) − log π̂(v)), word-level KD
          on the teacher's top-K; β = 1: the reverse KL; between: jsd.py)

The teacher is not in memory: `posttrain train` reads S_t and the teacher's log-probs there from
data.teacher_cache (teacher_cache.py), checked against the student's vocabulary and the data
file. k: the first k of the cached K (the cache is sorted, most likely first); null: all K.
"""

from dataclasses import dataclass

from posttrain.losses import jsd
from posttrain.losses.objective import TEACHER_TOPK, Objective
from posttrain.ranges import PositiveInt, Probability


@dataclass
class Params:
    k: PositiveInt | None = None  # null: the cache's K
    beta: Probability = 0.0  # 0 forward KL, 1 reverse KL, between: JSD_β (jsd.py)
    renormalize: bool = True


def needs(params):
    return frozenset({TEACHER_TOPK})  # offline: from the teacher cache, never a live teacher


def full_vocab(params):
    return not params.renormalize


def targets(params, logits_CV, inputs, scratch_CV):
    return inputs["support_ids"].long()  # int32 in the cache


def token_loss(params, scores_CK, ids_CK, inputs):
    return jsd.support_divergence(params, scores_CK, inputs)


OBJECTIVE = Objective(
    name="kd_topk", summary="offline KD on a teacher cache: forward KL (β=0) or JSD_β on the cached teacher top-K",
    Params=Params, token_loss=token_loss, targets=targets, full_vocab=full_vocab, needs=needs,
)
