"""No contamination: training rows never hold a test problem, `rft-data` refuses test problems by
content whatever their benchmark name or file, and NAME:PATH always reads PATH (issue 20, item 4)."""

import json
from pathlib import Path

import pytest
import yaml

from posttrain.data import synthetic
from posttrain.eval.benchmarks import BENCHMARKS, SYNTHETIC_TRAIN_SIZE, held_out_problems, load_benchmark, problem_key
from tests.helpers import BENCHMARKS as SHARED_BENCHMARKS
from tests.helpers import REPO, run_cli

TEST_KEYS = {problem_key(row["problem"]): (split, i)
             for split in synthetic.TEST_SPLITS for i, row in enumerate(synthetic.test_rows(split))}


def _recipe_draws() -> set[tuple[str, int, int]]:
    """(split, num_examples, seed) of every synthetic section of the mini recipes."""
    draws = set()
    for path in sorted((REPO / "recipes" / "mini").glob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        for section in ("data", "prompts"):
            spec = (recipe.get(section) or {})
            if spec.get("source") == "synthetic":
                cfg = spec.get("synthetic", {})
                draws.add((cfg.get("split", "in_domain"), cfg["num_examples"], cfg.get("seed", synthetic.DATA_SEED)))
    # the base's, the fine-tuning's and the teacher's draws, plus the pretrain split (the base's before)
    assert len(draws) >= 3
    return draws | {("pretrain", 32768, synthetic.DATA_SEED)}


def test_test_splits_are_whole_and_what_the_benchmarks_serve():
    """The evals' --limit (200 in the Makefile) takes the first N of the whole split, and the
    whole split is what training rows are deduplicated against."""
    assert len(TEST_KEYS) > 900  # two splits of 500 (a handful of in-split repeats at most)
    for name, split in (("synthetic", "in_domain"), ("synthetic_ood", "out_of_domain")):
        loaded = load_benchmark(name, None, None)
        assert loaded.rows == synthetic.test_rows(split) and loaded.size == synthetic.TEST_SIZE
        assert load_benchmark(name, None, 200).rows == loaded.rows[:200]


@pytest.mark.parametrize("split, num_examples, seed", sorted(_recipe_draws() | {
    ("in_domain", SYNTHETIC_TRAIN_SIZE, synthetic.DATA_SEED),  # synthetic_train (RFT sampling)
    ("out_of_domain", 8192, synthetic.DATA_SEED), ("in_domain", 64, synthetic.DATA_SEED),  # the tests' size
    ("in_domain", 600, synthetic.TEST_SEED_OFFSET),  # a training seed equal to the test seed
}))
def test_training_rows_never_equal_a_test_problem(split, num_examples, seed):
    rows = synthetic.make_rows(split, num_examples, seed)
    assert len(rows) == num_examples
    overlaps = [(i, TEST_KEYS[problem_key(r["problem"])]) for i, r in enumerate(rows) if problem_key(r["problem"]) in TEST_KEYS]
    assert overlaps == []


def test_skipping_a_test_problem_leaves_every_earlier_row_as_it_was():
    """The generator skips test problems in its own stream: the rows before the first skipped draw
    are the rows it always gave (the 64-row runs the pinned losses use have no collision at all)."""
    raw = synthetic._raw_rows("in_domain", 8200, synthetic.DATA_SEED)
    first = next(i for i, r in enumerate(raw) if problem_key(r["problem"]) in TEST_KEYS)
    assert first == 1312  # in_domain test problem 171 (of the 4 in the first 8192 draws before deduplication)
    rows = synthetic.make_rows("in_domain", 8192, synthetic.DATA_SEED)
    assert rows[:first] == raw[:first] and rows[first] == raw[first + 1]
    assert synthetic.make_rows("in_domain", 64, synthetic.DATA_SEED) == raw[:64]
    assert load_benchmark("synthetic_train", None, None).rows == rows


def test_problem_key_ignores_case_unicode_form_and_whitespace():
    assert problem_key("Compute 1 + 2.") == problem_key("  compute 1+2.\n") == problem_key("Ｃompute 1 + 2.")
    assert problem_key("Compute 1 + 2.") != problem_key("Compute 1 + 3.")


def _graded(tmp_path: Path, benchmark: str, questions: list[str], golds: list[str], data_dir: Path | None = None) -> Path:
    """An eval folder of `posttrain eval --completions` over a file of these problems given as
    `benchmark`:FILE, each answered correctly once (what rft-data would keep)."""
    source = tmp_path / "my_training_problems.jsonl"
    source.write_text("".join(json.dumps({"problem": q, "question": q, "answer": g}) + "\n"
                              for q, g in zip(questions, golds)))
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps({"index": i, "completion": f"so \\boxed{{{g}}}", "finish_reason": "stop"})
                                   + "\n" for i, g in enumerate(golds)))
    out = tmp_path / "graded"
    args = ["--data-dir", str(data_dir)] if data_dir else []
    run_cli("eval", "--benchmark", f"{benchmark}:{source}", "--completions", str(completions), "--out", str(out),
            "--workers", "1", *args)
    return out


