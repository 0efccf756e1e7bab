"""Evaluation metrics over a problems × samples table of verdicts.

  avg@k   mean over the k sample columns of each column's accuracy (the DFT paper's Average@16);
          equals pass@1 estimated from k samples. With unequal sample counts: mean over problems
          of each problem's accuracy.
  std     standard deviation of the k column accuracies (how much one run of the benchmark varies)
  pass@k  unbiased estimator 1 − C(n−c, k)/C(n, k), averaged over problems, for k ≤ n
  maj@k   majority vote over the k extracted answers (math): correct if the most common answer is
"""

from __future__ import annotations

import statistics
from collections import Counter


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if n - c < k:
        return 1.0
    result = 1.0
    for i in range(n - c + 1, n + 1):  # stable product form of C(n−c, k) / C(n, k)
        result *= 1.0 - k / i
    return 1.0 - result


def summarize(verdicts: list[list[bool]], answers: list[list[str | None]] | None = None) -> dict:
    """verdicts[i][j]: sample j of problem i is correct. answers: extracted answers (for maj@k)."""
    if not verdicts:
        return {}
    counts = [len(v) for v in verdicts]
    k = min(counts)
    out = {"problems": len(verdicts), "samples_per_problem": k}
    out[f"avg@{k}"] = 100.0 * statistics.fmean(sum(v) / len(v) for v in verdicts)
    if k > 1 and len(set(counts)) == 1:
        columns = [100.0 * statistics.fmean(v[j] for v in verdicts) for j in range(k)]
        out["std_over_samples"] = statistics.stdev(columns)
    for kk in _powers_of_two_upto(k):
        out[f"pass@{kk}"] = 100.0 * statistics.fmean(pass_at_k(len(v), sum(v), kk) for v in verdicts)
    if answers is not None and k > 1:
        out[f"maj@{k}"] = 100.0 * statistics.fmean(_majority_correct(v, a) for v, a in zip(verdicts, answers))
    return out


def _majority_correct(verdicts: list[bool], answers: list[str | None]) -> bool:
    from posttrain.eval.math_grader import clean_answer  # `5.`, `$5$` and ` 5 ` are one vote (graded alike)

    voted = [(clean_answer(a), ok) for a, ok in zip(answers, verdicts) if a is not None]
    if not voted:
        return False
    winner, _ = Counter(a for a, _ in voted).most_common(1)[0]
    return next(ok for a, ok in voted if a == winner)  # equal answers share a verdict


def _powers_of_two_upto(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks + ([n] if ks[-1] != n else [])
