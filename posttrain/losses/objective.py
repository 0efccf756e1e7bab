"""What an objective is: a per-token loss on a few scored token ids, plus what it needs.

Shape legend (every file of posttrain writes tensor shapes as these suffixes, uppercase only):
  B  sequences (rollouts or examples) in a batch     T  positions (tokens) of a padded sequence
  N  loss positions of a batch (the True cells of loss_mask_BT)
  C  loss positions of one chunk of N                 V  vocabulary
  H  hidden size                                      K  top-K / support ids per position
  J  scored ids per position (1 for the target token, K for a support)
  R  rows of the engine's small scratch block (≤ 16 positions at a time)

Every objective in posttrain is a function of the student's scores at a small set of token ids
per position (the "targets", [chunk, J]):

  - dense objectives (SFT, DFT, OTR, OPD, LSM without renormalisation, LSM on student top-K)
    see full-vocabulary log-probabilities log π(v) at their targets;
  - support objectives (LSM renormalised on given ids) see raw logits z_v at their targets, and
    never pay for the [chunk, vocab] matmul.

The engine (engine.py) differentiates the loss with autograd on that small [chunk, J] tensor and
turns the result into the logit gradient itself, so an objective is only a few lines of torch
and its gradient is exact by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

# The sources an objective can ask the on-policy loop for (its `needs`). The loop always has
# π_old's sampled-token log-prob and entropy; it runs the teacher, the reference policy or the
# grader only when one of these asks for it.
TEACHER_TOKEN = "teacher_token_logprob"  # log q(y_t) of the sampled token
TEACHER_TOPK = "teacher_topk"  # the teacher's top-k ids and log-probs (k = params.k)
STUDENT_TOPK = "student_topk"  # π_old's top-k ids (k = params.k) and the teacher's log-probs there
REFERENCE_TOKEN = "reference_logprob"  # log π_ref(y_t): the starting student, frozen (KL penalties)
# V_old(s_t) per position from the value model (posttrain/critic.py), which the loop builds, trains on
# each PPO mini-batch and checkpoints only for an objective that declares it. Such an objective's
# prepare returns the critic's inputs: "value_return" (R_t, its regression target), "old_value"
# (V_old) and "value_mask" (the positions it regresses on).
VALUE = "value"
VERIFIABLE_REWARD = "verifiable_reward"  # 1/0 per rollout: the grader on its text vs the prompt's answer
# per rollout, its prompt's verifiable rewards in earlier steps (DCPO's smooth standardisation): the
# loop keeps them across steps and resumes (rl_shaping.py); signals.reward_history
PROMPT_HISTORY = "prompt_reward_history"
TEACHER_SOURCES = frozenset({TEACHER_TOKEN, TEACHER_TOPK, STUDENT_TOPK})


@dataclass
class TokenSignals:
    """Everything the on-policy loop fetched for one rollout batch, without gradients: built in
    one place (signals.fetch_signals) for every scorer. Per-token fields are [B, T, ...] at the
    loss positions (zero elsewhere); a field is None when no declared source produced it."""

    old_logprob_BT: torch.Tensor  # log π_old(y_t)
    entropy_BT: torch.Tensor | None  # H(π_old) at each position; None: no scoring pass (rollout.old_logprob: sampler)
    group_B: torch.Tensor  # index of the prompt each rollout answers (rollouts of one prompt share it)
    teacher_token_logprob_BT: torch.Tensor | None = None
    teacher_topk_ids_BTK: torch.Tensor | None = None
    teacher_topk_logprob_BTK: torch.Tensor | None = None
    student_logprob_at_teacher_topk_BTK: torch.Tensor | None = None
    student_topk_ids_BTK: torch.Tensor | None = None
    student_topk_logprob_BTK: torch.Tensor | None = None
    teacher_logprob_at_student_topk_BTK: torch.Tensor | None = None
    exact_reverse_kl_BT: torch.Tensor | None = None  # Σ_v π_old(v)(log π_old − log q): local teacher only
    reference_logprob_BT: torch.Tensor | None = None
    value_BT: torch.Tensor | None = None  # V_old(s_t): the critic before this step's updates (VALUE)
    verifiable_reward_B: torch.Tensor | None = None
    # added to the verifiable reward before the group advantage (DAPO's overlong penalty); None: none
    reward_shaping_B: torch.Tensor | None = None
    # PROMPT_HISTORY: per rollout, its prompt's PAST "steps", "count" (rollouts), "sum" (Σr), "square_sum" (Σr²), [B] each
    reward_history: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Support:
    """What an objective trains on besides the sampled token, for the loop to fetch and measure:
    `k` ids per position (the width of the teacher's and π_old's top-K the scorer returns) and
    whose top-K the support is (teacher / student / union / overlap: losses/support.py)."""

    kind: str
    k: int


def given_target(params: Any, logits_CV: torch.Tensor | None, inputs: dict, scratch_CV) -> torch.Tensor:
    """The usual target: the token at each position (ground truth offline, sampled on-policy)."""
    return inputs["target_ids"].unsqueeze(1)


def no_needs(params: Any) -> frozenset[str]:
    return frozenset()


def always_full_vocab(params: Any) -> bool:
    return True


def no_support(params: Any) -> Support | None:
    return None


def none_unused(params: Any) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Objective:
    """One registered training objective. See losses/sft.py for the smallest example."""

    name: str
    summary: str  # one line, shown by `posttrain objectives` and in errors
    Params: type  # dataclass of hyperparameters, validated from the recipe's `objective:` section
    # token_loss(params, scores_CJ, targets_CJ, inputs) -> (loss_C, stats: dict[str, Tensor[C]])
    token_loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    on_policy: bool = False
    # targets(params, logits_CV | None, inputs, scratch_CV | None) -> LongTensor [C, J]
    targets: Callable[..., torch.Tensor] = given_target
    # True: scores are full-vocabulary log-probs (needs the [C, V] logits); False: raw logits.
    full_vocab: Callable[[Any], bool] = always_full_vocab
    # Sources the on-policy loop must fetch (names above).
    needs: Callable[[Any], frozenset[str]] = no_needs
    # sample_inputs(params, n_tokens, generator, device) -> dict of per-token random inputs,
    # drawn once per engine call so that results do not depend on the chunk size.
    sample_inputs: Callable[..., dict[str, torch.Tensor]] | None = None
    # prepare(params, batch, signals: TokenSignals) -> dict of extra [B, T, ...] inputs, once per
    # rollout batch (on-policy objectives: rewards, advantages, supports).
    prepare: Callable[..., dict[str, torch.Tensor]] | None = None
    # current_policy(params, logprob_BT, batch) -> dict of extra [B, T] inputs computed from the
    # CURRENT policy π_θ, no gradient: logprob_BT = log π_θ(y_t) at the batch's loss positions
    # (zero elsewhere), from a no-grad head pass on the hidden states the forward already has
    # (policy.PolicyLoss). For objectives that need a per-sequence quantity of π_θ as a constant:
    # GSPO's sg[s_i] (losses/gspo.py), a DPO sequence log-ratio. A sequence never straddles two
    # micro-batches, so a per-row reduction of logprob_BT sees the whole sequence.
    current_policy: Callable[..., dict[str, torch.Tensor]] | None = None
    # current_policy_probe(params, logp_CV, inputs_C) -> {name: [C]}: per-token values of π_θ's FULL
    # log-softmax at the loss positions (no gradient, engine.head_probe), handed to current_policy
    # in its batch as [B, T] tensors under their names (tdpo: KL(π_ref ‖ π_θ) at each position).
    current_policy_probe: Callable[..., dict[str, torch.Tensor]] | None = None
    # support(params) -> Support | None: the top-K width and kind the objective reads (lsm: its
    # k and support); None: the loop scores top-K only for its diagnostics (scoring.diagnostics_k,
    # the teacher's).
    support: Callable[[Any], Support | None] = no_support
    # Trains on (chosen, rejected) pairs, data.format: preference (data/preference.py), with the start
    # model's "token" log-probs of each response token (dpo) or its full "vocab" distribution at each
    # response position (tdpo) as π_ref (posttrain/preference.py); None: not a pair objective.
    preference_pairs: Literal["token", "vocab"] | None = None
    # unused_keys(params) -> {key: why}: params keys that these settings never read (tdpo's alpha
    # under tdpo1). The loader refuses such a key when the recipe sets it: an option that is
    # accepted and silently ignored reads as an experiment that was not run.
    unused_keys: Callable[[Any], dict[str, str]] = none_unused
    # The one train.loss_aggregation under which the loss is the paper's (gspo: seq-mean-token-mean,
    # the per-rollout mean that turns the GSPO-token identity into the sequence ratio's gradient);
    # rl refuses another. None: any aggregation is a valid choice.
    exact_aggregation: str | None = None
