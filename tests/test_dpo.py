"""DPO: the loss and its gradients through the real PolicyLoss (the current-policy hook, the head
engine) against the paper's formula in float64 and fp32; the known answer π_θ = π_ref → log 2;
pairs never split; `posttrain pref-data` (pairing policy, one-sided problems, contamination);
and eval → pref-data → train dpo through the CLI."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.data.preference import PreferencePair, collate_pairs
from posttrain.data.sft import Example, micro_batches
from posttrain.data.synthetic import DATA_SEED, make_rows
from posttrain.losses import OBJECTIVES, dpo
from posttrain.policy import NOT_PER_TOKEN, PolicyLoss
from tests import reference
from tests.helpers import metrics_of, run_cli, tiny_train_recipe, write_recipe
from tests.test_rft import _eval_folder

VOCAB, HIDDEN = 11, 6


class _Body(torch.nn.Module):
    """hidden = an embedding of the input ids: enough of a decoder for PolicyLoss."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids, attention_mask=None, **unused):
        return SimpleNamespace(last_hidden_state=self.embedding(input_ids))


class _Model(torch.nn.Module):
    def __init__(self, dtype, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = _Body(torch.nn.Embedding(VOCAB, HIDDEN).to(dtype))
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype)

    def get_decoder(self):
        return self.body

    def get_output_embeddings(self):
        return self.head


def _pairs(seed=1, n=3, reference=True):
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(0, VOCAB, (3,), generator=generator).tolist()
        sides = [Example(prompt + torch.randint(0, VOCAB, (int(k),), generator=generator).tolist(), 3)
                 for k in torch.randint(1, 6, (2,), generator=generator)]
        pairs.append(PreferencePair(*sides))
        if reference:
            pairs[-1].reference_logprob = tuple((-torch.rand(s.loss_tokens, generator=generator) * 3).tolist() for s in sides)
    return pairs


def _policy_loss(model, batch, params, sequences, chunk=None):
    """What train_step does for one micro-batch with seq-mean-token-sum: Σ w ℓ / (sequences of the step)."""
    stats = {}
    loss = PolicyLoss(model, OBJECTIVES["dpo"], params, chunk_tokens=chunk)(batch, stats=stats) / sequences
    return loss, stats


