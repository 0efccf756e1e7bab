"""`posttrain eval` never loses what it wrote and never presents partial coverage as a score:
chunked grading of --completions, coverage labels, torn-tail repair, the output-folder lock,
clear errors for a malformed benchmark file or a file as --out, and the grading pool's recovery."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.errors import UserError
from posttrain.eval.pool import TimeoutPool
from tests.helpers import BENCHMARKS, REPO, cli_env, run_cli

DATA = BENCHMARKS
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/benchmarks is not beside the checkout")


def _completions(path: Path, n: int) -> Path:
    golds = [json.loads(line)["answer"] for line in (DATA / "math500.jsonl").read_text().splitlines()[:n]]
    path.write_text("".join(json.dumps({"index": i, "completion": f"\\boxed{{{g}}}"}) + "\n" for i, g in enumerate(golds)))
    return path


def _grade(completions: Path, out: Path, check: bool = True):
    return run_cli("eval", "--benchmark", "math500", "--data-dir", str(DATA), "--completions", str(completions),
                   "--out", str(out), "--workers", "1", check=check)


@needs_data
def test_partial_completions_are_labelled_everywhere(tmp_path):
    proc = _grade(_completions(tmp_path / "c.jsonl", 1), tmp_path / "g")
    assert "math500 avg@1 100.00 on 1/500 problems (partial)" in proc.stdout + proc.stderr
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert results["benchmarks"]["math500"]["coverage"] == {"problems_graded": 1, "problems_asked": 500,
                                                            "problems_in_benchmark": 500, "complete": False}
    assert "macro_average" not in results
    from posttrain.report import Run

    run = Run(tmp_path, "train", {"name": "x"}, results=results)
    assert run.scores() == {}  # the report does not show a partial eval as a benchmark score


@needs_data
def test_killed_completions_eval_keeps_its_samples_and_resumes(tmp_path):
    completions, out = _completions(tmp_path / "c.jsonl", 200), tmp_path / "g"
    args = [sys.executable, "-m", "posttrain.cli", "eval", "--benchmark", "math500", "--data-dir", str(DATA),
            "--completions", str(completions), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (samples.exists() and samples.read_text().count("\n") >= 64):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = samples.read_text().count("\n")
    assert 64 <= kept < 200  # graded chunks were saved before the kill
    _grade(completions, out)
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(200)) and all(r["correct"] for r in records)


@needs_data
def test_torn_last_line_is_repaired_on_resume(tmp_path):
    out = tmp_path / "g"
    _grade(_completions(tmp_path / "c.jsonl", 2), out)
    samples = out / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text(lines[0] + lines[1][:20])  # killed while writing the second record
    proc = _grade(_completions(tmp_path / "c.jsonl", 3), out)
    assert "removed a torn last line" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    changed = tmp_path / "c.jsonl"
    rows = [json.loads(line) for line in changed.read_text().splitlines()]
    rows[1]["completion"] = "\\boxed{0}"  # regenerated into the same path
    changed.write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = _grade(changed, out, check=False)
    assert proc.returncode == 2 and "line 2: differs from the completion already graded" in proc.stderr
    changed.write_text(changed.read_text() + '{"index": 3, "completion": "\\s"}\n')  # not JSON: "\s"
    proc = _grade(changed, tmp_path / "other", check=False)
    assert proc.returncode == 2 and "line 4 is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


@needs_data
def test_a_second_eval_on_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    with open(out / ".eval.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running eval holds it
        proc = _grade(_completions(tmp_path / "c.jsonl", 2), out, check=False)
    assert proc.returncode == 2 and "another eval is writing this folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "samples.jsonl").exists()


def test_malformed_benchmark_file_and_out_file_are_one_line_errors(tmp_path):
    bad = tmp_path / "bench.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "oops"\n')
    completions = tmp_path / "c.jsonl"
    completions.write_text('{"index": 0, "completion": "\\\\boxed{2}"}\n')
    proc = run_cli("eval", "--benchmark", f"math500:{bad}", "--completions", str(completions),
                   "--out", str(tmp_path / "g"), check=False)
    assert proc.returncode == 2 and f"benchmark file {bad}: line 2 is not valid JSON" in proc.stderr
    bad.write_text('{"problem": "1+1?"}\n')
    proc = run_cli("eval", "--benchmark", f"math500:{bad}", "--completions", str(completions),
                   "--out", str(tmp_path / "g"), check=False)
    assert proc.returncode == 2 and "problem 1 has no field 'answer'" in proc.stderr
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n')
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    proc = run_cli("eval", "--benchmark", f"math500:{bad}", "--completions", str(completions), "--out", str(a_file),
                   check=False)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and a_file.read_text() == "keep me"
    assert "Traceback" not in proc.stderr


def _die_on(item):
    if item == "die":
        os._exit(1)
    return {"value": item}


def _always_die(item):
    os._exit(1)


def test_pool_recovers_from_killed_and_dying_workers():
    with TimeoutPool(_die_on, workers=2, timeout=30, on_timeout={"correct": False}) as pool:
        for worker in pool.workers:  # killed while idle: the next send or receive fails (reset or EOF)
            worker["process"].kill()
            worker["process"].join()
        assert pool.map(["a", "b", "c"]) == [{"value": "a"}, {"value": "b"}, {"value": "c"}]
        results = pool.map(["x", "die", "y"])  # a worker that dies on its item: that item fails, once retried
        assert results[0] == {"value": "x"} and results[2] == {"value": "y"}
        assert results[1] == {"correct": False, "error": "grader process died"}
    with TimeoutPool(_always_die, workers=1, timeout=30, on_timeout={"correct": False}) as pool:
        with pytest.raises(UserError, match="grading processes keep dying"):
            pool.map(list(range(20)))


def _grading_workers(pid: int) -> list[int]:
    """The spawned grading processes among `pid`'s children (not multiprocessing's resource tracker)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    workers = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(child)
    return workers


@needs_data
def test_eval_survives_a_killed_grading_worker(tmp_path):
    completions, out = _completions(tmp_path / "c.jsonl", 200), tmp_path / "g"
    args = [sys.executable, "-m", "posttrain.cli", "eval", "--benchmark", "math500", "--data-dir", str(DATA),
            "--completions", str(completions), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples, deadline = out / "samples.jsonl", time.time() + 120
    while time.time() < deadline and not samples.exists():  # the first chunk is graded: workers are up
        time.sleep(0.05)
    workers = _grading_workers(proc.pid)
    assert workers and samples.read_text().count("\n") < 200
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(200)) and all(r["correct"] for r in records)
