"""Sequence packing for offline objectives (`train.packing: true`): padding-free micro-batches.

A step's examples are packed best-fit decreasing into rows of at most `train.micro_batch_tokens`
input tokens (an example longer than the budget gets a row of its own). A packed micro-batch is
one row [1, L]: the examples' tokens back to back, `position_ids` restarting at 0 for each, and
no attention mask. transformers then attends block-diagonally (each token sees only the earlier
tokens of its own example; masking_utils.find_packed_sequence_indices reads the example
boundaries off the position ids), for sdpa and eager attention alike, so every token's hidden
state, and so the loss and its gradient, are those of the unpacked, padded run (up to float
rounding of differently shaped matmuls). Nothing is computed on padding.

Only the token-mean loss aggregation is allowed: the sequence-level modes and the per-response
entropy mask read sequences as batch rows, which packing merges.
"""

from __future__ import annotations

import torch

from posttrain.data.sft import Example, collate
from posttrain.errors import UserError


def check_packing(train_cfg) -> None:
    if not train_cfg.packing:
        return
    if train_cfg.micro_batch_tokens is None:
        raise UserError(key="train.packing", message=": packing needs a token budget; set "
                        "train.micro_batch_tokens (input tokens per packed row)")
    if train_cfg.loss_aggregation != "token-mean":
        raise UserError(key="train.packing", message=": only with train.loss_aggregation: token-mean "
                        f"(got {train_cfg.loss_aggregation!r}: it averages over sequences, which packing merges)")
    if train_cfg.entropy_top_ratio is not None:
        raise UserError(key="train.packing", message=": not with train.entropy_top_ratio (a per-response "
                        "selection; packing merges responses)")


def best_fit(examples: list[Example], budget_tokens: int) -> list[list[Example]]:
    """Bins of examples whose input tokens (len − 1 each) sum to ≤ budget_tokens: longest first,
    each into the bin it fills the most, else into a new bin."""
    bins, room = [], []
    for example in sorted(examples, key=len, reverse=True):
        size = len(example) - 1
        fits = [b for b in range(len(bins)) if room[b] >= size]
        if fits:
            tightest = min(fits, key=room.__getitem__)
            bins[tightest].append(example)
            room[tightest] -= size
        else:
            bins.append([example])
            room.append(budget_tokens - size)
    return bins


def collate_packed(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One row [1, L]: each example as collate makes it, back to back, with its own positions."""
    rows = [collate([example], pad_id) for example in examples]
    batch = {key: torch.cat([row[key] for row in rows], dim=1) for key in rows[0]}
    batch["position_ids"] = torch.cat([torch.arange(row["input_ids"].shape[1]) for row in rows]).unsqueeze(0)
    return batch
