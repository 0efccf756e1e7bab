"""OPSD's teacher input (On-Policy Self-Distillation, arXiv 2601.18734; teacher.source: self):
the student is its own teacher, given privileged context (the row's reference solution) that
the student's prompt lacks, and it scores the SAME response tokens the student sampled.

    student:  [plain prompt ids      ][response ids]    (the rollout batch)
    teacher:  [privileged prompt ids       ][response ids]
    privileged user turn = teacher.context_template.format(question=<the row's question>,
                                                           context=<the row's context_field>)

The privileged prompt is rendered like the plain one (prompts.clean, the chat template,
prompts.system_prompt); only the user turn differs. The default template is the OPSD authors'
(data/templates.py OPSD_TEACHER_TEMPLATE). `PrivilegedPrompts.view` builds the teacher's batch
from a rollout batch: each row is its privileged prompt + the same response tokens, and its loss
positions are the rollout batch's own (the special-token mask's holes included) shifted by the
difference in prompt length, so both models' loss positions line up one to one, in order
(scoring.score_pair reads them that way). May import: config, data, errors, progress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import RLRecipe
from posttrain.data.examples import Example
from posttrain.data.prompts import PromptRows, prompt_of
from posttrain.data.sft import collate, render_prompt
from posttrain.data.templates import resolve_context_template
from posttrain.progress import console

DEFAULT_CONTEXT_FIELD = "solution"  # the OPSD authors' solution_field (and the synthetic rows')
DEFAULT_CONTEXT_TEMPLATE = "opsd"


def context_field_of(recipe: RLRecipe) -> str | None:
    """The prompt rows' field a self-teacher reads; None without one."""
    teacher = recipe.teacher
    if teacher is None or teacher.source != "self":
        return None
    return teacher.context_field or DEFAULT_CONTEXT_FIELD


@dataclass
class PrivilegedPrompts:
    """Each plain prompt's privileged prompt (token ids), looked up by the plain prompt's ids."""

    by_prompt: dict[tuple[int, ...], list[int]]
    pad_id: int

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.by_prompt.values())

    def view(self, batch: dict, prompt_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """The teacher's batch for a rollout batch whose row b starts with prompt_ids[b] (see the
        module docstring); on the batch's device."""
        lengths_B = batch["attention_mask"].sum(dim=1).tolist()
        rows, shifts = [], []
        for b, plain in enumerate(prompt_ids):
            n = int(lengths_B[b])  # attended positions: the sequence is input_ids[:n] + target_ids[n − 1]
            sequence = batch["input_ids"][b, :n].tolist() + [int(batch["target_ids"][b, n - 1])]
            if sequence[: len(plain)] != list(plain):
                raise RuntimeError(f"rollout {b} does not start with the prompt given for it")  # a wiring bug
            privileged = self.by_prompt[tuple(plain)]
            rows.append(Example(privileged + sequence[len(plain):], len(privileged)))
            shifts.append(len(privileged) - len(plain))
        view = collate(rows, self.pad_id)
        loss_mask_BT = torch.zeros_like(view["loss_mask"])
        mask_BT = batch["loss_mask"].cpu()
        for b, (plain, shift) in enumerate(zip(prompt_ids, shifts)):
            n = int(lengths_B[b])
            start = len(plain) - 1  # the first response position (it predicts the first response token)
            loss_mask_BT[b, start + shift : n + shift] = mask_BT[b, start:n]
        view["loss_mask"] = loss_mask_BT
        return {key: value.to(batch["input_ids"].device) for key, value in view.items()}


def privileged_prompts(recipe: RLRecipe, rows: PromptRows, tokenizer, prompts: list[list[int] | None]
                       ) -> PrivilegedPrompts | None:
    """The privileged prompt of every prompt in use (None where the plain one is too long: never
    drawn); None without a self-teacher. Rows whose plain prompts render identically share the
    first such row's context (warned when their contexts differ: the student cannot tell them apart)."""
    if context_field_of(recipe) is None:
        return None
    cfg = recipe.prompts
    template = resolve_context_template(recipe.teacher.context_template or DEFAULT_CONTEXT_TEMPLATE)
    by_prompt, conflicts = {}, 0
    for index, (field, context, plain) in enumerate(zip(rows.fields, rows.contexts, prompts)):
        if plain is None:
            continue
        # the row's question as the plain prompt starts from it: cleaned, before prompts.template
        # (a template of "{question}" alone yields just that text)
        question = prompt_of(field, cfg.clean, "{question}", index)
        user_turn = template.format(question=question, context=context)
        privileged = render_prompt(tokenizer, user_turn, cfg.system_prompt)
        key = tuple(plain)
        if key in by_prompt:
            conflicts += by_prompt[key] != privileged
            continue
        by_prompt[key] = privileged
    if conflicts:
        console.print(f"warning: key 'teacher.context_field': {conflicts} row(s) have the same prompt as an earlier row "
                      "but a different context; the self-teacher sees the first row's", highlight=False)
    return PrivilegedPrompts(by_prompt, tokenizer.pad_token_id)
