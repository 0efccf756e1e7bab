"""Grading throughput: math (math-verify in worker processes) and code (the sandbox).

Math: 500 MATH500 problems × 16 samples = 8,000 completions, graded twice:
  realistic   per problem: the right answer, an equivalent rewrite of it, 3 wrong answers and a
              missing box, repeated across the 16 samples as a model's samples repeat
  worst case  16 different answers per problem (every (gold, answer) pair is new: no cache hits)
Code: HumanEval canonical solutions (164 programs), each in its own sandbox (bubblewrap +
seccomp when available) answering calls from its own checker process.

    python bench/grading_bench.py --data-dir ../shared/benchmarks [--workers 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from pathlib import Path

from posttrain.eval.benchmarks import load_benchmark
from posttrain.eval.code_sandbox import CodeSandbox, assemble_program
from posttrain.eval.math_grader import MathGrader


def math_workloads(rows, golds) -> dict[str, list[str]]:
    rng = random.Random(0)
    others = list(golds)
    realistic, worst = [], []
    for gold in golds:
        wrong = rng.sample(others, 3)
        pool = [f"So the answer is \\boxed{{{gold}}}.", f"We get $\\boxed{{{gold} }}$", "I cannot finish this."]
        pool += [f"The answer is \\boxed{{{w}}}." for w in wrong]
        realistic += [pool[rng.randrange(len(pool))] for _ in range(16)]
        worst += [f"\\boxed{{{w}}}" for w in rng.sample(others, 15)] + [f"\\boxed{{{gold}}}"]
    return {"realistic": realistic, "worst case (no repeats)": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    bench = load_benchmark("math500", args.data_dir, None)
    golds = [bench.spec.gold(r) for r in bench.rows]
    print(f"\nGrading throughput, {args.workers} worker processes")
    print("| workload | samples | seconds | samples/s |")
    print("|---|---:|---:|---:|")
    for name, completions in math_workloads(bench.rows, golds).items():
        with MathGrader(args.workers) as grader:  # a fresh cache and fresh workers per workload
            start = time.perf_counter()
            grader.grade([g for g in golds for _ in range(16)], completions)
            seconds = time.perf_counter() - start
        print(f"| MATH500 500 × 16, {name} | {len(completions):,} | {seconds:.1f} | {len(completions) / seconds:,.0f} |")

    rows = [json.loads(line) for line in gzip.open(Path(args.data_dir) / "humaneval.jsonl.gz", "rt")]
    programs = [assemble_program(r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]) for r in rows]
    sandbox = CodeSandbox(args.workers, allow_weak=True)  # a speed measurement: the isolation it ran under is printed
    start = time.perf_counter()
    verdicts = sandbox.run_many(programs)
    seconds = time.perf_counter() - start
    passed = sum(v["passed"] for v in verdicts)
    print(f"| HumanEval canonical ({passed}/{len(rows)} pass), {sandbox.isolation} | {len(rows)} | {seconds:.1f} "
          f"| {len(rows) / seconds:,.1f} |")


if __name__ == "__main__":
    main()
