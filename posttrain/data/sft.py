"""Demonstration data: rows → chat-rendered prompt/response → token ids + loss mask → batches.

Rendering follows the DFT paper's setup: the prompt is the raw problem through the tokenizer's
chat template with the generation prompt; the response is the solution followed by EOS. Only
response tokens (EOS included) are trained on.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
from pathlib import Path

import torch

from posttrain.config import DataConfig, SyntheticConfig
from posttrain.data import synthetic
from posttrain.data.conversation import build_conversation_examples
from posttrain.data.examples import Example  # noqa: F401  (re-exported: the loops' unit of data)
from posttrain.errors import UserError
from posttrain.seeds import epoch_seed


def load_rows(source: str, split: str, synthetic_cfg: SyntheticConfig, max_examples: int | None, key: str,
              dedupe_field: str | None = None) -> list[dict]:
    """Rows (dicts) from the synthetic task, local json/jsonl/parquet files, or a Hub dataset.
    With `dedupe_field`, only the first row of each distinct value of that field is kept (before
    max_examples), found by hashing the field alone, so the full table is never turned into dicts."""
    if source == "synthetic":
        rows = synthetic.make_rows(synthetic_cfg.split, synthetic_cfg.num_examples, synthetic_cfg.seed)
        if dedupe_field:
            _check_field(rows[0] if rows else {}, dedupe_field, key)
            keep = first_occurrences(row[dedupe_field] for row in rows)
            rows = [rows[i] for i in keep]
        return rows[:max_examples] if max_examples else rows
    import datasets

    datasets.disable_progress_bars()
    files = sorted(glob.glob(source))
    try:
        if files:
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(files[0]).suffix)
            if kind is None:
                raise UserError(key=f"{key}", message=f": {source!r} must be .jsonl, .json or .parquet files")
            for path in files:
                _check_local_file(path, kind, key)
            table = datasets.load_dataset(kind, data_files=files, split="train")
        elif Path(source).exists() or "/" not in source:
            raise UserError(key=f"{key}", message=f": no file matches {source!r} (and it is not a Hub dataset id)")
        else:
            table = datasets.load_dataset(source, split=split)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for a missing/unreachable dataset
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(key=f"{key}", message=f": cannot load {source!r}: {first_line}") from None
    if len(table) == 0:
        raise UserError(key=f"{key}", message=f": {source!r} holds no rows")
    if dedupe_field:
        _check_field(dict.fromkeys(table.column_names), dedupe_field, key)
        column = table.select_columns([dedupe_field])
        values = (value for chunk in column.iter(batch_size=8192) for value in chunk[dedupe_field])
        table = table.select(first_occurrences(values))
    if max_examples:
        table = table.select(range(min(max_examples, len(table))))
    return list(table)


def first_occurrences(values) -> list[int]:
    """Indices of the first occurrence of each distinct value (compared by a 128-bit hash of its
    canonical JSON, so memory grows with the distinct values only, 16 bytes each)."""
    seen, keep = set(), []
    for index, value in enumerate(values):
        digest = hashlib.blake2b(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode(),
                                 digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(index)
    return keep


def _check_field(row: dict, name: str, key: str) -> None:
    if name not in row:
        raise UserError(key=f"{key.split('.')[0]}.prompt_field", message=f": the data has no field {name!r}; "
                        f"fields: {', '.join(row)}")
def _check_local_file(path: str, kind: str, key: str) -> None:
    """An empty file or JSON that is not UTF-8 fails deep inside `datasets` (or only when a row is
    read); say which file instead."""
    if Path(path).stat().st_size == 0:
        raise UserError(key=f"{key}", message=f": {path} is empty; it needs one JSON object per line (or parquet rows)")
    if kind != "json":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                raise UserError(key=f"{key}", message=f": {path} is not UTF-8 (byte {block[err.start]:#04x} at offset "
                                f"{offset + err.start}); save it as UTF-8") from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(key=f"{key}", message=f": {path} is not UTF-8 (it ends inside a character)") from None


def render_prompt(tokenizer, prompt, system_prompt: str | None) -> list[int]:
    """Token ids of the chat-rendered prompt with the generation prompt (no double BOS).

    `prompt` is the user's text, or already a list of {"role", "content"} messages (as in
    DAPO-Math-17k's `prompt` field)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; posttrain renders prompts through it")
    if isinstance(prompt, list):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        messages = [{"role": "user", "content": str(prompt)}]
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already writes any BOS it wants; tokenizing without special tokens avoids a second.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_examples(rows: list[dict], tokenizer, cfg: DataConfig, key: str = "data") -> tuple[list[Example], dict]:
    """Tokenize rows; returns the examples and counts of what was truncated or dropped."""
    if cfg.format != "prompt-response":
        return build_conversation_examples(rows, tokenizer, cfg, key)
    for field_key, name in (("prompt_field", cfg.prompt_field), ("response_field", cfg.response_field)):
        if rows and name not in rows[0]:
            raise UserError(f": the data has no field {name!r}; fields: {', '.join(rows[0])}", key=f"{key}.{field_key}")
    examples, truncated, dropped = [], 0, 0
    for number, row in enumerate(rows, start=1):
        _check_text_fields(row, number, cfg, key)
        prompt_ids = render_prompt(tokenizer, row[cfg.prompt_field], cfg.system_prompt)
        response = response_text(row[cfg.response_field], cfg.response_role, f"{key}.response_field")
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        token_ids = prompt_ids + response_ids + [tokenizer.eos_token_id]
        if len(prompt_ids) >= cfg.max_length:
            dropped += 1
            continue
        if len(token_ids) > cfg.max_length:
            truncated += 1
            token_ids = token_ids[: cfg.max_length]
        examples.append(Example(token_ids, len(prompt_ids)))
    if not examples:
        raise UserError(key=f"{key}", message=f": no usable examples (all {len(rows)} prompts exceed max_length)")
    return examples, {"examples": len(examples), "truncated": truncated, "dropped": dropped}


