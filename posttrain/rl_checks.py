"""Every check of an on-policy recipe, in one place: `validate(recipe, world_size)` (no model: run
first by `posttrain rl` and by `rl --check`), `check_golds` (the gold answers, parsed by the
math grader's workers before any model loads), and the two that need the student's tokenizer or
head (`check_k`, `single_token_ids`). Each mistake is one UserError naming its recipe key.
May import: config, losses, data (templates), errors, models, trackers, eval (math_grader: gold kinds).
"""

from __future__ import annotations

from posttrain.config import RLRecipe
from posttrain.data.templates import resolve_context_template, resolve_template
from posttrain.errors import UserError
from posttrain.losses import OBJECTIVES
from posttrain.losses.objective import PROMPT_HISTORY, STUDENT_TOPK, TEACHER_SOURCES, VALUE, VERIFIABLE_REWARD
from posttrain.models import check_rollout_fits
from posttrain.progress import console
from posttrain.trackers import check_installed


def needs_of(recipe: RLRecipe) -> frozenset[str]:
    """The sources the recipe's objective declares (objective.needs)."""
    return OBJECTIVES[recipe.objective.name].needs(recipe.objective.params)


def validate(recipe: RLRecipe, world_size: int = 1) -> None:
    """The recipe's checks that need no model, data or process group beyond its size."""
    objective = OBJECTIVES[recipe.objective.name]
    if not objective.on_policy:
        raise UserError(f": {objective.name!r} is an offline objective; run it with `posttrain train`",
                        key="objective.name")
    needs = needs_of(recipe)
    _check_sources(recipe, needs)
    _check_self_teacher(recipe)
    _check_code_reward(recipe, needs)
    _check_grouped(recipe, needs)
    _check_critic(recipe, needs)
    _check_scoring(recipe)
    _check_sizes(recipe, world_size)
    _check_shaping(recipe, needs, world_size)
    _check_sampler_old_logprob(recipe, needs)
    check_rollout_fits(recipe)  # models.py: a prompt plus the new tokens within the models' positions
    check_installed(recipe.report_to)  # trackers.py: a missing tracker package, before anything runs


def _check_sources(recipe: RLRecipe, needs: frozenset[str]) -> None:
    """A teacher exactly when the objective declares a teacher signal; vllm scoring only for what
    it can return."""
    name = recipe.objective.name
    if needs & TEACHER_SOURCES and recipe.teacher is None:
        raise UserError(f"is required: {name} learns from a teacher's log-probs; give teacher.path", key="teacher")
    if not needs & TEACHER_SOURCES and recipe.teacher is not None:
        raise UserError(f": {name} uses no teacher signal, so the teacher would be ignored; remove the teacher "
                        "section", key="teacher")
    if STUDENT_TOPK in needs and recipe.scoring.backend == "vllm":
        raise UserError(": vllm returns only the teacher's own top-K, so it cannot score the student's top-K support; "
                        "use scoring.backend: hf", key="scoring.backend")
    if not needs & TEACHER_SOURCES and recipe.scoring.backend == "vllm":
        raise UserError(f": vllm scoring serves a teacher, and {name} has none; use scoring.backend: hf",
                        key="scoring.backend")


SELF_ONLY_KEYS = ("weights", "context_field", "context_template")


def _check_self_teacher(recipe: RLRecipe) -> None:
    """teacher.source: self (OPSD) reads the student, scored locally; the keys that say how are
    for a self-teacher only, and a separate model's keys are not for one."""
    teacher = recipe.teacher
    if teacher is None:
        return
    if teacher.source != "self":
        for key in SELF_ONLY_KEYS:
            if getattr(teacher, key) is not None:
                raise UserError(": is only for teacher.source: self (the student as its own teacher, OPSD); remove it, "
                                "or set teacher.source: self", key=f"teacher.{key}")
        return
    for key in ("path", "tiny", "tokenizer"):
        if getattr(teacher, key) is not None:
            raise UserError(": teacher.source: self is the student itself (student.path); remove it, or drop "
                            "teacher.source to learn from a separate model", key=f"teacher.{key}")
    if recipe.scoring.backend == "vllm":
        raise UserError(": a self-teacher is the student, scored locally; use scoring.backend: hf",
                        key="scoring.backend")
    if teacher.context_template is not None:
        try:
            resolve_context_template(teacher.context_template)
        except ValueError as err:
            raise UserError(str(err), key="teacher.context_template") from None


def _check_code_reward(recipe: RLRecipe, needs: frozenset[str]) -> None:
    """prompts.reward code: an objective that is graded, and prompts rendered as eval renders HumanEval."""
    cfg = recipe.prompts
    if cfg.reward != "code":
        return
    if VERIFIABLE_REWARD not in needs:
        raise UserError(f": code grades completions for a verifiable reward, and {recipe.objective.name} has none; "
                        "remove prompts.reward", key="prompts.reward")
    for key, value, unset in (("template", cfg.template, None), ("clean", cfg.clean, "none")):
        if value != unset:
            raise UserError(": code prompts are the function stub in a python block, as `posttrain eval --prompt chat` "
                            "asks HumanEval; remove it", key=f"prompts.{key}")


