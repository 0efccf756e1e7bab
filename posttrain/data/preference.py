"""Preference data (`data.format: preference`, the dpo objective): rows of a prompt with a chosen
and a rejected response (data.chosen_field, data.rejected_field; `posttrain pref-data` writes
them) → pairs of examples rendered as prompt-response rows are (data/sft.py: the prompt through
the chat template, the response + EOS, loss on the response) → micro-batches of whole pairs.

A pair is the unit of the loop: train.batch_size and train.micro_batch_size count pairs, a pair
is never split (its two sequences are adjacent rows of one micro-batch: chosen, then rejected),
and the start model's per-token log-probs of both responses (π_ref, computed once before
training: posttrain/preference.py) travel with it as the batch's `reference_logprob`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import DataConfig
from posttrain.data.sft import Example, collate, render_prompt
from posttrain.errors import UserError


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    # log π_ref of each response token (chosen, rejected), from the start model; None until computed
    reference_logprob: tuple[list[float], list[float]] | None = None
    # tdpo: log π_ref over the whole vocabulary at each response token, [tokens, V] per side
    reference_vocab_logprob: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def loss_tokens(self) -> int:
        return self.chosen.loss_tokens + self.rejected.loss_tokens

    def __len__(self) -> int:
        """Padded tokens of the pair's two rows (what a micro-batch token budget counts)."""
        return 2 * max(len(self.chosen), len(self.rejected))


def check_pair_rows(rows: list[dict], cfg: DataConfig, key: str = "data") -> None:
    """Every row needs a text prompt and both responses as text: a one-sided row is refused in one
    line naming the file, the row and the key, before any model loads or anything is written."""
    fields = (("prompt_field", cfg.prompt_field), ("chosen_field", cfg.chosen_field), ("rejected_field", cfg.rejected_field))
    for number, row in enumerate(rows, start=1):
        for field_key, name in fields:
            value = row.get(name)
            if not isinstance(value, str) or (field_key != "prompt_field" and not value.strip()):
                kind = "is null or missing" if value is None else ("is empty" if isinstance(value, str)
                                                                   else f"is a {type(value).__name__}, not text")
                raise UserError(key=f"{key}.{field_key}", message=f": row {number} of {cfg.source!r}: field {name!r} "
                                f"{kind}; every preference row needs a prompt, a chosen and a rejected response")
        if row[cfg.chosen_field].strip() == row[cfg.rejected_field].strip():  # DPO's margin is 0: no gradient, silently
            raise UserError(key=f"{key}.rejected_field", message=f": row {number} of {cfg.source!r}: the rejected "
                            f"response is the chosen one ({cfg.chosen_field!r} and {cfg.rejected_field!r} are the same "
                            "text); a pair trains on their difference")


def build_pairs(rows: list[dict], tokenizer, cfg: DataConfig, key: str = "data") -> tuple[list[PreferencePair], dict]:
    """Tokenized pairs and counts (a pair whose prompt alone fills max_length is dropped; responses
    longer than max_length are cut at the end, counted once per pair)."""
    check_pair_rows(rows, cfg, key)
    pairs, truncated, dropped = [], 0, 0
    for row in rows:
        prompt_ids = render_prompt(tokenizer, row[cfg.prompt_field], cfg.system_prompt)
        if len(prompt_ids) >= cfg.max_length:
            dropped += 1
            continue
        sides = [prompt_ids + tokenizer(row[name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for name in (cfg.chosen_field, cfg.rejected_field)]
        truncated += any(len(ids) > cfg.max_length for ids in sides)
        sides = [Example(ids[: cfg.max_length], len(prompt_ids)) for ids in sides]
        pairs.append(PreferencePair(*sides))
    if not pairs:
        raise UserError(key=key, message=f": no usable pairs (all {len(rows)} prompts exceed max_length)")
    return pairs, {"examples": len(pairs), "truncated": truncated, "dropped": dropped}


def sequences(pairs: list[PreferencePair]) -> list[Example]:
    """The pairs' examples as rows: chosen, rejected, chosen, rejected, ..."""
    return [example for pair in pairs for example in (pair.chosen, pair.rejected)]


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """collate() of the pairs' rows (chosen, rejected, ...), plus `preference_chosen` (1 on a
    chosen row, 0 on a rejected one) and, once computed, `reference_logprob` ([B, T]) and
    `reference_vocab_logprob` ([B, T, V], tdpo) at the loss positions."""
    batch = collate(sequences(pairs), pad_id)
    rows, length = batch["input_ids"].shape
    batch["preference_chosen"] = (torch.arange(rows) % 2 == 0).float().unsqueeze(1).expand(rows, length).contiguous()
    if all(pair.reference_logprob is not None for pair in pairs):
        reference_BT = torch.zeros(rows, length)
        values = [torch.tensor(v, dtype=torch.float32) for pair in pairs for v in pair.reference_logprob]
        reference_BT[batch["loss_mask"]] = torch.cat(values)
        batch["reference_logprob"] = reference_BT
    if all(pair.reference_vocab_logprob is not None for pair in pairs):
        values = torch.cat([v for pair in pairs for v in pair.reference_vocab_logprob])
        batch["reference_vocab_logprob"] = values.new_zeros(rows, length, values.shape[1])
        batch["reference_vocab_logprob"][batch["loss_mask"]] = values
    return batch
