"""The run folders a report reads, as `Run`s: command, config, metrics, eval, and how runs relate.

A run's variant is its name without a `-seed<N>` suffix; runs of one variant are the seeds of a table
row. Base / student / teacher rows are found by following the model paths in the configs to the runs
whose `final` checkpoint they point at. An RFT run is a train run on `posttrain rft-data` output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.errors import UserError
from posttrain.eval_record import forgeable, per_problem_scores
from posttrain.runfolder import command_kind, read_json_object, read_jsonl, read_run_config

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
    _per_problem: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def variant(self) -> str:
        return re.sub(r"-seed\d+$", "", self.name)

    def scores(self) -> dict[str, float]:
        """benchmark -> avg@k (percent) from this run's eval: complete benchmarks only, and no code
        score graded without the strong sandbox (forgeable)."""
        if not self.results:
            return {}
        out = {}
        for bench, res in self.results["benchmarks"].items():
            key = next((k for k in res["metrics"] if k.startswith("avg@")), None)
            if not res.get("coverage", {}).get("complete", False):
                continue  # a partial eval (an interrupted one, an incomplete completions file) is not a score
            if forgeable(self.results, bench):
                continue
            if key:
                out[bench] = res["metrics"][key]
        return out

    @property
    def versions(self) -> dict | None:
        """The package versions the training run recorded (versions.json, or `versions` in config.yaml)."""
        recorded = self.path / "versions.json"
        if recorded.is_file():
            return read_json_object(recorded)
        return self.config.get("versions") if isinstance(self.config.get("versions"), dict) else None

    def forgeable_benchmarks(self) -> list[str]:
        return [b for b in (self.results or {}).get("benchmarks", {}) if forgeable(self.results, b)]

    def per_problem(self, benchmark: str):
        """[problems] per-problem accuracy of a complete benchmark (eval/samples.jsonl), or None."""
        if benchmark not in self._per_problem:
            res = (self.results or {}).get("benchmarks", {}).get(benchmark) or {}
            asked = (res.get("coverage") or {}).get("problems_asked")
            ok = benchmark in self.scores() and isinstance(asked, int)
            self._per_problem[benchmark] = per_problem_scores(self.path / "eval", benchmark, asked) if ok else None
        return self._per_problem[benchmark]


def load_runs(paths: list[Path]) -> list[Run]:
    folders = []
    for path in paths:
        if not path.exists():
            raise UserError(f"report: {path} does not exist")
        folders += [path] if (path / "config.yaml").exists() else sorted(p.parent for p in path.glob("*/config.yaml"))
    runs = []
    for folder in folders:
        text, config = read_run_config(folder)  # runfolder.py: a damaged config.yaml is one line
        # on-policy runs (posttrain rl, or its alias distill: runfolder.command_kind) with a teacher
        # are distillation runs; without one (grpo), RL runs
        on_policy = command_kind(folder) == "rl"
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


def is_rft(run: Run) -> bool:
    """A train run on `posttrain rft-data` output (its rows name the eval folder they came from)."""
    return rft_source(run) is not None


def rft_source(run: Run) -> Path | None:
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


def resolve(path: Path) -> Path:
    return path.resolve() if path.exists() else path


def source_run(run: Run, key: str, by_final: dict) -> Run | None:
    """The run whose final checkpoint this run's `key` (model/student/teacher) path points at."""
    path = (run.config.get(key) or {}).get("path")
    if not path:
        return None
    target = Path(path) if Path(path).is_absolute() else (Path.cwd() / path)
    return by_final.get(resolve(target))


def variants(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)

    def order(item):
        objective = item[1][0].config["objective"]["name"]
        rank = OBJECTIVE_ORDER.index(objective) if objective in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER)
        return rank, item[0]

    return sorted(groups.items(), key=order)


