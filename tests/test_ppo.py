"""PPO with a value model: GAE, the whitening, the token rewards and the clipped value loss against
float64 references written from the formulas (and hand-computed cases), the actor loss through the
chunked head engine against its reference (values and gradients), and `posttrain rl` end to end:
the critic trains, is checkpointed and resumes; recipes without a critic (or with one it would
ignore) are refused with one line."""

import json

import pytest
import torch

from posttrain.config import RLRecipe, TinyModelConfig, from_dict
from posttrain.critic import CRITIC_FILE, Critic
from posttrain.errors import UserError
from posttrain.losses import OBJECTIVES, opd, ppo
from posttrain.losses.value import clipped_value_loss
from posttrain.rl import rl
from posttrain.rl_checks import validate
from posttrain.runtime import make_runtime
from tests import reference
from tests.helpers import TINY, load_weights, metrics_of, run_cli, token_signals, write_recipe
from tests.test_losses import engine_run, make_problem, reference_run

# --- GAE -------------------------------------------------------------------------------------


def test_gae_known_answer_with_discount_and_lambda_below_one():
    # one prompt position (off the mask), three response tokens, one padding position
    mask = torch.tensor([[False, True, True, True, False]])
    reward = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    value = torch.tensor([[9.0, 0.5, 0.2, 0.4, 9.0]], dtype=torch.float64)  # off-mask values must not matter
    advantage, returns = ppo.gae(reward, value, mask, gamma=0.5, lam=0.5)
    # δ = [0 + 0.5·0.2 − 0.5, 0 + 0.5·0.4 − 0.2, 1 + 0 − 0.4] = [−0.4, 0, 0.6]; γλ = 0.25
    # A_2 = 0.6, A_1 = 0 + 0.25·0.6 = 0.15, A_0 = −0.4 + 0.25·0.15 = −0.3625
    want = torch.tensor([[0.0, -0.3625, 0.15, 0.6, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantage, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.1375, 0.35, 1.0, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    gen = torch.Generator().manual_seed(0)
    reward = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    value = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    advantage, returns = ppo.gae(reward, value, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantage, opd.reward_to_go(reward, 1.0) - value, rtol=0, atol=1e-13)
    torch.testing.assert_close(returns, opd.reward_to_go(reward, 1.0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (0.7, 1.0), (1.0, 1.0)])
def test_gae_matches_the_sum_formula_on_ragged_masks(gamma, lam):
    """Rows of different lengths, a prompt part, padding, and a hole inside a response (a token
    train.mask_first_tokens took out): the recursion skips it, as if it were not there."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for row, (start, end) in enumerate([(2, 12), (3, 7), (1, 9), (4, 5)]):
        mask[row, start:end] = True
    mask[2, 5] = False  # a hole
    reward = torch.randn(4, 12, generator=gen, dtype=torch.float64) * mask
    value = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    advantage, returns = ppo.gae(reward, value, mask, gamma, lam)
    for row in range(4):
        kept = mask[row].nonzero()[:, 0]
        want_a, want_r = reference.gae(reward[row, kept].tolist(), value[row, kept].tolist(), gamma, lam)
        torch.testing.assert_close(advantage[row, kept], torch.tensor(want_a, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(returns[row, kept], torch.tensor(want_r, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert not advantage[~mask].any() and not returns[~mask].any()


def test_whitening_is_verl_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1; padding 0
    want = torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=torch.float64) / (1 + ppo.WHITEN_EPSILON) ** 0.5
    torch.testing.assert_close(ppo.whiten(x, mask), want, rtol=0, atol=1e-15)


def test_the_reward_sits_on_each_responses_last_trained_token():
    mask = torch.tensor([[False, True, True, False], [True, True, False, True], [False, False, False, False]])
    got = ppo.token_rewards(torch.tensor([1.0, 0.5, 1.0]), mask)
    assert got.tolist() == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]


def test_prepare_adds_the_kl_penalty_and_hands_the_critic_its_inputs():
    batch = {"loss_mask": torch.tensor([[False, True, True, True]]),
             "old_logprob": torch.tensor([[0.0, -1.0, -2.0, -0.5]]),
             "reference_logprob": torch.tensor([[0.0, -1.5, -1.0, -0.5]])}
    signals = token_signals(batch)
    signals.verifiable_reward_B = torch.tensor([1.0])
    signals.value_BT = torch.tensor([[0.0, 0.3, -0.2, 0.1]])
    params = ppo.Params(gamma=1.0, lam=1.0, kl_coef=0.1)
    out = ppo.prepare(params, batch, signals)
    # log π_old − log π_ref = [0.5, −1, 0]: r = −0.1 · that, plus the reward 1 on the last token = [−0.05, 0.1, 1]
    want_return = torch.tensor([0.0, 1.05, 1.1, 1.0], dtype=torch.float64)  # γ = λ = 1: reward-to-go
    torch.testing.assert_close(out["value_return"][0].double(), want_return, rtol=0, atol=1e-6)
    raw = (want_return - signals.value_BT.double())[0, 1:]
    whitened = (raw - raw.mean()) / (raw.var() + 1e-8).sqrt()
    torch.testing.assert_close(out["advantage"][0, 1:].double(), whitened, rtol=0, atol=1e-6)
    assert out["advantage"][0, 0] == 0
    assert torch.equal(out["old_value"], signals.value_BT) and torch.equal(out["value_mask"], batch["loss_mask"])


def test_needs_declare_the_value_model_and_the_reference_only_with_kl():
    assert OBJECTIVES["ppo"].needs(ppo.Params()) == {"verifiable_reward", "value"}
    assert OBJECTIVES["ppo"].needs(ppo.Params(kl_coef=0.01)) == {"verifiable_reward", "value", "reference_logprob"}


# --- the value loss --------------------------------------------------------------------------


def test_value_loss_known_answer_and_gradient():
    value = torch.tensor([1.0, 0.0, 2.0, -0.7], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    returns = torch.tensor([1.0, 1.0, 0.0, -0.2], dtype=torch.float64)
    loss, clipped = clipped_value_loss(value, old, returns, clip=0.5)
    # V clipped to [−0.5, 0.5]: [0.5, 0, 0.5, −0.5]; unclipped squares [0, 1, 4, 0.25], clipped [0.25, 1, 0.25, 0.09]
    torch.testing.assert_close(loss.detach(), torch.tensor([0.125, 0.5, 2.0, 0.125], dtype=torch.float64))
    assert clipped.tolist() == [True, False, False, False]
    (grad,) = torch.autograd.grad(loss.sum(), value)
    # a clipped token has no gradient; the others V − R
    torch.testing.assert_close(grad, torch.tensor([0.0, -1.0, 2.0, -0.5], dtype=torch.float64))
    unclipped, none = clipped_value_loss(value, old, returns, clip=None)
    torch.testing.assert_close(unclipped.detach(), 0.5 * (value.detach() - returns) ** 2)
    assert not none.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_loss_matches_its_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    value = torch.randn(200, generator=gen, dtype=torch.float64)
    old = value + torch.empty(200, dtype=torch.float64).uniform_(-1, 1, generator=gen)
    returns = torch.randn(200, generator=gen, dtype=torch.float64)
    v1, v2 = value.to(dtype).requires_grad_(True), value.clone().requires_grad_(True)
    got, _ = clipped_value_loss(v1, old.to(dtype), returns.to(dtype), clip=0.5)
    want = reference.clipped_value_loss(v2, old, returns, 0.5)
    (got_grad,) = torch.autograd.grad(got.sum(), v1)
    (want_grad,) = torch.autograd.grad(want.sum(), v2)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.detach().double(), want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=tol, atol=tol)


# --- the actor loss through the head engine ----------------------------------------------------

ACTOR_CASES = [ppo.Params(), ppo.Params(dual_clip=None), ppo.Params(clip_low=0.1, clip_high=0.3, dual_clip=1.5)]


def _actor_inputs(batch, seed=3):
    gen = torch.Generator().manual_seed(seed)
    advantage = torch.randn(batch["target_ids"].shape[0], generator=gen, dtype=torch.float64) * 2
    return {**batch, "advantage": advantage.to(batch["old_logprob"].dtype)}


@pytest.mark.parametrize("params", ACTOR_CASES, ids=str)
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_actor_loss_chunked_equals_reference_fp32(params, chunk):
    hidden, weight, batch, _ = make_problem()
    inputs = _actor_inputs(batch)
    loss, grad_h, grad_w, stats = engine_run("ppo", params, hidden, weight, inputs, chunk)
    ref_loss, ref_h, ref_w = reference_run("ppo", params, hidden, weight, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad_h, ref_h, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad_w, ref_w, rtol=2e-5, atol=2e-5)
    assert 0 < stats["clip_frac"].item() < len(inputs["advantage"])  # the problem's ratios reach both clips


@pytest.mark.parametrize("params", ACTOR_CASES, ids=str)
def test_actor_loss_float64_matches_reference_to_rounding(params):
    hidden, weight, batch, _ = make_problem(torch.float64)
    inputs = _actor_inputs(batch)
    loss, grad_h, grad_w, _ = engine_run("ppo", params, hidden, weight, inputs, chunk=6)
    ref_loss, ref_h, ref_w = reference_run("ppo", params, hidden, weight, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-10, atol=1e-11)


def test_dual_clip_bounds_the_loss_of_a_negative_advantage():
    # one token, ratio e² ≈ 7.4 with A = −1: PPO-clip's max gives 7.4; the dual clip caps it at −A·c = 3
    inputs = {"target_ids": torch.tensor([0]), "old_logprob": torch.tensor([-2.0]), "advantage": torch.tensor([-1.0])}
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, stats = ppo.token_loss(ppo.Params(), logp, None, inputs)
    assert loss.item() == pytest.approx(3.0) and stats["clip_frac"].item() == 1.0
    assert torch.autograd.grad(loss.sum(), logp)[0].item() == 0.0
    plain, _ = ppo.token_loss(ppo.Params(dual_clip=None), logp, None, inputs)
    assert plain.item() == pytest.approx(torch.e**2)


# --- `posttrain rl` with objective ppo ----------------------------------------------------------


def _ppo_recipe(tmp_path, student, name="p", steps=3, **sections):
    # Prompts whose gold answer is 1: the fixture's tiny student often ends with \boxed{1}, so the
    # rewards vary by construction of the task (see tests/test_grpo.py).
    ones = tmp_path / "ones.jsonl"
    ones.write_text("".join(json.dumps({"problem": f"Compute {a} - {a - 1}.", "answer": "1"}) + "\n" for a in range(1, 65)))
    recipe = {
        "name": name, "out_dir": str(tmp_path / "runs"), "student": {"path": str(student)},
        "prompts": {"source": str(ones), "prompt_field": "problem", "answer_field": "answer"},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 1, "max_new_tokens": 32},
        "scoring": {"grader_workers": 1},
        "objective": {"name": "ppo"}, "critic": {"lr": 3e-3},
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": steps, "mini_batch_size": 4, "micro_batch_size": 2},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def test_ppo_runs_end_to_end_saves_its_critic_and_resumes_with_it(tmp_path, models):
    recipe = _ppo_recipe(tmp_path, models[1], steps=3)
    run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)))
    run_dir = tmp_path / "runs" / "p"
    rows = metrics_of(run_dir)
    assert len(rows) == 3
    for row in rows:
        for key in ("value_loss", "value_clip_frac", "explained_variance", "value_mean", "return_mean",
                    "advantage_mean", "critic_grad_norm", "verifiable_reward_mean", "train_clip_frac"):
            assert key in row and torch.isfinite(torch.tensor(row[key])), key
        assert row["critic_lr"] == 3e-3 and row["critic_skipped_updates"] == 0
        # γ = λ = 1, no KL: every return is the rollout's reward, so their mean is the reward mean
        assert row["return_mean"] == pytest.approx(row["verifiable_reward_mean"], abs=0.2)
    assert any(row["verifiable_reward_mean"] > 0 for row in rows), rows
    saved = torch.load(run_dir / "final" / CRITIC_FILE, weights_only=False)
    assert set(saved) == {"model", "optimizer", "scheduler"} and "head.weight" in saved["model"]
    # the saved critic is the trained one: its body moved away from the student's starting weights
    start = load_weights(models[1])
    body = {k.removeprefix("body."): v for k, v in saved["model"].items() if k.startswith("body.")}
    assert body and all(("model." + k) in start for k in body)
    assert any(not torch.equal(body[k], start["model." + k]) for k in body)
    manifest = json.loads((run_dir / "final" / "manifest.json").read_text())
    assert CRITIC_FILE in manifest["files"]  # a damaged critic.pt makes the checkpoint damaged
    assert "critic:\n  lr: 0.003\n  clip_value: 0.5" in (run_dir / "config.yaml").read_text()
    # the same run in two sessions (2 steps, then --resume to 3) ends with the same policy and critic
    rl(from_dict(RLRecipe, _ppo_recipe(tmp_path, models[1], "b", steps=2), "t"))
    resumed = rl(from_dict(RLRecipe, _ppo_recipe(tmp_path, models[1], "b", steps=3), "t"), resume=True,
                 allow_changed_recipe=True)  # train.steps 2 → 3: continues from the final checkpoint of step 2
    a, b = load_weights(run_dir / "final"), load_weights(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    critic_b = torch.load(resumed / "final" / CRITIC_FILE, weights_only=False)
    assert all(torch.equal(saved["model"][k], critic_b["model"][k]) for k in saved["model"])
    assert [r["value_loss"] for r in metrics_of(resumed)] == [r["value_loss"] for r in rows]


def test_the_critic_regresses_onto_the_returns():
    """Critic.update on one fixed batch, again and again (V_old refreshed each time, as each step
    rescores): the value loss falls towards 0 and V reaches the returns."""
    recipe = from_dict(RLRecipe, {"name": "c", "student": {"tiny": dict(TINY)}, "objective": {"name": "ppo"},
                                  "critic": {"lr": 1e-2}, "optim": {"lr": 1e-3, "schedule": "constant"},
                                  "train": {"steps": 1, "mini_batch_size": 4, "micro_batch_size": 2}}, "t")
    critic = Critic.build(recipe, make_runtime("fp32"), total_updates=40, checkpoint=None)
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, 4:] = True
    batch = {"input_ids": torch.randint(TINY["vocab_size"], (4, 10), generator=gen),
             "attention_mask": torch.ones(4, 10, dtype=torch.long), "value_mask": mask, "loss_mask": mask,
             "value_return": torch.tensor([0.4, 0.4, -0.4, -0.3]).unsqueeze(1) * mask}
    losses = []
    for _ in range(30):
        batch["old_value"] = critic.values(batch)
        critic.update([{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 2), slice(2, 4))])
        losses.append(critic.metrics()["value_loss"])
    assert losses[-1] < losses[0] / 20, losses
    torch.testing.assert_close(critic.values(batch)[mask], batch["value_return"][mask], rtol=0, atol=0.05)


def test_a_critic_is_required_exactly_for_ppo(tmp_path, models):
    recipe = _ppo_recipe(tmp_path, models[1])
    del recipe["critic"]
    proc = run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "key 'critic' is required: ppo learns a value model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs" / "p").exists()
    recipe = _ppo_recipe(tmp_path, models[1], objective={"name": "grpo", "gamma": 0.9})
    del recipe["critic"]
    recipe["rollout"]["samples_per_prompt"] = 2
    proc = run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "key 'objective.gamma' is unknown" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("change,message", [
    ({"objective": {"name": "grpo"}, "rollout": {"samples_per_prompt": 2}}, "key 'critic': grpo learns no value model"),
    ({"critic": {}}, "key 'critic.lr' is required"),
    ({"critic": {"lr": 1e-3, "clip_value": 0}}, "key 'critic.clip_value' must be"),
    ({"objective": {"name": "ppo", "lam": 1.5}}, "key 'objective.lam' must be"),
])
def test_bad_critic_or_ppo_keys_are_refused(tmp_path, change, message):
    recipe = _ppo_recipe(tmp_path, tmp_path / "student")
    for key, value in change.items():
        recipe[key] = value if key == "critic" else {**recipe[key], **value}
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        validate(from_dict(RLRecipe, recipe, "r.yaml"))


def test_one_rollout_per_prompt_is_allowed_with_a_value_model(tmp_path):
    validate(from_dict(RLRecipe, _ppo_recipe(tmp_path, tmp_path / "student"), "r.yaml"))  # samples_per_prompt 1


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_memory_plan_counts_the_value_model(arch):
    """ppo trains a second model: the plan adds its weights, gradients and AdamW state (fp32: 16 bytes
    per parameter of the critic that Critic.build makes: the student's body and a scalar head)."""
    from posttrain.critic import ValueModel
    from posttrain.memory import training_memory
    from posttrain.models import build_tiny_model

    model = build_tiny_model(TinyModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=64), 320, seed=0)
    common = {"tokens_per_micro_batch": 64, "bf16": False, "gradient_checkpointing": False, "world_size": 1,
              "sharded": False, "head_chunk_tokens": None}
    without, with_critic = training_memory(model, **common), dict(training_memory(model, **common, critic=True))
    critic = ValueModel(model.get_decoder(), 32, 0.02, 0, None)
    assert with_critic.pop("value model: weights, gradients, AdamW state") == 16 * sum(p.numel() for p in critic.parameters())
    assert with_critic == dict(without)
