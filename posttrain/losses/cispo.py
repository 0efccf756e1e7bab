"""CISPO, clipped importance-sampling-weight policy optimisation (MiniMax-M1, arXiv 2506.13585, eq. 4–5):
GRPO's group-normalised verifiable reward, with the clip moved from the update to the IS weight.

    ρ_t = π_θ(y_t) / π_old(y_t)
    ℓ_t = −sg[clip(ρ_t, 1 − ε_lo, 1 + ε_hi)] · A_i · log π_θ(y_t)

The clipped weight is a constant (stop-gradient), so every token keeps a gradient: a token whose
ratio left the band is down-weighted, never dropped (PPO-clip's max(...) zeroes it). The paper
sets no lower bound ("we did not impose a lower bound on the IS weight by setting ε_low to a
large value; instead, we only tuned ε_high"): clip_low null. verl's `cispo` loss clamps to
[1 − clip_ratio_low, 1 + clip_ratio_high] the same way; TRL's `loss_type="cispo"` caps the ratio
at epsilon_high itself (clamp(ρ, max=ε_high)), i.e. its epsilon_high is our 1 + clip_high.
The "clip_frac" stat is the share of tokens whose weight was clipped (they still train).
"""

from dataclasses import dataclass

from posttrain.losses.grpo import GroupAdvantageParams, advantage_inputs, reward_needs
from posttrain.losses.objective import Objective
from posttrain.ranges import NonNegativeFloat, OpenFraction


@dataclass
class Params(GroupAdvantageParams):  # normalize_std, std_epsilon: grpo's group advantage
    clip_low: OpenFraction | None = None  # ε_lo; null: no lower bound on the weight (the paper)
    # ε_hi: the weight is capped at 1 + ε_hi. The paper tunes it without publishing the value; 0.28 is
    # DAPO's clip-higher, verl's cispo reads the actor's clip_ratio_high, Trinity-RFT's default is 0.28
    clip_high: NonNegativeFloat = 0.28


def token_loss(params, logp_CJ, targets_CJ, inputs):
    logp_C, advantage_C = logp_CJ[:, 0], inputs["advantage"].to(logp_CJ.dtype)
    ratio_C = (logp_C - inputs["old_logprob"].to(logp_C.dtype)).exp().detach()
    low = None if params.clip_low is None else 1.0 - params.clip_low
    weight_C = ratio_C.clamp(min=low, max=1.0 + params.clip_high)
    loss_C = -weight_C * advantage_C * logp_C
    clipped_C = (weight_C != ratio_C).to(logp_C.dtype)
    return loss_C, {"clip_frac": clipped_C, "ratio": ratio_C, "advantage": advantage_C}


OBJECTIVE = Objective(
    name="cispo", summary="CISPO: GRPO's group advantage, −sg[clip(ρ)]·A·log π (the IS weight clipped, every token trains)",
    Params=Params, token_loss=token_loss, on_policy=True, needs=reward_needs, prepare=advantage_inputs,
)
