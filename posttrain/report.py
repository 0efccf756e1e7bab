"""`posttrain report RUNS... --out DIR`: comparison tables and plots, rebuilt from run folders only.

A run folder (see runfolder.py) says everything needed: config.yaml (command, objective, seed,
model paths), metrics.jsonl (training curves), token_probs.json (offline runs: training-token
probabilities before/after), eval/results.json (benchmark metrics). Seeds of one variant are runs
whose names differ only by a `-seed<N>` suffix. Base / student / teacher rows are found by
following the model paths in the configs to the runs that produced them.

Writes DIR/tables.md, DIR/runs.md (every run), DIR/summary.json and DIR/*.png.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from posttrain import claims as claims_mod
from posttrain.errors import UserError
from posttrain.paper_numbers import SOURCES, distill_paper_row, offline_paper_row, table2_paper_row
from posttrain.progress import console
from posttrain.report_cells import Row, cell_text, cells
from posttrain.report_plots import plots as draw_plots
from posttrain.report_rows import (BENCHMARK_LABELS, Run, is_rft, load_runs, resolve, rft_source,  # noqa: F401
                                   source_run, variants)
from posttrain.runfolder import read_json_object
from posttrain.stats import bootstrap, point

_rft_source = rft_source  # the name older tests import


def report(paths: list[Path], out: Path, with_papers: bool = True, split_protocols: bool = False) -> dict:
    runs = load_runs(paths)
    by_final = {resolve(run.path / "final"): run for run in runs}
    from_base = [r for r in runs if r.command == "train" and source_run(r, "model", by_final) is not None]
    rft = [r for r in from_base if is_rft(r)]
    pairs = [r for r in from_base if (r.config.get("data") or {}).get("format") == "preference"]  # DPO, TDPO
    offline = [r for r in from_base if r not in rft and r not in pairs]
    distilled = [r for r in runs if r.command == "distill"]
    rl = [r for r in runs if r.command == "rl"]
    benchmarks = sorted({b for r in runs for b in r.scores()}, key=lambda b: (b not in BENCHMARK_LABELS, b))
    _check_variants(runs)
    sections, summary = [], {"benchmarks": benchmarks, "tables": {}}
    context = (benchmarks, with_papers, split_protocols, summary)
    if offline:
        base = source_run(offline[0], "model", by_final)
        rows = [("base model", [base], offline_paper_row("base"))]
        rows += [(variant, group, offline_paper_row("trained", group[0].config["objective"]["name"], group[0].config["objective"]))
                 for variant, group in variants(offline)]
        sections.append(_table("Offline objectives from one base model (shaped like DFT Table 1)", rows,
                               "paper: Qwen2.5-Math-1.5B Average@16", "offline", context))
    if distilled:
        sections.append(_distill_table(distilled, by_final, context))
    if rft or rl or pairs:
        sections.append(_table2(offline, rft, pairs, rl, by_final, context))
    if benchmarks:
        sections.append(_claims(runs, benchmarks, summary))
    if any(run.metrics for run in runs):
        sections.append(_compute_table(runs, benchmarks, by_final, summary))
    sections.append(_sources_note(with_papers))
    out.mkdir(parents=True, exist_ok=True)  # only once every table has been built: a refused report writes nothing
    (out / "tables.md").write_text("\n\n".join(sections) + "\n")
    (out / "runs.md").write_text(_runs_table(runs, benchmarks))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    written = draw_plots(runs, offline, distilled, rl, by_final, out)
    from rich.markdown import Markdown

    console.print(Markdown("\n\n".join(sections)))
    console.print(f"\nwrote {out / 'tables.md'}, {out / 'runs.md'}, {out / 'summary.json'}"
                  + (f", {len(written)} plots" if written else ""))
    return summary


def _check_variants(runs: list[Run]) -> None:
    """Seeds of one variant must be one recipe: a row averaging two settings is two rows mixed."""
    ignored = {"name", "seed", "out_dir", "versions", "command"}  # command: how the CLI was called (names, seeds)
    for variant, group in variants(runs):
        first = {k: v for k, v in group[0].config.items() if k not in ignored}
        for run in group[1:]:
            other = {k: v for k, v in run.config.items() if k not in ignored}
            if other != first:
                keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
                raise UserError(f"report: {group[0].path} and {run.path} are seeds of one row ({variant}) but their "
                                f"recipes differ in {', '.join(keys)}; give one of them another name")


def _distill_table(distilled, by_final, context) -> str:
    student = source_run(distilled[0], "student", by_final)
    teacher = source_run(distilled[0], "teacher", by_final)
    rows = [(label, [run], distill_paper_row(role)) for label, run, role in
            (("student (init)", student, "student"), ("teacher", teacher, "teacher")) if run is not None]
    for variant, group in variants(distilled):
        # the paper row follows the run's own settings (config.yaml), never its name
        masked = bool(group[0].config["train"].get("mask_first_tokens"))
        objective = group[0].config["objective"]
        top_p = float((group[0].config.get("rollout") or {}).get("top_p", 1.0))
        rows.append((variant, group, distill_paper_row("distilled", objective["name"], objective, masked, top_p)))
    return _table("On-policy distillation from one student (shaped like the LSM paper's single-task table)",
                  rows, "paper: 7B student, math average", "distill", context, extra=_distill_extras)


def _table2(offline, rft, pairs, rl, by_final, context) -> str:
    """Base, SFT, DFT, OTR, RFT-data runs (SFT = RFT, DFT on RFT data), preference-pair runs (DPO),
    and on-policy runs without a teacher (GRPO and its variants, PPO) from one base model, shaped like
    DFT Table 2. The paper column follows what a run trained on: DFT on the model's own correct
    samples is the paper's Table-2 DFT; DFT on the reference demonstrations is the Table-1 setup."""
    start_of = lambda run: source_run(run, "student" if run.command == "rl" else "model", by_final)  # noqa: E731
    starts = [start_of(r) for r in rft + pairs + rl + offline]
    base = max(starts, key=lambda run: sum(other is run for other in starts))  # the model most runs started from
    # one base model: runs started from another model are left out of this table (named below it)
    others = [r.name for r in rft + pairs + rl + offline if start_of(r) is not base]
    offline, rft, pairs, rl = ([r for r in group if start_of(r) is base] for group in (offline, rft, pairs, rl))
    rows = [("base model", [base], table2_paper_row("base"))] if base is not None else []
    for variant, group in variants(offline):
        objective = group[0].config["objective"]
        if objective["name"] in ("sft", "dft") or (objective["name"] == "otr" and objective.get("beta") == -0.1):
            rows.append((variant, group, table2_paper_row(objective["name"], "demonstrations", objective)))
    rows += [(variant, group, table2_paper_row(group[0].config["objective"]["name"], "own correct samples",
                                               group[0].config["objective"])) for variant, group in variants(rft)]
    rows += [(variant, group, table2_paper_row(group[0].config["objective"]["name"], "own graded pairs",
                                               group[0].config["objective"])) for variant, group in variants(pairs)]
    rows += [(variant, group, table2_paper_row(group[0].config["objective"]["name"], "on-policy",
                                               group[0].config["objective"], group[0].config.get("rollout")))
             for variant, group in variants(rl)]
    table = _table("Offline and online RL baselines from one base model (shaped like DFT Table 2)",
                   rows, "paper: Qwen2.5-Math-1.5B average", "table2", context)
    if others:
        table += f"\n\nNot in this table (started from another model than {base.name if base else 'the base'}): {', '.join(others)}"
    if base is None:
        table += ("\n\nThe model these runs started from is not a run among the report's folders: no base row, and "
                  "offline or RFT runs can be placed here only when their base run is given too.")
    return table


