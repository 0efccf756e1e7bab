"""The loss registry. Adding an objective = one small file + one line below.

The loops ask an objective what it needs (`needs`, `on_policy`, `full_vocab`) and never branch on
its name; every objective goes through the same chunked head engine (engine.py) and the same
aggregation (aggregation.py: per-token weights chosen by the recipe's train.loss_aggregation).
"""

from posttrain.losses import dft, forward_kl, grpo, lsm, opd, otr, sft
from posttrain.losses import cispo, dcpo, gspo, sapo
from posttrain.losses import jsd, kd_topk
from posttrain.losses import dpo, tdpo
from posttrain.losses.engine import head_loss
from posttrain.losses.objective import Objective
from posttrain.losses import ppo

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (sft.OBJECTIVE, dft.OBJECTIVE, otr.OBJECTIVE, opd.OBJECTIVE, lsm.OBJECTIVE,
                                                         grpo.OBJECTIVE, forward_kl.OBJECTIVE)}

OBJECTIVES.update({o.name: o for o in (gspo.OBJECTIVE, cispo.OBJECTIVE, sapo.OBJECTIVE, dcpo.OBJECTIVE)})  # the verifiable-reward policy-loss family (#24)
OBJECTIVES.update({o.name: o for o in (dpo.OBJECTIVE, tdpo.OBJECTIVE)})  # offline preference pairs (#24)
OBJECTIVES.update({o.name: o for o in (ppo.OBJECTIVE,)})  # PPO with a value model and GAE (#24)

__all__ = ["OBJECTIVES", "Objective", "head_loss"]
