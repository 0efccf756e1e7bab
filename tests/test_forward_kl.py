"""The teacher top-K forward KL (losses/forward_kl.py): the chunked engine against the float64
reference written from the formula (values and gradients), its closed-form logit gradient,
k = vocabulary giving the full forward KL, and a run through the real loop."""

import pytest
import torch

from posttrain.losses import OBJECTIVES, forward_kl, head_loss
from posttrain.losses.objective import TEACHER_TOPK, Support
from tests.helpers import metrics_of, run_cli, write_recipe
from tests.test_distill import distill_recipe
from tests.test_losses import (
    K, assert_float64_matches_reference, assert_fp32_chunks_match_reference, engine_run, inputs_for, make_problem,
)

CASES = [forward_kl.Params(k=K), forward_kl.Params(k=K, renormalize=False)]


@pytest.mark.parametrize("params", CASES, ids=str)
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_equals_plain_fp32(params, chunk):
    assert_fp32_chunks_match_reference("forward_kl", params, chunk)


@pytest.mark.parametrize("params", CASES, ids=str)
def test_float64_matches_the_formula_to_rounding(params):
    assert_float64_matches_reference("forward_kl", params)


@pytest.mark.parametrize("params", CASES, ids=str)
def test_float64_gradcheck(params):
    hidden, weight, batch, _ = make_problem(torch.float64, n=6, h=4, v=9, k=3)
    inputs = inputs_for("forward_kl", params, batch)

    def fn(h, w):
        return head_loss(h, w, OBJECTIVES["forward_kl"], params, inputs, chunk_tokens=4)

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(True), weight.requires_grad_(True)), eps=1e-6, atol=1e-6)


def test_the_logit_gradient_is_student_minus_teacher_on_the_support():
    # ∂ℓ/∂z_v = π̂(v) − q̂(v) for v in S_t, 0 elsewhere: grad_W = Σ_t g_tᵀ h_t, grad_h = g_t W
    hidden, weight, batch, teacher_NV = make_problem(torch.float64)
    params = forward_kl.Params(k=K)
    _, grad_h, grad_w, _ = engine_run("forward_kl", params, hidden, weight, inputs_for("forward_kl", params, batch), chunk=5)
    ids_NK = batch["teacher_topk_ids"]
    p_hat = (hidden @ weight.t()).gather(1, ids_NK).softmax(-1)
    q_hat = teacher_NV.gather(1, ids_NK).softmax(-1)
    g_NV = torch.zeros(hidden.shape[0], weight.shape[0], dtype=torch.float64).scatter_(1, ids_NK, p_hat - q_hat)
    torch.testing.assert_close(grad_w, g_NV.t() @ hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_h, g_NV @ weight, rtol=1e-10, atol=1e-12)


def test_k_equal_vocabulary_is_the_full_forward_kl():
    hidden, weight, batch, teacher_NV = make_problem(torch.float64, v=11, k=11)
    for params in (forward_kl.Params(k=11), forward_kl.Params(k=11, renormalize=False)):
        loss, *_ = engine_run("forward_kl", params, hidden, weight, inputs_for("forward_kl", params, batch), chunk=4)
        logp_NV = (hidden @ weight.t()).log_softmax(-1)
        full = (teacher_NV.exp() * (teacher_NV - logp_NV)).sum()
        torch.testing.assert_close(loss, full, rtol=1e-11, atol=1e-11)


def test_it_declares_the_teacher_top_k_and_its_width():
    objective = OBJECTIVES["forward_kl"]
    assert objective.on_policy and objective.needs(forward_kl.Params()) == {TEACHER_TOPK}
    assert objective.support(forward_kl.Params(k=8)) == Support(kind="teacher", k=8)


def test_the_loop_trains_it_unchanged(tmp_path, models):  # noqa: F811
    recipe = distill_recipe(tmp_path, models, {"name": "forward_kl", "k": 8}, name="fkl")
    run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)))
    rows = metrics_of(tmp_path / "runs" / "fkl")
    assert len(rows) == 2 and all(row["loss"] >= 0 and row["skipped_updates"] == 0 for row in rows)
    assert 0 < rows[0]["train_teacher_mass"] <= 1 and rows[0]["support_size"] == 8
