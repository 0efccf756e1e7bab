"""TRL's GRPOTrainer on the mini GRPO recipe's settings, side by side with `posttrain rl`: seconds per
on-policy step (one generation of 8 prompts × 8 samples, then its two updates), one torch thread each.

What is held equal (recipes/mini/grpo.yaml): the model (the mini base), the prompts (the same synthetic
rows, rendered by posttrain's own chat-template code, so both tokenise the same text), the reward
(posttrain's math grader, called from TRL's reward function: plain integers decided in TRL's process,
the rest in the grader's worker process, as for posttrain), 8 × 8 samples at temperature 1,
top_p 1, 96 new tokens, token-mean aggregation (TRL loss_type "dapo"), clip 0.2 / 0.28, no KL (beta 0),
lr 1e-4 constant, weight decay 0.01, grad clip 1.0, fp32, two updates of 32 rollouts per generation
(steps_per_generation 2, so TRL computes π_old with an extra forward, as posttrain does).
What is not: the prompts each draws (each shuffles its own way) and so the response lengths; the table
prints both lengths.

Needs a Python with trl==1.16.0 over the lock (`make bench-trl` builds .venv-trl and runs this):

    .venv-trl/bin/python bench/trl_grpo_bench.py --student runs/mini/base/final [--steps 12]
        [--before path/to/an/older/checkout]

Each round runs `posttrain rl` of each --before checkout (the "before" of a speed change: without
metrics timestamps, rl_bench.with_step_times falls back to shorter measures), TRL, then `posttrain rl` of this checkout, all with the same python; the table gives
each trainer's mean step and TRL's step ÷ its step paired within rounds (this machine's speed drifts
by ±5% between minutes). A step is the interval between the ends of two steps (everything in the loop:
TRL's logging, posttrain's metrics row and progress); steps 3..N are shown, as in rl_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # posttrain from this checkout, and rl_bench
from rl_bench import WARM_UP_STEPS, posttrain_step_times  # noqa: E402

RECIPE = REPO / "recipes" / "mini" / "grpo.yaml"


def prompt_rows(student: Path):
    """The GRPO recipe's prompts as posttrain renders them (text) and their gold answers."""
    from transformers import AutoTokenizer

    from posttrain.config import RLRecipe
    from posttrain.config.loader import load_recipe
    from posttrain.data.prompts import load_prompt_rows, tokenize_prompts

    recipe = load_recipe(RECIPE, RLRecipe, [f"student.path={student}"])
    tokenizer = AutoTokenizer.from_pretrained(student)
    rows = load_prompt_rows(recipe.prompts, graded=True)
    ids = tokenize_prompts(recipe.prompts, rows.fields, tokenizer, recipe.rollout.prompts_per_step)
    return [{"prompt": tokenizer.decode(p), "answer": gold} for p, gold in zip(ids, rows.golds) if p is not None]


class StepClock:
    """The end time of each generation cycle (`steps_per_generation` optimizer steps); seconds() are
    the intervals between them: steps 2..N, each whole (generation, reward, updates, logging)."""

    def __init__(self, per_cycle: int):
        self.per_cycle, self.marks = per_cycle, []

    def on_step_end(self, step: int) -> None:
        if step % self.per_cycle == 0:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def run_trl(student: Path, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.eval.math_grader import MathGrader

    grader = MathGrader(workers=1)

    def reward(completions, answer, **_):
        return [float(g["correct"]) for g in grader.grade(list(answer), list(completions))]

    clock, lengths = StepClock(2), []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.on_step_end(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    config = GRPOConfig(output_dir=str(out), use_cpu=True, seed=0, max_steps=2 * steps, per_device_train_batch_size=32,
                        gradient_accumulation_steps=1, steps_per_generation=2, num_generations=8,
                        max_completion_length=96, temperature=1.0, top_p=1.0, loss_type="dapo", beta=0.0,
                        epsilon=0.2, epsilon_high=0.28, learning_rate=1e-4, lr_scheduler_type="constant",
                        weight_decay=0.01, max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
                        bf16=False, disable_dropout=True, dataloader_num_workers=0)
    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(prompt_rows(student)), callbacks=[Clock()])
    try:
        trainer.train()
    finally:
        grader.close()
    seconds = clock.seconds()[WARM_UP_STEPS:]
    return {"step": (statistics.mean(seconds), min(seconds), max(seconds)), "steps": len(seconds),
            "response_length": statistics.mean(lengths) if lengths else float("nan")}


def one_round(student: Path, steps: int, before: list[Path], work: Path) -> list[tuple[str, dict]]:
    """Each --before checkout, TRL, this checkout, and this checkout with the sampler's log-probs as π_old
    (verl's bypass: no π_old forward; other numbers by rounding): (label, summary) in that order."""
    import trl

    rows = [(f"posttrain rl, {checkout}", posttrain_step_times("grpo", "hf", student, None, steps, work / f"before{i}",
                                                               sys.executable, checkout.absolute()))
            for i, checkout in enumerate(before)]
    rows.append((f"TRL {trl.__version__} GRPOTrainer", run_trl(student, steps, work / "trl")))
    rows.append(("posttrain rl, this checkout", posttrain_step_times("grpo", "hf", student, None, steps, work / "after",
                                                                     sys.executable)))
    rows.append(("posttrain rl, this checkout, rollout.old_logprob: sampler", posttrain_step_times(
        "grpo", "hf", student, None, steps, work / "sampler", sys.executable, extra=("rollout.old_logprob=sampler",))))
    return rows


def table(rounds: list[list[tuple[str, dict]]], steps: int, student: Path) -> Table:
    """Per trainer: the mean step over rounds (each round's mean over its steps) and TRL's step ÷ its
    step, paired within each round (machine speed drifts between rounds more than within one)."""
    trl_index = next(i for i, (label, _) in enumerate(rounds[0]) if label.startswith("TRL"))
    out = Table(title=f"GRPO step, seconds: {len(rounds)} rounds × steps {WARM_UP_STEPS + 2}..{steps}, one torch thread, "
                      f"{student}")
    for column in ("trainer", "step s, mean (round means)", "response length", "TRL ÷ this, mean (min–max over rounds)"):
        out.add_column(column, justify="left" if column == "trainer" else "right")
    for index, (label, _) in enumerate(rounds[0]):
        means = [r[index][1]["step"][0] for r in rounds]
        ratios = [r[trl_index][1]["step"][0] / r[index][1]["step"][0] for r in rounds]
        out.add_row(label, f"{statistics.mean(means):.3f} ({', '.join(f'{m:.3f}' for m in means)})",
                    f"{statistics.mean(r[index][1]['response_length'] for r in rounds):.1f}",
                    f"{statistics.mean(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3, help="each trainer once per round, in turn")
    parser.add_argument("--before", type=Path, action="append", default=[], help="an older checkout to time too")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "trl_grpo_bench.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    student, rounds = args.student.absolute(), []
    with tempfile.TemporaryDirectory(prefix="trl_bench_") as tmp:
        for index in range(args.rounds):
            rounds.append(one_round(student, args.steps, args.before, Path(tmp) / f"round{index}"))
    Console(width=200).print(table(rounds, args.steps, args.student))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "warm_up_steps": WARM_UP_STEPS,
                                    "rounds": [[{"trainer": label, **result} for label, result in r] for r in rounds]},
                                   indent=1))


if __name__ == "__main__":
    main()