def _check_grouped(recipe: RLRecipe, needs: frozenset[str]) -> None:
    """A verifiable reward (grpo): each rollout's advantage is relative to its prompt's other rollouts
    (not with a value model, ppo: its baseline is the critic's V, so one rollout per prompt is fine)."""
    if VERIFIABLE_REWARD not in needs:
        if recipe.rollout.dynamic_sampling:
            raise UserError(f": drops groups whose rewards are all equal, and {recipe.objective.name} has no verifiable "
                            "reward; remove it", key="rollout.dynamic_sampling")
        return
    name = recipe.objective.name
    if recipe.rollout.dynamic_sampling and needs & {VALUE, PROMPT_HISTORY}:
        # dynamic sampling drops a group of equal rewards as one whose advantage is 0; with a critic's
        # baseline (ppo) or a prompt's reward history (dcpo's smooth_std) such a group still trains
        why = "its critic's value" if VALUE in needs else "the prompt's reward history (objective.smooth_std)"
        fix = "" if VALUE in needs else ", or set objective.smooth_std: false"
        raise UserError(f": drops groups whose rewards are all equal as if they trained nothing, but {name}'s advantage "
                        f"is relative to {why}, so they do train; remove it{fix}", key="rollout.dynamic_sampling")
    if VALUE in needs:
        return
    if recipe.rollout.samples_per_prompt < 2:
        raise UserError(f": {name} compares each rollout with the other rollouts of its prompt; with 1 every "
                        "advantage is 0 and nothing trains; use ≥ 2", key="rollout.samples_per_prompt")
    if recipe.rollout.temperature == 0:
        raise UserError(f": greedy rollouts of one prompt are identical, so every {name} advantage is 0; sample at "
                        "temperature > 0", key="rollout.temperature")


def _check_critic(recipe: RLRecipe, needs: frozenset[str]) -> None:
    """A critic section exactly when the objective learns a value model (ppo)."""
    name = recipe.objective.name
    if VALUE in needs and recipe.critic is None:
        raise UserError(f"is required: {name} learns a value model (critic) beside the policy; add a critic section "
                        "with its lr (critic.lr; verl's default 1.0e-5, 10x its actor's lr)", key="critic")
    if VALUE not in needs and recipe.critic is not None:
        raise UserError(f": {name} learns no value model, so the critic would be ignored; remove the critic section",
                        key="critic")


def _check_scoring(recipe: RLRecipe) -> None:
    if recipe.prompts.template is not None:
        try:
            resolve_template(recipe.prompts.template)
        except ValueError as err:
            raise UserError(str(err), key="prompts.template") from None
    if recipe.scoring.at_rollout_temperature and recipe.rollout.temperature == 0:
        raise UserError(": rollout.temperature is 0 (greedy); log-probs at temperature 0 are undefined",
                        key="scoring.at_rollout_temperature")
    if recipe.scoring.at_rollout_temperature and recipe.scoring.backend == "vllm":
        raise UserError(": the vllm scoring backend returns log-probs at temperature 1 only; use scoring.backend: hf",
                        key="scoring.at_rollout_temperature")


def _check_sizes(recipe: RLRecipe, world_size: int) -> None:
    per_step = recipe.rollout.prompts_per_step
    rollouts = per_step * recipe.rollout.samples_per_prompt
    if per_step % world_size:
        raise UserError(f"({per_step}) must be a multiple of the number of processes ({world_size})",
                        key="rollout.prompts_per_step")
    mini = recipe.train.mini_batch_size
    if rollouts % mini or mini % world_size:
        raise UserError(f"({mini}) must divide the rollouts per step ({rollouts}) and be a multiple of the number of "
                        "processes", key="train.mini_batch_size")


def _check_sampler_old_logprob(recipe: RLRecipe, needs: frozenset[str]) -> None:
    """rollout.old_logprob: sampler only where the sampler's log-probs are π_old up to rounding:
    the student itself samples (hf), in fp32, from its plain distribution, and no scoring pass
    runs anyway (a teacher's pass computes π_old alongside at no extra cost)."""
    import torch

    rollout, scoring, train = recipe.rollout, recipe.scoring, recipe.train
    if rollout.old_logprob != "sampler":
        return
    key = "rollout.old_logprob"
    bf16 = train.precision in ("bf16", "bf16-pure") or (train.precision == "auto" and torch.cuda.is_available())
    plain = rollout.top_p == 1.0 and not rollout.top_k and (
        rollout.temperature == 1.0 or (scoring.at_rollout_temperature and rollout.temperature > 0))
    problems = [
        (rollout.backend != "hf", "the vllm engine samples with other kernels and precision than the trainer: keep "
                                  "recompute (and rollout.importance_cap for the mismatch)"),
        (bf16, "bf16 training scores π_θ in other numerics than the fp32 sampler: keep recompute, or train.precision: fp32"),
        (not plain, "the sampler draws from a truncated or tempered distribution, not π_old (top_p 1, top_k 0, and "
                    "temperature 1 or scoring.at_rollout_temperature)"),
        (bool(needs & (TEACHER_SOURCES | {STUDENT_TOPK})), f"{recipe.objective.name} scores the rollouts anyway (a "
                                                           "teacher or π_old's top-K), which gives π_old at no cost"),
        (train.entropy_top_ratio is not None, "train.entropy_top_ratio reads π_old's entropy from the scoring pass"),
        (rollout.importance_cap is not None, "the importance weight π_old / π_rollout would be 1 by construction"),
    ]
    for refused, why in problems:
        if refused:
            raise UserError(f"is sampler; {why}", key=key)


