"""The signal sources of an on-policy step, opened once from the recipe, and the one place a
rollout batch's `TokenSignals` are built (`fetch_signals`).

  scorer     π_old (always: the student before this step's updates) and, when the objective
             declares a teacher signal, the teacher: ONE interface, `Scorer.score(student,
             batch, group_B) -> TokenSignals`, with three implementations
               StudentScorer   no teacher: π_old's sampled-token log-prob and entropy
               HFPairScorer    a local transformers teacher, scored with the student in one
                               chunked pass (scoring.score_pair): every field, and the exact reverse KL
               VLLMScorer      a vLLM teacher's own top-K (prompt_logprobs), the student scored
                               on it (no exact KL, no student top-K: validate() refuses those)
               SelfScorer      OPSD (teacher.source: self): the student itself, or a frozen copy
                               of it, reading each rollout after its privileged prompt
                               (data/privileged.py), scored with π_old as HFPairScorer does
  reference  the starting student, frozen, for a KL penalty (REFERENCE_TOKEN)
  grader     the math grader's worker pool, or the code sandbox (VERIFIABLE_REWARD)
  critic     the value model's V_old (VALUE): posttrain/critic.py, built and trained by rl

What is fetched is what the objective declares (objective.needs) at the width it declares
(objective.support); the loop never branches on an objective's name. A new teacher signal is
a field of TokenSignals and a few lines in each scorer. May import: config, losses, models,
scale, scoring, preflight (the vocabulary check), generation, eval (grader, sandbox).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from posttrain.config import RLRecipe
from posttrain.data.privileged import PrivilegedPrompts
from posttrain.errors import UserError
from posttrain.losses import OBJECTIVES
from posttrain.losses.objective import (
    REFERENCE_TOKEN, TEACHER_SOURCES, VALUE, VERIFIABLE_REWARD, Support, TokenSignals,
)
from posttrain.losses.support import student_logprob_on_support, support_slots
from posttrain.models import load_policy, max_positions
from posttrain.preflight import vocabulary_findings
from posttrain.progress import console
from posttrain.runtime import Runtime
from posttrain.scale import gathered, place_teacher
from posttrain.scoring import score_pair, score_tokens


def support_of(recipe: RLRecipe) -> Support:
    """The top-K the scorer returns and the diagnostics measure: the objective's own support, or
    the teacher's top-K at scoring.diagnostics_k."""
    declared = OBJECTIVES[recipe.objective.name].support(recipe.objective.params)
    return declared or Support(kind="teacher", k=recipe.scoring.diagnostics_k)


def scoring_temperature(recipe: RLRecipe) -> float:
    """The temperature π_old, the teacher and the trained π_θ are all scored at (scoring.at_rollout_temperature)."""
    return recipe.rollout.temperature if recipe.scoring.at_rollout_temperature else 1.0


class Scorer:
    """Scores a rollout batch without gradients: π_old, and the teacher where there is one."""

    teacher_model = None  # the local teacher (preflight's sample and determinism checks), or None
    teacher_tokenizer = None

    def __init__(self, k: int, settings: dict):
        self.k, self.settings = k, settings  # settings: chunk_tokens, matmul_dtype, temperature

    def score(self, student, batch: dict, group_B: torch.Tensor, prompt_ids: list[list[int]] | None = None
              ) -> TokenSignals:
        """`prompt_ids`: each rollout's prompt token ids (read by the self-teacher only)."""
        raise NotImplementedError


class StudentScorer(Scorer):
    def score(self, student, batch, group_B, prompt_ids=None):
        old = score_tokens(student, batch, k=0, entropy=True, **self.settings)
        return TokenSignals(old_logprob_BT=old["token_logprob"], entropy_BT=old["entropy"], group_B=group_B)


class HFPairScorer(Scorer):
    def __init__(self, k, settings, model, tokenizer):
        super().__init__(k, settings)
        self.teacher_model, self.teacher_tokenizer = model, tokenizer

    def score(self, student, batch, group_B, prompt_ids=None):
        with gathered(self.teacher_model):
            return TokenSignals(group_B=group_B, **score_pair(student, self.teacher_model, batch, k=self.k, **self.settings))