def response_text(value, role: str, key: str) -> str:
    """The response: a string as is, or from a list of chat messages (OpenR1-Math-220k's
    `messages`) the content of the last message with `role` (data.response_role)."""
    if not isinstance(value, list):
        return str(value)
    turns = [m for m in value if isinstance(m, dict) and m.get("role") == role]
    if not turns:
        roles = sorted({str(m.get("role")) for m in value if isinstance(m, dict)})
        raise UserError(key=f"{key}", message=f": a row's message list has no {role!r} turn (roles: {', '.join(roles) or 'none'}); "
                        "set data.response_role")
    return str(turns[-1].get("content", ""))
def _check_text_fields(row: dict, number: int, cfg: DataConfig, key: str) -> None:
    """A null or missing field would be rendered as the text "None" and trained on."""
    for field_key, name in (("prompt_field", cfg.prompt_field), ("response_field", cfg.response_field)):
        value = row.get(name)
        # A response may also be a list of chat messages (data.response_role picks the turn).
        if value is None or (field_key == "response_field" and not isinstance(value, (str, int, float, list))):
            kind = "is null or missing" if value is None else f"is a {type(value).__name__}, not text"
            raise UserError(key=f"{key}.{field_key}", message=f": row {number} of {cfg.source!r}: field {name!r} {kind}; "
                            "every row needs text there (remove or fix such rows)")


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; position t of input_ids predicts target_ids[t], trained iff loss_mask[t]."""
    length = max(len(ex.token_ids) for ex in examples) - 1
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    target_ids = torch.full_like(input_ids, pad_id)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, ex in enumerate(examples):
        ids = torch.tensor(ex.token_ids)
        n = len(ids) - 1
        input_ids[row, :n] = ids[:-1]
        target_ids[row, :n] = ids[1:]
        attention_mask[row, :n] = 1
        for start, end in ex.loss_spans or [(ex.prompt_len, n + 1)]:
            loss_mask[row, start - 1 : end - 1] = True  # position t − 1 predicts token t
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "target_ids": target_ids, "loss_mask": loss_mask}
    for key, value in (examples[0].per_token or {}).items():  # [B, T, ...], zero off the loss positions
        batch[key] = value.new_zeros(len(examples), length, *value.shape[1:])
        for row, ex in enumerate(examples):
            batch[key][row][loss_mask[row]] = ex.per_token[key]
    return batch


def micro_batches(examples: list, micro_batch_size: int, micro_batch_tokens: int | None, length=len) -> list[list]:
    """Split one step's examples into micro-batches, by count or by a padded-token budget.

    With a token budget the examples are sorted by length first, so that similar lengths share
    a micro-batch (less padding); the step's gradient is a sum, so grouping does not change it.
    """
    if not micro_batch_tokens:
        return [examples[i : i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
    ordered = sorted(examples, key=length, reverse=True)
    batches, current = [], []
    for ex in ordered:
        longest = length(current[0]) if current else length(ex)
        if current and (len(current) + 1) * longest > micro_batch_tokens:
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    return batches


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_examples, generator=generator).tolist()
