"""GRPO: group advantages, the clipped loss and its KL term exactly; the loop end to end (CLI),
with the math grader's reward and with HumanEval's tests in the code sandbox (prompts.reward code)."""

import gzip
import json
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import RLRecipe, from_dict
from posttrain.errors import UserError
from posttrain.losses import OBJECTIVES, grpo
from tests.helpers import BENCHMARKS, TINY, run_cli, token_signals, write_recipe, metrics_of


def test_group_advantages_are_normalised_within_each_prompt():
    reward_B = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    group_B = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    got = grpo.group_advantages(reward_B, group_B, normalize_std=True, epsilon=0.0)
    std0 = torch.tensor([0.75, 0.25, 0.25, 0.25]).pow(2).sum().div(3).sqrt()  # unbiased std of [1, 0, 0, 0]
    torch.testing.assert_close(got[:4], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64) / std0)
    assert got[4:6].tolist() == [0.0, 0.0]  # every rollout of the group equal: no signal
    torch.testing.assert_close(got[6:], torch.tensor([0.5, -0.5], dtype=torch.float64) / (0.5**0.5))
    centred = grpo.group_advantages(reward_B, group_B, normalize_std=False, epsilon=1e-6)
    assert centred.tolist() == [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.5, -0.5]


def test_prepare_spreads_the_advantage_over_each_response():
    batch = {"loss_mask": torch.tensor([[False, True, True], [True, True, False]])}
    signals = token_signals(batch)
    signals.verifiable_reward_B = torch.tensor([1.0, 0.0])
    signals.group_B = torch.tensor([5, 5])
    advantage_BT = grpo.prepare(grpo.Params(normalize_std=False), batch, signals)["advantage"]
    assert advantage_BT.tolist() == [[0.0, 0.5, 0.5], [-0.5, -0.5, 0.0]]


def test_asymmetric_clip_and_reference_kl():
    params = grpo.Params(clip_low=0.2, clip_high=0.28, kl_coef=0.5, kl_estimator="k3")
    old = torch.zeros(4, dtype=torch.float64)
    ratio = torch.tensor([1.5, 1.5, 0.5, 1.1], dtype=torch.float64)
    advantage = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    reference = torch.tensor([0.0, 0.0, 0.0, -0.3], dtype=torch.float64)
    logp = ratio.log().unsqueeze(1).requires_grad_(True)
    loss, stats = grpo.token_loss(params, logp, None, {"old_logprob": old, "advantage": advantage,
                                                       "reference_logprob": reference})
    log_r = reference - ratio.log()
    kl = log_r.exp() - log_r - 1
    want = torch.stack([-1.28 * torch.ones(()), 1.5 * torch.ones(()), 0.8 * torch.ones(()), -1.1 * torch.ones(())])
    torch.testing.assert_close(loss.detach(), want.double() + 0.5 * kl)
    assert stats["clip_frac"].tolist() == [1.0, 0.0, 1.0, 0.0]  # above 1 + 0.28 with A > 0; below 1 − 0.2 with A < 0
    # a clipped token has no policy-gradient part, only the KL's
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad[0, 0], (0.5 * (1 - log_r.exp()))[0])
    k1 = grpo.token_loss(grpo.Params(kl_coef=1.0, kl_estimator="k1", clip_high=1.0), logp, None,
                         {"old_logprob": old, "advantage": torch.zeros(4, dtype=torch.float64),
                          "reference_logprob": reference})[1]["kl_reference"]
    torch.testing.assert_close(k1.detach(), ratio.log() - reference)


def test_needs_declares_only_what_it_uses():
    assert OBJECTIVES["grpo"].needs(grpo.Params()) == {"verifiable_reward"}
    assert OBJECTIVES["grpo"].needs(grpo.Params(kl_coef=0.1)) == {"verifiable_reward", "reference_logprob"}


def _grpo_recipe(tmp_path, student, **objective):
    return {
        "name": "g", "out_dir": str(tmp_path / "runs"), "student": {"path": str(student)},
        "prompts": {"source": "synthetic", "prompt_field": "prompt",
                    "synthetic": {"split": "in_domain", "num_examples": 64}},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 64},
        "scoring": {"grader_workers": 1},
        "objective": {"name": "grpo", **objective}, "optim": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": 2, "mini_batch_size": 8, "micro_batch_size": 4},
    }


