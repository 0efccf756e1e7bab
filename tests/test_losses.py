"""The chunked head engine against plain references, float64 gradient checks and the exact
known-answer cases of each objective."""

import math

import pytest
import torch

from posttrain.losses import OBJECTIVES, head_loss, lsm, opd, otr
from posttrain.losses.engine import inverse_cdf_draws
from tests import reference
from tests.helpers import token_signals

N, H, V, K = 37, 16, 50, 5


def make_problem(dtype=torch.float32, n=N, h=H, v=V, k=K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.4
    target = torch.randint(v, (n,), generator=gen)
    teacher_logprob_NV = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 2).log_softmax(-1)
    student_logprob_NV = (hidden @ weight.t()).log_softmax(-1)
    # old log-probs shifted so that PPO ratios spread over [0.6, 1.6]: both clips get exercised
    old_logprob = student_logprob_NV.gather(1, target[:, None])[:, 0] + torch.empty(n, dtype=torch.float64).uniform_(
        -0.5, 0.5, generator=gen
    )
    batch = {
        "target_ids": target,
        "loss_mask": torch.ones(n, dtype=torch.bool),
        "old_logprob": old_logprob.to(dtype),
        "teacher_token_logprob": teacher_logprob_NV.gather(1, target[:, None])[:, 0].to(dtype),
        "teacher_topk_logprob": teacher_logprob_NV.topk(k, dim=-1).values.to(dtype),
        "teacher_topk_ids": teacher_logprob_NV.topk(k, dim=-1).indices,
        "student_topk_ids": student_logprob_NV.topk(k, dim=-1).indices,
        "teacher_logprob_NV": teacher_logprob_NV.to(dtype),  # for the plain LSM reference only
    }
    batch["teacher_logprob_at_student_topk"] = teacher_logprob_NV.gather(1, batch["student_topk_ids"]).to(dtype)
    return hidden.to(dtype), weight.to(dtype), batch, teacher_logprob_NV.to(dtype)


def inputs_for(name, params, batch):
    """Per-token inputs as the training loops build them (prepare runs on [B, T] = [1, N])."""
    inputs = dict(batch)
    objective = OBJECTIVES[name]
    if objective.prepare is not None:
        as_bt = {key: value.unsqueeze(0) for key, value in batch.items()}
        inputs.update({key: value.squeeze(0) for key, value in objective.prepare(params, as_bt, token_signals(as_bt)).items()})
    return inputs


CASES = [
    ("sft", OBJECTIVES["sft"].Params()),
    ("dft", OBJECTIVES["dft"].Params()),
    ("otr", otr.Params(k=64, kappa=1.3, beta=-0.1)),
    ("otr", otr.Params(k=16, kappa=1.0, beta=0.0)),
    ("opd", opd.Params()),
    ("opd", opd.Params(ppo_clip=False)),
    ("opd", opd.Params(discount=0.9)),
    ("lsm", lsm.Params(k=K)),
    ("lsm", lsm.Params(k=K, renormalize=False)),
    ("lsm", lsm.Params(k=K, support="student")),
    ("lsm", lsm.Params(k=K, add_sampled_token=True)),
    ("lsm", lsm.Params(k=K, support="union")),
    ("lsm", lsm.Params(k=K, support="overlap")),  # about half the positions have an empty overlap
    ("lsm", lsm.Params(k=K, renormalize="tail")),
    ("lsm", lsm.Params(k=K, support="student", renormalize="tail")),
    ("lsm", lsm.Params(k=K, support="union", renormalize="tail", add_sampled_token=True)),
    ("lsm", lsm.Params(k=K, support="overlap", renormalize=False, add_sampled_token=True)),
]
CASE_IDS = [f"{name}-{params}" for name, params in CASES]


def engine_run(name, params, hidden, weight, inputs, chunk, seed=0, matmul_dtype=None):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    stats = {}
    loss = head_loss(
        h, w, OBJECTIVES[name], params, inputs, chunk_tokens=chunk, generator=torch.Generator().manual_seed(seed),
        matmul_dtype=matmul_dtype, stats=stats,
    )
    loss.backward()
    return loss.detach(), h.grad, w.grad, stats


