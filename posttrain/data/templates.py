"""Prompt text: the templates papers' official code wraps questions in (verbatim), the boxed-answer
instruction and the code request that eval and the on-policy prompts share. Imports nothing of posttrain."""

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "Complete the following Python function. Answer with the whole function in a ```python code block.\n\n"


def code_request(question: str) -> str:
    """The user turn asking for a HumanEval function (eval's chat and qwen-boxed presets; the rl
    loop's code prompts, so that a code reward is earned on the prompt `posttrain eval` asks)."""
    return f"{CODE_INSTRUCTION}```python\n{question}```"


# LSM authors' code (revisiting_opd): the user turn for math prompts, through the chat template.
LSM_MATH_TEMPLATE = (
    "Math problem: {question}\n\nPlease carefully reason through the math problem step by step and derive the "
    "correct answer. You must conduct reasoning inside <think> and </think> and give the final answer within "
    "\\boxed{{}}.\n"
)

# OPSD authors' code (siyan-zhao/OPSD, data_collator.py, reason_first off, the default): the
# self-teacher's user turn: the problem, the reference solution, their transition prompt and the
# boxed-answer instruction, through the chat template. {context}: the row's solution.
OPSD_TEACHER_TEMPLATE = (
    "{question}\n\nHere is a reference solution to this problem:\n{context}\n"
    "\n\nAfter understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem below:\n"
    "\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)

# ----------------------------------------------------------------------------------------------
# Recipe keys `prompts.template` (a name below, or a format string with {question}) and
# `prompts.clean` (field cleaning before the template).

TEMPLATES = {"lsm-math": LSM_MATH_TEMPLATE}

# DAPO-Math-17k's instruction lines, as the LSM authors' data script (examples/data_preprocess/
# math_opd_process.py, clean_prompt) drops them: any line whose stripped text starts with one of these.
DAPO_INSTRUCTION_PREFIXES = (
    "Solve the following math problem",
    "The last line of your response should be of the form",
    "Remember to put your answer on its own line",
    "$Answer (without quotes) where $Answer",
)


def clean_dapo_instructions(text: str) -> str:
    """The bare question: DAPO's instruction lines and all blank lines dropped, trailing spaces
    of the kept lines removed, the result stripped (what clean_prompt in the official script does)."""
    kept = []
    for line in text.strip().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(DAPO_INSTRUCTION_PREFIXES):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept).strip()


def resolve_template(template: str) -> str:
    """A template name's text, or the string itself if it is a format string with {question}.
    Raises ValueError naming what is allowed."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{question}" not in template:
        raise ValueError(f"must be one of: {', '.join(TEMPLATES)}, or a format string containing {{question}}; "
                         f"got {template!r}")
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"is not a valid format string ({err}); write a literal brace as {{{{ or }}}}") from None
    return template


# Recipe key `teacher.context_template` (teacher.source: self): a name below, or a format string
# with {question} and {context}.
CONTEXT_TEMPLATES = {"opsd": OPSD_TEACHER_TEMPLATE}


def resolve_context_template(template: str) -> str:
    """A context template name's text, or the string itself if it is a format string with both
    {question} and {context}. Raises ValueError naming what is allowed."""
    if template in CONTEXT_TEMPLATES:
        return CONTEXT_TEMPLATES[template]
    missing = [f"{{{name}}}" for name in ("question", "context") if f"{{{name}}}" not in template]
    if missing:
        raise ValueError(f"must be one of: {', '.join(CONTEXT_TEMPLATES)}, or a format string containing {{question}} "
                         f"and {{context}} (missing {' and '.join(missing)}); got {template!r}")
    try:
        template.format(question="", context="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"is not a valid format string ({err}); write a literal brace as {{{{ or }}}}") from None
    return template