class VLLMScorer(Scorer):
    def __init__(self, k, settings, engine, tokenizer):
        super().__init__(k, settings)
        self.engine, self.teacher_tokenizer = engine, tokenizer

    def score(self, student, batch, group_B, prompt_ids=None):
        teach = self.engine.score(batch)  # at temperature 1 (validate() refuses at_rollout_temperature)
        old = score_tokens(student, batch, k=self.k, at_ids_BTJ=teach["topk_ids"], entropy=True, **self.settings)
        return TokenSignals(
            old_logprob_BT=old["token_logprob"], entropy_BT=old["entropy"], group_B=group_B,
            teacher_token_logprob_BT=teach["token_logprob"],
            teacher_topk_ids_BTK=teach["topk_ids"], teacher_topk_logprob_BTK=teach["topk_logprob"],
            student_logprob_at_teacher_topk_BTK=old["at_logprob"],
            student_topk_ids_BTK=old["topk_ids"], student_topk_logprob_BTK=old["topk_logprob"])


class SelfScorer(Scorer):
    """OPSD's teacher: the student's current weights (π_old at scoring time: no second model;
    teacher_model stays None) or a frozen copy of the starting student (teacher.weights: frozen),
    scoring the same response tokens after each rollout's privileged prompt."""

    def __init__(self, k, settings, tokenizer, privileged: PrivilegedPrompts, frozen=None):
        super().__init__(k, settings)
        self.teacher_model, self.teacher_tokenizer, self.privileged = frozen, tokenizer, privileged

    def score(self, student, batch, group_B, prompt_ids=None):
        teacher_batch = self.privileged.view(batch, prompt_ids)
        teacher = student if self.teacher_model is None else self.teacher_model
        with gathered(self.teacher_model):
            return TokenSignals(group_B=group_B, **score_pair(student, teacher, batch, k=self.k,
                                                              teacher_batch=teacher_batch, **self.settings))


def open_scorer(recipe: RLRecipe, needs: frozenset[str], runtime: Runtime, student_tokenizer,
                privileged: PrivilegedPrompts | None = None) -> Scorer:
    """`privileged`: the self-teacher's prompts (data/privileged.py), with teacher.source: self."""
    support = support_of(recipe)
    settings = dict(chunk_tokens=recipe.scoring.chunk_tokens, matmul_dtype=runtime.matmul_dtype,
                    temperature=scoring_temperature(recipe))
    if not needs & TEACHER_SOURCES:
        return StudentScorer(support.k, settings)
    if recipe.teacher.source == "self":
        return _open_self_scorer(recipe, runtime, student_tokenizer, privileged, support.k, settings)
    model, tokenizer = load_policy(recipe.teacher, "teacher", recipe.seed + 1, "cpu", dtype=_frozen_dtype(recipe, runtime))
    fatal = [f for f in vocabulary_findings(student_tokenizer, tokenizer, None, model) if f.fatal]
    if fatal:
        raise UserError(f": {fatal[0].message}", key=fatal[0].key)
    if recipe.scoring.backend == "vllm":
        from posttrain.generation.vllm import VLLMTeacher

        engine = VLLMTeacher(recipe.teacher.path, k=support.k, gpu_memory_utilization=recipe.scoring.gpu_memory_utilization)
        return VLLMScorer(support.k, settings, engine, tokenizer)
    return HFPairScorer(support.k, settings, place_teacher(model.eval().requires_grad_(False), runtime), tokenizer)