def _claims(runs, benchmarks, summary) -> str:
    """The claims table (posttrain/claims.py): every variant of the report's main protocol, one bootstrap."""
    by_variant: dict[str, list[Run]] = {}
    for variant, group in variants(runs):
        by_variant[variant] = group
    rows, _ = cells([(variant, group, ("", "")) for variant, group in by_variant.items()], benchmarks, split=True)
    # the protocol most evaluated runs share: claims compare within it only
    protocols = [row.protocol for row in rows if row.runs]
    if not protocols:
        return "### Claims\n\nNo evaluated runs."
    main = max(protocols, key=lambda p: sum(len(r.runs) for r in rows if r.protocol == p))
    usable = {row.label.split(" [protocol")[0]: row for row in rows
              if row.runs and row.protocol == main and all(r.per_problem(b) is not None for r in row.runs for b in benchmarks)}
    table = {label: [np.stack([r.per_problem(b) for r in row.runs]) for b in benchmarks] for label, row in usable.items()}
    draws = bootstrap(table) if table else {}
    points = {label: point(t) for label, t in table.items()}
    seeds = {label: len(row.runs) for label, row in usable.items()}
    verdicts = claims_mod.judge(claims_mod.CLAIMS, points, draws, seeds)
    checks = claims_mod.judge(claims_mod.TESTBED_CHECKS, points, draws, seeds)
    claims_mod.apply_preconditions(verdicts, checks)
    summary["claims"] = claims_mod.summary(verdicts)
    summary["testbed_checks"] = claims_mod.summary(checks)
    return (claims_mod.markdown(verdicts, "Claims of the papers, tested on these runs") + "\n\n"
            + claims_mod.markdown(checks, "Testbed checks (not paper claims; tested the same way, outside the claims' Holm family)"))


