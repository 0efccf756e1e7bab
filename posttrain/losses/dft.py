"""DFT, Dynamic Fine-Tuning (arXiv 2508.05629): each token's CE weighted by its own detached
probability, L = −Σ_t m_t · sg(π_θ(x_t)) · log π_θ(x_t) / N (temperature 1, no clipping).

Per token the gradient is −∇π_θ(x_t): SFT's implicit 1/π importance weight is cancelled.
"""

from dataclasses import dataclass

from posttrain.losses.objective import Objective


@dataclass
class Params:
    pass  # token-level, as in the paper's best variant; nothing to tune


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C = logp_CJ[:, 0]
    prob_C = logp_C.exp()
    return -prob_C.detach() * logp_C, {"target_prob": prob_C}


OBJECTIVE = Objective(
    name="dft", summary="dynamic fine-tuning: CE weighted by the token's detached probability", Params=Params,
    token_loss=token_loss,
)
