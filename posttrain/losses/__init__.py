"""The loss registry. Adding an objective = one small file + one line below.

The loops ask an objective what it needs (`needs`, `on_policy`, `full_vocab`) and never branch on
its name; every objective goes through the same chunked head engine (engine.py) and the same
normalisation (`normalise`: sum over tokens / masked tokens in the global batch).
"""

import torch

from posttrain.losses import dft, lsm, opd, otr, sft
from posttrain.losses.engine import head_loss
from posttrain.losses.objective import Objective

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (sft.OBJECTIVE, dft.OBJECTIVE, otr.OBJECTIVE, opd.OBJECTIVE, lsm.OBJECTIVE)}


def normalise(loss_sum: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """Token-level aggregation shared by every objective: Σ_t ℓ_t / N_global (so 8×1 == 1×8)."""
    return loss_sum / max(global_tokens, 1)


__all__ = ["OBJECTIVES", "Objective", "head_loss", "normalise"]
