"""The policy-loss family's recipes (recipes/examples/*-math.yaml) through the real CLI at tiny
size, and the loop's options around them: Dr. GRPO's constant-length aggregation, DAPO's
overlong shaping, truncated importance sampling (with the hf backend's log-probs perturbed), and
DCPO's prompt history across a resume."""

import json

import pytest
import torch

from posttrain.config import RLRecipe, TrainRecipe, from_dict
from posttrain.errors import UserError
from posttrain.losses.aggregation import LENGTH_NORM, GlobalCounts, aggregate, micro_batch_aggregation, token_weights
from tests.helpers import REPO, TINY, metrics_of, run_cli, tiny_train_recipe, write_recipe

# dcpo-math runs in test_dcpo_history_is_replayed_on_resume, drgrpo-math in test_the_loop_divides_by_groups_times_max_new_tokens
EXAMPLES = ["gspo-math", pytest.param("cispo-math", marks=pytest.mark.slow), pytest.param("sapo-math", marks=pytest.mark.slow),
            pytest.param("dapo-math", marks=pytest.mark.slow)]  # one in make test, the others in make test-slow


def _ones(tmp_path, count=8):
    """Prompts whose gold answer is 1: the fixture's tiny model boxes a 1 or a 2, so rewards vary."""
    path = tmp_path / f"ones{count}.jsonl"
    path.write_text("".join(json.dumps({"problem": f"Compute {a} - {a - 1}.", "answer": "1"}) + "\n"
                            for a in range(1, count + 1)))
    return path


def _tiny(tmp_path, student, prompts=8, **rollout):
    """Overrides that shrink an example recipe to seconds on a CPU (everything else as shipped)."""
    settings = {"out_dir": str(tmp_path / "runs"), "student.path": str(student),
                "prompts.source": str(_ones(tmp_path, prompts)),
                "prompts.max_prompt_length": 64, "rollout.backend": "hf", "rollout.prompts_per_step": 2,
                "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 24, "scoring.grader_workers": 1,
                "train.steps": 2, "train.mini_batch_size": 4, "train.micro_batch_size": 2, "train.precision": "auto",
                "optim.lr": 1e-3, **{f"rollout.{k}": v for k, v in rollout.items()}}
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in settings.items()]


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_recipe_runs_through_the_cli(tmp_path, boxer, example):
    # the shipped 1024 is above the tiny max_new_tokens; 20 of 24: the fixture's 6-token answers are in the buffer
    extra = {"overlong_buffer": 20} if example == "dapo-math" else {}
    run_cli("rl", "--recipe", str(REPO / "recipes" / "examples" / f"{example}.yaml"), *_tiny(tmp_path, boxer, **extra))
    rows = metrics_of(tmp_path / "runs" / example)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["skipped_updates"] == 0 and "verifiable_reward_mean" in row and "train_advantage" in row
        assert ("train_clip_frac" in row) == (example != "sapo-math")
    if example == "sapo-math":
        assert all(0 < row["train_gate_weight"] <= 1.0 + 1e-6 for row in rows)
    if example == "dapo-math":
        assert all(-1.0 <= row["overlong_penalty_mean"] < 0.0 and row["overlong_frac"] > 0 for row in rows)
        assert all(row["importance_weight_mean"] == pytest.approx(1.0, abs=1e-3) for row in rows)  # hf: π_rollout = π_old


# --- Dr. GRPO's constant length normaliser ------------------------------------------------------


def test_length_norm_weights_are_one_over_groups_times_the_constant():
    masks = [torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool), torch.tensor([[1, 1, 1]], dtype=torch.bool)]
    losses = torch.tensor([[1.0, 2.0, 99.0], [99.0, 99.0, 99.0], [4.0, 5.0, 9.0]])
    assert aggregate(LENGTH_NORM, losses, masks, length_norm=4).item() == pytest.approx((3 + 0 + 18) / (3 * 4), abs=1e-12)
    counts = GlobalCounts(tokens=5, sequences=3, micro_batches=2, length_norm=4)
    assert token_weights(LENGTH_NORM, masks[1], counts).tolist() == [[1 / 12] * 3]
    assert micro_batch_aggregation(LENGTH_NORM, masks[1], counts) == (None, 12)  # a divisor, as seq-mean-token-sum
    with pytest.raises(ValueError, match="constant length"):
        token_weights(LENGTH_NORM, masks[1], GlobalCounts(tokens=5, sequences=3, micro_batches=2))