def _check_shaping(recipe: RLRecipe, needs: frozenset[str], world_size: int) -> None:
    """rl_shaping.py's options: each only where it means something."""
    from posttrain.losses.aggregation import LENGTH_NORM

    rollout, name = recipe.rollout, recipe.objective.name
    exact = OBJECTIVES[name].exact_aggregation
    if exact is not None and recipe.train.loss_aggregation != exact:
        raise UserError(f" is {recipe.train.loss_aggregation}; {name} is its paper's loss only with {exact} (see "
                        f"posttrain/losses/{name}.py): set train.loss_aggregation: {exact}", key="train.loss_aggregation")
    if recipe.train.loss_aggregation == LENGTH_NORM and VALUE in needs:
        raise UserError(f": the value model of {name} aggregates its loss with the same mode and has no constant "
                        "length; use seq-mean-token-sum or token-mean", key="train.loss_aggregation")
    if rollout.overlong_buffer is None and rollout.overlong_penalty != type(rollout).overlong_penalty:  # not the default
        raise UserError(f"({rollout.overlong_penalty:g}) scales the overlong shaping, which is off; set "
                        "rollout.overlong_buffer too, or remove it", key="rollout.overlong_penalty")
    if rollout.overlong_buffer is not None:
        if VERIFIABLE_REWARD not in needs:
            raise UserError(f": shapes a verifiable reward, and {name} has none; remove it", key="rollout.overlong_buffer")
        if rollout.overlong_buffer >= rollout.max_new_tokens:
            raise UserError(f"({rollout.overlong_buffer}) must be below rollout.max_new_tokens ({rollout.max_new_tokens}): "
                            "the penalty starts at max_new_tokens − overlong_buffer", key="rollout.overlong_buffer")
    if rollout.importance_cap is not None:
        if rollout.top_p < 1.0 or rollout.top_k:
            raise UserError(": the backend's log-probs are of the top-p/top-k truncated distribution, which π_old is "
                            "not; sample with top_p 1 and top_k 0", key="rollout.importance_cap")
        if rollout.temperature != 1.0 and not recipe.scoring.at_rollout_temperature:
            raise UserError(f": the backend's log-probs are at temperature {rollout.temperature:g} and π_old at 1; set "
                            "scoring.at_rollout_temperature: true", key="rollout.importance_cap")
    if PROMPT_HISTORY in needs and world_size > 1:
        raise UserError(f": {name}'s smooth standardisation keeps each prompt's reward history in one process; run it "
                        "on one process, or set objective.smooth_std: false", key="objective.smooth_std")


def check_golds(recipe: RLRecipe, golds: list[str]) -> None:
    """Before any model loads, every distinct gold answer parsed once (math reward only): a gold
    the grader cannot parse would give its prompt reward 0 in every rollout, silently (refused);
    one that parses only as text matches only the same text (warned: GSM8K's "... #### 2")."""
    if not golds:  # no verifiable reward, or code problems
        return
    from posttrain.eval.math_grader import gold_kinds

    kinds = gold_kinds(golds, recipe.scoring.grader_workers)
    for kind in ("none", "text"):
        found = [gold for gold in golds if kinds[gold] == kind]
        if not found:
            continue
        example = f"{len(set(found))} gold answer(s) {'the math grader cannot parse' if kind == 'none' else 'that parse only as text'}, " \
                  f"e.g. {found[0]!r} (row {golds.index(found[0])})"
        if kind == "none":
            raise UserError(f": {example}; every rollout of such a prompt would get reward 0. Give the final answer only",
                            key="prompts.answer_field")
        console.print(f"warning: key 'prompts.answer_field': {example}; a rollout matches them only by the same text. "
                      "If they are answers with extra words (GSM8K's '#### 2'), give the final answer only",
                      highlight=False)


def check_k(recipe: RLRecipe, vocab: int) -> None:
    """Top-K supports need K ≤ the vocabulary (torch.topk would fail mid-run otherwise)."""
    declared = OBJECTIVES[recipe.objective.name].support(recipe.objective.params)
    key, k = ("objective.k", declared.k) if declared is not None else ("scoring.diagnostics_k", recipe.scoring.diagnostics_k)
    if k > vocab:
        raise UserError(f"({k}) must be at most the vocabulary size ({vocab})", key=key)


def single_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """train.mask_first_tokens as token ids (each must be one token of this tokenizer)."""
    ids = []
    for token in tokens:
        encoded = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if encoded is None:
            pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise UserError(f": {token!r} is {len(pieces)} tokens for this tokenizer; list single tokens",
                                key="train.mask_first_tokens")
            encoded = pieces[0]
        ids.append(encoded)
    return ids
