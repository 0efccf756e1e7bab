"""The verifiable-reward policy-loss family (#24): GSPO, CISPO, SAPO, DCPO against plain float64
references written from each paper's formula (values and gradients, fp32 and float64, chunked),
exact known answers, and the current-policy hook (Objective.current_policy) through PolicyLoss."""

import pytest
import torch

from posttrain.losses import OBJECTIVES, cispo, dcpo, gspo, head_loss, sapo
from posttrain.losses.aggregation import GlobalCounts, token_weights
from posttrain.losses.engine import head_token_logprob
from tests import reference
from tests.helpers import token_signals

B, T, H, V = 5, 9, 12, 40
LENGTHS = [9, 4, 7, 1, 6]  # loss tokens per sequence (one sequence of a single token)


def make_problem(dtype=torch.float64, seed=0, spread=0.5):
    """B sequences as the loop has them ([B, T] masks), hidden states at every position, the
    advantage per sequence, and π_old shifted from the current policy so ratios spread around 1."""
    gen = torch.Generator().manual_seed(seed)
    hidden_BTH = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight_VH = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5
    mask_BT = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    target_BT = torch.randint(V, (B, T), generator=gen)
    logp_BT = (hidden_BTH @ weight_VH.t()).log_softmax(-1).gather(2, target_BT[..., None])[..., 0]
    old_BT = logp_BT + torch.empty(B, T, dtype=torch.float64).uniform_(-spread, spread, generator=gen)
    advantage_B = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9], dtype=torch.float64)
    batch = {"target_ids": target_BT, "loss_mask": mask_BT, "old_logprob": old_BT.to(dtype),
             "advantage": (advantage_B[:, None] * mask_BT).to(dtype),
             "sequence": torch.arange(B)[:, None].expand(B, T)}
    return hidden_BTH.to(dtype), weight_VH.to(dtype), batch


def flat_inputs(name, params, hidden_BTH, weight_VH, batch):
    """What PolicyLoss hands the engine: [N] inputs at the loss positions, the current-policy
    inputs (GSPO) and the seq-mean-token-mean weights w_t = 1 / (B n_i)."""
    mask_BT = batch["loss_mask"]
    extra = {}
    objective = OBJECTIVES[name]
    if objective.current_policy is not None:
        logprob_BT = torch.zeros(mask_BT.shape, dtype=hidden_BTH.dtype)
        logprob_BT[mask_BT] = head_token_logprob(hidden_BTH[mask_BT], weight_VH, batch["target_ids"][mask_BT])
        extra = objective.current_policy(params, logprob_BT, batch)
    counts = GlobalCounts(tokens=int(mask_BT.sum()), sequences=B, micro_batches=1)
    weights_BT = token_weights("seq-mean-token-mean", mask_BT, counts).to(hidden_BTH.dtype)
    inputs = {k: v[mask_BT] for k, v in {**batch, **extra, "loss_weight": weights_BT}.items() if k != "loss_mask"}
    return hidden_BTH[mask_BT], inputs


