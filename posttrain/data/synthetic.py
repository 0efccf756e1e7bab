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

Test sets: the first TEST_SIZE draws of in_domain and out_of_domain under the test seed (the
benchmarks `synthetic` and `synthetic_ood`). Training rows never equal a test problem: the
training generator draws from its own seeded stream and skips any problem whose text (normalised,
benchmarks.problem_key) is in either whole test split, so every row before the first skipped draw
is the row the stream always gave, and the rows after it are the next draws.
"""

from __future__ import annotations

import functools
import random

from posttrain.data.templates import BOXED_INSTRUCTION

SPLITS = {
    "pretrain": {"operands": (2, 4), "max_value": 49},
    "in_domain": {"operands": (3, 3), "max_value": 99},
    "out_of_domain": {"operands": (4, 4), "max_value": 99},
    # the mini teacher's: every chain length (2–4) over the whole range, so that it is better than the
    # student out of domain too (4 numbers below 100; never the test problems themselves: see below)
    "teacher": {"operands": (2, 4), "max_value": 99},
    # the mini base's: the pretrain split, with a share of rows over the whole range, so that the base
    # has partial, uncertain competence on the fine-tuning task (its samples differ: RL has signal)
    "pretrain_wide": {"operands": (2, 4), "max_value": 49, "wide": (0.03, 99)},
}
TOKENIZER_SPLITS = ("pretrain", "in_domain", "out_of_domain")
DATA_SEED = 1234  # the default data seed of a recipe's synthetic section (config.SyntheticConfig.seed)
# Test sets use seeds far from any training seed, so train and test draws are independent.
TEST_SEED_OFFSET = 1_000_003
TEST_SIZE = 500  # problems in each test split; the evals' --limit takes the first N of them
TEST_SPLITS = ("in_domain", "out_of_domain")  # the splits with a test set (synthetic, synthetic_ood)


def make_row(rng: random.Random, split: str) -> dict:
    spec = SPLITS[split]
    count = rng.randint(*spec["operands"])
    max_value = spec["max_value"]
    if "wide" in spec and rng.random() < spec["wide"][0]:  # (no extra draw for the other splits: their rows stay)
        max_value = spec["wide"][1]
    value = rng.randint(0, max_value)
    terms = [str(value)]
    steps = []
    for _ in range(count - 1):
        operand = rng.randint(0, max_value)
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
    """`num_examples` training rows of `split`: the seeded stream of draws, less every draw that
    is a problem of a test split (see the module docstring)."""
    rng = _stream(split, seed)
    tests = test_problem_keys()
    rows = []
    while len(rows) < num_examples:
        row = make_row(rng, split)
        if _key(row["problem"]) not in tests:
            rows.append(row)
    return rows


def test_rows(split: str) -> list[dict]:
    """The whole evaluation set of a split (the benchmarks `synthetic` and `synthetic_ood`)."""
    if split not in TEST_SPLITS:
        raise ValueError(f"synthetic split {split!r} has no test set; allowed: {', '.join(TEST_SPLITS)}")
    rng = _stream(split, TEST_SEED_OFFSET)
    return [make_row(rng, split) for _ in range(TEST_SIZE)]


@functools.cache
def test_problem_keys() -> frozenset[str]:
    """The normalised problems (benchmarks.problem_key) of every test split."""
    return frozenset(_key(row["problem"]) for split in TEST_SPLITS for row in test_rows(split))


def _key(problem: str) -> str:
    from posttrain.data.problems import problem_key

    return problem_key(problem)


def _stream(split: str, seed: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; allowed: {', '.join(SPLITS)}")
    return random.Random(f"{split}:{seed}")


def _raw_rows(split: str, num_examples: int, seed: int) -> list[dict]:
    """The stream's draws as they come (no test problem skipped): only the tokenizer's corpus,
    which must stay what every saved tiny tokenizer was trained on."""
    rng = _stream(split, seed)
    return [make_row(rng, split) for _ in range(num_examples)]


def tokenizer_corpus() -> list[str]:
    """Fixed text the tiny tokenizer is trained on: every split, both fields, and the prompt
    instruction, so the vocabulary covers everything the task and the eval prompts print. (Text
    for the BPE merges only, no model trains on it; kept as it always was, so tokenizers match.)"""
    texts = []
    for split in TOKENIZER_SPLITS:  # not "teacher": its text is the other splits' (and the merges must not move)
        for row in _raw_rows(split, 2000, seed=0):
            texts.append(row["prompt"])
            texts.append(row["solution"])
    texts.append("You are a helpful assistant. system user assistant")
    return texts
