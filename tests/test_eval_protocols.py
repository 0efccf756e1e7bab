"""Evaluation protocols: --extract boxed|after-think|harness, the harness-style grader, --cross-check,
the lsm-think prompt and the papers' eval recipes (n = 1 single-task, avg@32 ablation)."""

import json

import pytest

from posttrain.config import EvalRecipe, load_recipe
from posttrain.data.templates import LSM_MATH_TEMPLATE
from posttrain.errors import UserError
from posttrain.eval.harness_grader import HarnessGrader, harness_equal, harness_extract, normalize, to_number
from posttrain.eval.prompts import prompt_text
from posttrain.eval.protocols import after_first_think, make_math_grader
from tests.helpers import BENCHMARKS, REPO, run_cli

# --- extraction ------------------------------------------------------------------------------


def test_after_first_think_is_what_the_lsm_eval_grades():
    assert after_first_think("<think>try \\boxed{1}</think> so \\boxed{2}") == " so \\boxed{2}"
    assert after_first_think("no think at all \\boxed{3}") == "no think at all \\boxed{3}"  # the whole response
    # Their split("</think>")[1]: the text between the first and the second </think>.
    assert after_first_think("a</think>b</think>c") == "b"
    assert after_first_think("<think>never closed \\boxed{4}") == "<think>never closed \\boxed{4}"


@pytest.mark.parametrize("completion, expected", [
    ("so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}+1}.", "x^{2}+1"),  # the last box, braces matched
    ("<think>\\boxed{9}</think> the result", "9"),  # the harness does not remove <think>
    ("\\boxed 5$ done", "5"),  # a box without braces: up to the dollar
    ("cut off \\boxed{12", "12"),  # never closed: what follows
    ("Therefore, the answer is 42.", "42."),
    ("we get 3,456 apples and 1,000,000 more", "1000000"),  # last number, thousands commas removed
    ("x = -2.5 or so", "-2.5"),
    ("no digits here", None),
])
def test_harness_extraction(completion, expected):
    assert harness_extract(completion) == expected


def test_the_three_extractions_read_different_answers_from_one_completion():
    completion = "<think>first guess \\boxed{4}</think> it is \\boxed{3} </think> or \\boxed{5}; finally 6"
    boxed, after_think, harness = (make_math_grader(mode, 1) for mode in ("boxed", "after-think", "harness"))
    try:
        assert boxed.grade(["5"], [completion])[0]["correct"]  # posttrain's default: after the last </think>
        assert after_think.grade(["3"], [completion])[0] == {"extracted": "3", "correct": True, "error": None}
        assert harness.grade(["5"], [completion])[0]["extracted"] == "5"
        none = after_think.grade(["3"], ["<think>a</think> no box"])[0]
        assert none["extracted"] is None and not none["correct"] and "after the first </think>" in none["error"]
        assert harness.grade(["3"], ["nothing"])[0] == {"extracted": None, "correct": False,
                                                         "error": "no boxed answer, answer phrase or number"}
    finally:
        for grader in (boxed, after_think, harness):
            grader.close()


# --- harness-style equivalence ---------------------------------------------------------------


@pytest.mark.parametrize("gold, answer", [
    ("\\frac{1}{2}", "0.5"), ("\\frac12", "1/2"), ("\\dfrac{3}{4}", "\\frac{3}{4}"), ("1000", "1,000"),
    ("10", "10.0"), ("5", "5 \\text{ cm}"), ("18^\\circ", "18"), ("5", "x = 5"), ("\\$12", "12"),
    ("\\text{Monday}", "monday"), ("(3, \\frac{\\pi}{2})", "(3,\\pi/2)"), ("[1,2)", "(1,2]"),
    ("x^2+2x+1", "(x+1)^2"), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("2\\sqrt{3}", "\\sqrt{12}"),
    ("y = 2x + 3", "2x+3"), ("2x - y = 1", "y - 2x = -1"), ("\\frac{1}{3}", "0.33333"),
    ("50", "0.5"),  # the harness also accepts the gold read as a percentage
    ("\\left( 1, 2 \\right)", "(1,2)"), ("\\infty", "infinity"),
])
def test_harness_accepts(gold, answer):
    assert harness_equal(gold, answer)