def reference_run(name, params, hidden, weight, inputs, seed=0):
    if OBJECTIVES[name].sample_inputs is not None:
        inputs = {**inputs, **OBJECTIVES[name].sample_inputs(params, hidden.shape[0], torch.Generator().manual_seed(seed), "cpu")}
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = reference.REFERENCES[name](h, w, inputs, params)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def assert_fp32_chunks_match_reference(name, params, chunk):
    """The engine in fp32 with the LM head in chunks of `chunk` tokens against the float64-written
    reference: loss and both gradients (the check every objective's test file runs)."""
    hidden, weight, batch, _ = make_problem()
    inputs = inputs_for(name, params, batch)
    loss, grad_h, grad_w, _ = engine_run(name, params, hidden, weight, inputs, chunk)
    ref_loss, ref_h, ref_w = reference_run(name, params, hidden, weight, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad_h, ref_h, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad_w, ref_w, rtol=2e-5, atol=2e-5)


def assert_float64_matches_reference(name, params):
    """The engine in float64 against the reference: equal to rounding, loss and both gradients."""
    hidden, weight, batch, _ = make_problem(torch.float64)
    inputs = inputs_for(name, params, batch)
    loss, grad_h, grad_w, _ = engine_run(name, params, hidden, weight, inputs, chunk=6)
    ref_loss, ref_h, ref_w = reference_run(name, params, hidden, weight, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("chunk", [1, 7, 13, None])
def test_chunked_equals_plain_fp32(name, params, chunk):
    assert_fp32_chunks_match_reference(name, params, chunk)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_float64_matches_reference_to_rounding(name, params):
    assert_float64_matches_reference(name, params)


GRADCHECK_CASES = [(c, i) for c, i in zip(CASES, CASE_IDS) if c[0] not in ("otr", "dft")]


@pytest.mark.parametrize("name,params", [c for c, _ in GRADCHECK_CASES], ids=[i for _, i in GRADCHECK_CASES])
def test_float64_gradcheck(name, params):
    # Left out: OTR, whose draws are a step function of the logits (finite differences across a
    # draw boundary mean nothing), and DFT, whose loss value contains sg(p) so its derivative is
    # not the training gradient by design. Both are checked in float64 against their references
    # above, and DFT exactly against −∇p below.
    hidden, weight, batch, _ = make_problem(torch.float64, n=6, h=4, v=9, k=3)
    inputs = inputs_for(name, params, batch)

    def fn(h, w):
        return head_loss(h, w, OBJECTIVES[name], params, inputs, chunk_tokens=4)

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(True), weight.requires_grad_(True)), eps=1e-6, atol=1e-6)


def test_bf16_matmuls_stay_close_to_float64():
    hidden, weight, batch, _ = make_problem()
    params = OBJECTIVES["sft"].Params()
    loss, grad_h, grad_w, _ = engine_run("sft", params, hidden, weight, batch, chunk=8, matmul_dtype=torch.bfloat16)
    ref_loss, ref_h, ref_w = reference_run("sft", params, hidden.double(), weight.double(), batch)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    assert (grad_h.double() - ref_h).norm() / ref_h.norm() < 3e-2
    assert (grad_w.double() - ref_w).norm() / ref_w.norm() < 3e-2


def test_stats_are_sums_over_tokens():
    hidden, weight, batch, _ = make_problem()
    _, _, _, stats = engine_run("dft", OBJECTIVES["dft"].Params(), hidden, weight, batch, chunk=5)
    logp = (hidden @ weight.t()).log_softmax(-1)
    assert stats["tokens"].item() == N
    expected_prob = logp.gather(1, batch["target_ids"][:, None]).exp().sum()
    assert abs(stats["target_prob"].item() - expected_prob.item()) < 1e-4
    expected_entropy = -(logp.exp() * logp).sum()
    assert abs(stats["entropy"].item() - expected_entropy.item()) < 1e-3


# --- DFT -------------------------------------------------------------------------------------


