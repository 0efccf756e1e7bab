"""Sequence packing: best-fit bins, and the loss and gradients of packed micro-batches equal the
padded run's."""


import pytest
import torch

from posttrain.config import DataConfig, TinyModelConfig
from posttrain.data.packing import best_fit, collate_packed
from posttrain.data.sft import Example, build_examples, collate, load_rows
from posttrain.config import SyntheticConfig
from posttrain.losses import OBJECTIVES
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.policy import PolicyLoss
from tests.helpers import TINY, load_weights, run_cli, tiny_train_recipe, write_recipe, metrics_of


def test_best_fit_keeps_every_example_once_within_the_budget():
    examples = [Example(list(range(n)), 1) for n in (9, 3, 7, 5, 5, 2, 30, 4)]
    bins = best_fit(examples, budget_tokens=12)
    assert sorted(id(e) for b in bins for e in b) == sorted(id(e) for e in examples)
    sizes = [sum(len(e) - 1 for e in b) for b in bins]
    assert sizes[0] == 29  # longer than the budget: a row of its own
    assert all(size <= 12 for size in sizes[1:])
    assert len(bins) == 4  # 29 | 8+3 | 6+4+2 | 4+3+1 (bins of 12 cannot hold the 33 other tokens in 2)


def test_collate_packed_restarts_positions_and_keeps_targets():
    examples = [Example([5, 6, 7, 8], 2), Example([9, 10, 11], 1, loss_spans=[(2, 3)])]
    batch = collate_packed(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10]]
    assert batch["target_ids"].tolist() == [[6, 7, 8, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["loss_mask"].tolist() == [[False, True, True, False, True]]


def loss_and_grads(model, batches, objective="sft"):
    model.zero_grad()
    policy = PolicyLoss(model, OBJECTIVES[objective], OBJECTIVES[objective].Params())
    tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    total = 0.0
    for batch in batches:
        loss = policy(batch) / tokens
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_runs(arch, attention):
    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    config = TinyModelConfig(**{**TINY, "arch": arch})
    model = build_tiny_model(config, len(tokenizer), seed=0)
    model.config._attn_implementation = attention
    rows = load_rows("synthetic", "train", SyntheticConfig(num_examples=12), None, "data.source")
    examples, _ = build_examples(rows, tokenizer, DataConfig(max_length=96))
    assert len({len(e) for e in examples}) > 3  # lengths differ: the padded run has real padding
    for objective in ("sft", "dft"):
        padded_loss, padded_grads = loss_and_grads(model, [collate(examples, tokenizer.pad_token_id)], objective)
        bins = best_fit(examples, budget_tokens=150)
        assert 1 < len(bins) < len(examples)
        packed_loss, packed_grads = loss_and_grads(model, [collate_packed(b, tokenizer.pad_token_id) for b in bins],
                                                   objective)
        assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
        for name, grad in padded_grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The control: the same rows without restarting positions (one long sequence that attends
    # across example boundaries) is a different loss, so the check above can fail.
    crossing = [{k: v for k, v in collate_packed(b, tokenizer.pad_token_id).items() if k != "position_ids"} for b in bins]
    _, crossing_grads = loss_and_grads(model, crossing)
    _, padded_grads = loss_and_grads(model, [collate(examples, tokenizer.pad_token_id)])
    worst = max(((crossing_grads[n] - g).norm() / g.norm()).item() for n, g in padded_grads.items() if g.norm() > 0)
    assert worst > 1e-2


def test_packed_training_through_the_cli_matches_the_padded_run(tmp_path):
    common = {"micro_batch_size": 8, "micro_batch_tokens": 200, "batch_size": 16, "max_steps": 3}
    for name, packing in (("padded", False), ("packed", True)):
        recipe = tiny_train_recipe(tmp_path, name=name, train={**common, "packing": packing}, optim={"lr": 1e-3})
        run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    rows = {name: metrics_of(tmp_path / "runs" / name)
            for name in ("padded", "packed")}
    assert [r["loss"] for r in rows["packed"]] == pytest.approx([r["loss"] for r in rows["padded"]], rel=1e-5)
    padded, packed = load_weights(tmp_path / "runs" / "padded" / "final"), load_weights(tmp_path / "runs" / "packed" / "final")
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-4, atol=1e-6)
    bad = tiny_train_recipe(tmp_path, name="bad", train={"packing": True})
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, bad)), check=False)
    assert proc.returncode == 2 and "key 'train.packing': packing needs a token budget" in proc.stderr
    bad["train"].update(micro_batch_tokens=200, loss_aggregation="seq-mean-token-mean")
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, bad)), check=False)
    assert proc.returncode == 2 and "only with train.loss_aggregation: token-mean" in proc.stderr
