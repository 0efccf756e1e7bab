"""`posttrain rft-data`: rejection-sampling fine-tuning data (RFT, Yuan et al. 2023; the DFT
paper's offline baseline) from an eval folder.

RFT is a pipeline of existing commands, not a loop:
  1. `posttrain eval --model BASE --benchmark synthetic_train --samples k --out D`  k samples per
     training problem from the base model, graded (D/samples.jsonl)
  2. `posttrain rft-data D --out data.jsonl`  keeps the correct ones (this module)
  3. `posttrain train --recipe recipes/mini/rft.yaml data.source=data.jsonl`  SFT (or DFT) on them

A kept sample is graded correct, ended by the model (a completion cut at max_new_tokens is not
a demonstration of stopping), and distinct from the problem's other kept samples. Its problem is
never a test problem: one whose content (benchmarks.problem_key) is in a built-in test split or
in any benchmark file under the eval's --data-dir or the default benchmark directory
(benchmarks.DEFAULT_DATA_DIR) is refused, whatever name or file it was sampled under.
Each line is {"prompt": the user message the model answered, "solution": the completion, "answer", "problem",
"index", "sample", "rft_source": the eval folder (`posttrain report` finds RFT runs by it)}; `prompt` is what eval's `chat` preset put in the user turn, which is what
`posttrain train` renders through the same chat template, so training sees the prompt the
samples were drawn for.

Samples drawn elsewhere (e.g. by a vLLM server, from the same base model under the chat prompt)
can be graded with `posttrain eval --completions FILE` and used with `--given-completions`; each
line of FILE then says how the sample ended ("finish_reason": "stop" or "length").
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import UserError
from posttrain.eval.benchmarks import BENCHMARKS, DEFAULT_DATA_DIR, held_out_problems, load_benchmark, problem_key
from posttrain.eval.prompts import BOXED_INSTRUCTION
from posttrain.progress import console
from posttrain.runfolder import read_json_object, read_jsonl, write_text_atomic


def rft_data(eval_dir: Path, out: Path, max_per_problem: int | None = None, given_completions: bool = False) -> dict:
    """Write the kept samples of `eval_dir` to `out` (JSONL); returns the counts."""
    config = _eval_config(eval_dir, given_completions)
    _check_out(out, eval_dir)
    records = _samples(eval_dir / "samples.jsonl")
    rows_of = {}
    kept, seen, counts = [], set(), {"samples": len(records), "correct": 0, "cut_off": 0, "duplicate": 0, "over_max": 0}
    per_problem: dict[tuple[str, int], int] = {}
    for record in sorted(records, key=lambda r: (r["benchmark"], r["index"], r["sample"])):
        if record["correct"] is not True:
            continue
        counts["correct"] += 1
        key = (record["benchmark"], record["index"])
        if record.get("finish_reason") not in ("stop", "length"):  # absent, or a typo: neither kept nor "cut off"
            source = f"the completions file {config['completions']}" if config.get("completions") else "samples.jsonl"
            raise UserError(f"{eval_dir / 'samples.jsonl'}: {record['benchmark']} index {record['index']} sample "
                            f"{record['sample']} has finish_reason {record.get('finish_reason')!r}; RFT keeps only samples "
                            f"the model ended itself, so each needs 'stop' or 'length' (give it per line of {source})")
        if record.get("finish_reason") != "stop":
            counts["cut_off"] += 1
            continue
        if (key, record["completion"]) in seen:
            counts["duplicate"] += 1
            continue
        if max_per_problem is not None and per_problem.get(key, 0) >= max_per_problem:
            counts["over_max"] += 1
            continue
        seen.add((key, record["completion"]))
        per_problem[key] = per_problem.get(key, 0) + 1
        if record["benchmark"] not in rows_of:
            rows_of[record["benchmark"]] = _benchmark_rows(record["benchmark"], config, eval_dir)
        spec, rows, source = rows_of[record["benchmark"]]
        if record["index"] >= len(rows):
            raise UserError(f"{eval_dir / 'samples.jsonl'}: {record['benchmark']} index {record['index']} is past the "
                            f"benchmark's {len(rows)} problems; the samples do not belong to these problems")
        question = spec.question(rows[record["index"]]).strip()
        _refuse_test_problem(question, record, source, config, eval_dir)
        kept.append({"prompt": f"{question}\n{BOXED_INSTRUCTION}", "solution": record["completion"],
                     "answer": record.get("gold"), "problem": question, "index": record["index"],
                     "sample": record["sample"], "rft_source": str(eval_dir)})
    if not kept:
        raise UserError(f"{eval_dir / 'samples.jsonl'}: no correct sample that the model ended itself "
                        f"({counts['correct']} correct, {counts['cut_off']} of them cut at max_new_tokens); nothing to train on")
    write_text_atomic(out, "".join(json.dumps(row) + "\n" for row in kept))
    counts.update(kept=len(kept), problems=len(per_problem))
    console.print(f"rft-data: kept {len(kept)} of {counts['samples']} samples ({counts['correct']} correct; dropped "
                  f"{counts['cut_off']} cut off, {counts['duplicate']} duplicates, {counts['over_max']} over the limit) "
                  f"for {len(per_problem)} problems → {out}", highlight=False)
    return counts


def _eval_config(eval_dir: Path, given_completions: bool) -> dict:
    path = eval_dir / "eval_config.json"
    if not (eval_dir / "samples.jsonl").is_file() or not path.is_file():
        raise UserError(f"{eval_dir}: not an eval folder (needs samples.jsonl and eval_config.json from `posttrain eval --out`)")
    config = read_json_object(path)
    if config.get("prompt") != "chat":
        raise UserError(f"{path}: the samples were drawn with --prompt {config.get('prompt')}; rft-data and pref-data pair them "
                        "with the chat prompt that `posttrain train` renders, so sample with --prompt chat")
    if config.get("completions") and not given_completions:
        raise UserError(f"{path}: graded given completions ({config['completions']}), not the model's own samples; "
                        "if they are the base model's samples under the chat prompt, pass --given-completions")
    return config


def _check_out(out: Path, eval_dir: Path) -> None:
    """--out: a new or regular file in an existing folder, never inside the eval folder it reads."""
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out}: exists and is not a regular file")
    if out.resolve().is_relative_to(eval_dir.resolve()):
        raise UserError(f"--out {out}: inside the eval folder {eval_dir}, whose files it would overwrite; write it elsewhere")


# what a sample record must hold for RFT, and the type of each
SAMPLE_FIELDS = {"benchmark": str, "index": int, "sample": int, "completion": str}


def _samples(path: Path) -> list[dict]:
    """The eval's sample records (a torn last line skipped), each checked for the fields RFT reads;
    a resumed eval may have re-drawn a sample: the last record of each id is the graded one, as
    eval reads it."""
    records = read_jsonl(path)
    for number, record in enumerate(records, 1):
        for key, kind in SAMPLE_FIELDS.items():
            value = record.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
                raise UserError(f"{path}: record {number} has {key}={value!r}; an eval sample record has "
                                f"{', '.join(SAMPLE_FIELDS)} (index and sample integers ≥ 0), as `posttrain eval` writes")
        if not isinstance(record.get("correct"), bool):
            raise UserError(f"{path}: record {number} has correct={record.get('correct')!r}; it must be true or false "
                            "(a graded sample, as `posttrain eval` writes)")
    return list({(r["benchmark"], r["index"], r["sample"]): r for r in records}.values())


# Benchmarks that are training problems; every other built-in benchmark is a test set that
# `posttrain eval` scores, and RFT data drawn from it would train on the answers it is scored on.
TRAINING_SETS = {"synthetic_train"}


def _benchmark_rows(name: str, config: dict, eval_dir: Path):
    """The rows the eval sampled, re-read from where the eval read them (results.json's source,
    checked against its sha256): a training set, or a user's own file given as NAME:PATH."""
    if name not in BENCHMARKS or BENCHMARKS[name].kind != "math":
        raise UserError(f"{eval_dir / 'samples.jsonl'}: benchmark {name!r}: rft-data and pref-data are made from math "
                        "benchmarks (a graded boxed answer)")
    results_path = eval_dir / "results.json"
    if not results_path.is_file():
        raise UserError(f"{eval_dir}: no results.json: the eval did not finish; run the same `posttrain eval` again "
                        "(it resumes), then rft-data")
    recorded = read_json_object(results_path).get("benchmarks", {}).get(name, {})
    source, spec = recorded.get("source"), BENCHMARKS[name]
    own_file = source not in (None, "built-in") and not source.startswith("hub:") and Path(source).name != spec.filename
    if name not in TRAINING_SETS and not own_file:
        raise UserError(f"{eval_dir}: benchmark {name!r} ({source}) is a test set that `posttrain eval` scores; "
                        f"rft-data and pref-data must come from training problems: sample {', '.join(sorted(TRAINING_SETS))}, or your "
                        f"own training file as {name}:PATH")
    loaded = load_benchmark(f"{name}:{source}" if own_file else name, config.get("data_dir"), None)
    if recorded.get("sha256") and loaded.sha256 != recorded["sha256"]:
        raise UserError(f"{loaded.source}: changed since the eval sampled it (sha256 differs from {results_path}); "
                        "the sample indices would point at other problems")
    return loaded.spec, loaded.rows, loaded.source


def _refuse_test_problem(question: str, record: dict, source: str, config: dict, eval_dir: Path) -> None:
    """A sampled problem whose content (benchmarks.problem_key) is a test problem, under any
    benchmark name or file, is refused: the built-in test splits, and every benchmark file under
    the eval's --data-dir and the default benchmark directory."""
    if "test_sets" not in config:  # built once, on the first kept sample
        folders = [Path(config["data_dir"])] if config.get("data_dir") else []
        config["test_sets"] = held_out_problems(folders + [DEFAULT_DATA_DIR])
    match = config["test_sets"].get(problem_key(question))
    if match is not None:
        name, where = match
        raise UserError(f"{source}: problem {record['index']} (sampled as {record['benchmark']} in {eval_dir}) is a "
                        f"test problem of the benchmark {name} ({where}); rft-data and pref-data must come from training "
                        "problems, never a test set's, whatever the file or name")

