"""Math grading: last \\boxed{} of the output (after any <think>…</think>), compared with the
gold answer by math-verify (gold first), in worker processes with a hard timeout per item.

Extraction happens here in the parent, so identical (gold, answer) pairs — common with 16
samples per problem — are verified once.
"""

from __future__ import annotations

from functools import lru_cache

from posttrain.eval.benchmarks import last_boxed, strip_think
from posttrain.eval.pool import TimeoutPool

VERIFY_TIMEOUT = 5  # math-verify's own (signal-based) limit inside the worker, seconds
HARD_TIMEOUT = 20  # the worker is killed after this, seconds


def extract_answer(completion: str) -> str | None:
    return last_boxed(strip_think(completion))


@lru_cache(maxsize=4096)
def _parse(expression: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(f"${expression}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=VERIFY_TIMEOUT)


def verify_pair(pair: tuple[str, str]) -> dict:
    """Runs in a worker: is `answer` equivalent to `gold`? (gold first, as math-verify wants)."""
    from math_verify import verify

    gold, answer = pair
    gold_parsed, answer_parsed = _parse(gold), _parse(answer)
    if not gold_parsed:
        return {"correct": False, "error": f"gold answer not parseable: {gold!r}"}
    return {"correct": bool(verify(gold_parsed, answer_parsed, timeout_seconds=VERIFY_TIMEOUT)), "error": None}


class MathGrader:
    def __init__(self, workers: int = 2):
        self.pool = TimeoutPool(verify_pair, workers, HARD_TIMEOUT, on_timeout={"correct": False, "error": "timeout"})
        self.cache: dict[tuple[str, str], dict] = {}

    def grade(self, golds: list[str], completions: list[str]) -> list[dict]:
        """One dict per completion: extracted, correct, error."""
        answers = [extract_answer(c) for c in completions]
        todo = sorted({(g, a) for g, a in zip(golds, answers) if a is not None and (g, a) not in self.cache})
        for pair, result in zip(todo, self.pool.map(todo)):
            self.cache[pair] = result
        out = []
        for gold, answer in zip(golds, answers):
            if answer is None:
                out.append({"extracted": None, "correct": False, "error": "no \\boxed{} answer"})
            else:
                out.append({"extracted": answer, **self.cache[(gold, answer)]})
        return out

    def close(self):
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
