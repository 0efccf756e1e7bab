"""Options that the papers' official code has: DAPO prompt cleaning + the LSM math template,
prompt dedupe, responses from a message list, clip_log_ratio, log-probs at the rollout
temperature, the entropy top-share mask and loss aggregation on-policy."""

import json

import pytest
import torch

from posttrain.config import DataConfig, RLRecipe, from_dict
from posttrain.data.sft import first_occurrences, load_rows, response_text
from posttrain.data.templates import LSM_MATH_TEMPLATE, clean_dapo_instructions, resolve_template
from posttrain.data.prompts import prompt_of
from posttrain.rl import rl
from posttrain.errors import UserError
from posttrain.losses import lsm, opd
from tests.helpers import load_weights, run_cli, token_signals, write_recipe
from tests.helpers import metrics_of
from tests.test_distill import distill_recipe

# A DAPO-Math-17k prompt, verbatim in form (the dataset's user turn).
DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "In triangle $ABC$, $AB = 3$.  \n\nFind $BC$.\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


def test_dapo_cleaning_keeps_only_the_question():
    assert clean_dapo_instructions(DAPO_PROMPT) == "In triangle $ABC$, $AB = 3$.\nFind $BC$."


def test_lsm_template_wraps_the_cleaned_user_turn():
    messages = [{"role": "user", "content": DAPO_PROMPT}]
    text = prompt_of(messages, "dapo-instructions", resolve_template("lsm-math"), 0)
    assert text == ("Math problem: In triangle $ABC$, $AB = 3$.\nFind $BC$.\n\nPlease carefully reason through the "
                    "math problem step by step and derive the correct answer. You must conduct reasoning inside <think> "
                    "and </think> and give the final answer within \\boxed{}.\n")
    assert text == LSM_MATH_TEMPLATE.format(question="In triangle $ABC$, $AB = 3$.\nFind $BC$.")
    assert prompt_of(messages, "none", None, 0) is messages  # no cleaning, no template: unchanged
    assert prompt_of("Q?", "none", "Q: {question} A:", 0) == "Q: Q? A:"


@pytest.mark.parametrize("bad", ["no placeholder", "{question} {other}"])
def test_bad_templates_are_refused(bad):
    with pytest.raises(ValueError):
        resolve_template(bad)


def test_an_instruction_only_row_is_refused():
    with pytest.raises(UserError, match="prompts.clean"):
        prompt_of("Solve the following math problem step by step.", "dapo-instructions", None, 7)


def test_dedupe_keeps_first_occurrences_of_a_jsonl(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i % 3}"}], "id": i} for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = load_rows(str(path), "train", None, None, "prompts.source", dedupe_field="prompt")
    assert [r["id"] for r in kept] == [0, 1, 2]
    assert [r["id"] for r in load_rows(str(path), "train", None, 2, "prompts.source", dedupe_field="prompt")] == [0, 1]
    assert len(load_rows(str(path), "train", None, None, "prompts.source")) == 10
    assert first_occurrences([{"a": 1, "b": 2}, {"b": 2, "a": 1}, "x"]) == [0, 2]
    with pytest.raises(UserError, match="no field 'question'"):
        load_rows(str(path), "train", None, None, "prompts.source", dedupe_field="question")


def test_response_from_a_message_list():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think> 42"}]
    assert response_text(messages, "assistant", "data.response_field") == "<think>r</think> 42"
    assert response_text("plain", "assistant", "data.response_field") == "plain"
    with pytest.raises(UserError, match="response_role"):
        response_text(messages[:1], "assistant", "data.response_field")
    assert DataConfig().response_role == "assistant"


def test_opd_clip_log_ratio_clamps_the_reward():
    batch = {"loss_mask": torch.tensor([[True, True, False]]), "old_logprob": torch.tensor([[-1.0, -9.0, -1.0]]),
             "teacher_token_logprob": torch.tensor([[-8.0, -2.0, -2.0]])}
    clipped = opd.prepare(opd.Params(clip_log_ratio=5.0), batch, token_signals(batch))["reward"]
    assert clipped.tolist() == [[-5.0, 5.0, 0.0]]
    assert opd.prepare(opd.Params(), batch, token_signals(batch))["reward"].tolist() == [[-7.0, 7.0, 0.0]]


