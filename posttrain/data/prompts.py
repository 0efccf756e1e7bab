"""The on-policy loop's prompts, row to token ids: load the rows, validate each prompt field,
take each row's reference for the grader (a gold answer, or a code problem), clean and template
the question, render it through the chat template, and draw each step's prompts.

    rows (prompts.source) → PromptRows(fields, references) → prompt token ids (None: too long)
                          → per step: an epoch-shuffled draw among the prompts that fit

Every mistake is a UserError naming its recipe key. May import: config, errors, data (sft,
templates), seeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from posttrain.config import PromptsConfig
from posttrain.data.sft import epoch_order, load_rows, render_prompt
from posttrain.data.templates import clean_dapo_instructions, code_request, resolve_template
from posttrain.errors import UserError


@dataclass
class PromptRows:
    """The prompt field of each row, and each row's reference for the grader (None when the
    objective is not graded): its gold answer (text), or {prompt, test, entry_point} (code)."""

    fields: list
    references: list
    contexts: list[str] | None = None  # teacher.source: self (OPSD): each row's privileged context field

    @property
    def golds(self) -> list[str]:
        """The gold answers (math reward); [] without a grader or for code problems."""
        return self.references if self.references and isinstance(self.references[0], str) else []


def load_prompt_rows(cfg: PromptsConfig, graded: bool, context_field: str | None = None) -> PromptRows:
    """The rows' prompt fields, validated; with `graded`, each row's reference (prompts.reward
    math: prompts.answer_field; code: the problem the sandbox runs); with `context_field`, each
    row's privileged context for a self-teacher (data/privileged.py)."""
    rows = load_rows(cfg.source, cfg.split, cfg.synthetic, cfg.max_examples, "prompts.source",
                     dedupe_field=cfg.prompt_field if cfg.dedupe else None)
    if rows and cfg.prompt_field not in rows[0]:
        raise UserError(f": the data has no field {cfg.prompt_field!r}; fields: {', '.join(rows[0])}",
                        key="prompts.prompt_field")
    fields = [row[cfg.prompt_field] for row in rows]
    bad = next((i for i, field in enumerate(fields) if not _is_prompt(field)), None)
    if bad is not None:  # str(None) or str(42) would otherwise become the prompt text
        raise UserError(f": row {bad}'s {cfg.prompt_field!r} is {fields[bad]!r}; a prompt is non-empty text, or a "
                        "list of chat messages {role, content} with text values", key="prompts.prompt_field")
    contexts = _contexts(rows, context_field) if context_field is not None else None
    if not graded:
        return PromptRows(fields, [None] * len(rows), contexts)
    if cfg.reward == "code":
        return PromptRows(fields, _code_problems(rows, cfg.prompt_field), contexts)
    return PromptRows(fields, _golds(rows, cfg.answer_field), contexts)


def _contexts(rows: list[dict], context_field: str) -> list[str]:
    """Each row's privileged context: non-empty text (an empty one would make the teacher the
    student itself for that prompt, silently: reward 0)."""
    if rows and context_field not in rows[0]:
        raise UserError(f": the prompt rows have no field {context_field!r} for the self-teacher's privileged context; "
                        f"fields: {', '.join(rows[0])}", key="teacher.context_field")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row.get(context_field), str)
                or not row[context_field].strip()), None)
    if bad is not None:
        raise UserError(f": row {bad}'s {context_field!r} is {rows[bad].get(context_field)!r}; the self-teacher's "
                        "context is non-empty text (e.g. the reference solution)", key="teacher.context_field")
    return [row[context_field] for row in rows]


def _golds(rows: list[dict], answer_field: str) -> list[str]:
    missing = next((i for i, row in enumerate(rows) if not _is_gold(row.get(answer_field))), None)
    if missing is not None:
        row = rows[missing]
        code_hint = " (code problems? set prompts.reward: code)" if {"test", "entry_point"} <= set(row) else ""
        raise UserError(f": row {missing} has {answer_field!r} = {row.get(answer_field)!r}, not a gold answer (text "
                        f"or a number) the grader can compare with{code_hint}; fields: "
                        f"{', '.join(k for k, v in row.items() if v is not None)}", key="prompts.answer_field")
    return [str(row[answer_field]).strip() for row in rows]


def _is_prompt(field) -> bool:
    if isinstance(field, str):
        return bool(field.strip())
    return isinstance(field, list) and bool(field) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in field)


