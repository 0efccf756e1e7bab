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
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.errors import UserError
from posttrain.paper_numbers import SOURCES, distill_paper_row, offline_paper_row, table2_paper_row
from posttrain.progress import console
from posttrain.runfolder import read_json_object, read_jsonl

BENCHMARK_LABELS = {"synthetic": "in-domain", "synthetic_ood": "out-of-domain"}
OBJECTIVE_ORDER = ["sft", "dft", "otr", "opd", "lsm", "grpo"]


@dataclass
class Run:
    path: Path
    command: str  # "train", "distill" (on-policy with a teacher) or "rl" (on-policy without one: grpo)
    config: dict
    metrics: list[dict] = field(default_factory=list)
    results: dict | None = None  # eval/results.json
    token_probs: dict | None = None

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def variant(self) -> str:
        return re.sub(r"-seed\d+$", "", self.name)

    def scores(self) -> dict[str, float]:
        """benchmark -> avg@k (percent) from this run's eval."""
        if not self.results:
            return {}
        out = {}
        for bench, res in self.results["benchmarks"].items():
            key = next((k for k in res["metrics"] if k.startswith("avg@")), None)
            if not res.get("coverage", {}).get("complete", False):
                continue  # a partial eval (--limit, an incomplete completions file) is not a benchmark score
            if key:
                out[bench] = res["metrics"][key]
        return out


def load_runs(paths: list[Path]) -> list[Run]:
    folders = []
    for path in paths:
        if not path.exists():
            raise UserError(f"report: {path} does not exist")
        folders += [path] if (path / "config.yaml").exists() else sorted(p.parent for p in path.glob("*/config.yaml"))
    runs = []
    for folder in folders:
        text = (folder / "config.yaml").read_text()
        # on-policy runs (posttrain rl, or its older name distill) with a teacher are distillation
        # runs; without one (grpo), RL runs
        on_policy = text.startswith(("# posttrain distill", "# posttrain rl"))
        config = yaml.safe_load(text)
        command = ("distill" if config.get("teacher") else "rl") if on_policy else "train"
        run = Run(folder, command, config)
        if (folder / "metrics.jsonl").exists():
            run.metrics = read_jsonl(folder / "metrics.jsonl")
        if (folder / "eval" / "results.json").exists():
            run.results = read_json_object(folder / "eval" / "results.json")
        if (folder / "token_probs.json").exists():
            run.token_probs = read_json_object(folder / "token_probs.json")
        runs.append(run)
    if not runs:
        raise UserError(f"report: no run folders (with config.yaml) under {', '.join(map(str, paths))}")
    return runs


def report(paths: list[Path], out: Path, with_papers: bool = True) -> dict:
    runs = load_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    by_final = {_resolve(run.path / "final"): run for run in runs}
    from_base = [r for r in runs if r.command == "train" and _source_run(r, "model", by_final) is not None]
    rft = [r for r in from_base if _is_rft(r)]
    offline = [r for r in from_base if r not in rft]
    distilled = [r for r in runs if r.command == "distill"]
    rl = [r for r in runs if r.command == "rl"]
    benchmarks = sorted({b for r in runs for b in r.scores()}, key=lambda b: (b not in BENCHMARK_LABELS, b))
    sections, summary = [], {"benchmarks": benchmarks, "tables": {}}
    if offline:
        base = _source_run(offline[0], "model", by_final)
        rows = [("base model", [base], offline_paper_row("base"))]
        rows += [(variant, group, offline_paper_row("trained", group[0].config["objective"]["name"], group[0].config["objective"]))
                 for variant, group in _variants(offline)]
        sections.append(_table("Offline objectives from one base model (shaped like DFT Table 1)", rows, benchmarks,
                               "paper: Qwen2.5-Math-1.5B Average@16", with_papers, summary, "offline"))
    if distilled:
        student = _source_run(distilled[0], "student", by_final)
        teacher = _source_run(distilled[0], "teacher", by_final)
        rows = [(label, [run], distill_paper_row(role)) for label, run, role in
                (("student (init)", student, "student"), ("teacher", teacher, "teacher")) if run is not None]
        for variant, group in _variants(distilled):
            # the paper row follows the run's own settings (config.yaml), never its name
            masked = bool(group[0].config["train"].get("mask_first_tokens"))
            objective = group[0].config["objective"]
            top_p = float((group[0].config.get("rollout") or {}).get("top_p", 1.0))
            rows.append((variant, group, distill_paper_row("distilled", objective["name"], objective, masked, top_p)))
        sections.append(_table("On-policy distillation from one student (shaped like the LSM paper's single-task table)",
                               rows, benchmarks, "paper: 7B student, math average", with_papers, summary, "distill",
                               extra=_distill_extras))
    if rft or rl:
        sections.append(_table2(offline, rft, rl, by_final, benchmarks, with_papers, summary))
    if any(run.metrics for run in runs):
        sections.append(_compute_table(runs, benchmarks, by_final, summary))
    sections.append(_sources_note(with_papers))
    (out / "tables.md").write_text("\n\n".join(sections) + "\n")
    (out / "runs.md").write_text(_runs_table(runs, benchmarks))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = _plots(runs, offline, distilled, by_final, out)
    from rich.markdown import Markdown

    console.print(Markdown("\n\n".join(sections)))
    console.print(f"\nwrote {out / 'tables.md'}, {out / 'runs.md'}, {out / 'summary.json'}"
                  + (f", {len(plots)} plots" if plots else ""))
    return summary


