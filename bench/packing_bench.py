"""Training tokens/s with and without sequence packing (train.packing), on the same examples.

The same tiny model and examples, three ways to cut them into micro-batches: by count in data
order (train.micro_batch_size 16, the default), by a padded-token budget (train.micro_batch_tokens,
length-sorted) and packed best-fit rows with the same budget (train.packing). One side's
forward+backward over all micro-batches is one measurement; rounds alternate the sides' order.
tokens/s counts real (non-padding) input tokens, as the train loop's `tokens_per_s` does.

    python bench/packing_bench.py                      # ~30 s on 2 idle cores
    python bench/packing_bench.py --examples 512 --budget 2048 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from posttrain.config import DataConfig, SyntheticConfig, TinyModelConfig
from posttrain.data.packing import best_fit, collate_packed
from posttrain.data.sft import build_examples, collate, load_rows, micro_batches
from posttrain.losses import OBJECTIVES
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.policy import PolicyLoss


def one_pass(policy, batches) -> float:
    started = time.perf_counter()
    tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    for batch in batches:
        (policy(batch) / tokens).backward()
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--budget", type=int, default=1024, help="input tokens per micro-batch (train.micro_batch_tokens)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("POSTTRAIN_THREADS", "2")))

    tokenizer = build_tiny_tokenizer(384)
    model = build_tiny_model(TinyModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                             intermediate_size=384), len(tokenizer), seed=0)
    policy = PolicyLoss(model, OBJECTIVES["sft"], OBJECTIVES["sft"].Params())
    # the synthetic task's splits differ in length: a mix gives a realistic spread of lengths
    rows = [row for split in ("pretrain", "in_domain", "out_of_domain")
            for row in load_rows("synthetic", "train", SyntheticConfig(split=split, num_examples=args.examples // 3),
                                 None, "data.source")]
    examples, _ = build_examples(rows, tokenizer, DataConfig(max_length=512))
    random.Random(0).shuffle(examples)  # training visits examples in a shuffled order
    lengths = sorted(len(e) - 1 for e in examples)
    real_tokens = sum(lengths)
    by_count = [collate(group, tokenizer.pad_token_id) for group in micro_batches(examples, 16, None)]
    padded = [collate(group, tokenizer.pad_token_id) for group in micro_batches(examples, 16, args.budget)]
    packed = [collate_packed(group, tokenizer.pad_token_id) for group in best_fit(examples, args.budget)]
    # by-count: train.micro_batch_size 16 in data order (the default micro-batching); padded:
    # train.micro_batch_tokens (length-sorted); packed: train.packing with the same budget
    sides = {"by-count": by_count, "padded": padded, "packed": packed}
    seconds = {name: [] for name in sides}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name in (list(sides) if round_index % 2 else list(reversed(sides))):
            elapsed = one_pass(policy, sides[name])
            if round_index:
                seconds[name].append(elapsed)

    print(f"{len(examples)} examples, input lengths {lengths[0]}..{lengths[-1]} (median {lengths[len(lengths) // 2]}), "
          f"{real_tokens} real tokens; budget {args.budget} input tokens per micro-batch; "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':9} {'micro-batches':>13} {'computed tokens':>16} {'padding':>8} {'median s':>9} {'tokens/s':>9}")
    for name, batches in sides.items():
        computed = sum(b["input_ids"].numel() for b in batches)
        median = statistics.median(seconds[name])
        print(f"{name:9} {len(batches):>13} {computed:>16} {1 - real_tokens / computed:>8.1%} {median:>9.2f} "
              f"{real_tokens / median:>9.0f}")
    for other in ("by-count", "padded"):
        speedup = statistics.median(seconds[other]) / statistics.median(seconds["packed"])
        print(f"packing: {speedup:.2f}x the tokens/s of {other}")


if __name__ == "__main__":
    main()