def _table(title, rows, paper_header, key, context, extra=None) -> str:
    benchmarks, with_papers, split_protocols, summary = context
    table_rows, notes = cells(rows, benchmarks, split_protocols)
    protocol = next((row.protocol for row in table_rows if row.protocol), None)
    headers = ["method", "seeds (evaluated)"] + [f"{BENCHMARK_LABELS.get(b, b)} ({b}{_coverage(protocol, b)})" for b in benchmarks]
    headers += ["average"]
    extra_headers, _ = extra(None) if extra else ([], None)
    headers += extra_headers
    if with_papers:
        headers += [paper_header, "paper source"]
    lines = [f"### {title}", "", _legend(protocol), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    summary["tables"][key] = []
    for row in table_rows:
        cells_text = [row.label, str(len(row.runs))] + [cell_text(row.cells.get(b)) for b in benchmarks]
        cells_text += [cell_text(row.cells.get("average"))]
        cells_text += extra(row.runs)[1] if extra else []
        if with_papers:
            cells_text += list(row.paper)
        lines.append("| " + " | ".join(cells_text) + " |")
        summary["tables"][key].append(_row_summary(row, benchmarks))
    unevaluated = [r.name for row in table_rows for r in row.unevaluated]
    if unevaluated:
        notes.append(f"Not evaluated on every benchmark of this table (not counted): {', '.join(unevaluated)}")
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else []))


def _coverage(protocol: dict | None, benchmark: str) -> str:
    """', 200 of 500 problems' in a column header: a --limit eval is a subset, and says so."""
    problems = (protocol or {}).get(f"{benchmark}.problems")
    if not problems:
        return ""
    asked, _, total = str(problems).partition(" of ")
    return f", {asked} problems" if asked == total else f", first {asked} of {total} problems"


def _legend(protocol: dict | None) -> str:
    text = ("Ours: mean over seeds of avg@k (percent) [95% bootstrap interval over seeds × problems; a single-run "
            "row's interval covers evaluation noise only]. Paper numbers are theirs, for their models and data.")
    if protocol:
        text += (f" Protocol: k={protocol.get('samples')}, temperature {protocol.get('temperature')}, top-p "
                 f"{protocol.get('top_p')}, max new tokens {protocol.get('max_new_tokens')}, prompt {protocol.get('prompt')}, "
                 f"extraction {protocol.get('extract')}, {protocol.get('backend')} backend, {protocol.get('grader')}.")
    return text


def _row_summary(row: Row, benchmarks: list[str]) -> dict:
    as_list = lambda c: None if c is None else [c.mean, c.low, c.high]  # noqa: E731
    return {"method": row.label, "runs": [r.name for r in row.runs], "unevaluated": [r.name for r in row.unevaluated],
            "scores": {b: [r.scores()[b] for r in row.runs] for b in benchmarks},
            "average": [statistics.fmean(r.scores()[b] for b in benchmarks) for r in row.runs],
            "ci95": {k: as_list(v) for k, v in row.cells.items()}, "paper": row.paper[0]}


def _sampling_phases(eval_dir: Path | None) -> dict[str, float]:
    """Generate / grade seconds and generated tokens of the eval that drew an RFT run's data
    (its results.json), so that RFT's row pays for its samples; zeros when not found."""
    results = eval_dir / "results.json" if eval_dir is not None else None
    if results is None or not results.is_file():
        return {"generate_s": 0.0, "score_s": 0.0, "generated_tokens": 0.0}
    benchmarks = read_json_object(results).get("benchmarks", {}).values()
    total = lambda key: sum(float(b.get(key) or 0.0) for b in benchmarks)  # noqa: E731
    return {"generate_s": total("generation_seconds"), "score_s": total("grading_seconds"),
            "generated_tokens": total("tokens_generated")}


