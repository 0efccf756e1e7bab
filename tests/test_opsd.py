"""OPSD (On-Policy Self-Distillation, arXiv 2601.18734) as a teacher source: teacher.source: self.
The teacher is the student reading each rollout after its privileged prompt (the row's reference
solution in the OPSD authors' wording); every teacher objective runs on it unchanged."""

from types import SimpleNamespace

import pytest
import torch

from posttrain.config import RLRecipe, TinyModelConfig, from_dict
from posttrain.data.examples import Example
from posttrain.data.privileged import PrivilegedPrompts, privileged_prompts
from posttrain.data.sft import collate, render_prompt
from posttrain.errors import UserError
from posttrain.losses import opd
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.rl import load_prompts, rl
from posttrain.signals import SelfScorer, Sources, fetch_signals
from tests.helpers import TINY, metrics_of, run_cli, write_recipe
from tests.reference import self_teacher_logprobs
from tests.test_integrity import one_error_line

VOCAB = 40
# the student's prompt as in the OPSD authors' code: the problem, then the boxed-answer instruction
STUDENT_TEMPLATE = "Problem: {question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def opsd_recipe(tmp_path, name="o", teacher=None, **sections):
    recipe = {
        "name": name, "out_dir": str(tmp_path / "runs"), "seed": 0,
        "student": {"tiny": dict(TINY)}, "teacher": teacher or {"source": "self"},
        "prompts": {"source": "synthetic", "prompt_field": "problem", "template": STUDENT_TEMPLATE,
                    "synthetic": {"split": "in_domain", "num_examples": 64}},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 12},
        "objective": {"name": "opd"}, "optim": {"lr": 1e-2, "schedule": "constant"},
        "train": {"steps": 3, "mini_batch_size": 8, "micro_batch_size": 4},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def tiny_model(seed: int, dtype=torch.float64):
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return build_tiny_model(cfg, VOCAB, seed=seed).to(dtype).eval()


# three rollouts: privileged prompts longer, much longer and SHORTER than the plain ones
PLAIN = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
PRIVILEGED = [[5, 6, 7, 20, 21, 22, 23], [30, 8, 9, 31, 32, 33, 34, 35], [10, 11]]
RESPONSES = [[14, 15, 16, 17], [18, 19, 24, 25, 26, 27], [28, 29]]


def rollout_batch():
    batch = collate([Example(p + r, len(p)) for p, r in zip(PLAIN, RESPONSES)], pad_id=0)
    batch["loss_mask"][0, len(PLAIN[0])] = False  # a hole, as the special-token mask leaves: response token 2 of row 0
    return batch


@pytest.mark.parametrize("weights", ["current", "frozen"])
def test_self_teacher_is_a_direct_forward_on_the_privileged_prompt(weights):
    """Known answer, float64: at every response token the self-teacher's log-prob of the sampled
    token, its top-K and the exact reverse KL equal one plain forward of the teacher model on
    privileged prompt + response (tests/reference.py); π_old is the plain prompt's. Chunked by 3.
    (A float64 model; the scorer's log-softmax is fp32 by design, hence 1e-5: one position off is O(1).)"""
    student = tiny_model(seed=0)
    teacher = student if weights == "current" else tiny_model(seed=1)  # frozen: a different model, to tell them apart
    privileged = PrivilegedPrompts({tuple(p): q for p, q in zip(PLAIN, PRIVILEGED)}, pad_id=0)
    scorer = SelfScorer(4, dict(chunk_tokens=3, matmul_dtype=None, temperature=1.0), None, privileged,
                        frozen=None if weights == "current" else teacher)
    batch = rollout_batch()
    signals = scorer.score(student, batch, torch.arange(3), PLAIN)
    for b, (plain, response) in enumerate(zip(PLAIN, RESPONSES)):
        expected_teacher = self_teacher_logprobs(teacher, PRIVILEGED[b], response)
        expected_student = self_teacher_logprobs(student, plain, response)
        for j, token in enumerate(response):
            t = len(plain) - 1 + j  # the rollout batch's position predicting response token j
            if not batch["loss_mask"][b, t]:
                assert signals.teacher_token_logprob_BT[b, t] == 0  # the hole stays a hole
                continue
            logq, logp = expected_teacher[j], expected_student[j]
            assert signals.teacher_token_logprob_BT[b, t].item() == pytest.approx(logq[token].item(), abs=1e-5)
            assert signals.old_logprob_BT[b, t].item() == pytest.approx(logp[token].item(), abs=1e-5)
            torch.testing.assert_close(signals.teacher_topk_logprob_BTK[b, t].double(), logq.topk(4).values, atol=1e-5, rtol=0)
            kl = (logp.exp() * (logp - logq)).sum()
            assert signals.exact_reverse_kl_BT[b, t].item() == pytest.approx(kl.item(), abs=1e-5)
    # the privileged context changes the teacher: it is not π_old
    mask = batch["loss_mask"]
    assert (signals.teacher_token_logprob_BT[mask] - signals.old_logprob_BT[mask]).abs().max() > 1e-3


