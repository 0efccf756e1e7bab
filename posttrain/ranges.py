"""The small range types of the recipe schema: allowed values of numeric (and name) keys, attached
with Annotated and checked by the loader. No imports from posttrain: objectives use these too."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

# Allowed ranges of numeric keys: attached to a type with Annotated, checked by the loader, so a
# zero batch size or a negative learning rate is a one-line error before anything runs.


@dataclass(frozen=True)
class Bounds:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # True: the value must be > low (else >= low)
    high_open: bool = False

    def allows(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


PositiveInt = Annotated[int, Bounds(low=1)]
NonNegativeInt = Annotated[int, Bounds(low=0)]
PositiveFloat = Annotated[float, Bounds(low=0, low_open=True)]
NonNegativeFloat = Annotated[float, Bounds(low=0)]
Probability = Annotated[float, Bounds(low=0, high=1)]  # [0, 1]
OpenFraction = Annotated[float, Bounds(low=0, high=1, high_open=True)]  # [0, 1)
Share = Annotated[float, Bounds(low=0, high=1, low_open=True)]  # (0, 1]: top-p, GPU memory share
# How per-token losses become one scalar per optimizer step (see posttrain/losses/aggregation.py).
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "microbatch-token-mean",
                          "seq-mean-token-sum-norm"]  # the last: rl only (Dr. GRPO's constant length)


@dataclass(frozen=True)
class RunNameRule:
    """A run's name is a folder under out_dir: not empty, not absolute, no '..' that leaves it."""

    def allows(self, value: str) -> bool:
        parts = Path(value).parts
        return bool(value.strip()) and bool(parts) and not Path(value).is_absolute() and ".." not in parts

    def describe(self) -> str:
        return "that names a folder under out_dir (not empty, not absolute, no '..')"


RunName = Annotated[str, RunNameRule()]
