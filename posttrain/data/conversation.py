"""Conversational demonstration data: whole conversations with the loss on assistant turns, and
TRL-style prompt/completion pairs (plain text or message lists).

`data.format`:
  prompt-response    (default, data/sft.py) the prompt through the chat template, the response
                     text + EOS trained
  messages           `data.response_field` holds a whole conversation (a list of {role,
                     content}); trained: every turn with role `data.response_role`, or only the
                     last one (`data.train_turns: last`)
  prompt-completion  TRL's pairs. Plain strings: prompt + completion as one text, no template;
                     the completion and an EOS are trained. Message lists: prompt + completion
                     rendered by the chat template; the completion's `response_role` turns trained.

A conversation is rendered once, as text, by the tokenizer's chat template and tokenized once, so
the token ids are exactly the template's (`apply_chat_template(messages, tokenize=True)`). A
trained turn is located by rendering the conversation up to it: an assistant turn starts where
the template's generation prompt for it ends (another role's, at its content) and runs through
its end-of-turn token (whitespace the template
writes between turns is not trained). A template that rewrites earlier turns once later ones
exist (e.g. dropping old reasoning) has no such prefixes and is refused.
"""

from __future__ import annotations

from posttrain.data.examples import Example
from posttrain.errors import UserError


def messages_example(tokenizer, messages: list[dict], trained: list[int], key: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids of the rendered conversation, token spans [start, end) of the trained turns)."""
    full = _render(tokenizer, messages, False, key)
    char_spans = []
    for index in trained:
        before_text = _render(tokenizer, messages[:index], False, key)
        turn_text = _render(tokenizer, messages[: index + 1], False, key)
        if messages[index]["role"] == "assistant":
            start_text = _render(tokenizer, messages[:index], True, key)  # ends with the generation prompt
            start = len(start_text) if turn_text.startswith(start_text) else -1
        else:  # no generation prompt for other roles: the turn's trained part starts at its content
            start = turn_text.find(messages[index]["content"], len(before_text))
        if start < 0 or not (full.startswith(turn_text) and turn_text.startswith(before_text)):
            raise UserError(key=f"{key}", message=f": the chat template renders earlier turns differently once later "
                            "turns follow (it rewrites the history), so trained turns cannot be located in the "
                            "conversation; train on single-turn data (data.format: prompt-response)")
        char_spans.append((start, len(turn_text.rstrip())))
    return _tokens_and_spans(tokenizer, full, char_spans, key)


def plain_example(tokenizer, prompt: str, completion: str, key: str) -> tuple[list[int], list[tuple[int, int]]]:
    """TRL's plain prompt/completion: one text, no template; the completion and an EOS trained."""
    ids, spans = _tokens_and_spans(tokenizer, prompt + completion, [(len(prompt), len(prompt + completion))], key)
    ids = ids + [tokenizer.eos_token_id]
    if spans:
        spans[-1] = (spans[-1][0], len(ids))
    else:
        spans = [(len(ids) - 1, len(ids))]
    return ids, spans


def trained_turns(messages: list[dict], first: int, role: str, which: str) -> list[int]:
    """Indices of the messages (from index `first` on) whose loss is trained."""
    turns = [i for i in range(first, len(messages)) if messages[i].get("role") == role]
    return turns[-1:] if which == "last" else turns


def as_messages(value, key: str, row_index: int) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise UserError(key=f"{key}", message=f": row {row_index} is not a list of {{role, content}} messages")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _render(tokenizer, messages, generation_prompt: bool, key: str) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as err:  # jinja raises its own types (e.g. a template that insists on roles alternating)
        raise UserError(key=f"{key}", message=f": the chat template refuses a conversation: {str(err).splitlines()[0]}") from None


def _tokens_and_spans(tokenizer, text: str, char_spans, key: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize once; a token is trained when its first character lies inside a trained span."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(key=f"{key}", message=f": conversational data needs a fast tokenizer (character offsets)")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    token_spans = []
    for char_start, char_end in char_spans:
        inside = [t for t, (a, _) in enumerate(offsets) if char_start <= a < char_end]
        if inside:
            token_spans.append((inside[0], inside[-1] + 1))
    return ids, token_spans


def build_conversation_examples(rows: list[dict], tokenizer, cfg, key: str):
    """Examples for data.format messages / prompt-completion (see the module docstring), cut at
    data.max_length; rows with nothing left to train on are dropped and counted."""
    examples, truncated, dropped = [], 0, 0
    fields = [cfg.response_field] if cfg.format == "messages" else [cfg.prompt_field, cfg.response_field]
    for name in fields:
        if rows and name not in rows[0]:
            field_key = "response_field" if name == cfg.response_field else "prompt_field"
            raise UserError(key=f"{key}.{field_key}", message=f": the data has no field {name!r}; fields: {', '.join(rows[0])}")
    for index, row in enumerate(rows):
        ids, spans = _example_of(row, index, tokenizer, cfg, key)
        if len(ids) > cfg.max_length:
            truncated += 1
            ids = ids[: cfg.max_length]
            spans = [(s, min(e, cfg.max_length)) for s, e in spans if s < cfg.max_length]
        if not spans:
            dropped += 1
            continue
        examples.append(Example(ids, spans[0][0], loss_spans=spans))
    if not examples:
        raise UserError(key=f"{key}", message=f": no usable examples (none of the {len(rows)} rows has a trained turn "
                        f"with role {cfg.response_role!r} within max_length)")
    return examples, {"examples": len(examples), "truncated": truncated, "dropped": dropped}


def _example_of(row, index, tokenizer, cfg, key):
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if cfg.format == "messages":
        messages = system + as_messages(row[cfg.response_field], f"{key}.response_field", index)
        trained = trained_turns(messages, 0, cfg.response_role, cfg.train_turns)
        return messages_example(tokenizer, messages, trained, f"{key}.response_field")
    prompt, completion = row[cfg.prompt_field], row[cfg.response_field]
    if isinstance(prompt, str) and isinstance(completion, str):
        return plain_example(tokenizer, prompt, completion, f"{key}.response_field")
    if isinstance(prompt, str) or isinstance(completion, str):
        raise UserError(key=f"{key}.prompt_field", message=f": row {index} mixes a plain string and a message list; "
                        "prompt and completion must both be strings or both be message lists")
    prompt_messages = system + as_messages(prompt, f"{key}.prompt_field", index)
    messages = prompt_messages + as_messages(completion, f"{key}.response_field", index)
    trained = trained_turns(messages, len(prompt_messages), cfg.response_role, cfg.train_turns)
    return messages_example(tokenizer, messages, trained, f"{key}.response_field")
