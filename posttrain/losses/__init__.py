"""The loss registry. Adding an objective = one small file + one line below.

The loops ask an objective what it needs (`needs`, `on_policy`, `full_vocab`) and never branch on
its name; every objective goes through the same chunked head engine (engine.py) and the same
aggregation (aggregation.py: per-token weights chosen by the recipe's train.loss_aggregation).
"""

from posttrain.losses import (
    cispo, dcpo, dft, dpo, forward_kl, grpo, gspo, jsd, kd_topk, lsm, opd, otr, ppo, sapo, sft, tdpo,
)
from posttrain.losses.engine import head_loss
from posttrain.losses.objective import Objective

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    # demonstrations (posttrain train)
    sft.OBJECTIVE,
    dft.OBJECTIVE,
    otr.OBJECTIVE,
    kd_topk.OBJECTIVE,  # a teacher cache's top-K (posttrain teacher-cache)
    # preference pairs (posttrain train, data.format: preference)
    dpo.OBJECTIVE,
    tdpo.OBJECTIVE,
    # on-policy, a teacher scores the rollouts (posttrain rl / distill)
    opd.OBJECTIVE,
    lsm.OBJECTIVE,
    forward_kl.OBJECTIVE,
    jsd.OBJECTIVE,
    # on-policy, a verifiable reward (posttrain rl)
    grpo.OBJECTIVE,
    gspo.OBJECTIVE,
    cispo.OBJECTIVE,
    sapo.OBJECTIVE,
    dcpo.OBJECTIVE,
    ppo.OBJECTIVE,
)}

__all__ = ["OBJECTIVES", "Objective", "head_loss"]