def test_grpo_runs_without_a_teacher_and_reports_its_diagnostics(tmp_path, boxer):
    # The boxer answers "Compute a - (a-1)." with \boxed{1} or \boxed{2}, about half each: rewards of
    # 1 and 0 in one group by construction of the fixture, on any machine (a model trained on the
    # synthetic task gave a lucky hit on one CPU and none on another).
    recipe = _grpo_recipe(tmp_path, boxer, clip_high=0.28, kl_coef=0.05)
    ones = tmp_path / "ones.jsonl"
    ones.write_text("".join(json.dumps({"problem": f"Compute {a} - {a - 1}.", "answer": "1"}) + "\n" for a in range(1, 65)))
    recipe["prompts"] = {"source": str(ones), "prompt_field": "problem", "answer_field": "answer"}
    recipe["rollout"]["max_new_tokens"] = 24
    run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)))
    rows = metrics_of(tmp_path / "runs" / "g")
    assert len(rows) == 2
    for row in rows:
        for key in ("verifiable_reward_mean", "verifiable_reward_std", "zero_advantage_group_frac", "train_clip_frac",
                    "train_kl_reference", "entropy", "response_length"):
            assert key in row, key
        assert 0.0 <= row["verifiable_reward_mean"] <= 1.0 and 0.0 <= row["zero_advantage_group_frac"] <= 1.0
        assert "reverse_kl" not in row and "reward_mean" not in row  # no teacher, no teacher metrics
    # the rewards are the grader's verdicts on the boxed answers: some right, some wrong
    assert any(0 < row["verifiable_reward_mean"] < 1 for row in rows), rows


def test_grpo_refuses_a_teacher_and_opd_requires_one(tmp_path, models):
    teacher, student = models
    recipe = _grpo_recipe(tmp_path, student)
    recipe["teacher"] = {"path": str(teacher)}
    proc = run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "grpo uses no teacher signal" in proc.stderr
    recipe = _grpo_recipe(tmp_path, student)
    recipe["objective"] = {"name": "opd"}
    proc = run_cli("distill", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "key 'teacher' is required" in proc.stderr
    recipe = _grpo_recipe(tmp_path, student)
    recipe["prompts"]["answer_field"] = "solutionz"
    proc = run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "prompts.answer_field" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "g").exists()  # refused before a run folder was made


# --- code prompts: HumanEval's tests in the sandbox are the reward (prompts.reward: code) ---------

HUMANEVAL = BENCHMARKS / "humaneval.jsonl.gz"
needs_humaneval = pytest.mark.skipif(not HUMANEVAL.is_file(), reason="../shared/benchmarks/humaneval.jsonl.gz is absent")
SHORT_PROBLEMS = ("HumanEval/34", "HumanEval/45", "HumanEval/23")  # unique, triangle_area, strlen: the shortest


def _humaneval_prompts(tmp_path):
    """The three problems as a prompts file, exactly as the benchmark holds them."""
    rows = [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")]
    rows = [next(r for r in rows if r["task_id"] == task) for task in SHORT_PROBLEMS]
    path = tmp_path / "humaneval3.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _code_recipe(tmp_path, source, **prompts):
    return {
        "name": "c", "out_dir": str(tmp_path / "runs"), "student": {"tiny": dict(TINY)},
        "prompts": {"source": str(source), "prompt_field": "prompt", "reward": "code", "max_prompt_length": 2048,
                    **prompts},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 16},
        "scoring": {"grader_workers": 1}, "objective": {"name": "grpo"},
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": 2, "mini_batch_size": 4, "micro_batch_size": 4},
    }


