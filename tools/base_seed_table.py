"""What the base's and the teacher's own seeds move: the mini tables' seed-0 runs from the base and
teacher of seed 0 (results/mini) beside the same runs from a base and teacher of seed 1
(results/mini-base1, `make reproduce-base-seed`), and the spread of the fine-tuning seeds for scale.

    python tools/base_seed_table.py results/mini/summary.json results/mini-base1/summary.json

Prints a markdown table: per method, the average accuracy of its seed-0 run on each base, the
difference, and the standard deviation over the fine-tuning seeds (0, 1, 2) on the seed-0 base; then
each claim's A − B on both pipelines (the seed-1 pipeline has one run per variant, so its interval
covers evaluation noise only).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def seed0_rows(summary: dict) -> dict[str, dict]:
    """method -> {"seed0": average of its seed-0 (or single) run, "seeds": every run's average}."""
    rows = {}
    for table in summary["tables"].values():
        for row in table:
            averages = dict(zip(row["runs"], row["average"]))
            first = next((v for name, v in averages.items() if name.endswith("-seed0") or "-seed" not in name), None)
            if first is not None:
                rows.setdefault(row["method"], {"seed0": first, "seeds": list(averages.values())})
    return rows


def claim_rows(summary: dict) -> dict[str, dict]:
    return {c["claim"]: c for c in summary.get("claims", []) + summary.get("testbed_checks", [])}


def markdown(main: dict, other: dict) -> str:
    ours, theirs = seed0_rows(main), seed0_rows(other)
    lines = ["| method | seed-0 run, base seed 0 | seed-0 run, base seed 1 | difference | sd over fine-tuning seeds (base seed 0) |",
             "|---|---|---|---|---|"]
    for method, row in ours.items():
        if method not in theirs or method == "student (init)":  # the base again, in the distillation table
            continue
        spread = f"{statistics.stdev(row['seeds']):.1f}" if len(row["seeds"]) > 1 else "–"
        lines.append(f"| {method} | {row['seed0']:.1f} | {theirs[method]['seed0']:.1f} | "
                     f"{theirs[method]['seed0'] - row['seed0']:+.1f} | {spread} |")
    lines += ["", "| claim | A − B, base seed 0 (3 seeds) [95% CI] | verdict | A − B, base seed 1 (1 seed) [95% CI] | verdict |",
              "|---|---|---|---|---|"]
    ours_c, theirs_c = claim_rows(main), claim_rows(other)
    for key, claim in ours_c.items():
        mine, other_claim = _cell(claim), _cell(theirs_c.get(key))
        lines.append(f"| {claim['text']} | {mine[0]} | {mine[1]} | {other_claim[0]} | {other_claim[1]} |")
    return "\n".join(lines)


def _cell(claim: dict | None) -> tuple[str, str]:
    if claim is None or claim.get("difference") is None:
        return "–", "not run"
    low, high = claim["ci95"]
    return f"{claim['difference']:+.1f} [{low:+.1f}, {high:+.1f}]", claim["verdict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("main", type=Path, help="summary.json of the seed-0 pipeline (results/mini)")
    parser.add_argument("other", type=Path, help="summary.json of the seed-1 pipeline (results/mini-base1)")
    args = parser.parse_args()
    print(markdown(json.loads(args.main.read_text()), json.loads(args.other.read_text())))


if __name__ == "__main__":
    main()
