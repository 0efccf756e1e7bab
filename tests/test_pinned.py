"""Pinned losses: the first logged metrics of every objective on tiny models through the real CLI,
checked against values recorded when they were known right (as torchtune pins its recipes).

A refactor of the loops, the engine or an objective that changes any number here changes what
posttrain computes; if the change is intended, say why in the commit and re-record the values
(POSTTRAIN_PRINT_PINNED=1 prints the new ones). CPU, one thread, fp32: bit-stable on one machine,
within the tolerances below across machines.
"""

import json
import os
from itertools import product

import pytest

from tests.helpers import TINY, run_cli, tiny_train_recipe, write_recipe, metrics_of

KEYS = ("loss", "grad_norm", "entropy", "reward_mean", "reverse_kl", "response_length", "trained_token_frac",
        "topk_overlap", "train_clip_frac", "train_reward", "train_teacher_mass", "verifiable_reward_mean",
        "zero_advantage_group_frac", "train_kl_reference")

# objective -> per logged step, {metric: value}
PINNED = {
    'sft': [
        {'loss': 4.219295024871826, 'grad_norm': 1.1470913887023926, 'entropy': 5.487025486981428},
        {'loss': 4.108447074890137, 'grad_norm': 1.156420111656189, 'entropy': 5.415197444141359},
        {'loss': 3.98982572555542, 'grad_norm': 1.099165439605713, 'entropy': 5.346743981603166},
    ],
    'dft': [
        {'loss': 0.06297849118709564, 'grad_norm': 0.02079811505973339, 'entropy': 5.487025486981428},
        {'loss': 0.06834420561790466, 'grad_norm': 0.02347775176167488, 'entropy': 5.415217741987759},
        {'loss': 0.07480325549840927, 'grad_norm': 0.025324445217847824, 'entropy': 5.346163729546776},
    ],
    'otr': [
        {'loss': -0.5121912360191345, 'grad_norm': 0.027194082736968994, 'entropy': 5.487025486981428},
        {'loss': -0.5057421326637268, 'grad_norm': 0.030020827427506447, 'entropy': 5.407516366557071},
        {'loss': -0.49709609150886536, 'grad_norm': 0.0331120640039444, 'entropy': 5.3356684312014515},
    ],
    'opd': [
        {'loss': 0.6488588005304337, 'grad_norm': 3.1126515865325928, 'entropy': 5.690817832946777, 'reward_mean': -0.7215430736541748, 'reverse_kl': 0.7151333093643188, 'response_length': 16.0, 'trained_token_frac': 1.0, 'topk_overlap': 0.34521484375, 'train_clip_frac': 0.2734375, 'train_reward': -0.7215430960059166},
        {'loss': 0.3309164368547499, 'grad_norm': 0.8798828423023224, 'entropy': 5.47844708552126, 'reward_mean': -0.3368922061607486, 'reverse_kl': 0.4265951563100346, 'response_length': 15.25, 'trained_token_frac': 1.0, 'topk_overlap': 0.6908299326896667, 'train_clip_frac': 0.0, 'train_reward': -0.33689221202350056},
    ],
    'lsm': [
        {'loss': 0.012919983244501054, 'grad_norm': 0.12910111621022224, 'entropy': 5.690817832946777, 'reward_mean': -0.7215430736541748, 'reverse_kl': 0.7151333093643188, 'response_length': 16.0, 'trained_token_frac': 1.0, 'topk_overlap': 0.1767578125, 'train_teacher_mass': 0.298294242908014},
        {'loss': 0.005737113591749221, 'grad_norm': 0.07205200754106045, 'entropy': 5.608398937788166, 'reward_mean': -0.41357947177574284, 'reverse_kl': 0.5099241225445856, 'response_length': 15.25, 'trained_token_frac': 1.0, 'topk_overlap': 0.36987704038619995, 'train_teacher_mass': 0.2523088290615649},
    ],
    'lsm-entropy': [
        {'loss': 0.009520920692011714, 'grad_norm': 0.14976976066827774, 'entropy': 5.690817832946777, 'reward_mean': -0.7215430736541748, 'reverse_kl': 0.7151333093643188, 'response_length': 16.0, 'trained_token_frac': 0.5, 'topk_overlap': 0.1767578125, 'train_teacher_mass': 0.32059322530403733},
        {'loss': 0.0021456644171848893, 'grad_norm': 0.11940068379044533, 'entropy': 5.558934446241035, 'reward_mean': -0.3424034118652344, 'reverse_kl': 0.45106568883677, 'response_length': 15.25, 'trained_token_frac': 0.5, 'topk_overlap': 0.3637295067310333, 'train_teacher_mass': 0.32081284923631637},
    ],
    'grpo': [
        {'loss': 0.09263486787676811, 'grad_norm': 1.7485938221216202, 'entropy': 1.2505871188256048, 'response_length': 9.6875, 'trained_token_frac': 1.0, 'train_clip_frac': 0.07096774193548387, 'verifiable_reward_mean': 0.1875, 'zero_advantage_group_frac': 0.25},
        {'loss': -0.011150795966386795, 'grad_norm': 0.8378989100456238, 'entropy': 0.759573397429093, 'response_length': 8.625, 'trained_token_frac': 1.0, 'train_clip_frac': 0.06521739130434782, 'verifiable_reward_mean': 0.1875, 'zero_advantage_group_frac': 0.25},
    ],
    'grpo-kl': [
        {'loss': 0.12162674590945244, 'grad_norm': 2.2134200632572174, 'entropy': 1.2505871188256048, 'response_length': 9.6875, 'trained_token_frac': 1.0, 'train_clip_frac': 0.07096774193548387, 'verifiable_reward_mean': 0.1875, 'zero_advantage_group_frac': 0.25, 'train_kl_reference': 0.0568615363490197},
        {'loss': 0.017503466457128525, 'grad_norm': 0.9749455451965332, 'entropy': 0.7497193041465265, 'response_length': 8.6875, 'trained_token_frac': 1.0, 'train_clip_frac': 0.08633093525179857, 'verifiable_reward_mean': 0.1875, 'zero_advantage_group_frac': 0.25, 'train_kl_reference': 0.05666645053479311},
    ],
}


