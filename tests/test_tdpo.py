"""TDPO (TDPO1/TDPO2): the loss and its gradients through the real PolicyLoss (the current-policy
probe of KL(π_ref ‖ π_θ), the head engine on the whole vocabulary) against the authors' formula
in float64 and fp32; π_θ = π_ref → log 2; the stop-gradient of TDPO2; the CLI end to end."""

import json
import math
import shutil

import pytest
import torch

from posttrain.data.preference import collate_pairs
from posttrain.losses import OBJECTIVES, tdpo
from posttrain.policy import NOT_PER_TOKEN, PolicyLoss
from tests import reference
from tests.helpers import metrics_of, run_cli, write_recipe
from tests.test_dpo import VOCAB, _dpo_recipe, _Model, _pairs


def _with_reference_rows(pairs, seed=7):
    """π_ref: a random full distribution at every response token (its target log-prob read from it)."""
    generator = torch.Generator().manual_seed(seed)
    for pair in pairs:
        rows = [torch.randn(side.loss_tokens, VOCAB, generator=generator).mul(2).log_softmax(-1)
                for side in (pair.chosen, pair.rejected)]
        pair.reference_vocab_logprob = tuple(rows)
        targets = [side.token_ids[side.prompt_len:] for side in (pair.chosen, pair.rejected)]
        pair.reference_logprob = tuple(r.gather(1, torch.tensor(t)[:, None])[:, 0].tolist() for r, t in zip(rows, targets))
    return pairs


def _losses(model, batch, params, sequences, chunk=None):
    loss = PolicyLoss(model, OBJECTIVES["tdpo"], params, chunk_tokens=chunk)(batch) / sequences
    mask = batch["loss_mask"]
    inputs = {k: v[mask] for k, v in batch.items() if k not in NOT_PER_TOKEN}
    inputs["row"] = mask.nonzero()[:, 0]
    return loss, inputs


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("variant, alpha", [("tdpo1", 0.5), ("tdpo2", 0.5), ("tdpo2", 2.0)])
def test_loss_and_gradients_match_the_authors_formula(dtype, tolerance, variant, alpha):
    params = tdpo.Params(beta=0.7, alpha=alpha, variant=variant)
    batch = collate_pairs(_with_reference_rows(_pairs(n=3)), pad_id=0)
    got_model, want_model = _Model(dtype), _Model(dtype)
    loss, inputs = _losses(got_model, batch, params, 6, chunk=2)
    loss.backward()
    hidden_NH = want_model.body.embedding(batch["input_ids"])[batch["loss_mask"]]
    want = reference.tdpo(hidden_NH, want_model.head.weight, inputs, params)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=tolerance, atol=tolerance)
    for got_p, want_p in ((got_model.head.weight, want_model.head.weight),
                          (got_model.body.embedding.weight, want_model.body.embedding.weight)):
        torch.testing.assert_close(got_p.grad, want_p.grad, rtol=tolerance, atol=tolerance)
    assert got_model.head.weight.grad.abs().max() > 1e-3


def test_tdpo2_stops_the_chosen_kl_gradient_and_tdpo1_does_not():
    batch = collate_pairs(_with_reference_rows(_pairs(n=2)), pad_id=0)
    grads = {}
    for variant in ("tdpo1", "tdpo2"):
        model = _Model(torch.float64)
        loss, _ = _losses(model, batch, tdpo.Params(alpha=1.0, variant=variant), 4)
        loss.backward()
        grads[variant] = (loss.item(), model.head.weight.grad)
    # α = 1: the same value, but TDPO2 drops ∇D(y_w), so the gradients differ
    assert grads["tdpo1"][0] == pytest.approx(grads["tdpo2"][0], abs=1e-12)
    assert (grads["tdpo1"][1] - grads["tdpo2"][1]).abs().max() > 1e-4


def test_policy_equal_to_reference_gives_log_2():
    model = _Model(torch.float64)
    pairs = _pairs(n=2, reference=False)
    batch = collate_pairs(pairs, 0)
    with torch.no_grad():  # π_ref := the model itself: every Δ and every KL is 0
        rows_BTV = model.head(model.body.embedding(batch["input_ids"])).log_softmax(-1)
    mask = batch["loss_mask"]
    batch["reference_vocab_logprob"] = rows_BTV * mask.unsqueeze(2)
    batch["reference_logprob"] = rows_BTV.gather(2, batch["target_ids"].unsqueeze(2)).squeeze(2) * mask
    for variant in ("tdpo1", "tdpo2"):
        loss, _ = _losses(model, batch, tdpo.Params(variant=variant), 4)
        assert abs(loss.item() - math.log(2)) < 1e-14


# make test-slow (CI runs it): make test keeps one CLI run per family under ~15 min on 2 cores
@pytest.mark.slow
def test_train_tdpo_through_the_cli(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": f"\\boxed{{{i + 1}}}",
                                        "rejected": f"\\boxed{{{i + 2}}}"}) + "\n" for i in range(4)))
    recipe = _dpo_recipe(tmp_path, data)
    recipe["objective"] = {"name": "tdpo", "beta": 0.1, "alpha": 0.5, "variant": "tdpo2"}
    recipe["train"].update(save_every=1, keep_checkpoints=4)
    path = write_recipe(tmp_path, recipe)
    run_cli("train", "--recipe", str(path))
    run_dir = tmp_path / "runs" / "dpo"
    metrics = metrics_of(run_dir)
    # resumed after step 2: π_ref comes from the run folder (not the step-2 checkpoint), so the run is the same
    for gone in ("checkpoints/step-000003", "checkpoints/step-000004", "final"):
        shutil.rmtree(run_dir / gone) if (run_dir / gone).is_dir() else (run_dir / gone).unlink()
    run_cli("train", "--recipe", str(path), "--resume")
    assert [row["loss"] for row in metrics_of(run_dir)] == pytest.approx([row["loss"] for row in metrics], rel=1e-6)
    assert len(metrics) == 4 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[0]["kl_reference"] == pytest.approx(0.0, abs=1e-5) and metrics[-1]["kl_reference"] > 0
    assert metrics[-1]["pair_reward_margin"] > 0
    saved = torch.load(tmp_path / "runs" / "dpo" / "reference_logprobs.pt", weights_only=True)
    assert saved["vocab"].shape[1] == 320  # the tiny vocabulary: π_ref's whole row at every response token
