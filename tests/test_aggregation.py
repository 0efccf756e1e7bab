"""Loss aggregation modes, the entropy top-share mask, and the other official-code options:
known answers on hand-made batches, the engine's weighting against a plain reference, and
equal updates for different micro-batch / process splits wherever a mode's definition says so."""

import math

import pytest
import torch

from posttrain.config import OptimConfig, TrainRecipe, from_dict
from posttrain.losses import OBJECTIVES, head_loss
from posttrain.losses.aggregation import MODES, GlobalCounts, aggregate, token_weights, top_entropy_mask
from posttrain.losses.engine import head_entropy
from posttrain.optim import lr_factor
from tests.helpers import load_weights, run_cli, tiny_train_recipe, write_recipe, metrics_of

# Two micro-batches; the second row of the first has no loss token.
MASKS = [torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool), torch.tensor([[1, 1, 1]], dtype=torch.bool)]
LOSSES = torch.tensor([[1.0, 2.0, 99.0], [99.0, 99.0, 99.0], [4.0, 5.0, 9.0]])
EXPECTED = {
    "token-mean": (1 + 2 + 4 + 5 + 9) / 5,  # 4.2
    "seq-mean-token-mean": (1.5 + 0.0 + 6.0) / 3,  # 2.5: the empty row counts, adds nothing
    "seq-mean-token-sum": (3 + 0 + 18) / 3,  # 7.0
    "microbatch-token-mean": (1.5 + 6.0) / 2,  # 3.75
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_gives_its_known_answer(mode):
    assert aggregate(mode, LOSSES, MASKS).item() == pytest.approx(EXPECTED[mode], abs=1e-12)


def test_weights_are_zero_off_the_mask_and_unknown_modes_fail():
    counts = GlobalCounts(tokens=5, sequences=3, micro_batches=2)
    for mode in MODES:
        assert (token_weights(mode, MASKS[0], counts)[~MASKS[0]] == 0).all()
    with pytest.raises(ValueError):
        token_weights("mean", MASKS[0], counts)


@pytest.mark.parametrize("objective", ["sft", "dft"])
def test_engine_weights_every_token_like_the_plain_reference(objective):
    """head_loss with per-token weights = Σ_t w_t ℓ_t from full logits, values and gradients."""
    torch.manual_seed(0)
    n, h, v = 11, 8, 29
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    w = torch.rand(n, dtype=torch.float64)
    loss = head_loss(hidden, weight, OBJECTIVES[objective], OBJECTIVES[objective].Params(),
                     {"target_ids": targets, "loss_weight": w}, chunk_tokens=4)
    grads = torch.autograd.grad(loss, (hidden, weight))
    logp = (hidden @ weight.t()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    per_token = -logp if objective == "sft" else -logp.exp().detach() * logp
    reference = (w * per_token).sum()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    for got, want in zip(grads, torch.autograd.grad(reference, (hidden, weight))):
        assert torch.allclose(got, want, atol=1e-12)


def test_top_entropy_mask_known_answers():
    entropy = torch.tensor([[0.1, 0.5, 0.3, 0.9, 7.0], [0.5, 0.5, 0.1, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    half = top_entropy_mask(entropy, mask, 0.5)  # keep ⌊4·0.5⌋ = 2 | ⌊3·0.5⌋ = 1 (+ its tie) | none
    assert half.tolist() == [[False, True, False, True, False], [True, True, False, False, False], [False] * 5]
    fifth = top_entropy_mask(entropy, mask, 0.2)  # ⌊0.8⌋ = 0 → at least 1
    assert fifth[0].tolist() == [False, False, False, True, False]
    assert top_entropy_mask(entropy, mask, 1.0).equal(mask)


def test_head_entropy_matches_the_full_softmax():
    torch.manual_seed(1)
    hidden, weight = torch.randn(37, 8), torch.randn(50, 8)
    logp = (hidden @ weight.t()).log_softmax(-1)
    want = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(head_entropy(hidden, weight, chunk_tokens=5), want, atol=1e-5)


def test_warmup_can_start_at_zero():
    plain = OptimConfig(lr=1.0, warmup_ratio=0.5, schedule="constant")
    zero = OptimConfig(lr=1.0, warmup_ratio=0.5, schedule="constant", warmup_starts_at_zero=True)
    assert [lr_factor(s, 8, plain) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_factor(s, 8, zero) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


# ---- through the training loop -----------------------------------------------------------------

def _train(tmp_path, name, mode, micro, steps=2, **train):
    from posttrain.train import train as run_train

    recipe = tiny_train_recipe(tmp_path, name=name, train={"micro_batch_size": micro, "max_steps": steps,
                                                           "loss_aggregation": mode, **train})
    run_dir = run_train(from_dict(TrainRecipe, recipe, "test"))
    rows = metrics_of(run_dir)
    return load_weights(run_dir / "final"), rows


def _gap(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_split_invariant_modes_give_the_same_update_for_8x1_and_1x8(tmp_path, mode):
    w8, rows8 = _train(tmp_path, "mb8", mode, 8)
    w1, rows1 = _train(tmp_path, "mb1", mode, 1)
    assert _gap(w8, w1) < 1e-5
    for a, b in zip(rows8, rows1):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


def test_microbatch_token_mean_follows_its_split(tmp_path):
    """One micro-batch of 8: the token mean. Eight micro-batches of one sequence: the mean of
    per-sequence token means. The modes differ from each other on this data."""
    mb_one, _ = _train(tmp_path, "a", "microbatch-token-mean", 8)
    token, _ = _train(tmp_path, "b", "token-mean", 8)
    mb_eight, _ = _train(tmp_path, "c", "microbatch-token-mean", 1)
    seq, _ = _train(tmp_path, "d", "seq-mean-token-mean", 8)
    assert _gap(mb_one, token) < 1e-5 and _gap(mb_eight, seq) < 1e-5
    assert _gap(token, seq) > 1e-4


def test_logged_first_step_loss_is_each_modes_aggregate_of_the_reference_losses(tmp_path):
    """The first step's logged loss (initial weights) equals `aggregate` of per-token CE from a
    plain full-logits forward of the same initial model on the same examples and split."""
    from posttrain.data.sft import build_examples, collate, epoch_order, load_rows
    from posttrain.models import load_policy

    recipe = from_dict(TrainRecipe, tiny_train_recipe(tmp_path), "test")
    model, tokenizer = load_policy(recipe.model, "model", recipe.seed, "cpu")
    examples, _ = build_examples(load_rows("synthetic", "train", recipe.data.synthetic, None, "data.source"),
                                 tokenizer, recipe.data)
    step = [examples[i] for i in epoch_order(len(examples), recipe.seed, 0)[:8]]
    batches = [collate(step[:3], tokenizer.pad_token_id), collate(step[3:], tokenizer.pad_token_id)]
    losses, masks = [], []
    with torch.no_grad():
        for b in batches:
            logp = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double().log_softmax(-1)
            ce = -logp.gather(2, b["target_ids"].unsqueeze(2)).squeeze(2)
            pad = torch.zeros(ce.shape[0], 200 - ce.shape[1], dtype=ce.dtype)
            losses.append(torch.cat([ce, pad], 1))
            masks.append(torch.cat([b["loss_mask"], pad.bool()], 1))
    for mode in MODES:
        # micro-batches of 3, 3, 2 sequences; the reference batches above split 3 | 5, so only
        # the split-free modes are compared here
        if mode == "microbatch-token-mean":
            continue
        _, rows = _train(tmp_path, mode, mode, 3, steps=1)
        assert rows[0]["loss"] == pytest.approx(aggregate(mode, torch.cat(losses), masks).item(), rel=2e-5)
    _, rows = _train(tmp_path, "mbtm", "microbatch-token-mean", 5, steps=1)  # split 5 | 3
    split = [collate(step[:5], tokenizer.pad_token_id), collate(step[5:], tokenizer.pad_token_id)]
    means = []
    with torch.no_grad():
        for b in split:
            logp = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double().log_softmax(-1)
            ce = -logp.gather(2, b["target_ids"].unsqueeze(2)).squeeze(2)
            means.append(ce[b["loss_mask"]].mean().item())
    assert rows[0]["loss"] == pytest.approx(sum(means) / 2, rel=2e-5)


def test_entropy_top_ratio_trains_on_the_top_share(tmp_path):
    _, rows = _train(tmp_path, "ent", "seq-mean-token-mean", 4, steps=1, entropy_top_ratio=0.2)
    assert 0.1 < rows[0]["trained_tokens"] / rows[0]["response_tokens"] <= 0.25
    assert math.isfinite(rows[0]["loss"])


def test_pure_bf16_keeps_weights_in_bf16(tmp_path):
    weights, rows = _train(tmp_path, "bf", "token-mean", 8, steps=2, precision="bf16-pure")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert all(math.isfinite(r["loss"]) for r in rows)
    state = torch.load(tmp_path / "runs" / "bf" / "final" / "trainer_state.pt", weights_only=False)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)


def test_aggregation_typo_is_a_one_line_error(tmp_path):
    recipe = tiny_train_recipe(tmp_path, train={"loss_aggregation": "seq-mean"})
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "train.loss_aggregation" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode,micro", [("seq-mean-token-mean", 2),
                                        pytest.param("microbatch-token-mean", 1, marks=pytest.mark.slow)])
def test_two_processes_give_the_same_update_as_one(tmp_path, mode, micro):
    """Equal by definition: seq-mean-token-mean for any split; microbatch-token-mean when the
    micro-batches are the same (one sequence each), whichever process runs them."""
    from tests.test_scale import torchrun

    for name in ("one", "two"):
        recipe = tiny_train_recipe(tmp_path, name=name, train={"micro_batch_size": micro, "max_steps": 2,
                                                               "loss_aggregation": mode})
        path = write_recipe(tmp_path, recipe, f"{name}.yaml")
        run_cli("train", "--recipe", str(path)) if name == "one" else torchrun("train", "--recipe", str(path))
    a, b = load_weights(tmp_path / "runs" / "one" / "final"), load_weights(tmp_path / "runs" / "two" / "final")
    assert _gap(a, b) < 1e-5
