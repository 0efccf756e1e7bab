"""The numbers of a comparison table: one protocol per table, seeds that were evaluated, intervals.

`cells(rows, benchmarks, split)` takes a table's rows (label, runs, paper) and returns, per row, the
evaluated runs and a 95% interval for every benchmark and the average (posttrain/stats.py: seeds ×
problems bootstrap). Before any number is computed it checks that every evaluated run of the table
was evaluated under one protocol (eval_record.protocol); otherwise it refuses, naming two runs and the
keys that differ, or — with `split` — gives each protocol its own rows, labelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from posttrain.errors import UserError
from posttrain.eval_record import describe_difference, differing_keys, protocol, versions
from posttrain.report_rows import Run
from posttrain.stats import Interval, bootstrap, interval, point


@dataclass
class Row:
    label: str
    runs: list[Run]  # evaluated on every benchmark of the table
    unevaluated: list[Run]
    paper: tuple[str, str]
    protocol: dict | None = None
    cells: dict[str, Interval | None] = field(default_factory=dict)  # benchmark or "average" -> interval


def cells(rows: list[tuple[str, list[Run], tuple[str, str]]], benchmarks: list[str], split: bool) -> tuple[list[Row], list[str]]:
    """(rows with intervals, notes for under the table)."""
    out = []
    for label, runs, paper in rows:
        runs = [r for r in runs if r is not None]
        done = [r for r in runs if benchmarks and all(b in r.scores() for b in benchmarks)]
        out.append(Row(label, done, [r for r in runs if r not in done], paper))
    out, notes = _one_protocol(out, split, benchmarks)
    _intervals(out, benchmarks, notes)
    notes += _version_notes([r for row in out for r in row.runs])
    return out, notes


def _one_protocol(rows: list[Row], split: bool, benchmarks: list[str]) -> tuple[list[Row], list[str]]:
    protocol_of = lambda run: protocol(run.results, benchmarks)  # noqa: E731
    protocols: list[dict] = []
    for row in rows:
        for run in row.runs:
            if protocol_of(run) not in protocols:
                protocols.append(protocol_of(run))
    if len(protocols) <= 1:
        for row in rows:
            row.protocol = protocols[0] if protocols else None
        return rows, []
    if not split:
        first, second = _two_runs_that_differ(rows, protocol_of)
        raise UserError(f"report: {first.path} and {second.path} were evaluated under different protocols "
                        f"({describe_difference(protocol_of(first), protocol_of(second))}); a table compares "
                        "one protocol: re-evaluate them alike, or pass --split-protocols to give each protocol its own rows")
    keys = sorted({k for p in protocols for k in differing_keys(protocols[0], p)})
    out = []
    for row in rows:
        for number, wanted in enumerate(protocols, start=1):
            runs = [r for r in row.runs if protocol_of(r) == wanted]
            if runs or (number == 1 and not row.runs):
                out.append(Row(f"{row.label} [protocol {number}]", runs, row.unevaluated if number == 1 else [],
                               row.paper, wanted))
    notes = [f"Protocol {n}: " + ", ".join(f"{k} {p.get(k)}" for k in keys) for n, p in enumerate(protocols, start=1)]
    notes.append("Rows of different protocols are not comparable with each other (--split-protocols).")
    return out, notes


def _two_runs_that_differ(rows: list[Row], protocol_of) -> tuple[Run, Run]:
    runs = [r for row in rows for r in row.runs]
    first = runs[0]
    return first, next(r for r in runs if protocol_of(r) != protocol_of(first))


def _intervals(rows: list[Row], benchmarks: list[str], notes: list[str]) -> None:
    """Every row's cells, from one bootstrap per protocol (the same problem draws for all rows)."""
    for wanted in {id(row.protocol): row.protocol for row in rows}.values():
        group = [row for row in rows if row.protocol is wanted and row.runs]
        with_problems = [row for row in group if all(r.per_problem(b) is not None for r in row.runs for b in benchmarks)]
        for row in group:
            if row not in with_problems:  # no samples.jsonl: the seed mean only, said so
                row.cells = {key: _mean_only(row, key, benchmarks) for key in [*benchmarks, "average"]}
                notes.append(f"{row.label}: no per-problem samples (eval/samples.jsonl) to draw an interval from")
        for key in [*benchmarks, "average"]:
            chosen = benchmarks if key == "average" else [key]
            table = {row.label: [np.stack([r.per_problem(b) for r in row.runs]) for b in chosen] for row in with_problems}
            if not table:
                continue
            draws = bootstrap(table)
            for row in with_problems:
                row.cells[key] = interval(point(table[row.label]), draws[row.label])


def _mean_only(row: Row, key: str, benchmarks: list[str]) -> Interval:
    chosen = benchmarks if key == "average" else [key]
    mean = float(np.mean([np.mean([r.scores()[b] for b in chosen]) for r in row.runs]))
    return Interval(mean, float("nan"), float("nan"), float("nan"))


def _version_notes(runs: list[Run]) -> list[str]:
    """A line for every version key on which the table's runs differ: numbers moved by a library release
    must not pass for an effect."""
    seen: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        for key, value in versions(run.results, run.versions).items():
            seen.setdefault(key, {}).setdefault(value, []).append(run.name)
    return [f"Made under different versions: {key}: " + "; ".join(f"{value} ({', '.join(names)})"
                                                                  for value, names in by_value.items())
            for key, by_value in sorted(seen.items()) if len(by_value) > 1]


def cell_text(cell: Interval | None) -> str:
    if cell is None:
        return "–"
    if cell.low != cell.low:  # nan: no interval
        return f"{cell.mean:.1f}"
    return f"{cell.mean:.1f} [{cell.low:.1f}, {cell.high:.1f}]"
