"""The generalised JSD on the teacher's top-K (losses/jsd.py, TRL's GKD convention) and OPD's
verl estimators (losses/opd.py): the chunked engine against the float64 reference written from
the formula, its two ends and limits against the forward / reverse KL, a hand-computed value,
and a run through the real loop."""

import math

import pytest
import torch

from posttrain.losses import OBJECTIVES, forward_kl, head_loss, jsd, lsm, opd
from posttrain.losses.objective import TEACHER_TOPK, Support
from tests.helpers import metrics_of, run_cli, token_signals, write_recipe
from tests.test_distill import distill_recipe
from tests.test_losses import (
    K, assert_float64_matches_reference, assert_fp32_chunks_match_reference, engine_run, inputs_for, make_problem,
)

CASES = [jsd.Params(k=K, beta=beta, renormalize=renormalize)
         for beta in (0.0, 0.1, 0.5, 0.9, 1.0) for renormalize in (True, False)]


@pytest.mark.parametrize("params", CASES, ids=str)
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_equals_plain_fp32(params, chunk):
    assert_fp32_chunks_match_reference("jsd", params, chunk)


@pytest.mark.parametrize("params", CASES, ids=str)
def test_float64_matches_the_formula_to_rounding(params):
    assert_float64_matches_reference("jsd", params)


@pytest.mark.parametrize("params", [p for p in CASES if p.beta in (0.0, 0.5, 1.0)], ids=str)
def test_float64_gradcheck(params):
    hidden, weight, batch, _ = make_problem(torch.float64, n=6, h=4, v=9, k=3)
    inputs = inputs_for("jsd", params, batch)

    def fn(h, w):
        return head_loss(h, w, OBJECTIVES["jsd"], params, inputs, chunk_tokens=4)

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(True), weight.requires_grad_(True)), eps=1e-6, atol=1e-6)


def run(name, params, chunk=5):
    hidden, weight, batch, _ = make_problem(torch.float64)
    return engine_run(name, params, hidden, weight, inputs_for(name, params, batch), chunk=chunk)[:3]


@pytest.mark.parametrize("renormalize", [True, False])
def test_beta_zero_is_forward_kl_and_beta_one_the_reverse_kl(renormalize):
    # TRL special-cases both ends: β = 0 → KL(teacher ‖ student), β = 1 → KL(student ‖ teacher)
    forward = run("forward_kl", forward_kl.Params(k=K, renormalize=renormalize))
    for got, want in zip(run("jsd", jsd.Params(k=K, beta=0.0, renormalize=renormalize)), forward):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    reverse = run("lsm", lsm.Params(k=K, support="teacher", renormalize=renormalize))  # reverse KL on the teacher top-K
    for got, want in zip(run("jsd", jsd.Params(k=K, beta=1.0, renormalize=renormalize)), reverse):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_limits_scaled_by_beta_are_the_forward_and_reverse_kl():
    # JSD_β / β → KL(q̂ ‖ π̂) as β → 0 and JSD_β / (1 − β) → KL(π̂ ‖ q̂) as β → 1, values and gradients
    forward = run("forward_kl", forward_kl.Params(k=K))
    reverse = run("lsm", lsm.Params(k=K, support="teacher"))
    for beta, scale, want in ((1e-7, 1e-7, forward), (1 - 1e-7, 1e-7, reverse)):
        got = run("jsd", jsd.Params(k=K, beta=beta))
        for value, target in zip(got, want):  # the next term is O(β) (O(1 − β)): relative 1e-7 × a χ²
            assert (value / scale - target).norm() <= 1e-5 * target.norm()
        coarse = run("jsd", jsd.Params(k=K, beta=beta * 1e5 if beta < 0.5 else 1 - 1e-2))[0]
        assert abs(coarse.item() / 1e-2 - want[0].item()) > 1e-3 * want[0].item()  # the check can fail


def test_a_hand_computed_value_and_the_symmetry_at_one_half():
    # q̂ = (1/2, 1/2), π̂ = (0.9, 0.1), β = 0.5: m = (0.7, 0.3)
    logq, logp = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log(), torch.tensor([[0.9, 0.1]], dtype=torch.float64).log()
    want = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
    assert jsd.divergence(0.5, logq, logp).item() == pytest.approx(want, rel=1e-14)
    assert jsd.divergence(0.5, logp, logq).item() == pytest.approx(want, rel=1e-14)
    # β = 0.3 weighs the teacher by 0.3: m = 0.3 q + 0.7 p
    m = [0.3 * 0.5 + 0.7 * 0.9, 0.3 * 0.5 + 0.7 * 0.1]
    want = 0.3 * sum(0.5 * math.log(0.5 / mi) for mi in m) + 0.7 * (0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1]))
    assert jsd.divergence(0.3, logq, logp).item() == pytest.approx(want, rel=1e-14)


def test_k_equal_vocabulary_is_the_full_generalised_jsd():
    hidden, weight, batch, teacher_NV = make_problem(torch.float64, v=11, k=11)
    params = jsd.Params(k=11, beta=0.3)
    loss, *_ = engine_run("jsd", params, hidden, weight, inputs_for("jsd", params, batch), chunk=4)
    q, p = teacher_NV.exp(), (hidden @ weight.t()).softmax(-1)
    m = 0.3 * q + 0.7 * p
    full = 0.3 * (q * (q / m).log()).sum() + 0.7 * (p * (p / m).log()).sum()
    torch.testing.assert_close(loss, full, rtol=1e-11, atol=1e-11)


def test_it_declares_the_teacher_top_k_and_its_width():
    objective = OBJECTIVES["jsd"]
    assert objective.on_policy and objective.needs(jsd.Params()) == {TEACHER_TOPK}
    assert objective.support(jsd.Params(k=8)) == Support(kind="teacher", k=8)
    assert jsd.Params().beta == 0.5  # TRL's GKDConfig default


def test_opd_estimators_are_verls_kl_penalty():
    # verl core_algos.kl_penalty with logprob = log π_old, ref_logprob = log q; reward = −estimate
    old, teacher = torch.tensor([[-1.0, -0.2, -3.0]]), torch.tensor([[-0.5, -2.0, -3.0]])
    batch = {"loss_mask": torch.ones(1, 3, dtype=torch.bool), "old_logprob": old, "teacher_token_logprob": teacher}
    d = old - teacher
    expected = {"k1": -d, "k2": -0.5 * d**2, "k3": -((teacher - old).exp() - (teacher - old) - 1)}
    for estimator, want in expected.items():
        got = opd.prepare(opd.Params(estimator=estimator), batch, token_signals(batch))["reward"]
        torch.testing.assert_close(got, want)
    assert opd.Params().estimator == "k1"  # the reward log q − log π_old, unchanged


def test_the_loop_trains_it(tmp_path, models):  # noqa: F811
    recipe = distill_recipe(tmp_path, models, {"name": "jsd", "k": 8, "beta": 0.5}, name="jsd")
    run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)))
    rows = metrics_of(tmp_path / "runs" / "jsd")
    assert len(rows) == 2 and all(row["loss"] >= 0 and row["skipped_updates"] == 0 for row in rows)
    assert 0 < rows[0]["train_teacher_mass"] <= 1 and rows[0]["support_size"] == 8
