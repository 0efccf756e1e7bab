"""Pinned losses: the first logged metrics of every objective on tiny models through the real CLI,
checked against values recorded when they were known right (as torchtune pins its recipes).

A refactor of the loops, the engine or an objective that changes any number here changes what
posttrain computes; if the change is intended, say why in the commit and re-record the values
(POSTTRAIN_PRINT_PINNED=1 prints the new ones). CPU, one thread, fp32: bit-stable runs.
"""

import json
import os

import pytest

from tests.helpers import TINY, run_cli, tiny_train_recipe, write_recipe

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
    'grpo-kl': [
        {'loss': 0.0006834268569946289, 'grad_norm': 0.0944879215207095, 'entropy': 5.690817832946777, 'response_length': 16.0, 'trained_token_frac': 1.0, 'train_clip_frac': 0.0, 'verifiable_reward_mean': 0.0, 'zero_advantage_group_frac': 1.0, 'train_kl_reference': 0.0013668537139892578},
        {'loss': 0.02763983397744596, 'grad_norm': 0.20824675261974335, 'entropy': 5.519532250576332, 'response_length': 15.25, 'trained_token_frac': 1.0, 'train_clip_frac': 0.0, 'verifiable_reward_mean': 0.0, 'zero_advantage_group_frac': 1.0, 'train_kl_reference': 0.05596612515996714},
    ],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny student and a wider teacher, each a few SFT steps from random init (CLI)."""
    tmp = tmp_path_factory.mktemp("pinned")
    for name, tiny, steps in (("student", TINY, 6), ("teacher", {**TINY, "hidden_size": 48}, 8)):
        recipe = tiny_train_recipe(tmp, name=name, model={"tiny": dict(tiny)}, optim={"lr": 1e-2},
                                   train={"max_steps": steps})
        run_cli("train", "--recipe", str(write_recipe(tmp, recipe, f"{name}.yaml")))
    return tmp / "runs" / "student" / "final", tmp / "runs" / "teacher" / "final"


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in KEYS if k in row} for row in rows]


def _offline(tmp_path, models, objective):
    recipe = tiny_train_recipe(tmp_path, name=objective["name"], objective=objective, train={"max_steps": 3})
    recipe["model"] = {"path": str(models[0])}
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    return _metrics(tmp_path / "runs" / objective["name"])


def _online(tmp_path, models, objective, command="distill", teacher=True, **sections):
    recipe = {
        "name": objective["name"], "out_dir": str(tmp_path / "runs"), "student": {"path": str(models[0])},
        "prompts": {"source": "synthetic", "prompt_field": "prompt",
                    "synthetic": {"split": "in_domain", "num_examples": 64}},
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


CASES = {
    "sft": lambda tmp, m: _offline(tmp, m, {"name": "sft"}),
    "dft": lambda tmp, m: _offline(tmp, m, {"name": "dft"}),
    "otr": lambda tmp, m: _offline(tmp, m, {"name": "otr"}),
    "opd": lambda tmp, m: _online(tmp, m, {"name": "opd"}),
    "lsm": lambda tmp, m: _online(tmp, m, {"name": "lsm", "k": 8}),
    "lsm-entropy": lambda tmp, m: _online(tmp, m, {"name": "lsm", "k": 8}, train={"entropy_top_ratio": 0.5}),
    # the tiny student solves nothing (reward 0, advantage 0): the KL term to the start policy is
    # what moves, from 0 on the first update to > 0 on the second of each step
    "grpo-kl": lambda tmp, m: _online(tmp, m, {"name": "grpo", "kl_coef": 0.5}, command="rl", teacher=False,
                                      prompts={"answer_field": "answer"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pinned_losses(tmp_path, models, case):
    got = CASES[case](tmp_path, models)
    if os.environ.get("POSTTRAIN_PRINT_PINNED"):
        print(f"\nPINNED {case!r}: {got!r}")
    assert case in PINNED, f"no pinned values for {case}: {got}"
    want = PINNED[case]
    assert len(got) == len(want)
    for got_row, want_row in zip(got, want):
        assert got_row.keys() == want_row.keys()
        for key, value in want_row.items():
            assert got_row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (case, key, got_row, want_row)
