"""What an objective is: a per-token loss on a few scored token ids, plus what it needs.

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
from typing import Any

import torch

# Names of the per-token signals an objective can ask the distill loop for.
OLD_LOGPROB = "old_logprob"  # log π_old(y_t) of the sampled token (student, no grad)
TEACHER_TOKEN = "teacher_token_logprob"  # log q(y_t) of the sampled token
TEACHER_TOPK = "teacher_topk"  # the teacher's top-k ids and log-probs (k = params.k)
STUDENT_TOPK = "student_topk"  # π_old's top-k ids (k = params.k) and the teacher's log-probs there


def given_target(params: Any, logits_CV: torch.Tensor | None, inputs: dict, scratch_CV) -> torch.Tensor:
    """The usual target: the token at each position (ground truth offline, sampled on-policy)."""
    return inputs["target_ids"].unsqueeze(1)


def no_needs(params: Any) -> frozenset[str]:
    return frozenset()


def always_full_vocab(params: Any) -> bool:
    return True


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
    # Per-token signals the distill loop must fetch (names above).
    needs: Callable[[Any], frozenset[str]] = no_needs
    # sample_inputs(params, n_tokens, generator, device) -> dict of per-token random inputs,
    # drawn once per engine call so that results do not depend on the chunk size.
    sample_inputs: Callable[..., dict[str, torch.Tensor]] | None = None
    # prepare(params, batch) -> dict of extra [B, T, ...] inputs, once per rollout batch
    # (on-policy objectives: rewards, advantages, supports).
    prepare: Callable[..., dict[str, torch.Tensor]] | None = None