def _reference_loss(model, batch, params):
    mask = batch["loss_mask"]
    hidden_NH = model.body.embedding(batch["input_ids"])[mask]
    inputs = {k: v[mask] for k, v in batch.items() if k not in NOT_PER_TOKEN}
    inputs["row"] = mask.nonzero()[:, 0]
    return reference.dpo(hidden_NH, model.head.weight, inputs, params)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_loss_and_gradients_match_the_paper_formula(dtype, tolerance, beta):
    params = dpo.Params(beta=beta)
    batch = collate_pairs(_pairs(), pad_id=0)
    batch["reference_logprob"] = batch["reference_logprob"].to(dtype)
    grads = []
    for compute in (lambda m: _policy_loss(m, batch, params, 6)[0], lambda m: _reference_loss(m, batch, params)):
        model = _Model(dtype)
        loss = compute(model)
        loss.backward()
        grads.append((loss.detach(), model.body.embedding.weight.grad, model.head.weight.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=tolerance, atol=tolerance)
    assert grads[0][0].item() > 0.1 and grads[0][2].abs().max() > 1e-3  # a real loss and gradient, not zeros


def test_chunked_equals_unchunked_and_micro_batches_sum_to_the_step():
    params = dpo.Params(beta=0.5)
    pairs = _pairs(seed=4, n=3)
    whole = _Model(torch.float64)
    loss, _ = _policy_loss(whole, collate_pairs(pairs, 0), params, 6)
    loss.backward()
    split = _Model(torch.float64)
    total = 0.0
    for group in micro_batches(pairs, 2, None):  # pairs 0-1, then pair 2; chunks of 2 tokens
        part, _ = _policy_loss(split, collate_pairs(group, 0), params, 6, chunk=2)
        part.backward()
        total += part.item()
    assert abs(total - loss.item()) < 1e-12
    torch.testing.assert_close(split.head.weight.grad, whole.head.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split.body.embedding.weight.grad, whole.body.embedding.weight.grad, rtol=1e-12, atol=1e-12)


def test_policy_equal_to_reference_gives_log_2_and_the_metrics():
    """At π_θ = π_ref every Δ is 0: L = log 2 per pair, rewards 0, accuracy 0 (r_w > r_l is strict)."""
    params = dpo.Params()
    model = _Model(torch.float64)
    pairs = _pairs(n=2, reference=False)
    batch = collate_pairs(pairs, 0)
    mask = batch["loss_mask"]
    with torch.no_grad():
        logp_BT = model.head(model.body.embedding(batch["input_ids"])).log_softmax(-1)
        logp_BT = logp_BT.gather(2, batch["target_ids"].unsqueeze(2)).squeeze(2)
    batch["reference_logprob"] = logp_BT * mask
    loss, stats = _policy_loss(model, batch, params, 4)
    assert abs(loss.item() - math.log(2)) < 1e-15
    assert float(stats["pairs"]) == pytest.approx(2.0, abs=1e-12)
    assert abs(float(stats["pair_reward_margin"])) < 1e-12 and float(stats["pair_reward_accuracy"]) == 0.0
    # the gradient is β/2 · (∇Δ_l − ∇Δ_w) / P: here against the reference formula's autograd
    loss.backward()
    want_model = _Model(torch.float64)
    _reference_loss(want_model, batch, params).backward()
    torch.testing.assert_close(model.head.weight.grad, want_model.head.weight.grad, rtol=1e-12, atol=1e-12)


def test_a_split_pair_is_refused_and_micro_batches_keep_pairs_whole():
    pairs = _pairs(n=3)
    batch = collate_pairs(pairs, 0)
    half = {k: v[1:3] for k, v in batch.items()}  # the rejected of pair 0 with the chosen of pair 1
    with pytest.raises(ValueError, match="a pair was split across micro-batches"):
        PolicyLoss(_Model(torch.float64), OBJECTIVES["dpo"], dpo.Params())(half)
    # by a token budget the unit is still the pair: each micro-batch holds whole pairs, its length counted twice
    groups = micro_batches(pairs, 8, 2 * max(len(p) for p in pairs) // 2 + 1, length=len)
    assert sorted(id(p) for g in groups for p in g) == sorted(id(p) for p in pairs)
    assert all(isinstance(p, PreferencePair) for g in groups for p in g)


# ---- pref-data -------------------------------------------------------------------------------


def _record(index, sample, correct, completion=None, finish="stop"):
    return {"index": index, "sample": sample, "completion": completion or f"{index}/{sample} \\boxed{{{int(correct)}}}",
            "correct": correct, "finish_reason": finish}


def test_pref_data_pairs_each_problem_by_seed_and_counts_one_sided_problems(tmp_path):
    records = [
        _record(0, 0, True), _record(0, 1, False), _record(0, 2, True), _record(0, 3, False),  # 2 pairs
        _record(1, 0, True), _record(1, 1, True),  # correct only: skipped
        _record(2, 0, False), _record(2, 1, True), _record(2, 2, False, "dup"), _record(2, 3, False, "dup"),  # 1 pair
        _record(3, 0, True), _record(3, 1, False, finish="length"),  # the wrong one was cut off: one-sided
    ]
    folder = _eval_folder(tmp_path, records)
    out = tmp_path / "pairs.jsonl"
    proc = run_cli("pref-data", str(folder), "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["chosen_sample"], r["rejected_sample"] in (1, 3)) for r in rows[:2]] == [(0, 0, True), (0, 2, True)] \
        or [(r["index"], r["chosen_sample"], r["rejected_sample"] in (1, 3)) for r in rows[:2]] == [(0, 2, True), (0, 0, True)]
    assert (rows[2]["index"], rows[2]["chosen_sample"], rows[2]["rejected_sample"] in (0, 2)) == (2, 1, True)
    assert {r["chosen_sample"] for r in rows[:2]} == {0, 2}  # each response in at most one pair
    assert rows[2]["chosen"] == "2/1 \\boxed{1}" and rows[2]["rejected"] in ("2/0 \\boxed{0}", "dup")
    train_rows = make_rows("in_domain", 4, DATA_SEED)
    assert rows[0]["prompt"] == train_rows[0]["prompt"] and rows[0]["pref_source"] == str(folder)
    said = " ".join(proc.stderr.split())
    assert "3 pairs from 2 problems with both a correct and an incorrect sample (2 one-sided problems skipped" in said
    assert "dropped 1 cut off, 1 duplicates" in said
    provenance = json.loads((tmp_path / "pairs.jsonl.provenance.json").read_text())
    assert provenance["two_sided_problems"] == 2 and provenance["one_sided_problems"] == 2 and provenance["pairs"] == 3
    # deterministic by seed; --max-pairs-per-problem caps each problem
    again = tmp_path / "again.jsonl"
    run_cli("pref-data", str(folder), "--out", str(again))
    assert again.read_text() == out.read_text()
    capped = tmp_path / "capped.jsonl"
    run_cli("pref-data", str(folder), "--out", str(capped), "--max-pairs-per-problem", "1", "--seed", "3")
    assert [json.loads(line)["index"] for line in capped.read_text().splitlines()] == [0, 2]


def test_pref_data_refuses_test_sets_and_data_without_pairs(tmp_path):
    folder = _eval_folder(tmp_path / "a", [_record(0, 0, True), _record(0, 1, False)], benchmark="synthetic")
    proc = run_cli("pref-data", str(folder), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "benchmark 'synthetic' (built-in) is a test set" in " ".join(proc.stderr.split())
    folder = _eval_folder(tmp_path / "b", [_record(0, 0, True), _record(1, 0, False)])
    proc = run_cli("pref-data", str(folder), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "no problem has both a correct and an incorrect sample" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.jsonl").exists()


# ---- the CLI end to end ------------------------------------------------------------------------


def _dpo_recipe(tmp_path, data, **sections):
    recipe = tiny_train_recipe(tmp_path, name="dpo", objective={"name": "dpo", "beta": 0.1},
                               data={"source": str(data), "format": "preference", "prompt_field": "prompt",
                                     "max_length": 512},
                               train={"epochs": 2, "batch_size": 2, "micro_batch_size": 1,
                                      "loss_aggregation": "seq-mean-token-sum"}, **sections)
    del recipe["data"]["synthetic"]
    return recipe


def test_eval_then_pref_data_then_train_dpo(tmp_path):
    golds = [row["answer"] for row in make_rows("in_domain", 4, DATA_SEED)]
    lines = []
    for index, gold in enumerate(golds):
        lines += [{"index": index, "completion": f"It is \\boxed{{{gold}}}.", "finish_reason": "stop"},
                  {"index": index, "completion": f"It is \\boxed{{{int(gold) + 1}}}.", "finish_reason": "stop"}]
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_cli("eval", "--benchmark", "synthetic_train", "--limit", "4", "--completions", str(completions),
            "--out", str(tmp_path / "graded"), "--workers", "1")
    data = tmp_path / "pairs.jsonl"
    run_cli("pref-data", str(tmp_path / "graded"), "--out", str(data), "--given-completions")
    assert len(data.read_text().splitlines()) == 4

    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, _dpo_recipe(tmp_path, data))))
    assert "examples │ 4 (0 truncated, 0 dropped)" in " ".join(proc.stderr.split())
    run_dir = tmp_path / "runs" / "dpo"
    metrics = metrics_of(run_dir)
    assert len(metrics) == 4  # 2 epochs of 2 steps of 2 pairs
    # the first update starts from π_θ = π_ref: every pair's loss is log 2, every reward 0
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(metrics[0]["pair_reward_chosen"]) < 1e-5 and abs(metrics[0]["pair_reward_margin"]) < 1e-5
    assert {"pair_reward_accuracy", "pair_reward_rejected", "grad_norm"} <= set(metrics[-1])
    assert metrics[-1]["pair_reward_margin"] > 0 and metrics[-1]["loss"] < math.log(2)  # it learns the preference
    assert (run_dir / "reference_logprobs.pt").is_file()


def test_dpo_refusals_are_one_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "a", "rejected": None}) + "\n")

    def refused(recipe, *overrides):
        proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)), *overrides, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "runs").exists()
        return " ".join(proc.stderr.split())

    recipe = _dpo_recipe(tmp_path, data)
    said = refused(recipe)
    assert "key 'data.rejected_field': row 2 of" in said and "field 'rejected' is null or missing" in said
    assert "pairs.jsonl" in said
    said = refused(recipe, "objective.gamma=1")
    assert "gamma" in said and "beta" in said
    assert "set data.format: preference" in refused(recipe, "data.format=prompt-response")
    assert "set train.loss_aggregation: seq-mean-token-sum" in refused(recipe, "train.loss_aggregation=token-mean")
    assert "train only a preference objective (dpo, tdpo), not 'sft'" in refused({**recipe, "objective": {"name": "sft"}})
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "q", "chosen": "same ", "rejected": "same"}) + "\n")
    said = refused(recipe)
    assert "key 'data.rejected_field': row 2 of" in said and "the rejected response is the chosen one" in said
