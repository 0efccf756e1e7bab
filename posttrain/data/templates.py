"""Prompt templates that papers' official code wraps questions in (verbatim)."""

# LSM authors' code (revisiting_opd): the user turn for math prompts, through the chat template.
LSM_MATH_TEMPLATE = (
    "Math problem: {question}\n\nPlease carefully reason through the math problem step by step and derive the "
    "correct answer. You must conduct reasoning inside <think> and </think> and give the final answer within "
    "\\boxed{{}}.\n"
)
