"""The generation interface's types: what is asked (SamplingSpec), what comes back (Completion),
and which tokens stop a sample. Imports nothing of posttrain."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    seed: int = 0


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" (a stop token ended it, included in token_ids) or "length"
    text: str = ""


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS, the chat template's end-of-turn token, and the model's own EOS ids."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        if token in vocab:
            ids.add(vocab[token])
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(i for i in ids if i is not None)