def test_lsm_clip_log_ratio_clamps_each_support_term():
    scores = torch.tensor([[2.0, 0.0, -3.0]], dtype=torch.float64, requires_grad=True)
    inputs = {"support_valid": torch.ones(1, 3, dtype=torch.bool),
              "support_teacher_logprob": torch.tensor([[-0.1, -9.0, -2.5]], dtype=torch.float64)}
    loss, _ = lsm.token_loss(lsm.Params(clip_log_ratio=1.0), scores, None, inputs)
    logp, logq = scores.log_softmax(1), inputs["support_teacher_logprob"].log_softmax(1)
    want = (logp.exp() * (logp - logq).clamp(-1.0, 1.0)).sum(1)
    assert torch.allclose(loss, want)
    free, _ = lsm.token_loss(lsm.Params(), scores, None, inputs)
    assert not torch.allclose(loss, free)


def test_score_tokens_at_a_temperature():
    from posttrain.config import TinyModelConfig
    from posttrain.models import build_tiny_model
    from posttrain.scoring import score_tokens

    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=64), 96, seed=0)
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_ids": torch.roll(ids, -1, 1),
             "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    got = score_tokens(model, batch, temperature=0.7, entropy=True, chunk_tokens=5)
    with torch.no_grad():
        logp = (model(input_ids=ids).logits / 0.7).log_softmax(-1)
    assert torch.allclose(got["token_logprob"], logp.gather(2, batch["target_ids"].unsqueeze(2)).squeeze(2), atol=1e-5)
    assert torch.allclose(got["entropy"], -(logp.exp() * logp).sum(-1), atol=1e-5)


def _run(tmp_path, models, name, objective=None, **sections):
    recipe = distill_recipe(tmp_path, models, objective or {"name": "opd"}, name=name, steps=1, **sections)
    return rl(from_dict(RLRecipe, recipe, "test"))


def test_distill_aggregation_is_split_invariant(tmp_path, models):
    runs = [_run(tmp_path, models, f"m{micro}", train={"micro_batch_size": micro, "loss_aggregation": "seq-mean-token-mean"})
            for micro in (1, 8)]
    a, b = (load_weights(r / "final") for r in runs)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # The mode reaches the loss: here every rollout is cut at max_new_tokens (equal lengths), so a
    # per-sequence token sum is exactly the token mean times the tokens per rollout.
    token = metrics_of(_run(tmp_path, models, "tok", train={"micro_batch_size": 8}))[0]
    seq_sum = metrics_of(_run(tmp_path, models, "sum", train={"loss_aggregation": "seq-mean-token-sum"}))[0]
    assert token["truncated_frac"] == 1.0
    assert seq_sum["loss"] == pytest.approx(token["loss"] * token["response_tokens"] / 16, rel=1e-4)


def test_scoring_at_rollout_temperature_keeps_the_first_ratio_at_one(tmp_path, models):
    """One update on all rollouts: π_θ = π_old, so the PPO ratio is exactly 1 only if the trained
    student is scored at the same temperature as π_old."""
    run = _run(tmp_path, models, "temp", rollout={"temperature": 0.7},
               scoring={"at_rollout_temperature": True}, train={"mini_batch_size": 16})
    row = metrics_of(run)[0]
    assert row["train_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_distill_entropy_top_ratio(tmp_path, models):
    row = metrics_of(_run(tmp_path, models, "ent", {"name": "lsm", "k": 8}, train={"entropy_top_ratio": 0.2}))[0]
    assert 0.1 < row["trained_token_frac"] <= 0.3


def test_at_rollout_temperature_refuses_greedy_rollouts(tmp_path, models):
    recipe = distill_recipe(tmp_path, models, {"name": "opd"}, rollout={"temperature": 0.0},
                            scoring={"at_rollout_temperature": True})
    proc = run_cli("distill", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "scoring.at_rollout_temperature" in proc.stderr


def test_a_bad_template_is_refused_before_anything_loads(tmp_path, models):
    recipe = distill_recipe(tmp_path, models, {"name": "opd"}, prompts={"template": "Solve: {problem}"})
    proc = run_cli("distill", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "prompts.template" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "d").exists()


def test_pure_bf16_distillation_runs_with_a_bf16_student(tmp_path, models):
    run = _run(tmp_path, models, "bf", {"name": "lsm", "k": 8}, train={"precision": "bf16-pure"})
    assert all(t.dtype == torch.bfloat16 for t in load_weights(run / "final").values())
    assert torch.isfinite(torch.tensor(metrics_of(run)[0]["loss"]))
