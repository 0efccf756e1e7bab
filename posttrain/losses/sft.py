"""SFT: L = −Σ_t m_t · log π_θ(x_t | x_<t) / N."""

from dataclasses import dataclass

from posttrain.losses.objective import Objective


@dataclass
class Params:
    pass  # plain cross-entropy has no hyperparameters


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C = logp_CJ[:, 0]
    return -logp_C, {"target_prob": logp_C.exp()}


OBJECTIVE = Objective(name="sft", summary="cross-entropy on the demonstration tokens", Params=Params, token_loss=token_loss)
