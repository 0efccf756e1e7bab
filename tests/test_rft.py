"""RFT: `posttrain eval` samples the training problems, `posttrain rft-data` keeps the correct
ones, `posttrain train` fine-tunes on them. End to end through the CLI on hand-written samples
graded by `posttrain eval --completions` (the test fixtures' tiny models solve too few
synthetic_train problems to sample from; the sampling step itself runs in `make reproduce-smoke`)."""

import json

from posttrain.data.synthetic import DATA_SEED, make_rows
from posttrain.eval.benchmarks import load_benchmark
from posttrain.eval.prompts import BOXED_INSTRUCTION
from tests.helpers import run_cli, tiny_train_recipe, write_recipe, metrics_of


def _eval_folder(tmp_path, records, prompt="chat", benchmark="synthetic_train", finished=True):
    folder = tmp_path / "samples"
    folder.mkdir(parents=True)
    (folder / "eval_config.json").write_text(json.dumps({"prompt": prompt, "completions": None}))
    base = {"benchmark": benchmark, "prompt": "<rendered>", "gold": "1", "tokens": 3}
    (folder / "samples.jsonl").write_text("".join(json.dumps({**base, **r}) + "\n" for r in records))
    if finished:  # what a finished eval records of the rows it read
        loaded = load_benchmark(benchmark, None, None)
        (folder / "results.json").write_text(json.dumps(
            {"benchmarks": {benchmark: {"source": loaded.source, "sha256": loaded.sha256}}}))
    return folder


def test_rft_data_keeps_correct_model_ended_distinct_samples(tmp_path):
    records = [
        {"index": 3, "sample": 0, "completion": "a \\boxed{1}", "correct": True, "finish_reason": "stop"},
        {"index": 3, "sample": 1, "completion": "a \\boxed{1}", "correct": True, "finish_reason": "stop"},  # duplicate
        {"index": 3, "sample": 2, "completion": "b \\boxed{1}", "correct": True, "finish_reason": "stop"},
        {"index": 3, "sample": 3, "completion": "c \\boxed{1}", "correct": True, "finish_reason": "stop"},  # over max
        {"index": 0, "sample": 0, "completion": "\\boxed{2}", "correct": False, "finish_reason": "stop"},
        {"index": 0, "sample": 1, "completion": "\\boxed{1} 1 1 1", "correct": True, "finish_reason": "length"},
        {"index": 5, "sample": 1, "completion": "d \\boxed{1}", "correct": True, "finish_reason": "stop"},
    ]
    out = tmp_path / "rft.jsonl"
    proc = run_cli("rft-data", str(_eval_folder(tmp_path, records)), "--out", str(out), "--max-per-problem", "2")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(3, 0), (3, 2), (5, 1)]
    train_rows = make_rows("in_domain", 8, DATA_SEED)
    assert rows[0]["prompt"] == f"{train_rows[3]['problem']}\n{BOXED_INSTRUCTION}" == train_rows[3]["prompt"]
    assert rows[2]["solution"] == "d \\boxed{1}"
    assert "kept 3 of 7 samples (6 correct; dropped 1 cut off, 1 duplicates, 1 over the limit) for 2 problems" in " ".join(proc.stderr.split())


