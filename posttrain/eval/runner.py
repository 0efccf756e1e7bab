"""`posttrain eval`: generate (or read) completions, grade them, write samples and results.

Output directory (--out):
  eval_config.json   what was asked (an interrupted eval resumes only with the same settings)
  samples.jsonl      one line per sample, appended as each group of problems is graded
  results.json       config, versions, per-benchmark source + sha256 + metrics, macro average

Problems are generated in fixed groups with a seed per group, so resuming regenerates exactly
the groups that were missing and the samples do not depend on where the run stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from posttrain.config import EvalRecipe, from_dict, load_recipe
from posttrain.errors import UserError
from posttrain.eval.benchmarks import LoadedBenchmark, load_benchmark
from posttrain.eval.code_sandbox import CodeSandbox
from posttrain.eval.protocols import cross_check as run_cross_check
from posttrain.eval.protocols import make_math_grader
from posttrain.eval.metrics import summarize
from posttrain.eval.prompts import prompt_ids, prompt_text
from posttrain.generation import SamplingSpec, make_backend
from posttrain.progress import console
from posttrain.runfolder import jsonl_lines, package_versions, read_jsonl, write_text_atomic
from posttrain.trackers import check_installed, report_eval

LOCK_FILE = ".eval.lock"
WEAK_MARK = "†"  # on every number a weak sandbox graded; the table's caption says what it means
WEAK_CAPTION = "† weak sandbox: forgeable (code graded without bubblewrap: not a benchmark score)"
COMPLETIONS_CHUNK = 64  # --completions: samples graded and appended at a time, so a killed eval keeps them


def eval_from_cli(recipe_path: Path | None, flags: dict, completions: Path | None, cross_check: bool = False,
                  allow_weak_sandbox: bool = False) -> dict:
    raw = asdict(load_recipe(recipe_path, EvalRecipe)) if recipe_path else {}
    raw.update(flags)
    given = {key: f"--{'benchmark' if key == 'benchmarks' else key.replace('_', '-')} {value}" for key, value in flags.items()}
    cfg = from_dict(EvalRecipe, raw, str(recipe_path or "command line"), given)
    check_installed(cfg.report_to, str(recipe_path or "command line"))
    if completions is None and not cfg.model:
        raise UserError("--model is required (or --completions FILE to grade completions made elsewhere)")
    if completions is not None and len(cfg.benchmarks) != 1:
        raise UserError("--completions grades one benchmark at a time: pass exactly one --benchmark")
    out = Path(cfg.out) if cfg.out else default_out_dir(cfg.model, completions)
    return evaluate(cfg, out, completions, cross_check, allow_weak_sandbox)


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


def evaluate(cfg: EvalRecipe, out: Path, completions: Path | None = None, cross_check: bool = False,
             allow_weak_sandbox: bool = False) -> dict:
    # Everything that can be a user mistake is checked before the output folder is made.
    benchmarks = [load_benchmark(token, cfg.data_dir, cfg.limit) for token in cfg.benchmarks]
    if completions is None:
        from posttrain.models import check_model_path  # torch: only when a model is evaluated

        check_model_path(cfg.model, "--model")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; give a folder for samples.jsonl and results.json")
    if completions is not None and not completions.is_file():
        raise UserError(f"--completions: file not found: {completions}")
    if completions is not None:  # every line checked before anything is written
        _given_rows(completions, benchmarks[0])
    # Code is graded only in the strong sandbox unless the weak one is asked for: refused here, one line.
    sandbox = CodeSandbox(cfg.workers, allow_weak=allow_weak_sandbox) if any(b.spec.kind == "code" for b in benchmarks) else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _locked(out):
            return _evaluate_locked(cfg, out, completions, benchmarks, cross_check, sandbox)
    finally:
        if sandbox:
            sandbox.close()


@contextmanager
def _locked(out: Path):
    """One eval writes a folder at a time: two would interleave their samples in one samples.jsonl."""
    with open(out / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--out {out}: another eval is writing this folder (it holds {out / LOCK_FILE}); "
                            "wait for it to finish or use another --out") from None
        yield  # the lock goes with the process, so a killed eval leaves nothing to clean up


def _evaluate_locked(cfg: EvalRecipe, out: Path, completions: Path | None, benchmarks: list[LoadedBenchmark],
                     cross_check: bool, sandbox: CodeSandbox | None) -> dict:
    _check_resume_config(out, cfg, completions)
    done = _existing_samples(out / "samples.jsonl")
    results = {"config": {**asdict(cfg), "completions": str(completions) if completions else None},
               "versions": _versions(), "benchmarks": {}}
    tokenizer = backend = None
    if completions is None:
        tokenizer, backend = _load_generator(cfg)
    math_grader = make_math_grader(cfg.extract, cfg.workers) if any(b.spec.kind == "math" for b in benchmarks) else None
    if sandbox:  # which isolation graded the code, in results.json and, when weak, said up front
        results["code_sandbox"] = sandbox.isolation
        results["sandbox"] = sandbox.mode  # "strong" | "weak" (then every code score is forgeable)
        if sandbox.warning():
            console.print(sandbox.warning(), highlight=False)
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
    if any(r.get("sandbox") == "weak" for r in results["benchmarks"].values()):
        results["sandbox"] = "weak"  # resumed over samples graded in a weak sandbox
    # Macro average over benchmarks, when they share the same avg@k.
    avg_keys = {next((k for k in r["metrics"] if k.startswith("avg@")), None) for r in results["benchmarks"].values()}
    complete = all(r["coverage"]["complete"] for r in results["benchmarks"].values())
    if len(avg_keys) == 1 and None not in avg_keys and complete:  # never average a partial benchmark in
        key = avg_keys.pop()
        values = [r["metrics"][key] for r in results["benchmarks"].values()]
        results["macro_average"] = {key: sum(values) / len(values)}
    if cross_check:
        results["cross_check"] = _cross_check(out, benchmarks, cfg)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    report_eval(cfg.report_to, out, cfg.model, results)  # trackers.py: the metrics to the experiment trackers
    _print_table(results, out)
    return results


def _cross_check(out: Path, benchmarks: list, cfg: EvalRecipe) -> dict:
    """--cross-check: the same samples graded by math-verify and harness-style (eval/protocols.py)."""
    report = run_cross_check(out, benchmarks, cfg.extract, cfg.workers)
    for name, counts in report["benchmarks"].items():
        accuracies = ", ".join(f"{k.removeprefix('accuracy_')} {v:.2f}" for k, v in counts.items() if k.startswith("accuracy_"))
        console.print(f"cross-check {name}: {counts['disagreements']} of {counts['samples']} samples graded differently "
                      f"({counts['only_mathverify_correct']} only math-verify correct, {counts['only_harness_correct']} only "
                      f"harness correct; accuracy {accuracies}) → {report['file']}", highlight=False)
    return report


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
    spec, records, counts = bench.spec, [], {}
    for line_no, row in _given_rows(path, bench):
        sample = counts.get(row["index"], 0)
        counts[row["index"]] = sample + 1
        graded = done.get((spec.name, row["index"]), {})
        if sample in graded and graded[sample]["completion"] != row["completion"]:  # the file was changed since
            raise UserError(f"{path}: line {line_no}: differs from the completion already graded in {out} "
                            f"(index {row['index']}, sample {sample}); use another --out or delete it")
        if sample >= len(graded):
            records.append({"benchmark": spec.name, "index": row["index"], "sample": sample,
                            "prompt": spec.question(bench.rows[row["index"]]), "completion": row["completion"],
                            "finish_reason": row.get("finish_reason"), "tokens": None})
    seconds = 0.0
    for start in range(0, len(records), COMPLETIONS_CHUNK):  # grade and save as it goes
        seconds += _grade_and_append(bench, records[start : start + COMPLETIONS_CHUNK], math_grader, sandbox, out, done)
    return {"grading_seconds": seconds, "samples_graded": len(records)}


def _given_rows(path: Path, bench: LoadedBenchmark) -> list[tuple[int, dict]]:
    """(line number, row) of a --completions file, each row checked: an integer 'index' of one of
    the benchmark's problems (true/false are not indices) and a string 'completion'; a file with
    no line is refused (it would grade nothing and exit 0)."""
    rows = _read_completions(path)
    if not rows:
        raise UserError(f"{path}: holds no completions; allowed: JSONL lines {{\"index\": i, \"completion\": \"...\"}}, "
                        f"one per sample of a problem of {bench.spec.name}")
    for line_no, row in rows:
        index = row.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(row.get("completion"), str):
            raise UserError(f"{path}: line {line_no}: key 'index' is {index!r} and 'completion' is a "
                            f"{type(row.get('completion')).__name__}; allowed: an integer 'index' "
                            f"(0..{len(bench.rows) - 1}, not true/false) and a string 'completion'")
        if not 0 <= index < len(bench.rows):
            raise UserError(f"{path}: line {line_no}: index {index} is outside {bench.spec.name} (0..{len(bench.rows) - 1})")
    return rows


def _read_completions(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-empty line; a line that is not a JSON object is an error
    (skipping it, as a torn tail of our own files is skipped, would score the file short)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    rows = jsonl_lines(text, str(path))
    for line_no, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {line_no}: each line needs an integer 'index' and a string 'completion'")
    return rows


def _grade_and_append(bench, records, math_grader, sandbox, out, done) -> float:
    """Grade `records` in place, append them to samples.jsonl; returns the seconds spent grading."""
    spec = bench.spec
    clock = time.time()
    golds = [spec.gold(bench.rows[r["index"]]) for r in records]
    if spec.kind == "math":
        for record, gold, verdict in zip(records, golds, math_grader.grade(golds, [r["completion"] for r in records])):
            record.update(gold=gold, extracted=verdict["extracted"], correct=verdict["correct"], error=verdict["error"])
    else:
        verdicts = sandbox.grade([bench.rows[r["index"]] for r in records], [r["completion"] for r in records])
        for record, gold, verdict in zip(records, golds, verdicts):
            record.update(gold=gold, extracted=None, correct=verdict["passed"], error=verdict["error"], sandbox=sandbox.mode)
    seconds = time.time() - clock
    with open(out / "samples.jsonl", "a") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))
        f.flush()
        os.fsync(f.fileno())
    for record in records:
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
    graded = len(per_problem)
    # A score covers what was asked (all problems, or the first --limit of them) or is labelled partial
    # everywhere it appears (an interrupted eval, a --completions file that covers only some problems).
    coverage = {"problems_graded": graded, "problems_asked": len(bench.rows), "problems_in_benchmark": bench.size,
                "complete": graded == len(bench.rows)}
    result = {"source": bench.source, "sha256": bench.sha256, "coverage": coverage, "metrics": summarize(verdicts, answers),
              "truncated_frac": sum(s.get("finish_reason") == "length" for s in flat) / max(len(flat), 1),
              "no_answer_frac": sum(s.get("extracted") is None for s in flat) / max(len(flat), 1)
              if bench.spec.kind == "math" else None, **timing}
    if bench.spec.kind == "code":  # weak if any sample was graded in a weak sandbox (a resume may mix them)
        result["sandbox"] = "weak" if any(s.get("sandbox") == "weak" for s in flat) else "strong"
    if timing.get("generation_seconds"):
        result["samples_per_s"] = timing["samples_generated"] / timing["generation_seconds"]
    if timing.get("grading_seconds"):
        result["graded_per_s"] = timing.get("samples_generated", timing.get("samples_graded", 0)) / timing["grading_seconds"]
    return result


def _existing_samples(path: Path) -> dict:
    """(benchmark, index) -> {sample: record} from an earlier (possibly killed) run."""
    done: dict = {}
    if path.exists():
        _repair_torn_tail(path)
        for record in read_jsonl(path):
            done.setdefault((record["benchmark"], record["index"]), {})[record["sample"]] = record
    return done


def _repair_torn_tail(path: Path) -> None:
    """An eval killed mid-write leaves a last line without its newline; the next append would be
    glued onto it and lost too. Cut the file back to its last complete line (and say so)."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    console.print(f"{path}: removed a torn last line ({len(data) - keep} bytes) left by an interrupted eval; "
                  "that sample is graded again", highlight=False)


