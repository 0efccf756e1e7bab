"""The papers' claims that the mini set can test, each with its test fixed in advance, and their verdicts.

Written down before the runs they judge (the README repeats them): changing a claim, its margin or its
test after seeing an outcome is exactly what this table exists to prevent.

Every claim compares two variants (run-folder names without `-seed<N>`; `base` and `teacher` are the
single runs the others start from) on the tables' `average` (mean of the benchmarks' avg@k), and is
judged on the bootstrap distribution of the difference A − B (posttrain/stats.py: seeds and problems
resampled, problems paired):
- "A > B": two-sided bootstrap p-value of A − B = 0, Holm-adjusted over all the claims tested in one
  report. reproduced: adjusted p < 0.05 and A − B > 0; contradicted: adjusted p < 0.05 and A − B < 0;
  inconclusive otherwise.
- "A ≈ B (not worse by more than m points)": non-inferiority, one-sided p of A − B ≤ −m, Holm-adjusted.
  reproduced: adjusted p < 0.05; contradicted: the whole interval lies below −m; inconclusive otherwise.
The smallest detectable difference is (z_{1−α/(2n)} + z_{0.8}) × the bootstrap standard error, at the
Bonferroni level for n claims (the strictest step of Holm's procedure): a true difference this large
would be declared with 80% probability; a smaller one may be called inconclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from posttrain.stats import CONFIDENCE, holm, interval, p_one_sided_above, p_two_sided, smallest_detectable

REPRODUCED, CONTRADICTED, INCONCLUSIVE, NOT_RUN = "reproduced", "contradicted", "inconclusive", "not run"
UNTESTABLE = "untestable"  # the testbed check the claim presupposes was not reproduced
ALPHA = 1 - CONFIDENCE


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the claim as the paper makes it
    source: str
    a: str  # variant
    b: str  # variant
    margin: float | None = None  # None: "A > B"; a number: "A is not worse than B by more than margin points"
    requires: str | None = None  # a testbed check this claim presupposes (a distillation claim: a better teacher)


# The distillation claims presuppose a teacher better than its student (the testbed check below; added
# on 2026-12-05, when a teacher 35 points below its student made "distillation improves the student"
# read as contradicted): where that check is not reproduced their verdict is "untestable", their
# difference and p-value still printed, and they stay in the Holm family fixed below.
TEACHER_CHECK = "teacher>student"

# Fixed on 2026-12-04 before the mini reproduction that first reported them (see the README).
CLAIMS = [
    Claim("sft>base", "SFT improves on the base model", "DFT Table 1 (15.92 → 18.01)", "sft", "base"),
    Claim("dft>base", "DFT improves on the base model", "DFT Table 1 (15.92 → 31.58)", "dft", "base"),
    Claim("dft>sft", "DFT beats SFT on the same data", "DFT Table 1 (31.58 vs 18.01)", "dft", "sft"),
    Claim("otr>sft", "OTR beats SFT on the same data", "OTR headline (SFT + 1.24)", "otr", "sft"),
    Claim("otr>otr-beta0", "OTR with β = −0.1 beats β = 0", "OTR (β = 0 \"almost always worse\")", "otr", "otr-beta0"),
    Claim("opd>student", "on-policy distillation improves the student", "LSM table (28.2 → 36.4)", "opd", "base",
          requires=TEACHER_CHECK),
    Claim("lsm>opd", "LSM beats sampled-token OPD", "LSM table (41.7 vs 36.4)", "lsm", "opd", requires=TEACHER_CHECK),
    Claim("opd-mask>opd", "masking the first tokens helps OPD", "LSM table (40.7 vs 36.4)", "opd-mask", "opd",
          requires=TEACHER_CHECK),
    Claim("lsm-norenorm<student", "LSM without renormalisation collapses (ends below its start)",
          "LSM ablations (collapse within ~100 steps)", "base", "lsm-norenorm", requires=TEACHER_CHECK),
    Claim("lsm-student-topk≈lsm", "student top-K support is competitive with teacher top-K (single task)",
          "LSM ablations", "lsm-student-topk", "lsm", margin=2.0, requires=TEACHER_CHECK),
    Claim("dft-rft>rft", "DFT beats SFT on the model's own correct samples (RFT)", "DFT Table 2 (35.43 vs 23.97)",
          "dft-rft", "rft"),
    Claim("dft-rft>grpo", "DFT on RFT data beats GRPO", "DFT Table 2 (35.43 vs 32.00)", "dft-rft", "grpo"),
    Claim("grpo>rft", "GRPO beats RFT", "DFT Table 2 (32.00 vs 23.97)", "grpo", "rft"),
    # Fixed on 2026-12-05, before the first DPO and PPO runs of the mini set existed.
    Claim("dft-rft>ppo", "DFT on RFT data beats PPO", "DFT Table 2 (35.43 vs 28.66)", "dft-rft", "ppo"),
    Claim("dft-rft>dpo", "DFT on RFT data beats DPO", "DFT Table 2 (35.43 vs 23.20)", "dft-rft", "dpo"),
]

# Checks of the testbed, not of a paper: tested the same way, outside the claims' Holm family.
TESTBED_CHECKS = [
    Claim(TEACHER_CHECK, "the teacher is better than the student it distils into", "testbed", "teacher", "base"),
]


@dataclass
class Verdict:
    claim: Claim
    difference: float | None = None  # A − B, points
    low: float | None = None
    high: float | None = None
    p: float | None = None  # raw
    p_adjusted: float | None = None  # Holm over the family
    detectable: float | None = None  # smallest detectable difference, points
    verdict: str = NOT_RUN
    seeds: tuple[int, int] = (0, 0)


def judge(claims: list[Claim], point: dict[str, float], draws: dict[str, np.ndarray], seeds: dict[str, int]) -> list[Verdict]:
    """Verdicts for `claims` from each variant's cell value and bootstrap draws (stats.bootstrap)."""
    verdicts, tested = [], []
    for claim in claims:
        verdict = Verdict(claim)
        if claim.a in draws and claim.b in draws:
            diff = draws[claim.a] - draws[claim.b]
            span = interval(point[claim.a] - point[claim.b], diff)
            verdict.difference, verdict.low, verdict.high = span.mean, span.low, span.high
            verdict.p = p_two_sided(diff) if claim.margin is None else p_one_sided_above(diff, -claim.margin)
            verdict.detectable = smallest_detectable(span.se, alpha=ALPHA / max(1, len(claims)))
            verdict.seeds = (seeds[claim.a], seeds[claim.b])
            tested.append(verdict)
        verdicts.append(verdict)
    for verdict, adjusted in zip(tested, holm([v.p for v in tested])):
        verdict.p_adjusted = adjusted
        verdict.verdict = _decide(verdict)
    return verdicts