def test_length_norm_is_refused_offline_and_accepted_on_policy(tmp_path):
    from posttrain.train import validate

    recipe = from_dict(TrainRecipe, tiny_train_recipe(tmp_path, train={"loss_aggregation": LENGTH_NORM}), "r.yaml")
    with pytest.raises(UserError, match="key 'train.loss_aggregation'.*offline data has none"):
        validate(recipe)
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, tiny_train_recipe(
        tmp_path, train={"loss_aggregation": LENGTH_NORM}))), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "runs" / "t").exists()


# make test-slow (CI runs it): make test keeps one CLI run per family under ~15 min on 2 cores
@pytest.mark.slow
def test_the_loop_divides_by_groups_times_max_new_tokens(tmp_path, boxer):
    """One update over the same rollouts (same seed): seq-mean-token-sum-norm's loss and gradient
    are seq-mean-token-sum's divided by L = rollout.max_new_tokens (24 here)."""
    rows = {}
    for name, mode in (("norm", LENGTH_NORM), ("sum", "seq-mean-token-sum")):
        args = _tiny(tmp_path, boxer) + ["objective.name=grpo", f"name={name}", f"train.loss_aggregation={mode}",
                                             "train.steps=1", "train.mini_batch_size=8", "train.micro_batch_size=3"]
        run_cli("rl", "--recipe", str(REPO / "recipes" / "examples" / "drgrpo-math.yaml"), *args)
        [rows[name]] = metrics_of(tmp_path / "runs" / name)
    # same seed, same rollouts: Σ_i Σ_t ℓ / (G L) against Σ_i Σ_t ℓ / G
    assert rows["norm"]["response_tokens"] == rows["sum"]["response_tokens"]
    assert rows["norm"]["loss"] == pytest.approx(rows["sum"]["loss"] / 24, rel=1e-5, abs=1e-9)
    assert rows["norm"]["grad_norm"] == pytest.approx(rows["sum"]["grad_norm"] / 24, rel=1e-4)
    assert rows["sum"]["grad_norm"] > 1e-4  # rewards varied: a gradient to compare


# --- DAPO's overlong shaping, truncated IS: the options' checks -----------------------------------


def test_overlong_penalty_is_daPOs_piecewise_linear_shape():
    from posttrain.rl_shaping import overlong_penalty

    lengths = torch.tensor([10, 16, 17, 20, 24, 25])  # L_max 24, L_cache 8: the buffer is (16, 24]
    assert overlong_penalty(lengths, 24, 8, 1.0).tolist() == [0.0, 0.0, -1 / 8, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 24, 8, 0.5).tolist() == [0.0, 0.0, -1 / 16, -0.25, -0.5, -0.5]


def test_shaping_enters_the_group_advantage():
    from posttrain.losses import grpo
    from tests.helpers import token_signals

    batch = {"loss_mask": torch.ones(4, 2, dtype=torch.bool)}
    signals = token_signals(batch)
    signals.verifiable_reward_B, signals.group_B = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0])
    signals.reward_shaping_B = torch.tensor([0.0, -0.5, 0.0, -1.0], dtype=torch.float64)
    advantage = grpo.prepare(grpo.Params(normalize_std=False), batch, signals)["advantage"][:, 0]
    torch.testing.assert_close(advantage, torch.tensor([1.0, 0.5, 0.0, -1.0]) - 0.125)
    # ppo (a value model, GAE): the shaped reward is the last token's reward (γ = λ = 1, V = 0: A_t = r_i)
    from posttrain.losses import ppo

    signals.value_BT = torch.zeros(4, 2)
    returns = ppo.prepare(ppo.Params(gamma=1.0, lam=1.0), batch, signals)["value_return"]
    torch.testing.assert_close(returns[:, 0], torch.tensor([1.0, 0.5, 0.0, -1.0]))