def _tail_mean(run: Run, key: str) -> float | None:
    values = [row[key] for row in run.metrics if key in row and row[key] == row[key]]
    if not values:
        return None
    tail = values[-max(1, len(values) // 10):]
    return statistics.fmean(tail)


def _distill_extras(group):
    headers = ["reverse KL (last 10% of steps)", "repetition", "student mass on support"]
    if group is None:
        return headers, None
    cells = []
    for key in ("reverse_kl", "repetition_frac", "student_mass"):
        values = [v for v in (_tail_mean(r, key) for r in group) if v is not None]
        cells.append(f"{statistics.fmean(values):.3f}" if values else "–")
    return headers, cells


def phase_totals(run: Run) -> dict[str, float]:
    """Seconds and tokens per phase, summed over the run's logged steps (metrics.jsonl).

    distill and rl (the on-policy loop): generate / score / train seconds (time_*), generated tokens (response_tokens) and
    trained tokens (response_tokens × trained_token_frac). train: train seconds (step_seconds),
    input tokens (tokens_per_s × step_seconds) and trained (loss) tokens (response_tokens)."""
    rows = run.metrics
    total = lambda key: sum(float(r.get(key, 0.0)) for r in rows)  # noqa: E731
    if run.command in ("distill", "rl"):
        return {"generate_s": total("time_generate"), "score_s": total("time_score"), "train_s": total("time_train"),
                "generated_tokens": total("response_tokens"),
                "trained_tokens": sum(float(r.get("response_tokens", 0.0)) * float(r.get("trained_token_frac", 1.0))
                                      for r in rows)}
    # an RFT run also pays for the sampling that made its data (shared by its seeds: counted in each)
    return {**_sampling_phases(rft_source(run)), "train_s": total("step_seconds"),
            "input_tokens": sum(float(r.get("tokens_per_s", 0.0)) * float(r.get("step_seconds", 0.0)) for r in rows),
            "trained_tokens": total("response_tokens")}


def _average(run: Run | None, benchmarks: list[str]) -> float | None:
    scores = run.scores() if run is not None else {}
    if not benchmarks or not all(b in scores for b in benchmarks):
        return None
    return statistics.fmean(scores[b] for b in benchmarks)


def _compute_table(runs: list[Run], benchmarks: list[str], by_final: dict, summary: dict) -> str:
    """Seconds and tokens per phase for every run, and accuracy at equal cost: with one eval at
    the end of a run, the honest measure is the gain over the model it started from (average
    accuracy, points) per 1000 s of the run's own wall time, not a point on a learning curve."""
    lines = ["### Compute per run (sums over the logged steps of metrics.jsonl)", "",
             "Gain per 1000 s = (average accuracy − that of the model the run started from) / total seconds × 1000: "
             "accuracy bought per unit of this run's wall time (the starting model's own training not counted; an RFT "
             "run's row includes the sampling of its data, shared by its seeds). "
             "Wall times compare only runs made on the same machine under the same load.", "",
             "| run | command | generate s | score s | train s | total s | generated tokens | trained tokens | "
             "average | start average | gain per 1000 s |", "|" + "---|" * 11]
    summary["compute"] = {}
    for run in sorted((r for r in runs if r.metrics), key=lambda r: r.name):
        phases = phase_totals(run)
        seconds = phases["generate_s"] + phases["score_s"] + phases["train_s"]
        start = source_run(run, "student" if run.command in ("distill", "rl") else "model", by_final)
        average, start_average = _average(run, benchmarks), _average(start, benchmarks)
        gain = ((average - start_average) / seconds * 1000
                if average is not None and start_average is not None and seconds > 0 else None)
        number = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {run.name} | {run.command} | {phases['generate_s']:.1f} | {phases['score_s']:.1f} | "
                     f"{phases['train_s']:.1f} | {seconds:.1f} | {phases['generated_tokens']:.0f} | "
                     f"{phases['trained_tokens']:.0f} | {number(average, '.1f')} | {number(start_average, '.1f')} | "
                     f"{number(gain, '.2f')} |")
        summary["compute"][run.name] = {**phases, "total_s": seconds, "average": average,
                                        "start_average": start_average, "gain_per_1000s": gain}
    return "\n".join(lines)


def _sources_note(with_papers: bool) -> str:
    note = ("Every number in the 'ours' columns is read from run folders (config.yaml, metrics.jsonl, "
            "eval/results.json); `runs.md` lists each run.")
    if with_papers:
        note += (" Paper columns are typed in from the tables below (posttrain/paper_numbers.py) and describe "
                 "billion-parameter models on real math benchmarks: compare directions, not values.\n\n"
                 + "\n".join(f"- **{key}**: {text}" for key, text in SOURCES.items()))
    return note


def _runs_table(runs: list[Run], benchmarks: list[str]) -> str:
    header = ["run", "command", "objective", "seed", "steps", *benchmarks]  # no benchmark: no empty column
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in sorted(runs, key=lambda r: r.name):
        scores = run.scores()
        objective = run.config.get("objective", {})
        params = ", ".join(f"{k}={v}" for k, v in objective.items() if k != "name")
        cells = [run.name, run.command, f"{objective.get('name')}{f' ({params})' if params else ''}",
                 str(run.config.get("seed")), str(len(run.metrics)),
                 *(f"{scores[b]:.1f}" if b in scores else "–" for b in benchmarks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
