"""The benchmarks `posttrain eval` knows: where each comes from, its question, its gold answer.

A benchmark is read from (first that applies):
  NAME:PATH      an explicit local file (.jsonl, .jsonl.gz or .json)
  --data-dir D   D/<file> (e.g. ../shared/benchmarks: nothing is copied into this repository)
  the Hub        when online (the ids below are the usual community copies; not tested offline)
The synthetic task's test sets are built in (`synthetic`, `synthetic_ood`), and its training
problems (`synthetic_train`: the rows the mini recipes train on, for RFT sampling); NAME:PATH
reads PATH for these names too (rows with `problem` and `answer`), never the built-in rows.

Contamination: `problem_key` is a problem's content hash (text normalised: NFKC, case folded,
whitespace removed); `held_out_problems` maps the key of every test problem posttrain can see
(the built-in test splits, and every benchmark file under the benchmark directories) to where it
is, so that training data (`posttrain rft-data`) can refuse test problems whatever their name.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.problems import problem_key  # noqa: F401  (re-exported: rft-data, tests)
from posttrain.errors import UserError
from posttrain.runfolder import jsonl_lines


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # "math" (boxed answer, math-verify) or "code" (HumanEval tests in a sandbox)
    filename: str | None  # file name inside --data-dir
    hub: tuple[str, str | None, str] | None  # (dataset id, config, split) for online use
    question: Callable[[dict], str]
    gold: Callable[[dict], str]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces matched; `\\boxed 5`
    (TeX's unbraced argument) gives the token after the space."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    after = start + (6 if text.startswith("\\boxed", start) else 5)
    unbraced = re.match(r"[ \t]+([^\s{}$]+)", text[after:])
    if unbraced:
        return unbraced.group(1)
    if not text[after:].lstrip().startswith("{"):
        return None
    open_at = text.find("{", after)
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None  # unbalanced: the output was cut inside the box


# OlympiadBench answers whose text is not a formula: the formula a mathematician reads in it.
OLYMPIAD_GOLD_FIXES = {
    1965: "f(x)=a x+b",  # "$f(x)=a x+b$, where $b$ is an arbitrary integer, and $a$ is ... with $\\mho(a)=0$"
    2045: "(0,4]",  # "t(0,4]": all t in (0, 4]
    2212: "n",  # "N=n": the largest N is n (math-verify folds case, so N=n would read as n=n, always true)
}


def _olympiad_gold(row: dict) -> str:
    if row.get("id") in OLYMPIAD_GOLD_FIXES:
        return OLYMPIAD_GOLD_FIXES[row["id"]]
    answers = row["final_answer"]
    if isinstance(answers, str):
        answers = ast.literal_eval(answers) if answers.startswith("[") else [answers]
    # An answer can hold several math spans ("$69$,$84$", "$221,$8$"): drop every `$`, keep the text.
    return ", ".join(str(a).replace("$", "").strip() for a in answers)


def _gsm8k_gold(row: dict) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark("math500", "math", "math500.jsonl", ("HuggingFaceH4/MATH-500", None, "test"),
                  lambda r: r["problem"], lambda r: r["answer"]),
        Benchmark("aime24", "math", "aime24.jsonl", ("HuggingFaceH4/aime_2024", None, "train"),
                  lambda r: r["problem"], lambda r: str(r["answer"])),
        Benchmark("aime25", "math", "aime25.jsonl", ("math-ai/aime25", None, "test"),
                  lambda r: r.get("question") or r["problem"], lambda r: str(r["answer"])),
        Benchmark("amc23", "math", "amc23.jsonl", ("math-ai/amc23", None, "test"),
                  lambda r: r.get("question") or r["problem"], lambda r: str(r["answer"])),
        Benchmark("minerva_math", "math", "minerva_math.jsonl", ("math-ai/minervamath", None, "test"),
                  lambda r: r["problem"], lambda r: (last_boxed(r["solution"]) or r.get("answer", "")).strip()),
        Benchmark("olympiadbench", "math", "olympiadbench.jsonl", ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
                  lambda r: r["question"], _olympiad_gold),
        Benchmark("gsm8k", "math", "gsm8k.jsonl", ("openai/gsm8k", "main", "test"),
                  lambda r: r["question"], _gsm8k_gold),
        Benchmark("humaneval", "code", "humaneval.jsonl.gz", ("openai/openai_humaneval", None, "test"),
                  lambda r: r["prompt"], lambda r: r["task_id"]),
        Benchmark("synthetic", "math", None, None, lambda r: r["problem"], lambda r: r["answer"]),
        Benchmark("synthetic_ood", "math", None, None, lambda r: r["problem"], lambda r: r["answer"]),
        # the training problems of the mini recipes (in_domain, data seed 1234), for RFT sampling
        Benchmark("synthetic_train", "math", None, None, lambda r: r["problem"], lambda r: r["answer"]),
    ]
}


SYNTHETIC_TRAIN_SIZE = 8192  # the mini recipes' in-domain training rows (--limit takes the first N)


@dataclass
class LoadedBenchmark:
    spec: Benchmark
    rows: list[dict]
    source: str  # a path, a hub id or "built-in"
    sha256: str  # of the file read (or of the rows' JSON for the Hub / built-in)
    size: int  # problems in the whole benchmark (rows may hold only the first --limit of them)


def load_benchmark(token: str, data_dir: str | None, limit: int | None) -> LoadedBenchmark:
    """`token` is NAME or NAME:PATH; see the module docstring for the search order."""
    name, _, explicit = token.partition(":")
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)} (or NAME:PATH for a local file)")
    spec = BENCHMARKS[name]
    if spec.filename is None and not explicit:
        from posttrain.data import synthetic

        if name == "synthetic_train":
            rows = synthetic.make_rows("in_domain", SYNTHETIC_TRAIN_SIZE, synthetic.DATA_SEED)
        else:
            rows = synthetic.test_rows("in_domain" if name == "synthetic" else "out_of_domain")
        return _finish(spec, rows, "built-in", _sha_of_rows(rows), limit)
    path = Path(explicit) if explicit else (Path(data_dir) / spec.filename if data_dir else None)
    if ":" in token and not explicit:
        raise UserError(f"benchmark {token!r}: NAME:PATH needs a path after the colon")
    if path is not None:
        if not path.is_file():
            raise UserError(f"benchmark {name}: file not found: {path}")
        raw = path.read_bytes()
        rows = _read_rows(path, raw)
        _check_rows(spec, rows, path)
        return _finish(spec, rows, str(path), hashlib.sha256(raw).hexdigest(), limit)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"benchmark {name}: no --data-dir or NAME:PATH given, and the Hub is offline (HF_HUB_OFFLINE=1)")
    import datasets

    dataset_id, config, split = spec.hub
    try:
        rows = list(datasets.load_dataset(dataset_id, config, split=split))
    except Exception as err:  # network / missing dataset: many exception types
        raise UserError(f"benchmark {name}: cannot load {dataset_id} from the Hub: {str(err).splitlines()[0]}") from None
    return _finish(spec, rows, f"hub:{dataset_id}", _sha_of_rows(rows), limit)


# Where the benchmark files are when no --data-dir names them: POSTTRAIN_BENCHMARKS, else
# ../shared/benchmarks beside the checkout (its README lists the files).
DEFAULT_DATA_DIR = Path(os.environ.get("POSTTRAIN_BENCHMARKS", Path(__file__).resolve().parents[3] / "shared" / "benchmarks"))
BENCHMARK_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
QUESTION_FIELDS = ("problem", "question", "prompt")  # what a benchmark file's problem is called


def held_out_problems(data_dirs: list[Path]) -> dict[str, tuple[str, str]]:
    """problem_key → (benchmark, where: a file, or "built-in") for every test problem: the whole
    built-in synthetic test splits, and each row of every benchmark file (.jsonl, .jsonl.gz,
    .json) under `data_dirs` (its question field, and any of problem/question/prompt)."""
    from posttrain.data import synthetic

    found: dict[str, tuple[str, str]] = {}
    for name, split in (("synthetic", "in_domain"), ("synthetic_ood", "out_of_domain")):
        for row in synthetic.test_rows(split):
            found.setdefault(problem_key(row["problem"]), (name, "built-in"))
    by_file = {b.filename: b for b in BENCHMARKS.values() if b.filename}
    for folder in data_dirs:
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(BENCHMARK_SUFFIXES))
        for path in files:
            spec = by_file.get(path.name)
            name = spec.name if spec else path.name.split(".")[0]
            for row in _read_rows(path, path.read_bytes()):
                if not isinstance(row, dict):
                    continue
                texts = [row.get(field) for field in QUESTION_FIELDS]
                if spec is not None:
                    try:
                        texts.append(spec.question(row))
                    except (KeyError, TypeError, ValueError, AttributeError):
                        pass
                for text in texts:
                    if isinstance(text, str) and text.strip():
                        found.setdefault(problem_key(text), (name, str(path)))
    return found


def _read_rows(path: Path, raw: bytes) -> list[dict]:
    """The rows of a .json / .jsonl / .jsonl.gz benchmark file; a malformed file is a UserError naming it."""
    try:
        text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"benchmark file {path}: cannot be read as {'gzip-compressed ' if path.suffix == '.gz' else ''}"
                        f"UTF-8 text ({err})") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"benchmark file {path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise UserError(f"benchmark file {path}: a .json benchmark must hold a list of objects")
        return rows
    return [row for _, row in jsonl_lines(text, f"benchmark file {path}")]


def _check_rows(spec: Benchmark, rows: list, path: Path) -> None:
    """Every row must be an object with the fields this benchmark reads (checked before any work)."""
    if not rows:
        raise UserError(f"benchmark file {path}: holds no problems")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"benchmark file {path}: problem {number} is not a JSON object")
        try:
            question, gold = spec.question(row), spec.gold(row)
        except KeyError as err:
            raise UserError(f"benchmark file {path}: problem {number} has no field {err} (needed by {spec.name})") from None
        except (TypeError, ValueError, SyntaxError, AttributeError) as err:
            raise UserError(f"benchmark file {path}: problem {number}: unreadable question or answer ({err})") from None
        missing = [key for key in ("test", "entry_point") if spec.kind == "code" and not isinstance(row.get(key), str)]
        if missing:
            raise UserError(f"benchmark file {path}: problem {number} has no text field {missing[0]!r} (needed by {spec.name})")
        if not isinstance(question, str) or not isinstance(gold, str) or (spec.kind == "math" and not gold.strip()):
            raise UserError(f"benchmark file {path}: problem {number}: the question and the gold answer must be "
                            f"non-empty text for {spec.name}")


def _finish(spec, rows, source, sha, limit) -> LoadedBenchmark:
    return LoadedBenchmark(spec, rows[:limit] if limit else rows, source, sha, len(rows))


def _sha_of_rows(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def strip_think(text: str) -> str:
    """The answer part of a reasoning model's output: after the last </think>; nothing if a
    <think> was opened and never closed (the output was cut while thinking)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if re.search(r"<think>", text):
        return ""
    return text