def engine_run(name, params, hidden_NH, weight_VH, inputs, chunk):
    h, w = hidden_NH.clone().requires_grad_(True), weight_VH.clone().requires_grad_(True)
    loss = head_loss(h, w, OBJECTIVES[name], params, inputs, chunk_tokens=chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def reference_run(name, params, hidden_NH, weight_VH, inputs):
    h, w = hidden_NH.detach().double().requires_grad_(True), weight_VH.detach().double().requires_grad_(True)
    as64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    if name == "gspo":
        loss = reference.gspo(h, w, as64, params)  # the paper's per-sequence loss, (1/G) Σ_i
    else:
        loss = (as64["loss_weight"] * reference.TOKEN_REFERENCES[name](h, w, as64, params)).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


CASES = [
    ("gspo", gspo.Params()),  # the paper's ε: most sequences clipped with ratios spread by ±0.5
    ("gspo", gspo.Params(clip_low=0.2, clip_high=0.2)),
    ("cispo", cispo.Params()),
    ("cispo", cispo.Params(clip_low=0.1, clip_high=0.1)),
    ("sapo", sapo.Params()),
    ("sapo", sapo.Params(tau_pos=0.5, tau_neg=3.0)),
    ("dcpo", dcpo.Params()),
    ("dcpo", dcpo.Params(dynamic_clip=False, dual_clip=1.5)),
    ("dcpo", dcpo.Params(clip_low=0.01, clip_high=0.01, dual_clip=2.0)),
]
IDS = [f"{name}-{params}" for name, params in CASES]


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_fp32_engine_matches_the_float64_reference(name, params, chunk):
    hidden, weight, batch = make_problem(torch.float32)
    hidden_NH, inputs = flat_inputs(name, params, hidden, weight, batch)
    loss, grad_h, grad_w = engine_run(name, params, hidden_NH, weight, inputs, chunk)
    ref_loss, ref_h, ref_w = reference_run(name, params, hidden_NH, weight, inputs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h.double(), ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_float64_engine_matches_the_reference_to_rounding(name, params):
    hidden, weight, batch = make_problem(torch.float64)
    hidden_NH, inputs = flat_inputs(name, params, hidden, weight, batch)
    loss, grad_h, grad_w = engine_run(name, params, hidden_NH, weight, inputs, chunk=4)
    ref_loss, ref_h, ref_w = reference_run(name, params, hidden_NH, weight, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-10, atol=1e-12)
    assert ref_h.abs().max() > 1e-3  # the case trains something: a test that cannot fail would pass on zeros


@pytest.mark.slow  # 10–20 s each; the fp32/float64 value-and-gradient checks against the reference stay in make test
@pytest.mark.parametrize("name,params", [("sapo", sapo.Params(tau_pos=0.5, tau_neg=3.0)),
                                         ("dcpo", dcpo.Params(clip_low=0.01, clip_high=0.01, dual_clip=2.0))])
def test_float64_gradcheck(name, params):
    # GSPO and CISPO are left out: their values hold sg[·] (s_i, the clipped weight), so the
    # derivative of the value is not the training gradient by design; both are checked against
    # their references' autograd above, which applies the same stop-gradients.
    hidden, weight, batch = make_problem(torch.float64, spread=0.15)
    hidden_NH, inputs = flat_inputs(name, params, hidden, weight, batch)

    def fn(h, w):
        return head_loss(h, w, OBJECTIVES[name], params, inputs, chunk_tokens=3)

    assert torch.autograd.gradcheck(fn, (hidden_NH.clone().requires_grad_(True), weight.clone().requires_grad_(True)),
                                    eps=1e-6, atol=1e-6)


# --- exact known answers ---------------------------------------------------------------------------


def _token_loss(objective, params, logp, old, advantage, **extra):
    logp = torch.tensor(logp, dtype=torch.float64).unsqueeze(1).requires_grad_(True)
    inputs = {"old_logprob": torch.tensor(old, dtype=torch.float64),
              "advantage": torch.tensor(advantage, dtype=torch.float64), **extra}
    loss, stats = objective.token_loss(params, logp, None, inputs)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return loss.detach(), grad[:, 0], stats


def test_gspo_token_value_is_the_sequence_ratio_and_its_gradient_the_ratio_times_score():
    import math

    log_s = math.log(1.0002)  # inside GSPO's band [1 − 3e-4, 1 + 4e-4]: not clipped
    loss, grad, stats = _token_loss(gspo, gspo.Params(), [-1.0, -2.0], [-1.3, -1.5], [2.0, 2.0],
                                    sequence_log_ratio=torch.tensor([log_s, log_s], dtype=torch.float64))
    torch.testing.assert_close(stats["ratio"], torch.full((2,), 1.0002, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(loss, torch.full((2,), -2.0 * 1.0002, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.full((2,), -2.0 * 1.0002, dtype=torch.float64))  # −A s_i ∂log π
    # s = 1.0005 > 1 + 4e-4 with A > 0: clipped, no gradient; with A < 0 the unclipped side is the max
    loss, grad, stats = _token_loss(gspo, gspo.Params(), [-1.0, -1.0], [-1.0, -1.0], [1.0, -1.0],
                                    sequence_log_ratio=torch.full((2,), math.log(1.0005), dtype=torch.float64))
    assert grad.tolist() == [0.0, pytest.approx(1.0005)] and stats["clip_frac"].tolist() == [1.0, 0.0]


def test_cispo_keeps_a_gradient_on_clipped_tokens():
    # ratios e^{0.5} ≈ 1.65 (above 1 + 0.28), 1, e^{-3} ≈ 0.05 (no lower bound by default)
    loss, grad, stats = _token_loss(cispo, cispo.Params(), [-0.5, -1.0, -4.0], [-1.0, -1.0, -1.0], [1.0, 1.0, -1.0])
    import math

    torch.testing.assert_close(grad, torch.tensor([-1.28, -1.0, math.exp(-3)], dtype=torch.float64))
    torch.testing.assert_close(loss, torch.tensor([1.28 * 0.5, 1.0, -math.exp(-3) * 4.0], dtype=torch.float64))
    assert stats["clip_frac"].tolist() == [1.0, 0.0, 0.0]
    _, grad, stats = _token_loss(cispo, cispo.Params(clip_low=0.2), [-4.0], [-1.0], [-1.0])
    assert grad.tolist() == [pytest.approx(0.8)] and stats["clip_frac"].tolist() == [1.0]  # weight floored at 1 − 0.2


def test_sapo_gate_is_the_policy_gradient_on_policy_and_decays_off_it():
    # ρ = 1: loss −(4/τ)·½·A = −2A/τ, gradient −A whatever τ
    loss, grad, stats = _token_loss(sapo, sapo.Params(), [-1.0, -1.0], [-1.0, -1.0], [2.0, -3.0])
    torch.testing.assert_close(loss, torch.tensor([-2 * 2.0 / 1.0, 2 * 3.0 / 1.05], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-2.0, 3.0], dtype=torch.float64))
    assert stats["gate_weight"].tolist() == [1.0, 1.0]
    # ρ = 2 with A = −1 (τ_neg = 1.05): gradient A · 4σ(1−σ) · ρ with σ = σ(1.05)
    sigma = torch.sigmoid(torch.tensor(1.05, dtype=torch.float64))
    _, grad, _ = _token_loss(sapo, sapo.Params(), [0.0], [-0.6931471805599453], [-1.0])
    torch.testing.assert_close(grad[0], 1.0 * 4 * sigma * (1 - sigma) * 2.0)


def test_dcpo_bounds_reproduce_the_papers_worked_example():
    # the DCPO README's table (ε_lo 0.16, ε_hi 0.2): q = 0.9 → p ∈ [0.69, min(1.06, 1)]; q = 0.01 → [0.005, 0.05]
    params = dcpo.Params(clip_low=0.16, clip_high=0.2)
    low, high = dcpo.ratio_bounds(params, torch.tensor([0.9, 0.01], dtype=torch.float64).log())
    q = torch.tensor([0.9, 0.01], dtype=torch.float64)
    p_low, p_high = (low * q).tolist(), (high * q).tolist()
    assert p_low[0] == pytest.approx(0.6918, abs=1e-4) and p_high[0] == pytest.approx(1.0685, abs=1e-4)
    assert p_low[1] == pytest.approx(0.005, abs=1e-12) and p_high[1] == pytest.approx(0.05, abs=1e-12)
    # a very rare token: the upper bound is capped at max(c, 10) as the official code does
    _, high = dcpo.ratio_bounds(dcpo.Params(), torch.tensor([-20.0], dtype=torch.float64))
    assert high.tolist() == [10.0]
    # dual clip: A < 0 and a huge ratio → the loss is −A·c, no gradient
    loss, grad, stats = _token_loss(dcpo, dcpo.Params(dual_clip=3.0), [0.0], [-2.5], [-1.0])
    assert loss.tolist() == [3.0] and grad.tolist() == [0.0] and stats["clip_frac"].tolist() == [1.0]


def _history(steps, count, total, square):
    as64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return {"steps": as64(steps), "count": as64(count), "sum": as64(total), "square_sum": as64(square)}


def test_dcpo_smooth_standardisation_against_the_papers_formula():
    # prompt 0: third time drawn (earlier steps [1, 0, 0, 0] and [1, 1, 0, 0]), this step all 0:
    # GRPO gives it nothing; SAS gives (1/i)·A_total-ish. prompt 1: first time, rewards [1, 0, 1, 1]
    past0, now0, now1 = [[1, 0, 0, 0], [1, 1, 0, 0]], [0, 0, 0, 0], [1, 0, 1, 1]
    flat = [r for step in past0 for r in step]
    reward_B = torch.tensor(now0 + now1, dtype=torch.float64)
    group_B = torch.tensor([0] * 4 + [1] * 4)
    history = _history([2] * 4 + [0] * 4, [8] * 4 + [0] * 4, [sum(flat)] * 4 + [0] * 4,
                       [sum(r * r for r in flat)] * 4 + [0] * 4)
    got = dcpo.smooth_advantages(reward_B, group_B, history, 1e-6)
    want = reference.dcpo_smooth_advantages(past0 + [now0], 1e-6) + reference.dcpo_smooth_advantages([now1], 1e-6)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert all(a < 0 for a in got[:4].tolist())  # the all-zero group still trains, pushed down
    # with no history SAS is GRPO's advantage exactly (i = 1: both smoothings are A_new)
    from posttrain.losses.grpo import group_advantages

    torch.testing.assert_close(got[4:], group_advantages(reward_B[4:], group_B[4:], True, 1e-6))


def test_dcpo_prepare_reads_the_history_and_declares_it():
    assert OBJECTIVES["dcpo"].needs(dcpo.Params()) == {"verifiable_reward", "prompt_reward_history"}
    assert OBJECTIVES["dcpo"].needs(dcpo.Params(smooth_std=False)) == {"verifiable_reward"}
    for name in ("gspo", "cispo", "sapo"):
        assert OBJECTIVES[name].needs(OBJECTIVES[name].Params()) == {"verifiable_reward"}
    batch = {"loss_mask": torch.tensor([[True, True], [True, False]])}
    signals = token_signals(batch)
    signals.verifiable_reward_B, signals.group_B = torch.tensor([0.0, 0.0]), torch.tensor([0, 0])
    signals.reward_history = _history([1, 1], [2, 2], [1, 1], [1, 1])  # drawn once before: rewards [1, 0]
    advantage_BT = dcpo.prepare(dcpo.Params(), batch, signals)["advantage"]
    want = reference.dcpo_smooth_advantages([[1, 0], [0, 0]], 1e-6)
    torch.testing.assert_close(advantage_BT, torch.tensor([[want[0]] * 2, [want[1], 0.0]], dtype=torch.float64).float())


# --- the current-policy hook through PolicyLoss (a real tiny model) --------------------------------


def test_gspo_through_policy_loss_is_the_papers_sequence_loss():
    """PolicyLoss's no-grad head pass gives GSPO sg[s_i] from the model's current log-probs: the
    loss and every parameter's gradient equal the literal per-sequence GSPO loss of the model."""
    from posttrain.config import TinyModelConfig
    from posttrain.models import build_tiny_model
    from posttrain.policy import PolicyLoss
    from tests.helpers import TINY

    model = build_tiny_model(TinyModelConfig(**TINY), TINY["vocab_size"], seed=0).double()
    gen = torch.Generator().manual_seed(1)
    input_BT = torch.randint(3, TINY["vocab_size"], (4, 10), generator=gen)
    target_BT = torch.roll(input_BT, -1, dims=1)
    mask_BT = torch.zeros(4, 10, dtype=torch.bool)
    for row, (start, end) in enumerate([(3, 9), (2, 5), (4, 10), (6, 7)]):  # prompt, then a response
        mask_BT[row, start:end] = True
    with torch.no_grad():
        logp_BT = model(input_ids=input_BT).logits.log_softmax(-1).gather(2, target_BT[..., None])[..., 0]
    old_BT = logp_BT + torch.empty(4, 10, dtype=torch.float64).uniform_(-0.3, 0.3, generator=gen)
    advantage_BT = torch.tensor([1.0, -1.5, 0.5, -0.2], dtype=torch.float64)[:, None] * mask_BT
    params = gspo.Params(clip_low=0.05, clip_high=0.05)
    weights_BT = token_weights("seq-mean-token-mean", mask_BT, GlobalCounts(int(mask_BT.sum()), 4, 1))
    batch = {"input_ids": input_BT, "attention_mask": torch.ones_like(input_BT), "target_ids": target_BT,
             "loss_mask": mask_BT, "old_logprob": old_BT, "advantage": advantage_BT, "loss_weight": weights_BT}
    policy = PolicyLoss(model, OBJECTIVES["gspo"], params, chunk_tokens=5)
    loss = policy(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    logp_BT = model(input_ids=input_BT).logits.log_softmax(-1).gather(2, target_BT[..., None])[..., 0]
    want = 0.0
    for row in range(4):
        s = (logp_BT[row][mask_BT[row]] - old_BT[row][mask_BT[row]]).mean().exp()
        a = advantage_BT[row][mask_BT[row]][0]
        want = want - torch.minimum(s * a, s.clamp(1 - 0.05, 1 + 0.05) * a) / 4
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert max(g.abs().max() for g in want_grads) > 1e-4


def test_head_token_logprob_is_the_log_softmax_at_the_target():
    hidden, weight, batch = make_problem(torch.float64)
    mask = batch["loss_mask"]
    got = head_token_logprob(hidden[mask], weight, batch["target_ids"][mask], chunk_tokens=3)
    want = (hidden[mask] @ weight.t()).log_softmax(-1).gather(1, batch["target_ids"][mask][:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
