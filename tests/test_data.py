"""Data: the synthetic task, the tiny tokenizer, chat rendering, masking, batching."""

import json

import torch

from posttrain.config import DataConfig, SyntheticConfig
from posttrain.data import synthetic
from posttrain.data.sft import Example, build_examples, collate, epoch_order, load_rows, micro_batches, render_prompt
from posttrain.models import build_tiny_tokenizer


def test_synthetic_rows_are_deterministic_and_correct():
    rows = synthetic.make_rows("in_domain", 200, seed=3)
    assert rows == synthetic.make_rows("in_domain", 200, seed=3)
    assert rows != synthetic.make_rows("in_domain", 200, seed=4)
    for row in rows:
        # the problem's expression evaluates to the boxed answer, and each step is right
        assert eval(row["problem"].removeprefix("Compute ").rstrip(".")) == int(row["answer"])
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}.")
        for step in row["solution"].split(". ")[:-1]:
            lhs, rhs = step.rstrip(".").split(" = ")
            assert eval(lhs) == int(rhs) >= 0
    assert {len(r["problem"].split()) for r in synthetic.make_rows("out_of_domain", 50, 0)} == {8}  # 4 numbers


def test_tiny_tokenizer_is_deterministic_and_round_trips():
    a, b = build_tiny_tokenizer(320), build_tiny_tokenizer(320)
    assert a.get_vocab() == b.get_vocab()
    text = "Compute 12 + 345 - 6. 12 + 345 = 357. The answer is \\boxed{351}."
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text
    digits = [a.decode([i]) for i in a("12345", add_special_tokens=False)["input_ids"]]
    assert digits == list("12345")  # digits are single tokens
    assert a.eos_token == "<|im_end|>" and a.pad_token == "<|endoftext|>"


def test_prompt_is_chat_rendered_and_only_the_response_is_trained():
    tokenizer = build_tiny_tokenizer(320)
    rows = [{"problem": "Compute 1 + 2.", "solution": "1 + 2 = 3. The answer is \\boxed{3}."}]
    examples, counts = build_examples(rows, tokenizer, DataConfig(max_length=200))
    (ex,) = examples
    prompt_text = tokenizer.decode(ex.token_ids[: ex.prompt_len])
    assert prompt_text == "<|im_start|>user\nCompute 1 + 2.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ex.token_ids[ex.prompt_len :]) == rows[0]["solution"] + "<|im_end|>"
    batch = collate(examples, tokenizer.pad_token_id)
    trained = batch["target_ids"][batch["loss_mask"]]
    assert tokenizer.decode(trained) == rows[0]["solution"] + "<|im_end|>"  # response + EOS, nothing else
    assert counts == {"examples": 1, "truncated": 0, "dropped": 0}


def test_truncation_and_dropping():
    tokenizer = build_tiny_tokenizer(320)
    rows = [{"problem": "Compute 1 + 2.", "solution": "1 + 2 = 3. " * 20}, {"problem": "x " * 300, "solution": "y"}]
    examples, counts = build_examples(rows, tokenizer, DataConfig(max_length=40))
    assert counts == {"examples": 1, "truncated": 1, "dropped": 1}
    assert len(examples[0].token_ids) == 40


def test_system_prompt_is_rendered():
    tokenizer = build_tiny_tokenizer(320)
    ids = render_prompt(tokenizer, "hi", "Be brief.")
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_local_jsonl_source_with_custom_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"Q{i}", "a": f"A{i}"}) for i in range(5)))
    rows = load_rows(str(path), "train", SyntheticConfig(), 3, "data.source")
    assert [r["q"] for r in rows] == ["Q0", "Q1", "Q2"]
    examples, _ = build_examples(rows, build_tiny_tokenizer(320), DataConfig(prompt_field="q", response_field="a"))
    assert len(examples) == 3


def test_micro_batches_by_count_and_by_token_budget():
    examples = [Example(list(range(n)), 1) for n in (5, 9, 3, 7, 2, 8)]
    assert [len(b) for b in micro_batches(examples, 4, None)] == [4, 2]
    by_budget = micro_batches(examples, 4, 20)
    assert sorted(len(e) for b in by_budget for e in b) == [2, 3, 5, 7, 8, 9]
    assert all(len(b) * max(len(e) for e in b) <= 20 for b in by_budget)


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(10, seed=1, epoch=0)
    assert sorted(order) == list(range(10)) and order == epoch_order(10, 1, 0) and order != epoch_order(10, 1, 1)
    assert torch.tensor(order).unique().numel() == 10
