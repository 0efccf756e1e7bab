"""Prompt presets: how a benchmark question becomes the model's input tokens.

  qwen-boxed  byte-identical to the "qwen-boxed" template of the Qwen2.5-Math evaluation harness
              that the DFT paper used (a fixed ChatML string; the tokenizer's template is ignored)
  chat        the tokenizer's own chat template with the same user message (math), or a request
              to complete the function (code); tokenized without adding a second BOS
  raw         the question alone (HumanEval: the function prompt to continue, as in the original
              harness; math: question + the boxed instruction, no template)
  lsm-think   math only: the LSM authors' template (posttrain/data/templates.py: "Math problem: …",
              reasoning inside <think> and </think>, answer in \\boxed{}) as the only user turn,
              through the tokenizer's chat template (no system message is added, as in their eval)
"""

from __future__ import annotations

from posttrain.data.templates import BOXED_INSTRUCTION, LSM_MATH_TEMPLATE, code_request
from posttrain.errors import UserError

QWEN_BOXED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{input}\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PRESETS = ("qwen-boxed", "chat", "raw", "lsm-think")


def prompt_text(preset: str, kind: str, question: str, tokenizer) -> str:
    if preset not in PRESETS:
        raise UserError(f"unknown prompt preset {preset!r}; allowed: {', '.join(PRESETS)}")
    if preset == "lsm-think":
        if kind != "math":
            raise UserError("prompt preset 'lsm-think' is for math benchmarks; use chat, qwen-boxed or raw for code")
        return _chat(tokenizer, LSM_MATH_TEMPLATE.format(question=question.strip()), preset)
    if kind == "code":
        if preset == "raw":
            return question
        user = code_request(question)
    else:
        if preset == "qwen-boxed":
            return QWEN_BOXED.replace("{input}", question.strip())
        user = f"{question.strip()}\n{BOXED_INSTRUCTION}"
        if preset == "raw":
            return user
    if preset == "qwen-boxed":  # code under the qwen-boxed preset: the same ChatML wrapper
        return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    return _chat(tokenizer, user, preset)


def _chat(tokenizer, user: str, preset: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"prompt preset '{preset}' needs a tokenizer with a chat template; use --prompt raw or qwen-boxed")
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)


def prompt_ids(preset: str, kind: str, question: str, tokenizer) -> list[int]:
    text = prompt_text(preset, kind, question, tokenizer)
    # Templates write their own BOS where the model wants one; only raw text gets the tokenizer's.
    return tokenizer(text, add_special_tokens=preset == "raw")["input_ids"]
