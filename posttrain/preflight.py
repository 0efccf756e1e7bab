"""Pre-flight checks of a teacher/student pair, in seconds: `posttrain rl --check` (or
`distill --check`), and the start of every on-policy run that has a teacher.

What is checked (each problem is one line naming the recipe key it is about):
  - vocabulary and LM heads: one shared vocabulary, each head covers it (fatal otherwise; padded
    heads of different sizes are fine: scoring ignores rows past the smaller one)
  - end of turn and stop tokens: the token each chat template ends an assistant turn with, each
    model's stop ids. Fatal: the teacher's end of turn is not a stop token of the student's
    rollouts (the student would learn to emit it and keep going: length explosion). Warnings:
    different ends of turn or EOS tokens, teacher stop ids the rollouts ignore.
  - chat templates: the same prompt rendered by both tokenizers (warning when the ids differ:
    the teacher scores prompts in the student's format)
  - the teacher's mean log-prob per token of a few of its own samples vs of the student's
    (warning when it does not prefer its own: a wrong teacher path, or a format mismatch)
  - scoring determinism: the same sequences scored twice, and one sequence alone vs inside the
    padded batch (warning beyond a dtype-dependent tolerance: padding or batch-variance bugs
    would otherwise show up as a silently wrong reverse KL)
The sample and scoring checks need the local teacher (scoring.backend: hf) and one process.
The checks read the pair from a scorer (signals.py: its teacher model and tokenizer); `rl.check`
and `rl.rl` call them. May import: data, generation, models, scoring.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from posttrain.data.sft import Example, collate, render_prompt
from posttrain.errors import UserError
from posttrain.generation import SamplingSpec, make_backend, stop_token_ids
from posttrain.models import same_vocabulary
from posttrain.scoring import score_tokens

PROBE = [{"role": "user", "content": "What is 12 + 30? Answer with a number."}]
SAMPLE_PROMPTS, SAMPLES_PER_PROMPT, SAMPLE_TOKENS = 2, 2, 32


@dataclass(frozen=True)
class Finding:
    fatal: bool
    key: str  # the recipe key the problem is about
    message: str

    def line(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: key '{self.key}': {self.message}"


def vocabulary_findings(student_tokenizer, teacher_tokenizer, student_model, teacher_model) -> list[Finding]:
    if not same_vocabulary(student_tokenizer, teacher_tokenizer):
        return [Finding(True, "teacher", "teacher and student tokenizers differ; token-level objectives need one "
                                         "shared vocabulary")]
    findings = []
    for key, model in (("student", student_model), ("teacher", teacher_model)):
        if model is None:  # a vLLM teacher: its head is not loaded here
            continue
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(student_tokenizer):
            findings.append(Finding(True, key, f"the LM head has {rows} rows for a vocabulary of "
                                               f"{len(student_tokenizer)} tokens"))
    return findings


def end_of_turn_id(tokenizer) -> int | None:
    """The first token the chat template writes after an assistant message's content."""
    marker = "PREFLIGHTMARKER"
    text = tokenizer.apply_chat_template(PROBE + [{"role": "assistant", "content": marker}], tokenize=False)
    after = text[text.index(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[0] if ids else None


def token_findings(student_tokenizer, teacher_tokenizer, student_model, teacher_model) -> list[Finding]:
    name = student_tokenizer.convert_ids_to_tokens
    student_stops = set(stop_token_ids(student_tokenizer, student_model))
    teacher_stops = set(stop_token_ids(teacher_tokenizer, teacher_model))
    student_eot, teacher_eot = end_of_turn_id(student_tokenizer), end_of_turn_id(teacher_tokenizer)
    findings = []
    if teacher_eot is not None and teacher_eot not in student_stops:
        findings.append(Finding(True, "student", f"the teacher ends a turn with {name(teacher_eot)!r}, which does not "
                                f"stop the student's rollouts (stop tokens: {sorted(map(name, student_stops))}); "
                                "add its id to eos_token_id in the student's generation_config.json, or use matching chat templates"))
    if student_eot != teacher_eot:
        findings.append(Finding(False, "teacher", f"the chat templates end a turn differently: student "
                                f"{_token(name, student_eot)}, teacher {_token(name, teacher_eot)}"))
    if student_tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
        findings.append(Finding(False, "teacher", f"EOS differs: student {student_tokenizer.eos_token!r}, teacher "
                                f"{teacher_tokenizer.eos_token!r}"))
    ignored = teacher_stops - student_stops
    if ignored:
        findings.append(Finding(False, "student", f"the teacher stops at {sorted(map(name, ignored))}, the student's "
                                "rollouts do not"))
    return findings


def _token(name, token_id):
    return "nothing" if token_id is None else repr(name(token_id))


def template_findings(student_tokenizer, teacher_tokenizer, system_prompt: str | None) -> list[Finding]:
    if not getattr(teacher_tokenizer, "chat_template", None):
        return [Finding(False, "teacher", "the teacher's tokenizer has no chat template; it scores prompts in the "
                                          "student's format")]
    student_ids = render_prompt(student_tokenizer, PROBE, system_prompt)
    teacher_ids = render_prompt(teacher_tokenizer, PROBE, system_prompt)
    if student_ids == teacher_ids:
        return []
    first = next((i for i, (a, b) in enumerate(zip(student_ids, teacher_ids)) if a != b),
                 min(len(student_ids), len(teacher_ids)))
    return [Finding(False, "teacher", f"the chat templates render the same prompt differently (from token {first}: "
                    f"student {student_tokenizer.decode(student_ids[first:first + 8])!r}, teacher "
                    f"{teacher_tokenizer.decode(teacher_ids[first:first + 8])!r}); the teacher scores the student's "
                    "rendering")]


def sample_findings(student, tokenizer, teacher_model, teacher_tokenizer, prompts: list[list[int]],
                    seed: int) -> tuple[list[Finding], list[str], list[Example]]:
    """The teacher's mean log-prob per token of its own samples and of the student's."""
    spec = SamplingSpec(n=SAMPLES_PER_PROMPT, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=SAMPLE_TOKENS,
                        seed=seed)
    probe_prompts = prompts[:SAMPLE_PROMPTS]
    mean_logprob, samples = {}, {}
    for who, model, tok in (("teacher", teacher_model, teacher_tokenizer), ("student", student, tokenizer)):
        completions = make_backend("hf", model=model, tokenizer=tok).generate(probe_prompts, spec)
        samples[who] = [Example(p + c.token_ids, len(p)) for p, group in zip(probe_prompts, completions) for c in group
                        if c.token_ids]
        scored = _teacher_logprobs(teacher_model, samples[who], tokenizer.pad_token_id)
        mean_logprob[who] = float(scored.mean()) if scored.numel() else float("nan")
    info = [f"teacher log-prob per token: {mean_logprob['teacher']:.3f} on its own samples, "
            f"{mean_logprob['student']:.3f} on the student's ({SAMPLE_PROMPTS} prompts x {SAMPLES_PER_PROMPT}, "
            f"{SAMPLE_TOKENS} tokens, temperature 1)"]
    findings = []
    if not mean_logprob["teacher"] > mean_logprob["student"]:
        findings.append(Finding(False, "teacher.path", f"the teacher does not prefer its own samples "
                                f"({mean_logprob['teacher']:.3f}) to the student's ({mean_logprob['student']:.3f} "
                                "log-prob per token): a wrong teacher, or a prompt format it was not trained on"))
    return findings, info, samples["teacher"] + samples["student"]


def _teacher_logprobs(teacher_model, examples: list[Example], pad_id: int) -> torch.Tensor:
    if not examples:
        return torch.zeros(0)
    batch = _on_device(collate(examples, pad_id), teacher_model)
    return score_tokens(teacher_model, batch)["token_logprob"][batch["loss_mask"]].float().cpu()


def _on_device(batch, model):
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def determinism_findings(models: dict, examples: list[Example], pad_id: int) -> tuple[list[Finding], list[str]]:
    """Each model scores the batch twice, and its shortest sequence alone (no padding)."""
    if len(examples) < 2:
        return [], []
    findings, info = [], []
    shortest = min(range(len(examples)), key=lambda i: len(examples[i].token_ids))
    for who, model in models.items():
        batch = _on_device(collate(examples, pad_id), model)
        mask_BT = batch["loss_mask"]
        first = score_tokens(model, batch)["token_logprob"]
        second = score_tokens(model, batch)["token_logprob"]
        alone = score_tokens(model, _on_device(collate([examples[shortest]], pad_id), model))["token_logprob"][0]
        width = alone.shape[0]
        repeat_gap = float((first - second)[mask_BT].abs().max())
        row_mask = mask_BT[shortest, :width]
        padding_gap = float((first[shortest, :width] - alone)[row_mask].abs().max()) if row_mask.any() else 0.0
        tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1
        info.append(f"{who} scoring: same batch twice differs by {repeat_gap:.2e}, a sequence alone vs padded "
                    f"in the batch by {padding_gap:.2e} (max |log-prob| difference)")
        if repeat_gap > tolerance:
            findings.append(Finding(False, who, f"scoring the same batch twice differs by up to {repeat_gap:.3g} "
                                    "in log-prob: non-deterministic scoring"))
        if padding_gap > tolerance:
            findings.append(Finding(False, who, f"a sequence scored alone and padded in a batch differs by up to "
                                    f"{padding_gap:.3g} in log-prob: padding changes the scores"))
    return findings, info


def run_checks(recipe, student, tokenizer, scorer, prompts: list[list[int]], *, models_too: bool):
    """(findings, info lines). models_too: also sample and score (needs the local teacher).
    `prompts` are token ids; None marks a prompt too long to use."""
    teacher_tokenizer, teacher_model = scorer.teacher_tokenizer, scorer.teacher_model
    if getattr(scorer, "privileged", None) is not None:  # signals.SelfScorer: one model, one tokenizer
        return [], ["self-teacher (teacher.source: self): the student scores its own rollouts after the privileged "
                    "prompt; no teacher/student pair to check"]
    if teacher_tokenizer is None:
        return [], [f"no teacher: {recipe.objective.name} learns from no teacher, so there is no pair to check"]
    prompts = [p for p in prompts if p is not None]
    findings = vocabulary_findings(tokenizer, teacher_tokenizer, student, teacher_model)
    if any(f.fatal for f in findings):
        return findings, []
    findings += token_findings(tokenizer, teacher_tokenizer, student, teacher_model)
    findings += template_findings(tokenizer, teacher_tokenizer, recipe.prompts.system_prompt)
    info = []
    if models_too and teacher_model is not None:
        with _eval_mode(student):
            found, info, samples = sample_findings(student, tokenizer, teacher_model, teacher_tokenizer, prompts,
                                                   recipe.seed)
            findings += found
            found, lines = determinism_findings({"student": student, "teacher": teacher_model}, samples,
                                                tokenizer.pad_token_id)
        findings += found
        info += lines
    elif teacher_model is None:
        info.append("samples and scoring determinism not checked: the vllm scoring backend has no local teacher")
    return findings, info


@contextmanager
def _eval_mode(model):
    """Dropout off while checking; the model's training flag restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def refuse_or_warn(findings: list[Finding], show) -> None:
    """Print one line per finding; raise if any is fatal (nothing has been trained yet)."""
    for finding in findings:
        show(finding.line())
    fatal = sum(f.fatal for f in findings)
    if fatal:
        raise UserError(f"pre-flight found {fatal} fatal problem(s), listed above; `posttrain rl --check` repeats the "
                        "checks in seconds", recipe=True)


def at_start(recipe, student, tokenizer, scorer, prompts, runtime) -> None:
    """The checks at the start of an rl run: fatal problems refuse, the others warn. The sample
    and scoring checks run in single-process runs (the teacher may be sharded otherwise)."""
    from rich.markup import escape

    from posttrain.progress import console

    findings, _ = run_checks(recipe, student, tokenizer, scorer, prompts, models_too=runtime.world_size == 1)
    refuse_or_warn(findings, show=lambda line: runtime.is_main and console.print(escape(line), highlight=False,
                                                                                  soft_wrap=True))