def _table2(offline, rft, rl, by_final, benchmarks, with_papers, summary) -> str:
    """Base, SFT, DFT, OTR (the offline runs' default variants), RFT and GRPO from one base model,
    shaped like DFT Table 2 (the paper's PPO and DPO rows are not run here)."""
    start_of = lambda run: _source_run(run, "student" if run.command == "rl" else "model", by_final)  # noqa: E731
    starts = [start_of(r) for r in rft + rl + offline]
    base = max(starts, key=lambda run: sum(other is run for other in starts))  # the model most runs started from
    # one base model: runs started from another model are left out of this table (named below it)
    others = [r.name for r in rft + rl + offline if start_of(r) is not base]
    offline, rft, rl = ([r for r in group if start_of(r) is base] for group in (offline, rft, rl))
    rows = [("base model", [base], table2_paper_row("base"))] if base is not None else []
    for variant, group in _variants(offline):
        objective = group[0].config["objective"]
        if objective["name"] in ("sft", "dft") or (objective["name"] == "otr" and objective.get("beta") == -0.1):
            rows.append((variant, group, table2_paper_row(objective["name"])))
    rows += [(variant, group, table2_paper_row("rft")) for variant, group in _variants(rft)]
    rows += [(variant, group, table2_paper_row(group[0].config["objective"]["name"])) for variant, group in _variants(rl)]
    table = _table("Offline and online RL baselines from one base model (shaped like DFT Table 2; PPO and DPO not run)",
                   rows, benchmarks, "paper: Qwen2.5-Math-1.5B average", with_papers, summary, "table2")
    if others:
        table += f"\n\nNot in this table (started from another model than {base.name if base else 'the base'}): {', '.join(others)}"
    if base is None:
        table += ("\n\nThe model these runs started from is not a run among the report's folders: no base row, and "
                  "offline or RFT runs can be placed here only when their base run is given too.")
    return table


def _is_rft(run: Run) -> bool:
    """A train run on `posttrain rft-data` output (its rows name the eval folder they came from)."""
    return _rft_source(run) is not None


def _rft_source(run: Run) -> Path | None:
    """The eval folder an RFT run's data was drawn from, else None: as the run recorded it
    (rft_source.json, written by `posttrain train`), or from its data rows (`rft_source`)."""
    recorded = run.path / "rft_source.json"
    if recorded.is_file():
        source = read_json_object(recorded).get("rft_source")
        if not isinstance(source, str):
            raise UserError(f"{recorded}: has no 'rft_source' path")
        return Path(source)
    source = Path((run.config.get("data") or {}).get("source", ""))
    if source.suffix != ".jsonl" or not source.is_file():
        return None
    with open(source, encoding="utf-8") as f:
        first = f.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return None
    return Path(row["rft_source"]) if isinstance(row, dict) and "rft_source" in row else None


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


def _resolve(path: Path) -> Path:
    return path.resolve() if path.exists() else path


def _source_run(run: Run, key: str, by_final: dict) -> Run | None:
    """The run whose final checkpoint this run's `key` (model/student/teacher) path points at."""
    path = (run.config.get(key) or {}).get("path")
    if not path:
        return None
    target = Path(path) if Path(path).is_absolute() else (Path.cwd() / path)
    return by_final.get(_resolve(target))


