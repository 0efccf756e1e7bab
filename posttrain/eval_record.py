"""What one run's `eval/` folder says, read for the report: its protocol, its per-problem scores.

A protocol is every setting that changes what an accuracy means: the benchmarks (each by the sha256
of its rows, how many problems were asked and how many the benchmark has), the samples per problem,
the sampling (temperature, top-p, top-k, max new tokens), the prompt preset, the answer extraction,
the generation backend, the grader's version and, for code, the sandbox. Two evaluations compare only
when their protocols are equal: the report puts one protocol in a table and refuses (or, asked to,
splits) anything else. The eval's own seed is not part of it: another seed is another draw of the same
measurement, the noise the intervals cover.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from posttrain.runfolder import read_jsonl

SAMPLING_KEYS = ("samples", "temperature", "top_p", "top_k", "max_new_tokens", "prompt", "extract", "backend")


def protocol(results: dict, benchmarks: list[str] | None = None) -> dict[str, object]:
    """The protocol of an eval (its results.json) as a flat mapping: key -> value, over `benchmarks`
    (those a table shows; default: all the eval ran)."""
    config = results.get("config") or {}
    out: dict[str, object] = {key: config.get(key) for key in SAMPLING_KEYS}
    if config.get("completions"):
        out["completions"] = "given"  # graded from a file: the sampling keys say nothing
    out["grader"] = f"math-verify {(results.get('versions') or {}).get('math-verify')}"
    for name, bench in sorted((results.get("benchmarks") or {}).items()):
        if benchmarks is not None and name not in benchmarks:
            continue
        coverage = bench.get("coverage") or {}
        out[f"{name}.sha256"] = (bench.get("sha256") or "")[:12]
        out[f"{name}.problems"] = f"{coverage.get('problems_asked')} of {coverage.get('problems_in_benchmark')}"
        if bench.get("sandbox") or results.get("code_sandbox"):
            out[f"{name}.sandbox"] = bench.get("sandbox") or results.get("code_sandbox")
    return out


def differing_keys(first: dict, second: dict) -> list[str]:
    return sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))


def describe_difference(first: dict, second: dict) -> str:
    return ", ".join(f"{k} {first.get(k)} vs {second.get(k)}" for k in differing_keys(first, second))


def forgeable(results: dict, benchmark: str) -> bool:
    """A code score graded without the strong sandbox layer: forgeable, never compared."""
    bench = (results.get("benchmarks") or {}).get(benchmark) or {}
    return bench.get("sandbox") == "weak"


def per_problem_scores(eval_dir: Path, benchmark: str, problems: int) -> np.ndarray | None:
    """[problems] share of each problem's samples graded correct, from eval/samples.jsonl; None when
    the samples file lacks a problem (the eval is then not complete)."""
    path = eval_dir / "samples.jsonl"
    if not path.is_file():
        return None
    correct: dict[int, dict[int, bool]] = {}
    for record in read_jsonl(path):
        if record.get("benchmark") == benchmark:
            correct.setdefault(int(record["index"]), {})[int(record["sample"])] = bool(record["correct"])
    if any(i not in correct for i in range(problems)):
        return None
    return np.array([np.mean(list(correct[i].values())) for i in range(problems)], dtype=np.float64)


def versions(results: dict | None, run_versions: dict | None) -> dict[str, str]:
    """The versions that made this run's numbers: the eval's and the training run's (prefixed)."""
    out = {}
    for prefix, mapping in (("eval", (results or {}).get("versions")), ("train", run_versions)):
        for key, value in sorted((mapping or {}).items()):  # every package the run recorded (runfolder.package_versions)
            if value:
                out[f"{prefix} {key}"] = str(value)
    return out