def test_current_self_teacher_with_no_context_is_pi_old_exactly():
    """`current` weights and a privileged prompt equal to the plain one (an empty context): the
    teacher is π_old itself, so through fetch_signals every OPD reward log q − log π_old is exactly 0."""
    student = tiny_model(seed=0, dtype=torch.float32)
    same = PrivilegedPrompts({tuple(p): list(p) for p in PLAIN}, pad_id=0)
    scorer = SelfScorer(4, dict(chunk_tokens=3, matmul_dtype=None, temperature=1.0), None, same)
    sources = Sources(needs=opd.needs(None), scorer=scorer, support=SimpleNamespace(kind="teacher", k=4))
    batch = rollout_batch()
    signals, _ = fetch_signals(sources, SimpleNamespace(model=student), batch, torch.arange(3), ["", "", ""],
                               [None] * 3, prompt_ids=PLAIN)
    assert torch.equal(signals.teacher_token_logprob_BT, signals.old_logprob_BT)
    reward = opd.prepare(opd.Params(), batch, signals)["reward"]
    assert batch["loss_mask"].sum() > 0 and torch.equal(reward, torch.zeros_like(reward))


def test_privileged_prompt_is_the_opsd_authors_wording(tmp_path):
    """The teacher's user turn for a synthetic row: the authors' data_collator.py text verbatim
    (problem, reference solution, transition prompt, boxed instruction), through the chat template."""
    recipe = from_dict(RLRecipe, opsd_recipe(tmp_path), "recipe.yaml")
    rows = load_prompts(recipe, 1)
    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    prompts = [render_prompt(tokenizer, STUDENT_TEMPLATE.format(question=f), None) for f in rows.fields]
    privileged = privileged_prompts(recipe, rows, tokenizer, prompts)
    from posttrain.data.synthetic import make_rows

    row = make_rows("in_domain", 64, 1234)[0]
    expected = (f"{row['problem']}\n\nHere is a reference solution to this problem:\n{row['solution']}\n"
                "\n\nAfter understanding the reference solution and the rationale behind each step, now articulate your "
                "own step-by-step reasoning that derives the same final answer to the problem below:\n"
                "\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert privileged.by_prompt[tuple(prompts[0])] == render_prompt(tokenizer, expected, None)
    custom = from_dict(RLRecipe, opsd_recipe(tmp_path, teacher={"source": "self", "context_field": "answer",
                                                                   "context_template": "{question} [{context}]"}), "r")
    rows = load_prompts(custom, 1)
    ids = privileged_prompts(custom, rows, tokenizer, prompts).by_prompt[tuple(prompts[0])]
    assert ids == render_prompt(tokenizer, f"{row['problem']} [{row['answer']}]", None)


def test_opsd_runs_through_the_cli_and_frozen_equals_current_at_step_one(tmp_path):
    """`posttrain rl` with teacher.source: self (current weights) on the synthetic task, and the
    same run with a frozen teacher (in-process): both start from the same student, so step 1's
    rewards agree; from step 2 the current teacher has moved and the frozen one has not."""
    current = write_recipe(tmp_path, opsd_recipe(tmp_path, name="current"))
    proc = run_cli("rl", "--recipe", str(current))
    assert "rl current (opd)" in proc.stderr
    frozen = rl(from_dict(RLRecipe, opsd_recipe(tmp_path, name="frozen", teacher={"source": "self", "weights": "frozen"}),
                          "test"))
    now, fixed = metrics_of(tmp_path / "runs" / "current"), metrics_of(frozen)
    assert len(now) == len(fixed) == 3
    assert now[0]["reverse_kl"] > 0  # the privileged context moves the teacher away from π_old
    assert now[0]["reward_mean"] == pytest.approx(fixed[0]["reward_mean"], rel=1e-6, abs=1e-9)
    assert now[2]["reward_mean"] != pytest.approx(fixed[2]["reward_mean"], rel=1e-3)
    assert (tmp_path / "runs" / "current" / "final" / "model.safetensors").exists()


def teacher_objectives() -> list[str]:
    """Every registered on-policy objective that declares a teacher signal (new ones included)."""
    from posttrain.losses import OBJECTIVES
    from posttrain.losses.objective import TEACHER_SOURCES

    return sorted(name for name, o in OBJECTIVES.items() if o.on_policy and o.needs(o.Params()) & TEACHER_SOURCES)


@pytest.mark.parametrize("name", teacher_objectives())
def test_every_teacher_objective_runs_on_the_self_teacher_unchanged(tmp_path, name):
    run_dir = rl(from_dict(RLRecipe, opsd_recipe(tmp_path, name=name, objective={"name": name}, train={"steps": 1}), "t"))
    row = metrics_of(run_dir)[0]
    assert torch.isfinite(torch.tensor(row["loss"])) and row["reverse_kl"] > 0, row


@pytest.mark.parametrize("teacher,sections,key,words", [
    ({"source": "self", "path": "some/model"}, {}, "teacher.path", "is the student itself"),
    ({"source": "self", "tiny": dict(TINY)}, {}, "teacher.tiny", "is the student itself"),
    ({"tiny": dict(TINY), "weights": "frozen"}, {}, "teacher.weights", "only for teacher.source: self"),
    ({"tiny": dict(TINY), "context_field": "solution"}, {}, "teacher.context_field", "only for teacher.source: self"),
    ({"source": "self", "context_field": "nosuch"}, {}, "teacher.context_field", "have no field 'nosuch'"),
    ({"source": "self", "context_template": "{question} alone"}, {}, "teacher.context_template", "missing {context}"),
    ({"source": "self"}, {"scoring": {"backend": "vllm"}}, "scoring.backend", "scored locally"),
    ({"source": "self"}, {"objective": {"name": "grpo"}}, "teacher", "uses no teacher signal"),
], ids=["path", "tiny", "weights-without-self", "field-without-self", "missing-field", "template", "vllm", "no-teacher-objective"])
def test_refusals(tmp_path, teacher, sections, key, words):
    recipe = opsd_recipe(tmp_path, teacher=teacher, **sections)
    with pytest.raises(UserError) as err:
        load_prompts(from_dict(RLRecipe, recipe, "recipe.yaml"), 1)
    assert f"key '{key}'" in str(err.value) and words in str(err.value), str(err.value)


def test_empty_context_rows_are_refused(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"problem": "1 + 1?", "solution": "2"}\n{"problem": "2 + 2?", "solution": " "}\n')
    recipe = opsd_recipe(tmp_path, prompts={"source": str(data)})
    with pytest.raises(UserError, match="row 1's 'solution' is ' '"):
        load_prompts(from_dict(RLRecipe, recipe, "recipe.yaml"), 1)


def test_refusal_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    recipe = write_recipe(tmp_path, opsd_recipe(tmp_path, teacher={"source": "self", "path": "some/model"}))
    line = one_error_line(run_cli("rl", "--recipe", str(recipe), check=False))
    assert "recipe.yaml: key 'teacher.path'" in line
    assert not (tmp_path / "runs").exists()