@pytest.mark.parametrize("gold, answer", [
    ("2", "3"), ("\\frac{1}{3}", "0.33"), ("(1,2)", "(1,3)"), ("(1,2)", "(1,2,3)"), ("x+1", "x+2"),
    ("\\sqrt{2}", "1.41"), ("10", ""), ("7", "\\frac{7}{0}"), ("2x - y = 1", "2x + y = 1"), ("\\pi", "3.14"),
    ("ab", "ba"), ("\\text{evens}", "\\text{seven}"),  # words are not products of letters
])
def test_harness_rejects(gold, answer):
    assert not harness_equal(gold, answer)


def test_harness_normalisation_and_numbers():
    assert normalize("\\left( \\dfrac12 \\right).") == "(\\frac{1}{2})"
    assert to_number("1,234.50") == 1234.5 and to_number("-\\frac{3}{4}") == -0.75 and to_number("x") is None
    assert to_number("1,2") is None  # a pair, not a number with a thousands comma


DATA = BENCHMARKS


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/benchmarks is not beside the checkout")
def test_harness_grader_accepts_every_math500_reference_solution_and_rejects_shifted_ones():
    from posttrain.eval.benchmarks import load_benchmark

    bench = load_benchmark("math500", str(DATA), None)
    golds = [bench.spec.gold(r) for r in bench.rows]
    grader = HarnessGrader(2)
    try:
        assert all(v["correct"] for v in grader.grade(golds, [r["solution"] for r in bench.rows]))
        shifted = grader.grade(golds, [bench.rows[(i + 1) % len(golds)]["solution"] for i in range(len(golds))])
        assert sum(v["correct"] for v in shifted) <= 5  # coincidences ("5" vs "x = 5") and the percent rule (200 vs 2)
    finally:
        grader.close()