@needs_humaneval
def test_code_reward_is_the_sandboxed_tests_on_the_prompt_eval_asks(tmp_path, monkeypatch, capsys):
    from posttrain.data.prompts import load_prompt_rows, tokenize_prompts
    from posttrain.signals import Sources
    from posttrain.eval.prompts import prompt_ids
    from posttrain.models import build_tiny_tokenizer

    source, rows = _humaneval_prompts(tmp_path)
    recipe = from_dict(RLRecipe, _code_recipe(tmp_path, source), "test")
    needs = OBJECTIVES["grpo"].needs(recipe.objective.params)
    prompt_fields, references = (lambda r: (r.fields, r.references))(load_prompt_rows(recipe.prompts, graded=True))
    assert references == [{"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]} for r in rows]
    # the model is asked what `posttrain eval --prompt chat` asks it for HumanEval, token for token
    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    loop_prompts = tokenize_prompts(recipe.prompts, prompt_fields, tokenizer, recipe.rollout.prompts_per_step)
    assert loop_prompts == [prompt_ids("chat", "code", r["prompt"], tokenizer) for r in rows]

    unique, area, strlen = references
    cases = [  # (problem, completion, reward)
        (unique, "    return sorted(list(set(l)))\n", 1.0),  # continues the stub (the original harness)
        (area, "Sure:\n```python\ndef triangle_area(a, h):\n    return a * h / 2\n```\nDone.", 1.0),  # a chat answer
        (strlen, "```python\ndef strlen(string):\n    return len(string) + 1\n```", 0.0),  # wrong
        (unique, "    return l\n", 0.0),  # wrong: neither sorted nor unique
        (area, "```python\nimport sys\nsys.exit(0)\n```", 0.0),  # forged: exits "successfully" before any test
        (strlen, "```python\ndef strlen(string):\n    print('{\"passed\": true, \"error\": null}')\n"
                 "    raise SystemExit(0)\n```", 0.0),  # forged: prints a verdict, then exits 0
        (unique, "", 0.0),  # nothing: the stub alone returns None
    ]
    runtime = SimpleNamespace(matmul_dtype=None)  # only the scoring settings read it (no teacher, no reference)
    with Sources.open(recipe, needs, runtime, tokenizer) as sources:
        assert sources.grader is None and sources.sandbox is not None
        rewards = sources.verifiable_rewards([c[0] for c in cases], [c[1] for c in cases])
    assert rewards == [c[2] for c in cases]
    assert sources.sandbox.uid_lock is None  # closed with the sources
    # without bubblewrap the sandbox is weak: refused unless the recipe allows it (scoring.allow_weak_sandbox),
    # and then the loop says so once, as `posttrain eval` does
    monkeypatch.setattr("posttrain.eval.code_sandbox.shutil.which", lambda name: None)
    with pytest.raises(UserError, match="scoring.allow_weak_sandbox: true"):
        Sources.open(recipe, needs, runtime, tokenizer)
    recipe.scoring.allow_weak_sandbox = True
    capsys.readouterr()
    with Sources.open(recipe, needs, runtime, tokenizer) as weak:
        assert weak.sandbox.isolation.startswith("weak")
    assert capsys.readouterr().err.count("warning: code sandbox is weak") == 1


@needs_humaneval
def test_grpo_on_humaneval_prompts_runs_end_to_end(tmp_path):
    source, _ = _humaneval_prompts(tmp_path)
    proc = run_cli("rl", "--recipe", str(write_recipe(tmp_path, _code_recipe(tmp_path, source))))
    rows = metrics_of(tmp_path / "runs" / "c")
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:  # an untrained tiny model passes no test: every group's rewards are 0
        assert row["verifiable_reward_mean"] == 0.0 and row["verifiable_reward_std"] == 0.0
        assert row["zero_advantage_group_frac"] == 1.0 and row["skipped_updates"] == 0
        assert row["rollouts_per_s"] > 0 and "train_clip_frac" in row
    logged = [json.loads(line) for line in (tmp_path / "runs" / "c" / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(len(entry["responses"]) == 2 for entry in logged)
    assert "verifiable reward mean / std" in " ".join(proc.stderr.split())


def test_code_reward_refuses_rows_and_settings_it_cannot_grade(tmp_path):
    # math rows under reward: code, through the CLI: one line naming the key, before a run folder exists
    recipe = _code_recipe(tmp_path, "synthetic")
    recipe["prompts"]["synthetic"] = {"split": "in_domain", "num_examples": 8}
    proc = run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "key 'prompts.reward': code runs each row's tests, and row 0 has no text field 'test'" in " ".join(proc.stderr.split())
    assert not (tmp_path / "runs" / "c").exists()

    from posttrain.data.prompts import load_prompt_rows
    from posttrain.rl_checks import validate

    def refusal(recipe_dict, step):
        recipe = from_dict(RLRecipe, recipe_dict, "r.yaml")
        needs = OBJECTIVES[recipe.objective.name].needs(recipe.objective.params)
        with pytest.raises(UserError) as err:
            validate(recipe) if step == "check" else load_prompt_rows(recipe.prompts, "verifiable_reward" in needs)
        return str(err.value)

    code_rows = tmp_path / "code.jsonl"
    code_rows.write_text(json.dumps({"prompt": "def f():\n", "test": "def check(c):\n    pass\n", "entry_point": "f"}) + "\n")
    assert "key 'prompts.template': code prompts are the function stub" in refusal(
        _code_recipe(tmp_path, code_rows, template="lsm-math"), "check")
    opd = {**_code_recipe(tmp_path, code_rows), "objective": {"name": "opd"}, "teacher": {"tiny": dict(TINY)}}
    assert "key 'prompts.reward': code grades completions for a verifiable reward, and opd has none" in refusal(opd, "check")
    entry_point_missing = tmp_path / "no_entry.jsonl"
    entry_point_missing.write_text(json.dumps({"prompt": "def f():\n", "test": "def check(c):\n    pass\n"}) + "\n")
    assert "row 0 has no text field 'entry_point'" in refusal(_code_recipe(tmp_path, entry_point_missing), "load")
    not_the_stub = _code_recipe(tmp_path, code_rows, prompt_field="test")  # a text field, but not the function stub
    assert "key 'prompts.prompt_field': row 0's 'test' does not define its entry_point 'f'" in refusal(not_the_stub, "load")
    # code rows under the default math reward: the gold answer is missing, and the error says which key to set
    math_on_code = _code_recipe(tmp_path, code_rows)
    del math_on_code["prompts"]["reward"]
    assert "(code problems? set prompts.reward: code)" in refusal(math_on_code, "load")


def test_an_empty_prompt_row_is_refused_not_sent_as_the_text_none(tmp_path):
    from posttrain.data.prompts import load_prompt_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" + json.dumps({"prompt": None, "answer": "3"}) + "\n")
    recipe = from_dict(RLRecipe, {"name": "g", "student": {"tiny": dict(TINY)}, "objective": {"name": "grpo"},
                                       "prompts": {"source": str(rows), "prompt_field": "prompt"}}, "r.yaml")
    with pytest.raises(UserError, match="row 1's 'prompt' is None"):
        load_prompt_rows(recipe.prompts, graded=True)


def test_the_first_update_is_on_policy_under_bf16_autocast(tmp_path, models):
    # π_old is scored under the autocast the update runs in, and the reference keeps the student's
    # fp32 weights: with one update per step the ratio is 1 and the KL to the start policy is 0
    recipe = _grpo_recipe(tmp_path, models[0], kl_coef=0.5)
    recipe["train"].update({"steps": 1, "mini_batch_size": 16, "micro_batch_size": 16, "precision": "bf16"})
    run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)))
    [row] = metrics_of(tmp_path / "runs" / "g")
    assert row["train_ratio"] == pytest.approx(1.0, abs=1e-6) and row["train_clip_frac"] == 0.0, row
    assert row["train_kl_reference"] == pytest.approx(0.0, abs=1e-6), row


def test_grpo_refuses_groups_that_cannot_have_an_advantage(tmp_path):
    from posttrain.rl_checks import validate

    for rollout, key in (({"samples_per_prompt": 1}, "rollout.samples_per_prompt"),
                         ({"temperature": 0.0}, "rollout.temperature")):
        recipe = from_dict(RLRecipe, {"name": "g", "student": {"tiny": dict(TINY)}, "objective": {"name": "grpo"},
                                           "rollout": rollout}, "r.yaml")
        with pytest.raises(UserError, match=f"key '{key}'"):
            validate(recipe)


def test_rl_refuses_prompts_and_answers_the_grader_would_silently_score_zero(tmp_path):
    from posttrain.data.prompts import load_prompt_rows
    from posttrain.rl_checks import check_golds
    from posttrain.eval.math_grader import gold_kinds

    def loaded(rows, **prompts):
        data = tmp_path / f"rows{len(list(tmp_path.iterdir()))}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        recipe = from_dict(RLRecipe, {"name": "g", "student": {"tiny": dict(TINY)}, "objective": {"name": "grpo"},
                                           "prompts": {"source": str(data), "prompt_field": "prompt", **prompts},
                                           "scoring": {"grader_workers": 1}}, "r.yaml")
        rows = load_prompt_rows(recipe.prompts, graded=True)
        return recipe, (rows.fields, rows.references)

    def refusal(rows, **prompts):
        with pytest.raises(UserError) as err:
            loaded(rows, **prompts)
        return str(err.value)

    assert "row 1's 'prompt' is 42" in refusal([{"prompt": "1+1?", "answer": "2"}, {"prompt": 42, "answer": "2"}])
    assert "list of chat messages" in refusal([{"prompt": [{"role": "user"}], "answer": "2"}])
    for answer in (True, [2], {"v": 2}, "  "):
        assert "not a gold answer (text or a number)" in refusal([{"prompt": "1+1?", "answer": answer}])
    code = {"prompt": "def f():\n", "entry_point": "f"}
    assert "test does not compile" in refusal([{**code, "test": "def check(c:\n"}], reward="code")
    assert "defines no check(candidate)" in refusal([{**code, "test": "assert True\n"}], reward="code")
    # a gold the math grader cannot parse is refused before the first step, naming the row; one
    # that parses only as text (GSM8K's "#### 2" form) is warned about
    recipe, (_, golds) = loaded([{"prompt": "1+1?", "answer": "2"}, {"prompt": "how many?", "answer": "$$"},
                                 {"prompt": "and?", "answer": "1+1=2\n#### 2"}])
    with pytest.raises(UserError, match="1 gold answer\\(s\\) the math grader cannot parse, e.g. '\\$\\$' \\(row 1\\)"):
        check_golds(recipe, golds)
    assert gold_kinds(golds, 1) == {"2": "math", "$$": "none", "1+1=2\n#### 2": "text"}
    check_golds(recipe, [golds[0], golds[2]])  # warns about the text-only gold, runs on
