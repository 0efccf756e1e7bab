"""The built-in synthetic math task: step-by-step arithmetic with a \\boxed{} answer.

    problem:  Compute 23 + 45 - 12.
    prompt:   the problem + "\\nPlease reason step by step, and put your final answer within \\boxed{}."
              (exactly what `posttrain eval --prompt chat` sends, so recipes train on `prompt`)
    solution: 23 + 45 = 68. 68 - 12 = 56. The answer is \\boxed{56}.

Splits (a tiny model can learn the first two in minutes on a CPU; the third tests transfer):
  pretrain       2–4 numbers below 50: what the mini "base" model is pretrained on
  in_domain      3 numbers below 100: the fine-tuning / distillation task and its test set
  out_of_domain  4 numbers below 100: longer chains with the larger numbers (harder): only the
                 chain length was seen in pretraining, only the number range in fine-tuning
Running values never go below zero. Rows are a pure function of (split, index, seed).
"""

from __future__ import annotations

import random

from posttrain.eval.prompts import BOXED_INSTRUCTION

SPLITS = {
    "pretrain": {"operands": (2, 4), "max_value": 49},
    "in_domain": {"operands": (3, 3), "max_value": 99},
    "out_of_domain": {"operands": (4, 4), "max_value": 99},
}
DATA_SEED = 1234  # the default data seed of a recipe's synthetic section (config.SyntheticConfig.seed)
# Test sets use seeds far from any training seed, so train and test draws are independent.
TEST_SEED_OFFSET = 1_000_003


def make_row(rng: random.Random, split: str) -> dict:
    spec = SPLITS[split]
    count = rng.randint(*spec["operands"])
    value = rng.randint(0, spec["max_value"])
    terms = [str(value)]
    steps = []
    for _ in range(count - 1):
        operand = rng.randint(0, spec["max_value"])
        if rng.random() < 0.5 and operand <= value:
            result, op = value - operand, "-"
        else:
            result, op = value + operand, "+"
        steps.append(f"{value} {op} {operand} = {result}.")
        terms.append(f"{op} {operand}")
        value = result
    problem = f"Compute {' '.join(terms)}."
    solution = " ".join(steps) + f" The answer is \\boxed{{{value}}}."
    return {"problem": problem, "prompt": f"{problem}\n{BOXED_INSTRUCTION}", "solution": solution, "answer": str(value)}


def make_rows(split: str, num_examples: int, seed: int) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = random.Random(f"{split}:{seed}")
    return [make_row(rng, split) for _ in range(num_examples)]


def test_rows(split: str, num_examples: int = 500, seed: int = 0) -> list[dict]:
    """The evaluation set of a split (the benchmarks `synthetic` and `synthetic_ood`)."""
    return make_rows(split, num_examples, seed + TEST_SEED_OFFSET)


def tokenizer_corpus() -> list[str]:
    """Fixed text the tiny tokenizer is trained on: every split, both fields, and the prompt
    instruction, so the vocabulary covers everything the task and the eval prompts print."""
    texts = []
    for split in SPLITS:
        for row in make_rows(split, 2000, seed=0):
            texts.append(row["prompt"])
            texts.append(row["solution"])
    texts.append("You are a helpful assistant. system user assistant")
    return texts