@pytest.mark.parametrize("settings,key", [
    ({"objective": {"name": "opd"}, "teacher": {"tiny": dict(TINY)}, "rollout": {"overlong_buffer": 8}},
     "rollout.overlong_buffer"),
    ({"rollout": {"overlong_buffer": 256}}, "rollout.overlong_buffer"),  # not below max_new_tokens (256)
    ({"rollout": {"importance_cap": 2.0, "top_p": 0.9}}, "rollout.importance_cap"),
    ({"rollout": {"importance_cap": 2.0, "temperature": 0.7}}, "rollout.importance_cap"),
    ({"objective": {"name": "ppo"}, "critic": {"lr": 1e-5}, "train": {"loss_aggregation": LENGTH_NORM}},
     "train.loss_aggregation"),  # the critic shares the mode and has no L
    ({"rollout": {"overlong_penalty": 2.0}}, "rollout.overlong_penalty"),  # the shaping is off: it would be ignored
    # the sampler's log-probs are π_old only for the student's own plain fp32 sampling, without a scoring pass anyway
    ({"rollout": {"old_logprob": "sampler", "backend": "vllm"}}, "rollout.old_logprob"),
    ({"rollout": {"old_logprob": "sampler"}, "train": {"precision": "bf16"}}, "rollout.old_logprob"),
    ({"rollout": {"old_logprob": "sampler", "top_p": 0.9}}, "rollout.old_logprob"),
    ({"rollout": {"old_logprob": "sampler", "temperature": 0.7}}, "rollout.old_logprob"),
    ({"rollout": {"old_logprob": "sampler"}, "objective": {"name": "opd"}, "teacher": {"tiny": dict(TINY)}},
     "rollout.old_logprob"),
    ({"rollout": {"old_logprob": "sampler"}, "train": {"entropy_top_ratio": 0.2}}, "rollout.old_logprob"),
    ({"rollout": {"old_logprob": "sampler", "importance_cap": 2.0}}, "rollout.old_logprob"),
    # gspo's per-token form is GSPO's gradient only under the per-rollout mean
    ({"objective": {"name": "gspo"}, "train": {"loss_aggregation": "token-mean"}}, "train.loss_aggregation"),
    # a group of equal rewards still trains against a critic's V or a prompt's history: dropping it loses signal
    ({"objective": {"name": "ppo"}, "critic": {"lr": 1e-5}, "rollout": {"dynamic_sampling": True}},
     "rollout.dynamic_sampling"),
    ({"objective": {"name": "dcpo"}, "rollout": {"dynamic_sampling": True}}, "rollout.dynamic_sampling"),
])
def test_shaping_options_are_refused_where_they_mean_nothing(settings, key):
    from posttrain.rl_checks import validate

    raw = {"name": "g", "student": {"tiny": dict(TINY)}, "objective": {"name": "grpo"}}
    for section, values in settings.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(UserError, match=f"key '{key}'"):
        validate(from_dict(RLRecipe, raw, "r.yaml"))
    raw = {"name": "g", "student": {"tiny": dict(TINY)}, "objective": {"name": "dcpo"}, "rollout": {"prompts_per_step": 2},
           "train": {"mini_batch_size": 8}}
    with pytest.raises(UserError, match="key 'objective.smooth_std'"):
        validate(from_dict(RLRecipe, raw, "r.yaml"), world_size=2)
    raw["rollout"]["temperature"] = 0.7
    validate(from_dict(RLRecipe, {**raw, "scoring": {"at_rollout_temperature": True},
                                  "rollout": {**raw["rollout"], "importance_cap": 2.0}}, "r.yaml"))  # comparable: fine


def test_an_option_an_objective_does_not_use_is_refused(tmp_path):
    for name, key in (("gspo", "kl_coef"), ("cispo", "dual_clip"), ("sapo", "clip_low"), ("dcpo", "normalize_std")):
        raw = {"name": "g", "student": {"tiny": dict(TINY)}, "objective": {"name": name, key: 0.1}}
        with pytest.raises(UserError, match=f"objective.{key}"):
            from_dict(RLRecipe, raw, "r.yaml")


# --- truncated importance sampling: the hf backend's log-probs perturbed --------------------------


def _run_in_process(tmp_path, student, name, shift, **rollout):
    """One step (one update over all 8 rollouts) of grpo in this process, the hf backend's
    recorded log-probs shifted by `shift`; returns its metrics row."""
    from posttrain.config import load_recipe
    from posttrain.generation import hf
    from posttrain.rl import rl

    original = hf.HFBackend._completions

    def shifted(self, tokens, logprobs):
        return original(self, tokens, logprobs + shift)

    args = _tiny(tmp_path, student, **rollout) + [f"name={name}", "train.steps=1", "train.mini_batch_size=8",
                                                  "train.micro_batch_size=8", "train.loss_aggregation=token-mean"]
    recipe = load_recipe(REPO / "recipes" / "examples" / "drgrpo-math.yaml", RLRecipe, args)
    hf.HFBackend._completions = shifted
    try:
        rl(recipe)
    finally:
        hf.HFBackend._completions = original
    [row] = metrics_of(tmp_path / "runs" / name)
    return row


