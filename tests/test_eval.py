"""The evaluator: answer extraction, math-verify grading, metrics, prompts,
and `posttrain eval` end to end on a tiny model with the real benchmark files."""

import json
import re
from itertools import combinations

import pytest

from posttrain.eval.benchmarks import last_boxed, load_benchmark, strip_think
from posttrain.eval.math_grader import MathGrader, extract_answer
from posttrain.eval.metrics import pass_at_k, summarize
from posttrain.eval.prompts import QWEN_BOXED, prompt_ids, prompt_text
from tests.helpers import BENCHMARKS, run_cli, tiny_train_recipe

DATA = BENCHMARKS
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/benchmarks is not beside the checkout")


# --- extraction ------------------------------------------------------------------------------


def test_last_boxed_matches_braces():
    assert last_boxed(r"so \boxed{\frac{1}{2}} and then \boxed{x^{2}+1}.") == "x^{2}+1"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"no box") is None
    assert last_boxed(r"cut \boxed{\frac{1}{2") is None  # truncated inside the box


def test_think_is_stripped_before_extraction():
    assert extract_answer(r"<think>maybe \boxed{1}</think> so \boxed{2}") == "2"
    assert extract_answer(r"<think>still thinking \boxed{1}") is None  # cut while thinking
    assert strip_think("plain") == "plain"


# --- math grading ----------------------------------------------------------------------------


@needs_data
def test_math500_reference_solutions_grade_at_least_99_percent():
    bench = load_benchmark("math500", str(DATA), None)
    with MathGrader(workers=2) as grader:
        verdicts = grader.grade([bench.spec.gold(r) for r in bench.rows], [r["solution"] for r in bench.rows])
    misses = [(r["unique_id"], r["answer"], v["extracted"]) for r, v in zip(bench.rows, verdicts) if not v["correct"]]
    assert len(misses) <= 5, misses  # ≥ 99% (measured: 500/500)


@needs_data
def test_gsm8k_reference_solutions_grade_at_least_99_percent():
    bench = load_benchmark("gsm8k", str(DATA), None)
    completions = [re.sub(r"####\s*(.*)$", r"The answer is \\boxed{\1}.", r["answer"].strip()) for r in bench.rows]
    with MathGrader(workers=2) as grader:
        verdicts = grader.grade([bench.spec.gold(r) for r in bench.rows], completions)
    misses = [(r["idx"], bench.spec.gold(r), v) for r, v in zip(bench.rows, verdicts) if not v["correct"]]
    assert len(misses) <= len(bench.rows) // 100, misses


def test_math_grader_equivalences_and_failures():
    golds = ["\\frac{1}{2}", "27.0", "\\left( 3, \\frac{\\pi}{2} \\right)", "2", "x^2+1"]
    completions = [r"\boxed{0.5}", r"\boxed{27}", r"\boxed{(3, \pi/2)}", r"\boxed{3}", "no answer here"]
    with MathGrader(workers=1) as grader:
        verdicts = grader.grade(golds, completions)
    assert [v["correct"] for v in verdicts] == [True, True, True, False, False]
    assert verdicts[4]["extracted"] is None and verdicts[3]["extracted"] == "3"


# --- metrics ---------------------------------------------------------------------------------


