"""Conversational data: multi-turn messages with the loss on assistant turns, TRL prompt/completion
pairs in plain and conversational form; token ids exactly the chat template's."""

import json

import pytest

from posttrain.config import DataConfig
from posttrain.data.conversation import messages_example
from posttrain.data.sft import build_examples, collate
from posttrain.errors import UserError
from posttrain.models import build_tiny_tokenizer
from tests.helpers import TINY, run_cli, tiny_train_recipe, write_recipe, metrics_of

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "It is 8."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TINY["vocab_size"])


def trained_text(tokenizer, example):
    """What the loss sees: the target tokens at the loss positions of a collated batch."""
    batch = collate([example], tokenizer.pad_token_id)
    return tokenizer.decode(batch["target_ids"][batch["loss_mask"]].tolist())


@pytest.mark.parametrize("train_turns,expected", [("all", "5<|im_end|>It is 8.<|im_end|>"), ("last", "It is 8.<|im_end|>")])
def test_messages_train_on_assistant_turns_with_the_templates_exact_ids(tokenizer, train_turns, expected):
    cfg = DataConfig(format="messages", response_field="messages", train_turns=train_turns)
    [example], counts = build_examples([{"messages": CHAT}], tokenizer, cfg)
    assert example.token_ids == tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert trained_text(tokenizer, example) == expected
    assert counts == {"examples": 1, "truncated": 0, "dropped": 0}


def test_system_prompt_and_other_roles(tokenizer):
    chat = [m for m in CHAT if m["role"] != "system"]
    cfg = DataConfig(format="messages", response_field="messages", system_prompt="Be brief.", response_role="user")
    [example], _ = build_examples([{"messages": chat}], tokenizer, cfg)
    assert example.token_ids == tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert trained_text(tokenizer, example) == "What is 2+3?<|im_end|>And 4+4?<|im_end|>"


def test_prompt_completion_plain_and_conversational(tokenizer):
    cfg = DataConfig(format="prompt-completion", prompt_field="prompt", response_field="completion")
    [plain], _ = build_examples([{"prompt": "2+3=", "completion": " 5"}], tokenizer, cfg)
    assert plain.token_ids == tokenizer("2+3= 5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert trained_text(tokenizer, plain) == " 5<|im_end|>"
    # conversational: the prompt's own assistant turn (a few-shot example) is not trained
    row = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    [chat], _ = build_examples([row], tokenizer, cfg)
    assert chat.token_ids == tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert trained_text(tokenizer, chat) == "It is 8.<|im_end|>"
    with pytest.raises(UserError, match="mixes a plain string and a message list"):
        build_examples([{"prompt": "2+3=", "completion": CHAT[2:3]}], tokenizer, cfg)


def test_truncation_keeps_what_fits_and_drops_rows_with_nothing_trained(tokenizer):
    full = len(tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    last_turn = len(tokenizer("It is 8.", add_special_tokens=False)["input_ids"]) + 1
    cfg = DataConfig(format="messages", response_field="messages", max_length=full - 3)
    [example], counts = build_examples([{"messages": CHAT}, {"messages": CHAT[:2]}], tokenizer, cfg)
    assert counts == {"examples": 1, "truncated": 1, "dropped": 1}
    # the cut takes the template's closing "\n" (never trained), "<|im_end|>" and "." of the last turn
    assert example.loss_tokens == 2 + last_turn - 2 and trained_text(tokenizer, example) == "5<|im_end|>It is 8"


def test_a_template_that_rewrites_history_is_refused(tokenizer):
    # drops earlier assistant turns' content, as reasoning templates drop old <think> blocks
    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(UserError, match="rewrites the history"):
        messages_example(tokenizer, CHAT, [2, 4], "data.response_field")


def test_train_on_conversations_through_the_cli(tmp_path, tokenizer):
    data = tmp_path / "chats.jsonl"
    chats = [[{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": f"{2 * i}"},
              {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": f"Yes, {2 * i}."}]
             for i in range(4)]
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    per_turn = [[len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1 for m in chat[1::2]]
                for chat in chats]
    for turns, expected in (("all", sum(map(sum, per_turn))), ("last", sum(t[-1] for t in per_turn))):
        recipe = tiny_train_recipe(tmp_path, name=f"chat-{turns}", train={"epochs": 1, "batch_size": 4, "micro_batch_size": 2},
                                   data={"source": str(data), "format": "messages", "response_field": "messages",
                                         "train_turns": turns})
        run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
        [row] = metrics_of(tmp_path / "runs" / f"chat-{turns}")
        assert row["response_tokens"] == expected
    bad = tiny_train_recipe(tmp_path, name="bad", data={"source": str(data), "format": "messages", "response_field": "conv"})
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, bad)), check=False)
    assert proc.returncode == 2 and "key 'data.response_field': the data has no field 'conv'" in proc.stderr
