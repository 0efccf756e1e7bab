"""Which answer a math completion is graded on (`--extract`), and `--cross-check`.

  boxed        posttrain's default: the last \\boxed{} after removing <think>…</think> (an unclosed
               <think> means no answer), compared by math-verify (math_grader.py)
  after-think  the LSM authors' eval (revisiting_opd, math_reward.py): the text after the first
               </think> (up to a second one, as their split("</think>")[1] does; the whole
               response when there is none), its last \\boxed{}, compared by math-verify
               (their own comparison is a Hendrycks-normalised string match or sympy)
  harness      the DFT authors' eval (their fork of the Qwen2.5-Math harness): last boxed, else
               "the answer is", else the last number, compared by its own rules
               (harness_grader.py)

`--cross-check` grades the samples of an eval both ways — math-verify (with --extract, or boxed
when --extract is harness) and harness-style — and lists every sample on which they disagree, so
a difference between two evals can be told apart from a difference between two graders.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.eval.benchmarks import last_boxed
from posttrain.runfolder import read_jsonl, write_text_atomic

EXTRACT_MODES = ("boxed", "after-think", "harness")


def after_first_think(completion: str) -> str:
    """The part the LSM authors' eval grades: what follows the first </think>, up to a second one."""
    return completion.split("</think>")[1] if "</think>" in completion else completion


class AfterThinkGrader:
    """math-verify on the last \\boxed{} of `after_first_think(completion)`."""

    def __init__(self, workers: int):
        from posttrain.eval.math_grader import MathGrader

        self.math_grader = MathGrader(workers)

    def grade(self, golds: list[str], completions: list[str]) -> list[dict]:
        answers = [last_boxed(after_first_think(c)) for c in completions]
        # MathGrader reads the last box of what it is given: hand it just the answer, boxed.
        verdicts = self.math_grader.grade(golds, ["" if a is None else "\\boxed{" + a + "}" for a in answers])
        return [{**v, "extracted": a, **({"error": "no \\boxed{} answer after the first </think>"} if a is None else {})}
                for a, v in zip(answers, verdicts)]

    def close(self):
        self.math_grader.close()


def make_math_grader(extract: str, workers: int):
    """A grader with `grade(golds, completions) -> [{extracted, correct, error}]` and `close()`."""
    if extract == "after-think":
        return AfterThinkGrader(workers)
    if extract == "harness":
        from posttrain.eval.harness_grader import HarnessGrader

        return HarnessGrader(workers)
    from posttrain.eval.math_grader import MathGrader

    return MathGrader(workers)


def cross_check(out: Path, benchmarks: list, extract: str, workers: int) -> dict:
    """Grade `out/samples.jsonl` with math-verify and harness-style; write the disagreements to
    `out/cross_check.jsonl` and return counts per benchmark."""
    mathverify_mode = "boxed" if extract == "harness" else extract
    by_benchmark: dict[str, list[dict]] = {}
    sizes = {b.spec.name: len(b.rows) for b in benchmarks if b.spec.kind == "math"}
    for record in read_jsonl(out / "samples.jsonl"):
        if record["benchmark"] in sizes and record["index"] < sizes[record["benchmark"]]:
            by_benchmark.setdefault(record["benchmark"], []).append(record)
    summary, lines = {}, []
    graders = make_math_grader(mathverify_mode, workers), make_math_grader("harness", workers)
    try:
        for name, records in by_benchmark.items():
            records.sort(key=lambda r: (r["index"], r["sample"]))
            golds, completions = [r["gold"] for r in records], [r["completion"] for r in records]
            mathverify, harness = (grader.grade(golds, completions) for grader in graders)
            disagree = [(r, m, h) for r, m, h in zip(records, mathverify, harness) if bool(m["correct"]) != bool(h["correct"])]
            summary[name] = {
                "samples": len(records),
                f"accuracy_mathverify_{mathverify_mode}": 100 * sum(bool(m["correct"]) for m in mathverify) / len(records),
                "accuracy_harness": 100 * sum(bool(h["correct"]) for h in harness) / len(records),
                "disagreements": len(disagree),
                "only_mathverify_correct": sum(bool(m["correct"]) for _, m, _ in disagree),
                "only_harness_correct": sum(bool(h["correct"]) for _, _, h in disagree),
            }
            lines += [{"benchmark": name, "index": r["index"], "sample": r["sample"], "gold": r["gold"],
                       "mathverify_extracted": m["extracted"], "mathverify_correct": bool(m["correct"]),
                       "harness_extracted": h["extracted"], "harness_correct": bool(h["correct"]),
                       "cause": "extraction" if m["extracted"] != h["extracted"] else "equivalence"}
                      for r, m, h in disagree]
    finally:
        for grader in graders:
            grader.close()
    write_text_atomic(out / "cross_check.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    return {"mathverify_extract": mathverify_mode, "file": str(out / "cross_check.jsonl"), "benchmarks": summary}