def _open_self_scorer(recipe: RLRecipe, runtime: Runtime, tokenizer, privileged: PrivilegedPrompts, k: int,
                      settings: dict) -> SelfScorer:
    positions = max_positions(recipe.student)
    if positions is not None and privileged.longest + recipe.rollout.max_new_tokens > positions:
        raise UserError(f": the longest privileged prompt ({privileged.longest} tokens) plus rollout.max_new_tokens "
                        f"({recipe.rollout.max_new_tokens}) must fit the student's {positions} positions",
                        key="teacher.context_field")
    frozen = None
    if recipe.teacher.weights == "frozen":
        # the trained student's weight dtype, as the KL reference: at step 1 frozen == current exactly
        dtype = torch.bfloat16 if recipe.train.precision == "bf16-pure" else torch.float32
        model, _ = load_policy(recipe.student, "student", recipe.seed, "cpu", dtype=dtype)
        frozen = place_teacher(model.eval().requires_grad_(False), runtime)
    return SelfScorer(k, settings, tokenizer, privileged, frozen)


def _frozen_dtype(recipe: RLRecipe, runtime: Runtime) -> torch.dtype:
    bf16 = runtime.matmul_dtype == torch.bfloat16 or recipe.train.precision == "bf16-pure"
    return torch.bfloat16 if bf16 else torch.float32


@dataclass
class Sources:
    """What the loop fetches per rollout batch, opened once from the recipe: exactly the sources
    the objective declares. A context manager: the grader's workers close with it."""

    needs: frozenset[str]
    scorer: Scorer
    support: Support  # the top-K kind and width scored and measured (support_of)
    reference: torch.nn.Module | None = None  # the starting student, frozen (KL to a reference)
    grader: object | None = None  # eval.math_grader.MathGrader (a worker pool): prompts.reward math
    # posttrain.critic.Critic, the value model (VALUE): built, trained and checkpointed by rl with
    # its own optimizer, so set there (rl._build), not here
    critic: object | None = None
    sandbox: object | None = None  # eval.code_sandbox.CodeSandbox: prompts.reward code
    # one thread that waits on the grader's processes while this one scores (grade_in_background)
    grading_thread: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, recipe: RLRecipe, needs: frozenset[str], runtime: Runtime, tokenizer, show: bool = True,
             privileged: PrivilegedPrompts | None = None) -> Sources:
        sources = cls(needs=needs, scorer=open_scorer(recipe, needs, runtime, tokenizer, privileged),
                      support=support_of(recipe))
        if REFERENCE_TOKEN in needs:
            # the trained student's weight dtype (fp32 unless bf16-pure), so the KL starts at 0
            dtype = torch.bfloat16 if recipe.train.precision == "bf16-pure" else torch.float32
            model, _ = load_policy(recipe.student, "student", recipe.seed, "cpu", dtype=dtype)
            sources.reference = place_teacher(model.eval().requires_grad_(False), runtime)
        if VERIFIABLE_REWARD in needs and recipe.prompts.reward == "code":
            from posttrain.eval.code_sandbox import WEAK_SANDBOX_KEY, CodeSandbox

            sources.sandbox = CodeSandbox(workers=recipe.scoring.grader_workers, allow_weak=recipe.scoring.allow_weak_sandbox,
                                          weak_flag=WEAK_SANDBOX_KEY)
            if show and sources.sandbox.warning():  # as `posttrain eval` says it: a weak sandbox, up front
                console.print(sources.sandbox.warning(), highlight=False)
        elif VERIFIABLE_REWARD in needs:
            from posttrain.eval.math_grader import MathGrader

            sources.grader = MathGrader(workers=recipe.scoring.grader_workers)
        return sources

    @property
    def frozen_model(self):
        """The no-grad model held beside the student (the local teacher, else the reference)."""
        return self.scorer.teacher_model if self.scorer.teacher_model is not None else self.reference

    def verifiable_rewards(self, references: list, texts: list[str]) -> list[float]:
        """1/0 per completion: the math grader's verdict on its boxed answer against the gold
        answer (reference: a string), or whether it passed the problem's tests in the code sandbox
        (reference: {prompt, test, entry_point}), graded exactly as `posttrain eval` grades."""
        if self.sandbox is not None:
            return [float(v["passed"]) for v in self.sandbox.grade(references, texts)]
        return [float(v["correct"]) for v in self.grader.grade(references, texts)]

    def grade_in_background(self, references: list, texts: list[str]) -> Future:
        """verifiable_rewards, started now and collected with .result(): the grader's work runs in
        its worker processes (the math pool, the sandbox), so this process scores π_old and the
        teacher meanwhile instead of waiting. The same verdicts: only when they are computed moves."""
        if self.grading_thread is None:
            self.grading_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-grading")
        return self.grading_thread.submit(self.verifiable_rewards, references, texts)

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc) -> None:
        if self.grading_thread is not None:
            self.grading_thread.shutdown(wait=True, cancel_futures=True)
        if self.grader is not None:
            self.grader.close()
        if self.sandbox is not None:
            self.sandbox.close()


