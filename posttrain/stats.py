"""Confidence intervals and tests for the comparison tables: a two-way bootstrap over seeds and problems.

A table cell is a variant's accuracy: the mean over its seeds (evaluated runs) of the mean over the
benchmarks of the mean over problems of the per-problem accuracy (the share of its k samples graded
correct). Two sources of noise move it, and one interval has to cover both:
- seeds: another training run of the same recipe is another model;
- evaluation: the test problems are a sample of the task, and each problem's k samples are draws.
Each bootstrap replicate therefore draws the seeds of every variant with replacement (independently
per variant) and the problems of every benchmark with replacement (one draw of problem indices shared
by every variant, because all variants are graded on the same problems: differences are paired by
problem). The k samples of a problem are kept as they are: their noise is already in the per-problem
accuracy, which the problem resampling carries.

With 3 seeds, resampling seeds understates the seed spread by a factor (n−1)/n in variance; the
intervals are percentile intervals at 95% and say so. A single-run row (the base, the teacher) has
no seed spread to draw: its interval covers evaluation noise only, which the tables say.

Shapes: `scores_SP` is one benchmark's per-problem accuracy of one variant, seeds × problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

BOOTSTRAP_REPLICATES = 4000
CONFIDENCE = 0.95
POWER = 0.80  # for the smallest detectable difference
BOOTSTRAP_SEED = 20_260_101  # fixed: the same run folders give the same intervals


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    se: float  # bootstrap standard error

    def text(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _replicates(variant_BSP: dict[str, list[np.ndarray]], rng: np.random.Generator, replicates: int) -> dict[str, np.ndarray]:
    """variant -> [replicates] bootstrap draws of its cell value (percent), paired problems across variants.

    variant_BSP[variant][b] holds benchmark b's seeds × problems accuracy; every variant has the
    same benchmarks with the same problem count per benchmark."""
    first = next(iter(variant_BSP.values()))
    problem_draws = [rng.integers(0, scores_SP.shape[1], size=(replicates, scores_SP.shape[1])) for scores_SP in first]
    out = {}
    for variant, benches in variant_BSP.items():
        seeds = benches[0].shape[0]
        seed_draws_RS = rng.integers(0, seeds, size=(replicates, seeds))
        per_bench = []
        for scores_SP, draws_RP in zip(benches, problem_draws):
            # mean over the drawn problems for every seed, then over the drawn seeds
            per_seed_RS = scores_SP[:, draws_RP].mean(axis=2).T  # [replicates, seeds]
            per_bench.append(np.take_along_axis(per_seed_RS, seed_draws_RS, axis=1).mean(axis=1))
        out[variant] = 100.0 * np.mean(per_bench, axis=0)
    return out


def point(benches: list[np.ndarray]) -> float:
    """The cell value itself (percent): mean over benchmarks of mean over seeds and problems."""
    return 100.0 * float(np.mean([scores_SP.mean() for scores_SP in benches]))


def bootstrap(variant_BSP: dict[str, list[np.ndarray]], replicates: int = BOOTSTRAP_REPLICATES) -> dict[str, np.ndarray]:
    """Seeded bootstrap replicates for every variant (see _replicates); one call per table, so that
    differences between its variants use the same problem draws."""
    return _replicates(variant_BSP, np.random.default_rng(BOOTSTRAP_SEED), replicates)


def interval(mean: float, draws: np.ndarray) -> Interval:
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(mean, float(low), float(high), float(draws.std(ddof=1)))


def p_two_sided(draws: np.ndarray, null: float = 0.0) -> float:
    """Bootstrap p-value of 'difference = null': twice the smaller tail share beyond the null, with
    the +1 correction so that it is never 0."""
    below = (np.sum(draws <= null) + 1) / (len(draws) + 1)
    above = (np.sum(draws >= null) + 1) / (len(draws) + 1)
    return float(min(1.0, 2 * min(below, above)))


def p_one_sided_above(draws: np.ndarray, bound: float) -> float:
    """Bootstrap p-value of 'difference ≤ bound' against 'difference > bound' (non-inferiority)."""
    return float((np.sum(draws <= bound) + 1) / (len(draws) + 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error over all the claims tested at once)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def smallest_detectable(se: float, alpha: float = 1 - CONFIDENCE, power: float = POWER) -> float:
    """The true difference a two-sided test at `alpha` detects with probability `power`, given the
    standard error of the estimated difference: (z_{1−α/2} + z_power) · se."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * se
