"""How the rebuilt on-policy wing holds together: errors carry their key and are formatted once;
config.yaml records the command as data and old folders still read; train refuses an objective
whose per-batch inputs it cannot prepare; the seeds replay the numbers posttrain always used."""

import dataclasses

import pytest

from posttrain.config import TrainRecipe, from_dict
from posttrain.errors import UserError, in_recipe
from posttrain.losses import OBJECTIVES
from posttrain.runfolder import command_kind
from posttrain.seeds import epoch_seed, micro_batch_seed, ppo_order_seed, rollout_seed
from tests.helpers import TINY


def test_a_user_error_names_its_file_and_key_once():
    assert str(UserError("is required", key="teacher")) == "recipe: key 'teacher' is required"
    assert str(UserError(": no such field", key="prompts.prompt_field", file="r.yaml")) == \
        "r.yaml: key 'prompts.prompt_field': no such field"
    assert str(UserError("stopped at step 3", recipe=True)) == "recipe: stopped at step 3"
    assert str(UserError("recipe file not found: x.yaml")) == "recipe file not found: x.yaml"
    with pytest.raises(UserError) as err, in_recipe("mine.yaml"):
        raise UserError("(9) must be at most 8", key="objective.k")
    assert str(err.value) == "mine.yaml: key 'objective.k' (9) must be at most 8"
    with pytest.raises(UserError) as err, in_recipe("mine.yaml"):  # already names its file: left alone
        raise UserError("is unknown", key="x", file="other.yaml (override x=1)")
    assert str(err.value) == "other.yaml (override x=1): key 'x' is unknown"
    with pytest.raises(UserError) as err, in_recipe("mine.yaml"):  # not about the recipe: no file added
        raise UserError("--allow-changed-recipe only applies together with --resume")
    assert str(err.value) == "--allow-changed-recipe only applies together with --resume"


@pytest.mark.parametrize("text,kind", [
    ("# posttrain rl --recipe r.yaml\ncommand:\n  name: rl\n  args: [--recipe, r.yaml]\nname: a\n", "rl"),
    ("# posttrain distill --recipe r.yaml\nname: a\nteacher: {path: t}\n", "rl"),  # an old folder: the comment
    ("# posttrain rl --recipe r.yaml\nname: a\n", "rl"),
    ("# posttrain train --recipe r.yaml\nname: a\n", "train"),
    ("name: a\n", None),
])
def test_the_command_kind_is_read_from_a_run_folder(tmp_path, text, kind):
    (tmp_path / "config.yaml").write_text(text)
    assert command_kind(tmp_path) == kind


def test_train_refuses_an_objective_it_cannot_prepare(monkeypatch):
    from posttrain.train import validate

    offline_with_prepare = dataclasses.replace(OBJECTIVES["sft"], name="needs-signals", prepare=lambda *a: {})
    monkeypatch.setitem(OBJECTIVES, "needs-signals", offline_with_prepare)
    recipe = from_dict(TrainRecipe, {"name": "t", "model": {"tiny": dict(TINY)}, "objective": {"name": "needs-signals"}}, "r.yaml")
    with pytest.raises(UserError, match="key 'objective.name': 'needs-signals' prepares its inputs from on-policy signals"):
        validate(recipe)


def test_the_seeds_are_the_numbers_posttrain_always_used():
    for seed, step, rank, index in ((0, 0, 0, 0), (3, 17, 1, 5), (1234, 99, 7, 100)):
        assert epoch_seed(seed, step) == seed * 1_000_003 + step
        assert rollout_seed(seed, step, rank) == (seed * 1_000_003 + step) * 101 + rank
        assert micro_batch_seed(seed, step, rank, index) == (seed * 1_000_003 + step) * 10_007 + rank * 101 + index
        assert ppo_order_seed(seed, step, index) == seed * 7919 + step * 31 + index