def test_truncated_importance_sampling_weights_every_token_by_the_capped_ratio(tmp_path, boxer):
    plain = _run_in_process(tmp_path, boxer, "plain", 0.0)
    assert plain["rollout_logprob_gap"] < 1e-5 and "importance_weight_mean" not in plain  # off by default
    # π_rollout = π_old · e^{0.5}: every weight is e^{-0.5}, so the first update's gradient is e^{-0.5} times the plain one
    low = _run_in_process(tmp_path, boxer, "low", 0.5, importance_cap=2.0)
    assert low["rollout_logprob_gap"] == pytest.approx(0.5, abs=1e-4)  # the measured gap is logged
    assert low["importance_weight_mean"] == pytest.approx(0.60653, abs=1e-4) and low["importance_capped_frac"] == 0
    assert low["grad_norm"] == pytest.approx(plain["grad_norm"] * 0.60653, rel=1e-3)
    # π_rollout = π_old · e^{-1}: the ratio e ≈ 2.72 is capped at 2
    high = _run_in_process(tmp_path, boxer, "high", -1.0, importance_cap=2.0)
    assert high["importance_weight_mean"] == pytest.approx(2.0, abs=1e-5) and high["importance_capped_frac"] == 1.0
    assert high["grad_norm"] == pytest.approx(plain["grad_norm"] * 2.0, rel=1e-3)
    assert plain["grad_norm"] > 1e-4  # rewards varied: there is a gradient to scale


# --- DCPO's prompt history across a resume -------------------------------------------------------


# make test-slow (CI runs it): make test keeps one CLI run per family under ~15 min on 2 cores
@pytest.mark.slow
def test_dcpo_history_is_replayed_on_resume(tmp_path, boxer):
    """Two prompts, both drawn every step: step 3's advantages read two steps of history. A run
    resumed after step 2 (from its checkpoint and prompt_history.jsonl) logs what the straight
    run logs."""
    recipe = str(REPO / "recipes" / "examples" / "dcpo-math.yaml")
    common = _tiny(tmp_path, boxer, prompts=2) + ["train.save_every=1"]
    run_cli("rl", "--recipe", recipe, *common, "name=straight", "train.steps=3")
    run_cli("rl", "--recipe", recipe, *common, "name=resumed", "train.steps=2")
    history = tmp_path / "runs" / "resumed" / "prompt_history.jsonl"
    history.write_text(history.read_text() + json.dumps({"step": 3, "groups": [["stale", [1.0]]]}) + "\n")  # a crash's leftover
    run_cli("rl", "--recipe", recipe, *common, "name=resumed", "train.steps=3", "--resume", "--allow-changed-recipe")
    straight, resumed = (metrics_of(tmp_path / "runs" / name) for name in ("straight", "resumed"))
    assert [row["step"] for row in resumed] == [1, 2, 3]
    for key in ("verifiable_reward_mean", "train_advantage", "loss"):
        assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-7), key
    logged = [(tmp_path / "runs" / name / "prompt_history.jsonl").read_text() for name in ("straight", "resumed")]
    assert logged[0] == logged[1] and "stale" not in logged[1]
    assert [json.loads(line)["step"] for line in logged[0].splitlines()] == [1, 2, 3]
    assert all(len(json.loads(line)["groups"]) == 2 for line in logged[0].splitlines())
    assert all(row["skipped_updates"] == 0 and "train_clip_low_bound" in row for row in straight)


def test_the_samplers_logprobs_as_pi_old_train_as_the_recomputed_ones(tmp_path, boxer):
    """rollout.old_logprob: sampler (verl's bypass of the π_old forward): one step of two updates on
    the same rollouts as a recompute run. The hf sampler's log-probs are π_old up to rounding (the
    recompute run's rollout_logprob_gap), so rewards are equal and every loss, ratio and gradient
    norm agrees to that rounding; the bypass run has no entropy metric (it came from the pass)."""
    args = _tiny(tmp_path, boxer) + ["prompts.prompt_field=problem", "train.steps=1", "train.mini_batch_size=4",
                                     "train.micro_batch_size=4"]
    recipe = str(REPO / "recipes" / "mini" / "grpo.yaml")
    run_cli("rl", "--recipe", recipe, *args, "name=recompute")
    run_cli("rl", "--recipe", recipe, *args, "name=sampler", "rollout.old_logprob=sampler")
    [exact], [bypass] = metrics_of(tmp_path / "runs" / "recompute"), metrics_of(tmp_path / "runs" / "sampler")
    assert exact["rollout_logprob_gap"] < 1e-5 and "entropy" in exact
    assert "rollout_logprob_gap" not in bypass and "entropy" not in bypass
    assert bypass["verifiable_reward_mean"] == exact["verifiable_reward_mean"] and exact["verifiable_reward_std"] > 0
    for key in ("loss", "train_ratio", "grad_norm", "train_clip_frac"):
        assert bypass[key] == pytest.approx(exact[key], rel=1e-4, abs=1e-6), key