def test_dft_is_half_ce_on_uniform_two_token_vocab():
    hidden = torch.randn(4, 3)
    weight = torch.zeros(2, 3)  # equal logits: p = 1/2 for both tokens
    inputs = {"target_ids": torch.tensor([0, 1, 1, 0])}
    dft_loss = head_loss(hidden, weight, OBJECTIVES["dft"], OBJECTIVES["dft"].Params(), inputs)
    ce_loss = head_loss(hidden, weight, OBJECTIVES["sft"], OBJECTIVES["sft"].Params(), inputs)
    assert ce_loss.item() == pytest.approx(4 * math.log(2), rel=1e-6)
    assert dft_loss.item() == pytest.approx(ce_loss.item() / 2, rel=1e-6)


def test_dft_token_gradient_is_minus_grad_of_probability():
    hidden, weight, batch, _ = make_problem(torch.float64, n=5)
    for n in range(5):
        inputs = {"target_ids": batch["target_ids"][n : n + 1]}
        h = hidden[n : n + 1].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        head_loss(h, w, OBJECTIVES["dft"], OBJECTIVES["dft"].Params(), inputs).backward()
        h2 = hidden[n : n + 1].clone().requires_grad_(True)
        w2 = weight.clone().requires_grad_(True)
        prob = (h2 @ w2.t()).softmax(-1)[0, inputs["target_ids"][0]]
        (-prob).backward()
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-13)


# --- OTR -------------------------------------------------------------------------------------