def apply_preconditions(verdicts: list[Verdict], checks: list[Verdict]) -> None:
    """A claim whose testbed check was run and not reproduced becomes UNTESTABLE (in place)."""
    failed = {check.claim.key for check in checks if check.verdict not in (REPRODUCED, NOT_RUN)}
    for verdict in verdicts:
        if verdict.claim.requires in failed and verdict.verdict != NOT_RUN:
            verdict.verdict = UNTESTABLE


def _decide(v: Verdict) -> str:
    if v.detectable == 0:
        # the bootstrap difference has no spread (every score identical, e.g. both variants at 0% on
        # every problem): it cannot estimate the noise, so no test can be decided on it
        return INCONCLUSIVE
    if v.claim.margin is not None:
        if v.p_adjusted < ALPHA:
            return REPRODUCED
        return CONTRADICTED if v.high < -v.claim.margin else INCONCLUSIVE
    if v.p_adjusted >= ALPHA:
        return INCONCLUSIVE
    return REPRODUCED if v.difference > 0 else CONTRADICTED


def markdown(verdicts: list[Verdict], title: str) -> str:
    lines = [f"### {title}", "",
             "Each claim's test was fixed before the runs (posttrain/claims.py). Difference = A − B in points of the "
             "average accuracy, with its 95% bootstrap interval (seeds × problems); p: two-sided (non-inferiority: "
             "one-sided) bootstrap p-value, Holm-adjusted over the claims of this table; detectable: the smallest true "
             "difference the test finds with 80% probability (0: the scores do not vary, so the bootstrap cannot "
             "estimate the noise and the claim is inconclusive). untestable: the testbed check the claim presupposes "
             "(a teacher better than its student) was not reproduced.", "",
             "| claim | source | A | B | seeds A/B | A − B [95% CI] | p (Holm) | detectable | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        c = v.claim
        a_b = f"{c.a} | {c.b}"
        text = c.text + (f" (margin {c.margin:g} points)" if c.margin is not None else "")
        if v.verdict == NOT_RUN:
            lines.append(f"| {text} | {c.source} | {a_b} | – | – | – | – | **{NOT_RUN}** |")
            continue
        lines.append(f"| {text} | {c.source} | {a_b} | {v.seeds[0]}/{v.seeds[1]} | "
                     f"{v.difference:+.1f} [{v.low:+.1f}, {v.high:+.1f}] | {v.p:.3g} ({v.p_adjusted:.3g}) | "
                     f"{v.detectable:.1f} | **{v.verdict}** |")
    return "\n".join(lines)


def summary(verdicts: list[Verdict]) -> list[dict]:
    return [{"claim": v.claim.key, "text": v.claim.text, "a": v.claim.a, "b": v.claim.b, "margin": v.claim.margin,
             "difference": v.difference, "ci95": [v.low, v.high], "p": v.p, "p_holm": v.p_adjusted,
             "detectable": v.detectable, "seeds": list(v.seeds), "verdict": v.verdict} for v in verdicts]