def _is_gold(value) -> bool:
    """Text or a number; a bool, a list or a mapping would reach the grader as Python's str()."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _code_problems(rows: list[dict], prompt_field: str) -> list[dict]:
    """HumanEval-style problems for the sandbox: the prompt field is the function stub the
    completion's code continues or replaces, `test` the checker's code, `entry_point` its name."""
    for index, row in enumerate(rows):
        for key in (prompt_field, "test", "entry_point"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f": code runs each row's tests, and row {index} has no text field {key!r} (HumanEval "
                                f"rows: prompt, test, entry_point; or use prompts.reward: math); fields: "
                                f"{', '.join(row)}", key="prompts.reward")
        _check_code_row(row, index, prompt_field)
    return [{"prompt": row[prompt_field], "test": row["test"], "entry_point": row["entry_point"]} for row in rows]


def _check_code_row(row: dict, index: int, prompt_field: str) -> None:
    try:  # a test that does not compile, or defines no check(), fails every sample: reward 0, silently
        compile(row["test"], f"row {index} test", "exec")
    except SyntaxError as err:
        raise UserError(f": row {index}'s test does not compile ({err.msg}, line {err.lineno})",
                        key="prompts.reward") from None
    if not re.search(r"^def\s+check\s*\(", row["test"], flags=re.MULTILINE):
        raise UserError(f": row {index}'s test defines no check(candidate) (HumanEval's form: the sandbox calls "
                        "check(entry_point))", key="prompts.reward")
    # a field that is not the stub (task_id, a docstring) would fail every test: reward 0, silently
    if not re.search(rf"^\s*def\s+{re.escape(row['entry_point'])}\s*\(", row[prompt_field], flags=re.MULTILINE):
        raise UserError(f": row {index}'s {prompt_field!r} does not define its entry_point {row['entry_point']!r} "
                        f"(def {row['entry_point']}(...)); it must be the function stub the completion completes "
                        "(HumanEval: prompt)", key="prompts.prompt_field")


def tokenize_prompts(cfg: PromptsConfig, fields: list, tokenizer, prompts_per_step: int) -> list[list[int] | None]:
    """Token ids of each prompt (cleaned, templated, chat-rendered); None for a prompt longer than
    prompts.max_prompt_length (skipped: the step's prompts are drawn among the others). The
    template was checked by rl's validate()."""
    template = resolve_template(cfg.template) if cfg.template is not None else None
    if cfg.reward == "code":  # the user turn `posttrain eval --prompt chat` writes for HumanEval
        prompts = [render_prompt(tokenizer, code_request(field), cfg.system_prompt) for field in fields]
    else:
        prompts = [render_prompt(tokenizer, prompt_of(field, cfg.clean, template, index), cfg.system_prompt)
                   for index, field in enumerate(fields)]
    prompts = [p if len(p) <= cfg.max_prompt_length else None for p in prompts]
    fitting = sum(p is not None for p in prompts)
    if fitting < prompts_per_step:
        raise UserError(f": only {fitting} prompts fit prompts.max_prompt_length={cfg.max_prompt_length}",
                        key="rollout.prompts_per_step")
    return prompts


def prompt_of(value, clean: str, template: str | None, index: int):
    """The user turn for one row: unchanged without cleaning or template; else the question
    text (the first user message of a message list, as the LSM authors' script reads DAPO's
    `prompt`), cleaned, then formatted into the template."""
    if clean == "none" and template is None:
        return value
    question = value
    if isinstance(value, list):
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise UserError(f": row {index}'s message list has no user turn", key="prompts.prompt_field")
        question = users[0].get("content", "")
    question = str(question)
    if clean == "dapo-instructions":
        question = clean_dapo_instructions(question)
        if not question:
            raise UserError(f": row {index} is empty once its instruction lines are dropped", key="prompts.clean")
    return template.format(question=question) if template is not None else question


def draw_prompts(prompts: list[list[int] | None], per_step: int, seed: int, step: int, rank: int,
                 world_size: int) -> list[int]:
    """Indices of this process's prompts for `step`: an epoch-shuffled order over the prompts that
    fit, `per_step` per step over all processes."""
    fitting = [i for i, p in enumerate(prompts) if p is not None]
    epoch, index = divmod(step, len(fitting) // per_step)
    order = epoch_order(len(fitting), seed, epoch)[index * per_step : (index + 1) * per_step]
    return [fitting[i] for i in order][rank::world_size]