def otr_expected_gradient(hidden, weight, target, kappa, beta):
    """−[π'(x)∇log π(x) + β Σ_{a≠x} π'(a)∇log π(a)], by autograd of a surrogate."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logits = h @ w.t()
    logp = logits.log_softmax(-1)
    explore = (logits.detach() / kappa).softmax(-1)
    reward = torch.full_like(logp, beta)
    reward.scatter_(1, target[:, None], 1.0)
    (-(explore * reward * logp).sum()).backward()
    return torch.cat([h.grad.flatten(), w.grad.flatten()])


def otr_gradient(hidden, weight, target, params, seed):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    head_loss(h, w, OBJECTIVES["otr"], params, {"target_ids": target}, generator=torch.Generator().manual_seed(seed)).backward()
    return torch.cat([h.grad.flatten(), w.grad.flatten()])


def test_otr_with_kappa_one_averages_to_one_minus_beta_times_dft():
    hidden, weight, batch, _ = make_problem(torch.float64, n=4, h=3, v=6)
    target = batch["target_ids"]
    beta = -0.1
    mc = otr_gradient(hidden, weight, target, otr.Params(k=400_000, kappa=1.0, beta=beta), seed=1)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    head_loss(h, w, OBJECTIVES["dft"], OBJECTIVES["dft"].Params(), {"target_ids": target}).backward()
    dft_grad = torch.cat([h.grad.flatten(), w.grad.flatten()])
    assert ((mc - (1 - beta) * dft_grad).norm() / dft_grad.norm()).item() < 0.01


def test_otr_monte_carlo_converges_to_closed_form_expectation():
    hidden, weight, batch, _ = make_problem(torch.float64, n=4, h=3, v=6)
    target = batch["target_ids"]
    expected = otr_expected_gradient(hidden, weight, target, kappa=1.7, beta=-0.1)
    errors = []
    for k in (1_000, 100_000):
        grads = [otr_gradient(hidden, weight, target, otr.Params(k=k, kappa=1.7, beta=-0.1), seed) for seed in range(3)]
        errors.append(max((g - expected).norm().item() for g in grads) / expected.norm().item())
    assert errors[1] < 0.02
    assert errors[1] < errors[0] / 3  # error shrinks roughly like 1/sqrt(K)


def test_otr_reports_share_of_draws_hitting_the_target():
    hidden = torch.zeros(2, 3)
    weight = torch.zeros(4, 3)  # uniform over 4 tokens
    stats = {}
    head_loss(hidden, weight, OBJECTIVES["otr"], otr.Params(k=20_000, kappa=1.0), {"target_ids": torch.tensor([0, 3])},
              generator=torch.Generator().manual_seed(0), stats=stats)
    assert stats["n_gt_frac"].item() / 2 == pytest.approx(0.25, abs=0.01)


def test_inverse_cdf_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -1e4, 0.5]])
    uniforms = torch.rand(1, 200_000, generator=torch.Generator().manual_seed(0))
    draws = inverse_cdf_draws(logits, 1.5, uniforms, torch.empty_like(logits))
    freq = torch.bincount(draws[0], minlength=6).double() / draws.numel()
    expected = (logits.double() / 1.5).softmax(-1)[0]
    assert freq[4] == 0  # a zero-probability token is never drawn
    sigma = (expected * (1 - expected) / draws.numel()).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all()


# --- LSM -------------------------------------------------------------------------------------


def test_lsm_with_k_equal_vocab_is_the_full_reverse_kl():
    hidden, weight, batch, teacher_NV = make_problem(torch.float64, n=7, v=11, k=11)
    assert_lsm_equals_full_reverse_kl(lsm.Params(k=11), hidden, weight, batch, teacher_NV)


def assert_lsm_equals_full_reverse_kl(params, hidden, weight, batch, teacher_NV):
    """The chunked LSM loss and its gradients equal the full-vocabulary reverse KL (float64)."""
    loss, grad_h, grad_w, _ = engine_run("lsm", params, hidden, weight, inputs_for("lsm", params, batch), chunk=3)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    full = reference.full_reverse_kl(h, w, teacher_NV)
    full.backward()
    torch.testing.assert_close(loss, full.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_h, h.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_w, w.grad, rtol=1e-9, atol=1e-12)


def test_lsm_with_k_one_is_zero():
    hidden, weight, batch, _ = make_problem(torch.float64, k=1)
    params = lsm.Params(k=1)
    loss, grad_h, grad_w, stats = engine_run("lsm", params, hidden, weight, inputs_for("lsm", params, batch), chunk=8)
    assert loss.item() == 0.0
    assert grad_h.abs().max().item() == 0.0 and grad_w.abs().max().item() == 0.0
    assert stats["teacher_mass"].item() > 0


def test_lsm_augmented_slot_is_dropped_when_the_sampled_token_is_in_the_support():
    _, _, batch, _ = make_problem(k=3)
    batch["target_ids"] = batch["teacher_topk_ids"][:, 0].clone()  # sampled token always in top-3
    prepared = lsm.prepare(lsm.Params(k=3, add_sampled_token=True), batch, token_signals(batch))
    assert prepared["support_ids"].shape[-1] == 4
    assert not prepared["support_valid"][:, 3].any()


# --- OPD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ppo_clip", [False, True])
def test_opd_expected_gradient_is_the_reverse_kl_gradient(ppo_clip):
    """E_{y~π}[∇ℓ(y)] = ∇ KL(π ‖ q), summing exactly over every y weighted by π(y)."""
    hidden, weight, _, teacher_NV = make_problem(torch.float64, n=3, v=8)
    n, v = teacher_NV.shape
    with torch.no_grad():
        student_NV = (hidden @ weight.t()).log_softmax(-1)
    target = torch.arange(v).repeat(n)  # every token at every position
    old = student_NV.reshape(-1)  # π_old = π_θ at the current parameters
    reward = teacher_NV.reshape(-1) - old
    inputs = {"target_ids": target, "old_logprob": old, "reward": reward, "advantage": old.exp() * reward}
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    head_loss(h.repeat_interleave(v, 0), w, OBJECTIVES["opd"], opd.Params(ppo_clip=ppo_clip), inputs).backward()
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    reference.full_reverse_kl(h2, w2, teacher_NV).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-9, atol=1e-12)


def test_opd_reward_to_go():
    reward = torch.tensor([[1.0, 2.0, 3.0]])
    assert opd.reward_to_go(reward, 0.0).tolist() == [[1.0, 2.0, 3.0]]
    assert opd.reward_to_go(reward, 1.0).tolist() == [[6.0, 5.0, 3.0]]
    torch.testing.assert_close(opd.reward_to_go(reward, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0]]))


def test_opd_dual_clip_bounds_the_loss_for_negative_advantages():
    # one token, ratio far above 1 + ε with a negative advantage: loss = −A·c, zero gradient
    hidden = torch.zeros(1, 2)
    weight = torch.zeros(3, 2)  # log π = log(1/3) everywhere
    inputs = {"target_ids": torch.tensor([0]), "old_logprob": torch.tensor([math.log(1 / 3) - 2.0]),
              "reward": torch.tensor([-1.0]), "advantage": torch.tensor([-1.0])}
    stats = {}
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss = head_loss(h, w, OBJECTIVES["opd"], opd.Params(), inputs, stats=stats)
    loss.backward()
    assert loss.item() == pytest.approx(3.0)
    assert w.grad.abs().max().item() == 0.0
    assert stats["clip_frac"].item() == 1.0 and stats["negative_reward_frac"].item() == 1.0


def test_empty_batch_gives_zero_loss_and_zero_grads():
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    loss = head_loss(hidden, weight, OBJECTIVES["sft"], OBJECTIVES["sft"].Params(), {"target_ids": torch.zeros(0, dtype=torch.long)})
    loss.backward()
    assert loss.item() == 0.0 and weight.grad.abs().sum().item() == 0.0


# --- the LSM support matrix --------------------------------------------------------------------


def per_position_lsm_losses(params, hidden, weight, batch):
    inputs = inputs_for("lsm", params, batch)
    return torch.stack([
        head_loss(hidden[n : n + 1], weight, OBJECTIVES["lsm"], params, {k: v[n : n + 1] for k, v in inputs.items()})
        for n in range(hidden.shape[0])
    ])


def test_lsm_tail_with_k_equal_vocab_is_the_full_reverse_kl():
    hidden, weight, batch, teacher_NV = make_problem(torch.float64, n=7, v=11, k=11)
    for support in ("teacher", "union"):
        params = lsm.Params(k=11, renormalize="tail", support=support)
        assert_lsm_equals_full_reverse_kl(params, hidden, weight, batch, teacher_NV)


def test_lsm_tail_kl_is_a_true_kl_that_grows_with_the_support():
    # A KL on the coarser partition {S, rest} is ≥ 0 and ≤ the KL on a finer one (the data
    # processing inequality): teacher-top-K ⊂ union ⊂ whole vocabulary, position by position.
    hidden, weight, batch, teacher_NV = make_problem(torch.float64, n=20, v=30, k=4)
    on_teacher = per_position_lsm_losses(lsm.Params(k=4, renormalize="tail"), hidden, weight, batch)
    on_union = per_position_lsm_losses(lsm.Params(k=4, renormalize="tail", support="union"), hidden, weight, batch)
    logp_NV = (hidden @ weight.t()).log_softmax(-1)
    full_N = (logp_NV.exp() * (logp_NV - teacher_NV)).sum(-1)
    assert (on_teacher >= 0).all() and (on_teacher <= on_union + 1e-12).all() and (on_union <= full_N + 1e-12).all()
    # and, unlike renormalize: false, it is not a lower bound that can go negative
    truncated = per_position_lsm_losses(lsm.Params(k=4, renormalize=False), hidden, weight, batch)
    assert (truncated < 0).any()


def test_lsm_empty_overlap_gives_zero_loss_and_gradient():
    hidden, weight, batch, _ = make_problem(torch.float64, n=6, k=3)
    batch["student_topk_ids"] = (batch["teacher_topk_ids"] + 1) % V  # shifted: no shared id ...
    batch["student_topk_ids"][:, 0] = batch["teacher_topk_ids"][:, 0]  # ... except the first one
    batch["student_topk_ids"][3:] = torch.tensor([V - 1, V - 2, V - 3])
    batch["teacher_topk_ids"][3:] = torch.tensor([0, 1, 2])  # positions 3..5: no overlap at all
    for renormalize in (True, "tail"):
        params = lsm.Params(k=3, support="overlap", renormalize=renormalize)
        inputs = inputs_for("lsm", params, batch)
        assert inputs["support_valid"].sum(-1).tolist() == [1, 1, 1, 0, 0, 0]
        loss, grad_h, _, stats = engine_run("lsm", params, hidden[3:], weight, {k: v[3:] for k, v in inputs.items()}, chunk=2)
        assert loss.item() == 0.0 and grad_h.abs().max().item() == 0.0
        assert stats["support_size"].item() == 0.0