def test_rft_data_refuses_what_it_cannot_pair(tmp_path):
    folder = _eval_folder(tmp_path, [{"index": 0, "sample": 0, "completion": "x", "correct": True,
                                      "finish_reason": "stop"}], prompt="qwen-boxed")
    proc = run_cli("rft-data", str(folder), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "--prompt qwen-boxed" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("rft-data", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "not an eval folder" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_rft_data_refuses_test_sets_and_unfinished_evals_and_keeps_the_last_draw(tmp_path):
    record = {"index": 0, "sample": 0, "completion": "x \\boxed{1}", "correct": True, "finish_reason": "stop"}
    # the problems `posttrain eval` scores (here the mini in-domain test set) are never training data
    folder = _eval_folder(tmp_path / "a", [record], benchmark="synthetic")
    proc = run_cli("rft-data", str(folder), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "benchmark 'synthetic' (built-in) is a test set" in " ".join(proc.stderr.split())
    folder = _eval_folder(tmp_path / "b", [record], finished=False)
    proc = run_cli("rft-data", str(folder), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "the eval did not finish" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
    # a resumed eval re-drew sample 0 of problem 0: only its last (graded) record counts
    folder = _eval_folder(tmp_path / "c", [record, {**record, "completion": "y \\boxed{2}", "correct": False}])
    proc = run_cli("rft-data", str(folder), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "no correct sample" in proc.stderr


def _line(index, completion, finish_reason="stop"):
    return {"index": index, "completion": completion, "finish_reason": finish_reason}


def test_rft_pipeline_eval_then_rft_data_then_train(tmp_path):
    golds = [row["answer"] for row in make_rows("in_domain", 8, DATA_SEED)]
    wrong = [str(int(g) + 1) for g in golds]
    lines = [  # per index, the lines in order are samples 0, 1, 2, ...
        _line(0, f"So it is \\boxed{{{golds[0]}}}."),  # 0/0 kept
        _line(0, f"So it is \\boxed{{{golds[0]}}}."),  # 0/1 correct, a duplicate of 0/0
        _line(0, f"\\boxed{{{wrong[0]}}}"),  # 0/2 wrong
        _line(0, f"First add, then subtract: \\boxed{{{golds[0]}}}"),  # 0/3 kept
        _line(1, f"\\boxed{{{golds[1]}}} and on and on", "length"),  # 1/0 correct but cut at max_new_tokens
        _line(1, "no answer"),  # 1/1 wrong
        _line(2, f"a \\boxed{{{golds[2]}}}"),  # 2/0 kept
        _line(2, f"b \\boxed{{{golds[2]}}}"),  # 2/1 kept
        _line(2, f"c \\boxed{{{golds[2]}}}"),  # 2/2 correct, over --max-per-problem 2
        _line(4, f"\\boxed{{{wrong[4]}}}"),  # 4/0 wrong (problems 3, 5..7: no samples, coverage partial)
    ]
    completions = tmp_path / "samples.jsonl"
    completions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    graded = tmp_path / "graded"
    proc = run_cli("eval", "--benchmark", "synthetic_train", "--limit", "8", "--completions", str(completions),
                   "--out", str(graded), "--workers", "1")
    assert "on 4/8 problems (partial)" in " ".join(proc.stderr.split() + proc.stdout.split())
    samples = [json.loads(line) for line in (graded / "samples.jsonl").read_text().splitlines()]
    assert sum(s["correct"] for s in samples) == 7 and len(samples) == 10

    data = tmp_path / "rft.jsonl"
    args = ("rft-data", str(graded), "--out", str(data), "--max-per-problem", "2")
    refused = run_cli(*args, check=False)  # given completions are refused unless vouched for
    assert refused.returncode == 2 and "--given-completions" in refused.stderr and not data.exists()
    proc = run_cli(*args, "--given-completions")
    assert "kept 4 of 10 samples (7 correct; dropped 1 cut off, 1 duplicates, 1 over the limit) for 2 problems" \
        in " ".join(proc.stderr.split())
    kept = [json.loads(line) for line in data.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in kept] == [(0, 0), (0, 3), (2, 0), (2, 1)]
    assert [r["solution"] for r in kept] == [lines[0]["completion"], lines[3]["completion"], lines[6]["completion"],
                                             lines[7]["completion"]]
    train_rows = make_rows("in_domain", 8, DATA_SEED)
    assert [r["prompt"] for r in kept] == [train_rows[i]["prompt"] for i in (0, 0, 2, 2)]  # the chat prompt's user turn

    # SFT on exactly those rows: 2 steps of 2 examples is one epoch over the 4
    recipe = tiny_train_recipe(tmp_path, name="rft", data={"source": str(data), "prompt_field": "prompt",
                                                           "response_field": "solution", "max_length": 512},
                               train={"epochs": 1, "batch_size": 2, "micro_batch_size": 2})
    del recipe["data"]["synthetic"]
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    assert "examples │ 4 (0 truncated, 0 dropped)" in " ".join(proc.stderr.split())
    metrics = metrics_of(tmp_path / "runs" / "rft")
    assert len(metrics) == 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "runs" / "rft" / "final")
    expected = sum(len(tokenizer(r["solution"], add_special_tokens=False)["input_ids"]) + 1 for r in kept)  # + EOS
    assert sum(row["response_tokens"] for row in metrics) == expected
    # the run keeps where its data was sampled, so the report finds it as RFT after the data file moves
    assert json.loads((tmp_path / "runs" / "rft" / "rft_source.json").read_text()) == {"rft_source": str(graded)}
    from posttrain.report import Run, _rft_source

    data.unlink()
    assert _rft_source(Run(tmp_path / "runs" / "rft", "train", {"data": {"source": str(data)}})) == graded


def test_rft_data_needs_to_know_how_each_correct_sample_ended(tmp_path):
    gold = make_rows("in_domain", 1, DATA_SEED)[0]["answer"]
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"index": 0, "completion": f"\\boxed{{{gold}}}"}) + "\n")  # no finish_reason
    run_cli("eval", "--benchmark", "synthetic_train", "--limit", "1", "--completions", str(completions),
            "--out", str(tmp_path / "g"), "--workers", "1")
    proc = run_cli("rft-data", str(tmp_path / "g"), "--out", str(tmp_path / "o.jsonl"), "--given-completions", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "o.jsonl").exists()
    assert "has finish_reason None; RFT keeps only samples the model ended itself, so each needs 'stop' or 'length' " \
           f"(give it per line of the completions file {completions})" in " ".join(proc.stderr.split())


def test_rft_data_refuses_damaged_or_foreign_records_and_unsafe_outputs(tmp_path):
    import pytest

    from posttrain.errors import UserError
    from posttrain.rft import rft_data

    good = {"index": 0, "sample": 0, "completion": "x \\boxed{1}", "correct": True, "finish_reason": "stop"}

    def refusal(records=None, out=None, edit=None):
        case = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder = _eval_folder(case, records if records is not None else [good])
        if edit:
            edit(folder)
        with pytest.raises(UserError) as err:
            rft_data(folder, out(folder) if out else case / "o.jsonl")
        return str(err.value)

    assert "record 1 has index=-1" in refusal([{**good, "index": -1}])  # rows[-1] would be the last problem
    assert "record 1 has index='0'" in refusal([{**good, "index": "0"}])
    assert "correct='false'; it must be true or false" in refusal([{**good, "correct": "false"}])
    assert "record 1 has completion=None" in refusal([{k: v for k, v in good.items() if k != "completion"}])
    assert "index 9000 is past the benchmark's 8192 problems" in refusal([{**good, "index": 9000}])
    assert "line 1 is not a JSON object" in refusal(edit=lambda f: (f / "samples.jsonl").write_text("[1, 2]\n{}\n"))
    assert "not UTF-8" in refusal(edit=lambda f: (f / "samples.jsonl").write_bytes(b"\xff\xfe{}\n"))
    assert "eval_config.json: not valid JSON" in refusal(edit=lambda f: (f / "eval_config.json").write_text("{"))
    assert "inside the eval folder" in refusal(out=lambda f: f / "samples.jsonl")  # would overwrite the samples
    assert "does not exist" in refusal(out=lambda f: f.parent / "no" / "o.jsonl")
    assert "is not a regular file" in refusal(out=lambda f: f.parent)