def test_pass_at_k_matches_brute_force():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (10, 3, 5)]:
        subsets = list(combinations([1] * c + [0] * (n - c), k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_summarize_known_answers():
    verdicts = [[True, False, True, False], [False, False, False, False], [True, True, True, True]]
    answers = [["1", "2", "1", "3"], ["5", "5", "6", None], ["x", "x", "x", "x"]]
    m = summarize(verdicts, answers)
    assert m["avg@4"] == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    columns = [100 * 2 / 3, 100 / 3, 100 * 2 / 3, 100 / 3]
    assert m["std_over_samples"] == pytest.approx(__import__("statistics").stdev(columns))
    assert m["pass@1"] == pytest.approx(m["avg@4"]) and m["pass@4"] == pytest.approx(200 / 3)
    assert m["maj@4"] == pytest.approx(200 / 3)  # "1" wins problem 0, "5" (wrong) problem 1, "x" problem 2
    m = summarize([[False, False, True, True, True]], [["7", "7", "12.", "$12$", " 12 "]])
    assert m["maj@5"] == 100.0  # three ways of writing 12 are one answer


# --- prompts ---------------------------------------------------------------------------------


def test_qwen_boxed_is_byte_identical_to_the_harness_template():
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 1+1?\n"
                "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert prompt_text("qwen-boxed", "math", "What is 1+1?", None) == expected
    assert QWEN_BOXED.count("{input}") == 1


def test_chat_prompt_has_no_double_bos():
    from transformers import PreTrainedTokenizerFast

    from posttrain.models import build_tiny_tokenizer

    base = build_tiny_tokenizer(320)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ids = prompt_ids("chat", "math", "Compute 1 + 2.", tokenizer)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


@needs_data
def test_benchmark_gold_answers_are_extracted_per_dataset():
    gold = {name: load_benchmark(name, str(DATA), 3) for name in ("minerva_math", "olympiadbench", "gsm8k", "amc23")}
    assert gold["gsm8k"].spec.gold(gold["gsm8k"].rows[0]) == "18"
    assert gold["olympiadbench"].spec.gold(gold["olympiadbench"].rows[0]) == "2"
    minerva = gold["minerva_math"]
    assert minerva.spec.gold(minerva.rows[0]) == last_boxed(minerva.rows[0]["solution"]) is not None
    assert gold["amc23"].spec.gold(gold["amc23"].rows[0]) == "27.0"
    assert len(gold["gsm8k"].sha256) == 64


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from posttrain.config import TrainRecipe, from_dict
    from posttrain.train import train

    tmp = tmp_path_factory.mktemp("evalmodel")
    recipe = tiny_train_recipe(tmp, name="m", data={"prompt_field": "prompt", "synthetic": {"num_examples": 2048}},
                               optim={"lr": 1e-2}, train={"epochs": 1, "batch_size": 32, "micro_batch_size": 32})
    train(from_dict(TrainRecipe, recipe, "fixture"))
    return tmp / "runs" / "m" / "final"


@needs_data
def test_eval_cli_end_to_end_and_resume(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_checkpoint), "--benchmark", "math500,humaneval", "--data-dir", str(DATA),
            "--samples", "4", "--max-new-tokens", "24", "--batch-size", "4", "--out", str(out),
            "--allow-weak-sandbox"]  # where bubblewrap is missing (results.json then says sandbox: weak)
    run_cli(*args, "--limit", "6")
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 6 * 4
    first = [json.loads(line) for line in lines]
    for key in ("prompt", "completion", "finish_reason", "extracted", "gold", "correct", "error"):
        assert key in first[0], key
    proc = run_cli(*args, "--limit", "20")  # resumes: only the missing problems are generated
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 20 * 4 and records[: len(first)] == first
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"math500", "humaneval"}
    math500 = results["benchmarks"]["math500"]
    assert math500["metrics"]["problems"] == 20 and "avg@4" in math500["metrics"] and len(math500["sha256"]) == 64
    assert results["versions"]["torch"] and "macro_average" in results
    assert math500["coverage"] == {"problems_graded": 20, "problems_asked": 20, "problems_in_benchmark": 500,
                                   "complete": True}  # --limit 20: a complete eval of a subset, said so
    assert "math500" in proc.stderr  # the table
    changed = run_cli(*args, "--limit", "20", "--temperature", "0.5", check=False)
    assert changed.returncode == 2 and "different settings" in changed.stderr


def test_synthetic_benchmark_and_the_default_output_folder(tiny_checkpoint):
    run_cli("eval", "--model", str(tiny_checkpoint), "--benchmark", "synthetic,synthetic_ood", "--samples", "2",
            "--limit", "8", "--max-new-tokens", "48")
    results = json.loads((tiny_checkpoint.parent / "eval" / "results.json").read_text())  # runs/m/eval
    assert results["benchmarks"]["synthetic"]["metrics"]["problems"] == 8
    assert results["benchmarks"]["synthetic"]["no_answer_frac"] < 1.0  # the format was learned


@needs_data
def test_grading_completions_made_elsewhere(tmp_path):
    bench = load_benchmark("math500", str(DATA), 3)
    path = tmp_path / "completions.jsonl"
    lines = [{"index": 0, "completion": bench.rows[0]["solution"]}, {"index": 0, "completion": "\\boxed{7}"},
             {"index": 2, "completion": bench.rows[2]["solution"]}]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    run_cli("eval", "--benchmark", "math500", "--data-dir", str(DATA), "--completions", str(path), "--out", str(tmp_path / "g"))
    records = [json.loads(line) for line in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"], r["correct"]) for r in records] == [(0, 0, True), (0, 1, False), (2, 0, True)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 9999, "completion": "x"}\n')
    proc = run_cli("eval", "--benchmark", "math500", "--data-dir", str(DATA), "--completions", str(bad), check=False)
    assert proc.returncode == 2 and "outside math500" in proc.stderr


def test_unknown_benchmark_or_missing_model_is_a_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("eval", "--model", "x", "--benchmark", "math5000", "--out", str(out), check=False)
    assert proc.returncode == 2 and "unknown benchmark 'math5000'" in proc.stderr
    proc = run_cli("eval", "--model", str(tmp_path / "missing"), "--benchmark", "synthetic", "--out", str(out), check=False)
    assert proc.returncode == 2 and "--model: " in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_out_of_range_eval_flag_names_the_flag():
    proc = run_cli("eval", "--model", "x", "--benchmark", "synthetic", "--limit", "0", check=False)
    assert proc.returncode == 2 and "(--limit 0): key 'limit' must be an integer ≥ 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