def _variants(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)

    def order(item):
        objective = item[1][0].config["objective"]["name"]
        rank = OBJECTIVE_ORDER.index(objective) if objective in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER)
        return rank, item[0]

    return sorted(groups.items(), key=order)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    if mean != mean:  # nan
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def _table(title, rows, benchmarks, paper_header, with_papers, summary, key, extra=None) -> str:
    headers = ["method", "seeds"] + [f"{BENCHMARK_LABELS.get(b, b)} ({b}) avg@k" for b in benchmarks] + ["average"]
    extra_headers, _ = extra(None) if extra else ([], None)
    headers += extra_headers
    if with_papers:
        headers += [paper_header, "paper source"]
    lines = [f"### {title}", "", "Ours: mean ± std over seeds (percent). Paper numbers are theirs, for their models and data.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    summary["tables"][key] = []
    for label, group, (paper_value, paper_source) in rows:
        per_bench = {b: [r.scores()[b] for r in group if b in r.scores()] for b in benchmarks}
        averages = [statistics.fmean(r.scores()[b] for b in benchmarks) for r in group
                    if benchmarks and all(b in r.scores() for b in benchmarks)]
        cells = [label, str(len(group))] + [_fmt(per_bench[b]) for b in benchmarks] + [_fmt(averages)]
        extra_cells = extra(group)[1] if extra else []
        cells += extra_cells
        if with_papers:
            cells += [paper_value, paper_source]
        lines.append("| " + " | ".join(cells) + " |")
        summary["tables"][key].append({"method": label, "runs": [r.name for r in group],
                                       "scores": per_bench, "average": averages, "paper": paper_value})
    return "\n".join(lines)


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
    return {**_sampling_phases(_rft_source(run)), "train_s": total("step_seconds"),
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
        start = _source_run(run, "student" if run.command in ("distill", "rl") else "model", by_final)
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
    lines = ["| run | command | objective | seed | steps | " + " | ".join(benchmarks) + " |",
             "|" + "---|" * (5 + len(benchmarks))]
    for run in sorted(runs, key=lambda r: r.name):
        scores = run.scores()
        objective = run.config.get("objective", {})
        params = ", ".join(f"{k}={v}" for k, v in objective.items() if k != "name")
        lines.append(f"| {run.name} | {run.command} | {objective.get('name')}{f' ({params})' if params else ''} | "
                     f"{run.config.get('seed')} | {len(run.metrics)} | "
                     + " | ".join(f"{scores[b]:.1f}" if b in scores else "–" for b in benchmarks) + " |")
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------------


def _plots(runs, offline, distilled, by_final, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def two_panels(runs, panels, filename):
        """One figure: for each (metric, title), the metric against step, a line per variant."""
        fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
        for ax, (key, title) in zip(axes, panels):
            for variant, group in _variants(runs):
                _curve(ax, group, key, variant)
            ax.set(title=title, xlabel="step")
        axes[-1].legend(fontsize=8)
        save(fig, filename)

    if offline:
        two_panels(offline, [("loss", "training loss (each objective's own loss)"),
                             ("target_prob", "mean probability of the target token (training batches)")],
                   "offline_training_curves.png")

        otr = [(v, g) for v, g in _variants(offline) if g[0].config["objective"]["name"] == "otr"]
        if otr:
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant, group in otr:
                _curve(ax, group, "n_gt_frac", variant)
            ax.set(title="OTR: mean N_gt / K (share of draws that hit the target)", xlabel="step")
            ax.legend(fontsize=8)
            save(fig, "otr_n_gt.png")

        with_probs = [(v, g) for v, g in _variants(offline) if any(r.token_probs for r in g)]
        if with_probs:
            fig, ax = plt.subplots(figsize=(7, 4))
            first = next(r for _, g in with_probs for r in g if r.token_probs)
            edges = first.token_probs["log10_edges"]
            centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            ax.plot(centers, _normalised(first.token_probs["initial"]), "k--", label="base (before training)")
            for variant, group in with_probs:
                counts = [r.token_probs["final"] for r in group if r.token_probs]
                ax.plot(centers, _normalised([sum(c) for c in zip(*counts)]), label=variant)
            ax.set(title="probability of training tokens after training (cf. DFT paper Fig. 2)",
                   xlabel="log10 p(token)", ylabel="share of tokens", yscale="log")
            ax.legend(fontsize=8)
            save(fig, "token_probability_histogram.png")

    if distilled:
        two_panels(distilled, [("reverse_kl", "reverse KL to the teacher on rollouts (exact, per token)"),
                               ("repetition_frac", "share of rollouts with a repetition loop")],
                   "distill_reverse_kl_and_repetition.png")

    scored = [(v, g) for v, g in _variants(offline + distilled) if any(r.scores() for r in g)]
    if scored:
        benchmarks = sorted({b for _, g in scored for r in g for b in r.scores()})
        fig, axes = plt.subplots(1, len(benchmarks), figsize=(5 * len(benchmarks), 0.4 * len(scored) + 1.5), squeeze=False)
        for ax, bench in zip(axes[0], benchmarks):
            for y, (variant, group) in enumerate(scored):
                values = [r.scores()[bench] for r in group if bench in r.scores()]
                ax.scatter(values, [y] * len(values), s=18)
                if values:
                    ax.plot([statistics.fmean(values)] * 2, [y - 0.3, y + 0.3], "k-")
            ax.set_yticks(range(len(scored)), [v for v, _ in scored], fontsize=8)
            ax.set(title=f"{BENCHMARK_LABELS.get(bench, bench)} avg@k (dots: seeds, bar: mean)", xlabel="percent")
        save(fig, "accuracy_by_seed.png")
    return written


def _curve(ax, group: list[Run], key: str, label: str) -> None:
    """Mean over the seeds of a metric against step, smoothed by a trailing mean over ~5% of steps."""
    series = [[row.get(key) for row in run.metrics] for run in group if any(key in row for row in run.metrics)]
    if not series:
        return
    length = min(len(s) for s in series)
    means = [statistics.fmean(s[i] for s in series if s[i] is not None) for i in range(length)]
    window = max(1, length // 20)
    smooth = [statistics.fmean(means[max(0, i - window + 1) : i + 1]) for i in range(length)]
    ax.plot(range(1, length + 1), smooth, label=label)


def _normalised(counts: list[float]) -> list[float]:
    total = sum(counts) or 1.0
    return [max(c / total, 1e-6) for c in counts]
