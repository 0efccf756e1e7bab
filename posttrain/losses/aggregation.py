"""Loss aggregation: how per-token losses ℓ_t become the one scalar an optimizer step minimises.

Every mode is a fixed weight per token, L = Σ_t w_t ℓ_t over the whole global batch (the step's
examples offline, the PPO mini-batch on-policy, over all processes). The loops compute the
weights of each micro-batch with `token_weights` before its forward pass; the head engine
multiplies each token's loss (and so its gradient) by its weight. Summing micro-batch gradients
and then over processes (DDP averages; the loops multiply by the world size) gives exactly ∇L,
whatever the split, for every mode whose weights do not depend on the split.

  token-mean             w_t = 1 / N                  N: loss tokens of the global batch
                         (the default; any split into micro-batches or processes gives the same L)
  seq-mean-token-mean    w_t = 1 / (B · n_s)          n_s: loss tokens of t's sequence, B: sequences
                         (verl's mode; the LSM authors' code, one rollout per micro-batch)
  seq-mean-token-sum     w_t = 1 / B                  (verl's mode)
  microbatch-token-mean  w_t = 1 / (M · n_m)          n_m: loss tokens of t's micro-batch, M: micro-
                         batches of the global batch over all processes (the DFT authors' SFT
                         trainer: each micro-batch token-averaged, then the mean over micro-
                         batches). By definition this depends on how the batch is split.
  seq-mean-token-sum-norm  w_t = 1 / (B · L)          L: a constant length, the rollouts' max_new_tokens
                         (Dr. GRPO, arXiv 2503.20783: Σ_i Σ_t ℓ_{i,t} / (G · L), no per-response
                         length normaliser; verl's mode of this name). On-policy only: offline
                         there is no max response length to hold constant.

A sequence with no loss tokens adds nothing (verl would divide by zero there) but still counts in B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "microbatch-token-mean")
LENGTH_NORM = "seq-mean-token-sum-norm"  # Dr. GRPO's constant normaliser: rl only (GlobalCounts.length_norm)
RL_MODES = (*MODES, LENGTH_NORM)


@dataclass(frozen=True)
class GlobalCounts:
    """Sizes of the whole global batch (all micro-batches of all processes)."""

    tokens: int  # loss tokens
    sequences: int
    micro_batches: int
    length_norm: int | None = None  # L of seq-mean-token-sum-norm (rl: rollout.max_new_tokens); None elsewhere


def token_weights(mode: str, loss_mask_BT: torch.Tensor, counts: GlobalCounts) -> torch.Tensor:
    """w_t for the tokens of ONE micro-batch (loss_mask_BT is that micro-batch's mask), float64,
    zero where the mask is off."""
    mask_BT = loss_mask_BT.to(torch.float64)
    if mode == "token-mean":
        return mask_BT / max(counts.tokens, 1)
    if mode == "seq-mean-token-mean":
        per_sequence_B1 = mask_BT.sum(dim=1, keepdim=True).clamp(min=1)
        return mask_BT / (per_sequence_B1 * max(counts.sequences, 1))
    if mode == "seq-mean-token-sum":
        return mask_BT / max(counts.sequences, 1)
    if mode == "microbatch-token-mean":
        return mask_BT / (max(float(mask_BT.sum()), 1.0) * max(counts.micro_batches, 1))
    if mode == LENGTH_NORM:
        return mask_BT / (max(counts.sequences, 1) * _length_norm(counts))
    raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {', '.join(RL_MODES)}")


def _length_norm(counts: GlobalCounts) -> int:
    if not counts.length_norm:
        raise ValueError(f"{LENGTH_NORM} needs the constant length L (GlobalCounts.length_norm): on-policy only")
    return counts.length_norm


def micro_batch_aggregation(mode: str, loss_mask_BT: torch.Tensor, counts: GlobalCounts) -> tuple[torch.Tensor | None, int]:
    """What a loop applies to one micro-batch: (per-token weights or None, divisor of the loss sum).

    Where every token has the same weight (token-mean: 1/N, seq-mean-token-sum: 1/B) the loop
    divides the micro-batch's loss sum by N or B instead of weighting each token: the same value,
    and bit for bit what posttrain computed before the other modes existed. Otherwise the weights
    go to the engine (batch["loss_weight"]) and the divisor is 1."""
    if mode == "token-mean":
        return None, max(counts.tokens, 1)
    if mode == "seq-mean-token-sum":
        return None, max(counts.sequences, 1)
    if mode == LENGTH_NORM:
        return None, max(counts.sequences, 1) * _length_norm(counts)
    return token_weights(mode, loss_mask_BT, counts).float(), 1


def aggregate(mode: str, loss_BT: torch.Tensor, micro_batch_masks: list[torch.Tensor],
              length_norm: int | None = None) -> torch.Tensor:
    """The aggregated loss of per-token losses given for the whole global batch at once:
    loss_BT stacks the micro-batches' rows in order, `micro_batch_masks` their masks. A plain
    reference of what the weights compute (the tests check the loops against it)."""
    masks_BT = torch.cat(micro_batch_masks)
    counts = GlobalCounts(tokens=int(masks_BT.sum()), sequences=masks_BT.shape[0], micro_batches=len(micro_batch_masks),
                          length_norm=length_norm)
    weights_BT = torch.cat([token_weights(mode, m, counts) for m in micro_batch_masks])
    return (weights_BT * loss_BT.to(torch.float64)).sum()


def top_entropy_mask(entropy_BT: torch.Tensor, loss_mask_BT: torch.Tensor, top_ratio: float) -> torch.Tensor:
    """Per response, keep the max(1, ⌊n·top_ratio⌋) loss tokens of highest entropy (ties at the
    threshold are all kept), as the LSM authors' `_compute_entropy_top_mask` does; returns a
    bool mask, a subset of loss_mask_BT."""
    n_B = loss_mask_BT.sum(dim=1)
    keep_B = (n_B.to(torch.float64) * top_ratio).floor().long().clamp(min=1)
    masked_BT = entropy_BT.to(torch.float64).masked_fill(~loss_mask_BT, -torch.inf)
    sorted_BT = masked_BT.sort(dim=1, descending=True).values
    threshold_B1 = sorted_BT.gather(1, (keep_B - 1).clamp(max=max(entropy_BT.shape[1] - 1, 0)).unsqueeze(1))
    return (masked_BT >= threshold_B1) & loss_mask_BT
