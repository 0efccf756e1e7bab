"""The GPU check: one call on a machine lent one GPU (`make gpu-check`), under 8 minutes, one
markdown table.

1. tests   the suite's CUDA tests (tests/test_cuda.py: the chunked head engine on the GPU against
           the plain references, bf16 matmuls, a tiny model's training step on CUDA vs CPU) and
           the engine's CPU tests (tests/test_losses.py), with pytest, in a subprocess.
2. head    forward+backward of the LM head + cross-entropy at 16,384 tokens × 151,936 vocab ×
           1,536 hidden in bf16 (Qwen2.5-1.5B's head): posttrain's chunked engine (default chunk
           and 4,096-token chunks), dense torch (full logits), Liger's fused linear cross-entropy
           and Apple's cut-cross-entropy when importable ("not installed" rows otherwise). Same
           tensors, same process; each case: one warm-up, then the median of 3 timed runs; peak =
           CUDA max allocated during one run minus what was allocated before it. The loss and the
           hidden-state gradient are compared with the engine's.
3. model   one SFT step and one GRPO step (rollouts with `generate`, π_old scoring, a synthetic
           0/1 reward that differs within groups, group advantages, PPO-clip update through the
           engine) of a Qwen2 with Qwen2.5-0.5B's shape (896 wide, 24 layers, 14/2 heads,
           151,936 vocab, tied), built from a config (random weights), fp32 weights with bf16
           autocast and AdamW as `posttrain train` runs on CUDA.

`--cpu-smoke` runs all of it (but the pytest phase) at a tiny shape on the CPU in seconds; a
test in `make test` runs it so this script cannot rot. Needs torch and transformers only
(pytest for phase 1); optional packages travel as wheels (`make gpu-wheels`).

    python bench/gpu_check.py                     # on the GPU machine; writes bench/out/gpu_check.md
    python bench/gpu_check.py --cpu-smoke --out /tmp/gpu_check.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GiB = 2**30
FULL = dict(tokens=16384, vocab=151936, hidden=1536)
SMOKE = dict(tokens=64, vocab=512, hidden=32)
QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
QWEN_SMOKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)


class Device:
    """Timing and peak memory on CUDA (allocator statistics) or the CPU (process RSS)."""

    def __init__(self, name: str):
        import torch

        self.torch, self.name = torch, name
        self.cuda = name == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self):
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            self.base = _rss()
            self.peak_rss = self.base
        return time.perf_counter()

    def stop(self, t0: float) -> tuple[float, float]:
        """(seconds, peak bytes above what was allocated at start)."""
        self.sync()
        seconds = time.perf_counter() - t0
        if self.cuda:
            return seconds, self.torch.cuda.max_memory_allocated() - self.base
        return seconds, max(_rss(), self.peak_rss) - self.base

    def describe(self) -> str:
        if self.cuda:
            props = self.torch.cuda.get_device_properties(0)
            return f"{props.name}, {props.total_memory / GiB:.0f} GiB"
        return f"CPU, {os.cpu_count()} cores"


def _rss() -> int:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


# ---------------------------------------------------------------------------------------------
# 1. the tests

def run_tests(timeout: int) -> list[list[str]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "tests/test_losses.py"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [["tests", "tests/test_cuda.py tests/test_losses.py", f"timed out after {timeout} s", "", "", ""]]
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr.strip().splitlines()[-1:]
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    status = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    return [["tests", "tests/test_cuda.py tests/test_losses.py", f"{status}: {summary}",
             f"{time.perf_counter() - t0:.1f} s", "", ""]]


# ---------------------------------------------------------------------------------------------
# 2. the head

def head_cases(dev: Device, tokens: int, vocab: int, hidden: int, dtype):
    """name -> function(h, w, target) returning (loss, grad_h, grad_w), or the reason it cannot run."""
    import torch
    import torch.nn.functional as F

    from posttrain.losses import OBJECTIVES, head_loss

    def engine(chunk):
        def run(h, w, target):
            loss = head_loss(h, w, OBJECTIVES["sft"], None, {"target_ids": target}, chunk_tokens=chunk,
                             matmul_dtype=dtype)
            loss.backward()
            return loss
        return run

    def dense(h, w, target):
        loss = F.cross_entropy((h @ w.t()).float(), target, reduction="sum")
        loss.backward()
        return loss

    cases = {"posttrain engine (chunk: 160 MB buffer)": engine(None),
             "posttrain engine (chunk 4,096 tokens)": engine(min(4096, tokens)),
             "dense torch (bf16 logits → fp32 CE)": dense}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger_run(h, w, target):
            loss = liger(w, h, target)
            loss.backward()
            return loss
        cases["Liger fused linear CE"] = liger_run if dev.cuda else "needs CUDA (Triton)"
    except Exception as err:  # ImportError, or a Triton/torch mismatch at import
        cases["Liger fused linear CE"] = f"not installed ({type(err).__name__})"
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce_run(h, w, target):
            loss = linear_cross_entropy(h, w, target, reduction="sum")
            loss.backward()
            return loss
        cases["Apple cut-cross-entropy"] = cce_run if dev.cuda else "needs CUDA (Triton)"
    except Exception as err:
        cases["Apple cut-cross-entropy"] = f"not installed ({type(err).__name__})"
    return cases


def head_bench(dev: Device, shape: dict, rounds: int) -> list[list[str]]:
    import torch

    dtype = torch.bfloat16
    tokens, vocab, hidden = shape["tokens"], shape["vocab"], shape["hidden"]
    gen = torch.Generator(device=dev.name).manual_seed(0)
    h = (torch.randn(tokens, hidden, device=dev.name, generator=gen) * 0.5).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=dev.name, generator=gen) * 0.02).to(dtype).requires_grad_(True)
    target = torch.randint(vocab, (tokens,), device=dev.name, generator=gen)
    label = f"{tokens:,} tok × {vocab:,} vocab × {hidden:,} hidden, bf16"
    rows, reference = [], None
    for name, run in head_cases(dev, tokens, vocab, hidden, dtype).items():
        if isinstance(run, str):
            rows.append(["head", f"{name} ({label})", run, "", "", ""])
            continue
        try:
            times, peak = [], 0.0
            for i in range(rounds + 1):  # the first is a warm-up (kernels compile, caches fill)
                h.grad = w.grad = None
                t0 = dev.start()
                loss = run(h, w, target)
                seconds, used = dev.stop(t0)
                if i:
                    times.append(seconds)
                peak = max(peak, used)
            agreement = ""
            if reference is None:
                reference = (float(loss), h.grad.float().clone())
                agreement = "reference"
            else:
                loss_diff = abs(float(loss) - reference[0]) / abs(reference[0])
                grad_diff = float((h.grad.float() - reference[1]).norm() / reference[1].norm())
                agreement = f"loss rel. diff {loss_diff:.1e}, grad_h rel. diff {grad_diff:.1e}"
            rows.append(["head", f"{name} ({label})", "ok", f"{statistics.median(times) * 1e3:.1f} ms",
                         f"{peak / GiB:.2f} GiB", agreement])
        except Exception as err:
            traceback.print_exc()
            rows.append(["head", f"{name} ({label})", f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}",
                         "", "", ""])
        finally:
            h.grad = w.grad = None
            if dev.cuda:
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# 3. a 0.5B-shaped model: one SFT step, one GRPO step

def model_steps(dev: Device, shape: dict, batch: int, seq: int, prompts: int, group: int, new_tokens: int) -> list[list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from posttrain.losses import OBJECTIVES, head_loss
    from posttrain.losses.grpo import Params as GrpoParams
    from posttrain.losses.grpo import group_advantages

    torch.manual_seed(0)
    config = Qwen2Config(**shape, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dev.name)
    params = sum(p.numel() for p in model.parameters())
    label = (f"Qwen2 {params / 1e6:.0f}M ({shape['hidden_size']} wide, {shape['num_hidden_layers']} layers, "
             f"vocab {shape['vocab_size']:,})")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=dev.cuda)
    autocast = torch.autocast(dev.name, dtype=torch.bfloat16, enabled=dev.cuda)
    mm_dtype = torch.bfloat16 if dev.cuda else None
    decoder, head = model.get_decoder(), model.get_output_embeddings().weight

    def update(input_ids, mask, objective, params_, inputs):
        with autocast:
            hidden = decoder(input_ids=input_ids).last_hidden_state
        loss = head_loss(hidden[mask].float(), head, OBJECTIVES[objective], params_,
                         {k: v[mask] for k, v in inputs.items()}, matmul_dtype=mm_dtype) / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    rows = []
    # SFT: `batch` sequences of `seq` tokens, loss on the second half of each
    ids = torch.randint(3, shape["vocab_size"], (batch, seq + 1), device=dev.name)
    mask = torch.zeros(batch, seq, dtype=torch.bool, device=dev.name)
    mask[:, seq // 2:] = True
    for i in range(2):  # the first step is a warm-up (CUDA kernels, AdamW state allocation)
        t0 = dev.start()
        loss = update(ids[:, :-1], mask, "sft", None, {"target_ids": ids[:, 1:]})
        seconds, peak = dev.stop(t0)
    rows.append(["model", f"SFT step: {label}, {batch} × {seq} tokens, bf16 autocast, AdamW", f"ok (loss {loss:.3f})",
                 f"{seconds:.2f} s ({batch * seq / seconds:,.0f} tok/s)", f"{peak / GiB:.2f} GiB", "second step timed"])

    # GRPO: `prompts` prompts × `group` samples, generate, score π_old, synthetic reward, update
    t0 = dev.start()
    prompt_ids = torch.randint(3, shape["vocab_size"], (prompts, 32), device=dev.name)
    model.eval()
    with torch.no_grad(), autocast:
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             num_return_sequences=group, pad_token_id=0)
    model.train()
    t_gen = time.perf_counter() - t0
    inputs_BT, targets_BT = out[:, :-1], out[:, 1:]
    mask_BT = torch.zeros_like(targets_BT, dtype=torch.bool)
    mask_BT[:, prompt_ids.shape[1] - 1:] = True
    with torch.no_grad(), autocast:
        hidden = decoder(input_ids=inputs_BT).last_hidden_state.float()
    old_lp = torch.zeros(targets_BT.shape, device=dev.name)
    for b in range(hidden.shape[0]):  # one row at a time: [T, V] logits, not [B, T, V]
        logits = (hidden[b].to(head.dtype) @ head.detach().t()).float()
        old_lp[b] = logits.log_softmax(-1).gather(1, targets_BT[b, :, None])[:, 0]
    del hidden
    # reward 1 when a rollout's first sampled id is even: a fair coin per rollout, so groups differ
    reward_B = (out[:, prompt_ids.shape[1]] % 2 == 0).double()
    group_B = torch.arange(prompts, device=dev.name).repeat_interleave(group)
    advantage_B = group_advantages(reward_B, group_B, True, 1e-6).float()
    flat = sum(bool((reward_B[group_B == g] == reward_B[group_B == g][0]).all()) for g in range(prompts))
    inputs = {"target_ids": targets_BT, "old_logprob": old_lp, "advantage": advantage_B[:, None].expand_as(old_lp)}
    loss = update(inputs_BT, mask_BT, "grpo", GrpoParams(clip_high=0.28), inputs)
    seconds, peak = dev.stop(t0)
    rows.append(["model", f"GRPO step: {label}, {prompts} prompts × {group} samples × {new_tokens} new tokens "
                 f"(generate + score + update)", f"ok (loss {loss:.3f}, {flat} of {prompts} groups flat)",
                 f"{seconds:.2f} s (generate {t_gen:.2f} s)", f"{peak / GiB:.2f} GiB", "one step, not warmed up"])
    del model, optimizer
    if dev.cuda:
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------

def table(rows: list[list[str]], header: str) -> str:
    head = ["phase", "case", "result", "time", "peak memory", "note"]
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="Tiny shapes on the CPU, no pytest phase (seconds).")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu_check.md")
    parser.add_argument("--skip-tests", action="store_true", help="Leave out phase 1 (pytest).")
    parser.add_argument("--test-timeout", type=int, default=240)
    args = parser.parse_args()
    started = time.perf_counter()

    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --cpu-smoke for the CPU version", file=sys.stderr)
        return 2
    dev = Device("cpu" if smoke else "cuda")
    import transformers

    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("liger_kernel", "cut_cross_entropy", "triton"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception:
            versions.append(f"{name} not installed")
    header = (f"gpu_check{' --cpu-smoke' if smoke else ''} on {dev.describe()}; " + ", ".join(versions)
              + f"; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)

    rows: list[list[str]] = []
    phases = []
    if smoke or args.skip_tests:
        rows.append(["tests", "tests/test_cuda.py tests/test_losses.py", "skipped (--cpu-smoke / --skip-tests)", "", "", ""])
    else:
        phases.append(lambda: run_tests(args.test_timeout))
    phases.append(lambda: head_bench(dev, SMOKE if smoke else FULL, rounds=1 if smoke else 3))
    phases.append(lambda: model_steps(dev, QWEN_SMOKE if smoke else QWEN05, batch=2 if smoke else 8,
                                      seq=16 if smoke else 1024, prompts=2 if smoke else 8, group=4 if smoke else 8,
                                      new_tokens=8 if smoke else 256))
    failed = False
    for phase in phases:
        try:
            new = phase()
        except Exception as err:
            traceback.print_exc()
            new = [["?", "phase failed", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}", "", "", ""]]
        failed |= any(r[2].startswith(("FAILED", "failed", "timed out")) or r[1] == "phase failed" for r in new)
        rows += new
        for row in new:
            print(" | ".join(row), flush=True)
    text = table(rows, header) + f"\ntotal wall time {time.perf_counter() - started:.0f} s\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\n{text}\nwritten: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
