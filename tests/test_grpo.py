"""GRPO: group advantages, the clipped loss and its KL term exactly; the loop end to end (CLI)."""

import json

import torch

from posttrain.losses import OBJECTIVES, grpo
from tests.helpers import run_cli, token_signals, write_recipe
from tests.test_distill import models  # noqa: F401  (a module fixture: a tiny student that can answer)


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


def test_grpo_runs_without_a_teacher_and_reports_its_diagnostics(tmp_path, models):
    student = models[0]  # the fixture's in-domain model: it solves some problems, so rewards vary
    recipe = _grpo_recipe(tmp_path, student, clip_high=0.28, kl_coef=0.05)
    run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)))
    rows = [json.loads(line) for line in (tmp_path / "runs" / "g" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for key in ("verifiable_reward_mean", "verifiable_reward_std", "zero_advantage_group_frac", "train_clip_frac",
                    "train_kl_reference", "entropy", "response_length"):
            assert key in row, key
        assert 0.0 <= row["verifiable_reward_mean"] <= 1.0 and 0.0 <= row["zero_advantage_group_frac"] <= 1.0
        assert "reverse_kl" not in row and "reward_mean" not in row  # no teacher, no teacher metrics
    # the rewards are the grader's verdicts on the logged completions' boxed answers
    assert any(row["verifiable_reward_mean"] > 0 for row in rows), rows


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