def _rft_refusal(tmp_path: Path, graded: Path) -> str:
    out = tmp_path / "rft.jsonl"
    proc = run_cli("rft-data", str(graded), "--out", str(out), "--given-completions", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return " ".join(proc.stderr.split())


def test_rft_data_refuses_a_synthetic_test_problem_under_a_training_name(tmp_path):
    train = synthetic.make_rows("in_domain", 2, synthetic.DATA_SEED)
    test = synthetic.test_rows("out_of_domain")[7]
    graded = _graded(tmp_path, "synthetic_train", [train[0]["problem"], "  compute " + test["problem"][8:].upper(),
                                                   train[1]["problem"]],
                     [train[0]["answer"], test["answer"], train[1]["answer"]])
    message = _rft_refusal(tmp_path, graded)
    assert f"{tmp_path / 'my_training_problems.jsonl'}: problem 1" in message
    assert "is a test problem of the benchmark synthetic_ood (built-in)" in message


def test_rft_data_refuses_a_benchmark_file_given_under_another_name(tmp_path):
    """A copy of problems of a benchmark file under the benchmark directory (here a private
    --data-dir holding a test file posttrain has never heard of) is refused by content."""
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "heldout.jsonl").write_text(json.dumps({"question": "What is 6 times 7?", "answer": "42"}) + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    graded = _graded(run_dir, "math500", ["What is 2 plus 2?", "what is 6 TIMES 7?"], ["4", "42"], data_dir=bench_dir)
    message = _rft_refusal(run_dir, graded)
    assert "problem 1" in message and f"test problem of the benchmark heldout ({bench_dir / 'heldout.jsonl'})" in message


@pytest.mark.skipif(not (SHARED_BENCHMARKS / "math500.jsonl").is_file(), reason="needs ../shared/benchmarks")
def test_rft_data_refuses_a_real_benchmark_problem_whatever_the_file_name(tmp_path):
    rows = [json.loads(line) for line in (SHARED_BENCHMARKS / "math500.jsonl").read_text().splitlines()[:2]]
    assert problem_key(rows[0]["problem"]) in held_out_problems([SHARED_BENCHMARKS])
    graded = _graded(tmp_path, "synthetic_train", [r["problem"] for r in rows], [r["answer"] for r in rows])
    message = _rft_refusal(tmp_path, graded)
    assert f"test problem of the benchmark math500 ({SHARED_BENCHMARKS / 'math500.jsonl'})" in message


def test_rft_data_keeps_training_problems_read_from_a_file(tmp_path):
    train = synthetic.make_rows("in_domain", 2, synthetic.DATA_SEED)
    graded = _graded(tmp_path, "synthetic_train", [r["problem"] for r in train], [r["answer"] for r in train])
    run_cli("rft-data", str(graded), "--out", str(tmp_path / "rft.jsonl"), "--given-completions")
    kept = [json.loads(line) for line in (tmp_path / "rft.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in kept] == [r["problem"] for r in train]


@pytest.mark.parametrize("name", [n for n, b in BENCHMARKS.items() if b.filename is None])
def test_name_path_of_a_built_in_benchmark_reads_the_path_or_refuses(tmp_path, name):
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"index": 0, "completion": "\\boxed{5}"}) + "\n")
    missing = tmp_path / "nonexistent" / "file.jsonl"
    proc = run_cli("eval", "--benchmark", f"{name}:{missing}", "--completions", str(completions),
                   "--out", str(tmp_path / "e"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"benchmark {name}: file not found: {missing}" in " ".join(proc.stderr.split())
    assert not (tmp_path / "e").exists()
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"problem": "Compute 2 + 3.", "answer": "5"}) + "\n")
    run_cli("eval", "--benchmark", f"{name}:{own}", "--completions", str(completions), "--out", str(tmp_path / "e"),
            "--workers", "1")
    result = json.loads((tmp_path / "e" / "results.json").read_text())["benchmarks"][name]
    assert result["source"] == str(own) and result["coverage"]["problems_in_benchmark"] == 1
    assert result["metrics"]["avg@1"] == 100.0  # graded against the file's answer