def test_hostile_expressions_do_not_hang_the_harness_grader():
    grader = HarnessGrader(1)
    try:
        verdicts = grader.grade(["1", "2"], ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{2}"])
        assert [v["correct"] for v in verdicts] == [False, True]
    finally:
        grader.close()


# --- the cross-check through the real CLI ----------------------------------------------------


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cross_check_finds_a_planted_disagreement(tmp_path):
    bench = _write(tmp_path / "bench.jsonl", [{"problem": "p0", "answer": "42"}, {"problem": "p1", "answer": "\\frac{1}{2}"},
                                               {"problem": "p2", "answer": "7"}])
    completions = _write(tmp_path / "completions.jsonl", [
        {"index": 0, "completion": "Adding up, the total is 42"},  # no box, right last number: only harness-correct
        {"index": 1, "completion": "so \\boxed{0.5}"},  # both correct
        {"index": 2, "completion": "so \\boxed{8}"},  # both wrong
        {"index": 2, "completion": "<think>maybe \\boxed{7}</think> so \\boxed{7}"},  # both correct
    ])
    out = tmp_path / "graded"
    args = ["eval", "--benchmark", f"aime24:{bench}", "--completions", str(completions), "--out", str(out), "--workers", "1"]
    proc = run_cli(*args, "--cross-check")
    assert "1 of 4 samples graded differently" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["extract"] == "boxed"
    counts = results["cross_check"]["benchmarks"]["aime24"]
    assert counts == {"samples": 4, "accuracy_mathverify_boxed": 50.0, "accuracy_harness": 75.0, "disagreements": 1,
                      "only_mathverify_correct": 0, "only_harness_correct": 1}
    listed = [json.loads(line) for line in (out / "cross_check.jsonl").read_text().splitlines()]
    assert listed == [{"benchmark": "aime24", "index": 0, "sample": 0, "gold": "42", "mathverify_extracted": None,
                       "mathverify_correct": False, "harness_extracted": "42", "harness_correct": True,
                       "cause": "extraction"}]
    # The primary grade is unchanged by the cross-check (math-verify, boxed).
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in records] == [False, True, False, True]
    # Changing the extraction on the same folder is refused and keeps what was written.
    before = (out / "samples.jsonl").read_text()
    changed = run_cli(*args, "--extract", "harness", check=False)
    assert changed.returncode == 2 and "different settings (extract)" in changed.stderr
    assert (out / "samples.jsonl").read_text() == before
    # Graded harness-style from the start, the same samples give the harness's verdicts.
    run_cli(*args[:-4], "--out", str(tmp_path / "harness"), "--extract", "harness", "--workers", "1")
    harness_records = [json.loads(line) for line in (tmp_path / "harness" / "samples.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in harness_records] == [True, True, False, True]
    assert json.loads((tmp_path / "harness" / "results.json").read_text())["config"]["extract"] == "harness"


def test_an_unknown_extraction_is_refused_naming_the_flag():
    from posttrain.config import from_dict

    with pytest.raises(UserError, match=r"\(--extract last\): key 'extract' must be one of: boxed, after-think, harness"):
        from_dict(EvalRecipe, {"extract": "last"}, "command line", {"extract": "--extract last"})


# --- prompts and recipes ---------------------------------------------------------------------


def test_lsm_template_is_the_official_text():
    official = ("Math problem: What is 1+1?\n\nPlease carefully reason through the math problem step by step and derive "
                "the correct answer. You must conduct reasoning inside <think> and </think> and give the final answer "
                "within \\boxed{}.\n")
    assert LSM_MATH_TEMPLATE.format(question="What is 1+1?") == official


def test_lsm_think_prompt_is_the_template_as_the_only_user_turn():
    from transformers import PreTrainedTokenizerFast

    from posttrain.models import build_tiny_tokenizer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer(320).backend_tokenizer,
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}<|im_start|>assistant{{ '\\n' }}")
    text = prompt_text("lsm-think", "math", "  What is 1+1?\n", tokenizer)
    assert text == f"<|im_start|>user\n{LSM_MATH_TEMPLATE.format(question='What is 1+1?')}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(UserError, match="lsm-think"):
        prompt_text("lsm-think", "code", "def f():", tokenizer)


def test_paper_eval_recipes_follow_the_official_protocols():
    paper = REPO / "recipes" / "paper"
    single = load_recipe(paper / "eval-lsm-single-task.yaml", EvalRecipe)
    ablation = load_recipe(paper / "eval-lsm-aime24-ablation.yaml", EvalRecipe)
    dft = load_recipe(paper / "eval-dft-protocol.yaml", EvalRecipe)
    assert (single.samples, single.benchmarks) == (1, ["math500", "aime24", "aime25", "minerva_math", "olympiadbench"])
    assert (ablation.samples, ablation.benchmarks) == (32, ["aime24"])
    for lsm in (single, ablation):
        assert (lsm.prompt, lsm.extract, lsm.temperature, lsm.top_p, lsm.top_k, lsm.max_new_tokens) == \
            ("lsm-think", "after-think", 1.0, 0.9, 0, 16384)
    assert (dft.prompt, dft.extract, dft.samples, dft.temperature, dft.top_p, dft.max_new_tokens) == \
        ("qwen-boxed", "harness", 16, 1.0, 1.0, 4096)
    assert not (paper / "eval-lsm-protocol.yaml").exists()


def test_ablation_numbers_are_typed_in_with_their_source():
    from posttrain import paper_numbers

    assert paper_numbers.LSM_AIME24_AVG32 == {"init": 10.0, "opd": 20.4, "opd + top-p": 21.6, "top-K without top-p": 17.7,
                                              "lsm": 23.6}
    assert "avg@32" in paper_numbers.SOURCES[paper_numbers.LSM_AIME24_ABLATION]