def fetch_signals(sources: Sources, policy, batch, group_B, texts: list[str], references: list,
                  rewards: list[float] | None = None, prompt_ids: list[list[int]] | None = None,
                  old_logprob_BT: torch.Tensor | None = None) -> tuple[TokenSignals, dict[str, float]]:
    """The one place a rollout batch's TokenSignals are built: the scorer (π_old, the teacher),
    then the reference policy and the grader where declared (`rewards`: graded already, by
    dynamic sampling; `prompt_ids`: each rollout's prompt, for a self-teacher; `old_logprob_BT`:
    π_old given (the sampler's, rollout.old_logprob: sampler): no scoring pass, no entropy).
    Returns (signals, support diagnostics)."""
    student = policy.module.model if hasattr(policy, "module") else policy.model
    grading = (sources.grade_in_background(references, texts)
               if VERIFIABLE_REWARD in sources.needs and rewards is None else None)
    if old_logprob_BT is not None:  # rl_checks allows it only where the scorer is π_old alone
        signals = TokenSignals(old_logprob_BT=old_logprob_BT, entropy_BT=None, group_B=group_B)
    else:
        with gathered(policy):  # under FSDP2 the student is scored outside its wrapped forward
            signals = sources.scorer.score(student, batch, group_B, prompt_ids)
    if sources.reference is not None:
        with gathered(sources.reference):
            signals.reference_logprob_BT = score_tokens(sources.reference, batch, k=0,
                                                        **sources.scorer.settings)["token_logprob"]
    if VERIFIABLE_REWARD in sources.needs:
        graded = rewards if rewards is not None else grading.result()
        signals.verifiable_reward_B = torch.tensor(graded, device=batch["loss_mask"].device)
    if VALUE in sources.needs:  # the critic before this step's updates
        signals.value_BT = sources.critic.values(batch)
    if signals.teacher_topk_ids_BTK is None:  # no teacher scored: no support to measure
        return signals, {}
    return signals, support_diagnostics(signals, sources.support.kind, batch["loss_mask"])


def support_diagnostics(signals: TokenSignals, support: str, mask_BT) -> dict[str, float]:
    """Means over loss positions: each model's probability mass on the support (teacher /
    student / union / overlap of the two top-K: losses/support.py), the support's size, and the
    share of the teacher's top-K that is also in the student's top-K."""
    if mask_BT.sum() == 0:
        return {}
    slots = support_slots(support, signals)
    off_BTJ = ~slots["valid"]
    student_mass = student_logprob_on_support(support, signals).masked_fill(off_BTJ, float("-inf"))
    teacher_mass = slots["teacher_logprob"].masked_fill(off_BTJ, float("-inf"))
    s_ids, t_ids = signals.student_topk_ids_BTK[mask_BT], signals.teacher_topk_ids_BTK[mask_BT]
    overlap = (t_ids.unsqueeze(-1) == s_ids.unsqueeze(-2)).any(-1).float().mean(-1)
    return {"student_mass": student_mass.logsumexp(-1).exp()[mask_BT].mean().item(),
            "teacher_mass": teacher_mass.logsumexp(-1).exp()[mask_BT].mean().item(),
            "support_size": slots["valid"][mask_BT].sum(-1).float().mean().item(),
            "topk_overlap": overlap.mean().item()}