def _check_resume_config(out: Path, cfg: EvalRecipe, completions) -> None:
    wanted = {k: v for k, v in asdict(cfg).items() if k not in ("limit", "benchmarks", "workers", "batch_size", "out", "report_to")}
    wanted["completions"] = str(completions) if completions else None
    path = out / "eval_config.json"
    if path.exists():
        before = json.loads(path.read_text())
        before.setdefault("extract", "boxed")  # folders made before --extract existed were graded boxed
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
    return package_versions()  # runfolder.py: the same record as a train/rl run's versions.json


def _print_table(results: dict, out: Path) -> None:
    weak = any(r.get("sandbox") == "weak" for r in results["benchmarks"].values())
    table = Table(title=f"eval → {out}", title_justify="left", caption=WEAK_CAPTION if weak else None,
                  caption_justify="left")
    for column in ("benchmark", "problems", "k", "avg@k", "std", "pass@k", "maj@k", "truncated", "samples/s"):
        table.add_column(column, justify="right" if column != "benchmark" else "left")
    for name, res in results["benchmarks"].items():
        m = res["metrics"]
        k = m.get("samples_per_problem", 0)
        coverage = res["coverage"]
        problems = f"{coverage['problems_graded']}/{coverage['problems_asked']} (partial)"
        if coverage["complete"]:
            problems = str(coverage["problems_graded"])
            if coverage["problems_asked"] < coverage["problems_in_benchmark"]:
                problems += f" of {coverage['problems_in_benchmark']}"  # --limit: a subset, said so
        mark = WEAK_MARK if res.get("sandbox") == "weak" else ""  # every number a weak sandbox graded
        table.add_row(name, problems, str(k), f"{m.get(f'avg@{k}', 0):.2f}{mark}",
                      f"{m['std_over_samples']:.2f}{mark}" if "std_over_samples" in m else "-",
                      f"{m.get(f'pass@{k}', 0):.2f}{mark}", f"{m[f'maj@{k}']:.2f}" if f"maj@{k}" in m else "-",
                      f"{100 * res['truncated_frac']:.0f}%", f"{res.get('samples_per_s', 0):.1f}")
    if "macro_average" in results:
        key, value = next(iter(results["macro_average"].items()))
        mark = WEAK_MARK if weak else ""
        table.add_row("macro average", "", "", f"{value:.2f}{mark}", "", "", "", "", "")
    console.print(table)
    for name, res in results["benchmarks"].items():
        coverage, metrics = res["coverage"], res["metrics"]
        if not coverage["complete"]:  # a plain line too, so a log or a grep cannot mistake it for a score
            key = next((k for k in metrics if k.startswith("avg@")), "avg@1")
            console.print(f"{name} {key} {metrics.get(key, 0.0):.2f} on {coverage['problems_graded']}/"
                          f"{coverage['problems_asked']} problems (partial): not a benchmark score", highlight=False)
        if res.get("sandbox") == "weak":
            key = next((k for k in metrics if k.startswith("avg@")), "avg@1")
            console.print(f"{name} {key} {metrics.get(key, 0.0):.2f}: weak sandbox: forgeable (graded without "
                          "bubblewrap; not a benchmark score)", highlight=False)