# The tolerance, from measurement. Every pinned number is a mean of per-token terms of size O(1)
# (log-probs, ρ·A with |A| ≤ 2, entropies) in fp32, one thread: unit roundoff u = 2^-24 ≈ 6e-8.
# Within one machine the runs are bit-stable, and another summation order (the LM head in chunks
# of 5 and 7 tokens) moved no number by more than 4.5e-8 absolutely or 6.4e-7 relatively. Across
# machines the CPU's kernels differ (AVX-512 vs AVX2 paths of MKL and ATen), and the fixtures'
# own training (a few SFT steps at lr 1e-2; the boxer: 60 steps) amplifies that rounding before
# the pinned run starts. Measured on 2026-12-05, the values pinned on the earlier machine against
# a Xeon with AVX-512: sft/dft ≤ 2.4e-7 relative, opd/lsm ≤ 2.2e-6, otr 4.0e-5 relative (1.3e-6
# absolute, grad_norm), grpo/grpo-kl 3.7e-4 relative (6.5e-6 absolute, the loss of the second
# update, a mean of −A·ρ whose Σ A ≈ 0 cancels). The tolerances are 10× those moves: rel 4e-4 /
# abs 1.3e-5, and rel 4e-3 / abs 6.5e-5 for the GRPO cases (built on the 60-step boxer). A real
# change still shows: one token more or less in a mean over ~150 moves it by ~7e-3, a sign, a clip
# bound or an aggregation by 1e-2 or more. Discrete parts (sampled tokens, rewards) stay put
# unless a perturbation crosses a sampling boundary: ~200 draws × 1e-5, about 1 in 500.
REL, ABS = 4e-4, 1.3e-5
CHAOTIC_FIXTURE = {"grpo": (4e-3, 6.5e-5), "grpo-kl": (4e-3, 6.5e-5)}  # case -> (rel, abs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny student and a wider teacher, each a few SFT steps from random init (CLI); and the
    student fine-tuned further to answer small sums in a box (the GRPO cases), with its prompts."""
    tmp = tmp_path_factory.mktemp("pinned")
    for name, tiny, steps in (("student", TINY, 6), ("teacher", {**TINY, "hidden_size": 48}, 8)):
        recipe = tiny_train_recipe(tmp, name=name, model={"tiny": dict(tiny)}, optim={"lr": 1e-2},
                                   train={"max_steps": steps})
        run_cli("train", "--recipe", str(write_recipe(tmp, recipe, f"{name}.yaml")))
    # "Compute a + b." for a, b in 0..1, answered "The answer is \boxed{a+b}.": 60 steps teach the
    # tiny student the form, not the sums, so its boxed numbers match the gold answer sometimes
    # (groups with mixed rewards: non-zero GRPO advantages from the first update on)
    sums = tmp / "sums.jsonl"
    sums.write_text("".join(json.dumps({"problem": f"Compute {a} + {b}.", "solution": f"The answer is \\boxed{{{a + b}}}.",
                                        "answer": str(a + b)}) + "\n" for _ in range(16) for a, b in product(range(2), repeat=2)))
    recipe = tiny_train_recipe(tmp, name="boxer", data={"source": str(sums), "prompt_field": "problem"},
                               optim={"lr": 1e-2}, train={"epochs": 50, "max_steps": 60})
    del recipe["data"]["synthetic"]
    recipe["model"] = {"path": str(tmp / "runs" / "student" / "final")}
    run_cli("train", "--recipe", str(write_recipe(tmp, recipe, "boxer.yaml")))
    return tmp / "runs" / "student" / "final", tmp / "runs" / "teacher" / "final", tmp / "runs" / "boxer" / "final", sums


def _metrics(run_dir):
    rows = metrics_of(run_dir)
    return [{k: row[k] for k in KEYS if k in row} for row in rows]


def _offline(tmp_path, models, objective):
    recipe = tiny_train_recipe(tmp_path, name=objective["name"], objective=objective, train={"max_steps": 3})
    recipe["model"] = {"path": str(models[0])}
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    return _metrics(tmp_path / "runs" / objective["name"])


SYNTHETIC_PROMPTS = {"source": "synthetic", "prompt_field": "prompt", "synthetic": {"split": "in_domain", "num_examples": 64}}


def _online(tmp_path, models, objective, command="distill", teacher=True, prompts=SYNTHETIC_PROMPTS, **sections):
    recipe = {
        "name": objective["name"], "out_dir": str(tmp_path / "runs"), "student": {"path": str(models[0])},
        "prompts": prompts,
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 16},
        "objective": objective, "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"steps": 2, "mini_batch_size": 4, "micro_batch_size": 2},
    }
    if teacher:
        recipe["teacher"] = {"path": str(models[1])}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    run_cli(command, "--recipe", str(write_recipe(tmp_path, recipe)))
    return _metrics(tmp_path / "runs" / objective["name"])


def _grpo(tmp_path, models, objective):
    return _online(tmp_path, (models[2],), objective, command="rl", teacher=False,
                   prompts={"source": str(models[3]), "prompt_field": "problem", "answer_field": "answer"},
                   rollout={"samples_per_prompt": 4, "max_new_tokens": 12}, scoring={"grader_workers": 1},
                   train={"mini_batch_size": 8, "micro_batch_size": 4})


CASES = {
    "sft": lambda tmp, m: _offline(tmp, m, {"name": "sft"}),
    "dft": lambda tmp, m: _offline(tmp, m, {"name": "dft"}),
    "otr": lambda tmp, m: _offline(tmp, m, {"name": "otr"}),
    "opd": lambda tmp, m: _online(tmp, m, {"name": "opd"}),
    "lsm": lambda tmp, m: _online(tmp, m, {"name": "lsm", "k": 8}),
    "lsm-entropy": lambda tmp, m: _online(tmp, m, {"name": "lsm", "k": 8}, train={"entropy_top_ratio": 0.5}),
    # the boxing student on its sums: 4 prompts × 4 rollouts, rewards mixed within some groups
    "grpo": lambda tmp, m: _grpo(tmp, m, {"name": "grpo"}),
    # + the KL to the start policy: 0 (value and gradient) on the first update, then it moves
    "grpo-kl": lambda tmp, m: _grpo(tmp, m, {"name": "grpo", "kl_coef": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pinned_losses(tmp_path, models, case):
    got = CASES[case](tmp_path, models)
    if os.environ.get("POSTTRAIN_PRINT_PINNED"):
        print(f"\nPINNED {case!r}: {got!r}")
    assert case in PINNED, f"no pinned values for {case}: {got}"
    want = PINNED[case]
    rel, abs_ = CHAOTIC_FIXTURE.get(case, (REL, ABS))
    assert len(got) == len(want)
    for got_row, want_row in zip(got, want):
        assert got_row.keys() == want_row.keys()
        for key, value in want_row.items():
            assert got_row[key] == pytest.approx(value, rel=rel, abs=abs_), (case, key, got_row, want_row)


def test_grpo_cases_carry_signal():
    """A GRPO case pins an update only where some group has rollouts with different rewards
    (non-zero advantages); all-zero advantages leave a gradient of rounding noise (see REL, ABS)."""
    for case in ("grpo", "grpo-kl"):
        for row in PINNED[case]:
            assert row["zero_advantage_group_frac"] < 1 and 0 < row["verifiable_reward_mean"] < 1, (case, row)
