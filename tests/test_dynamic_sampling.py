"""DAPO's dynamic sampling (rollout.dynamic_sampling): groups whose rewards are all equal are
dropped and more prompts drawn, at most rollout.max_draws batches a step, the rest filled with
dropped groups; logged in the metrics row."""

import pytest

from posttrain.config import RLRecipe, from_dict
from posttrain.errors import UserError
from posttrain.generation import Completion, SamplingSpec
from posttrain.rl_checks import validate
from posttrain.rollouts import sample_groups
from tests.helpers import TINY, metrics_of, run_cli, write_recipe
from tests.test_grpo import _grpo_recipe


class Backend:
    """Each prompt's samples: its first token says whether they are all right (1), all wrong (0)
    or mixed (2)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, spec):
        self.calls.append([p[0] for p in prompts])
        texts = {0: ["no", "no"], 1: ["yes", "yes"], 2: ["yes", "no"]}
        return [[Completion([1], text=t) for t in texts[p[0]]] for p in prompts]


class Grader:
    def verifiable_rewards(self, references, texts):
        return [float(t == "yes") for t in texts]


def test_flat_groups_are_dropped_and_more_prompts_drawn():
    pool = ([[2], [2], [0], [1], None, [2]], ["a", "b", "c", "d", "e", "f"])
    backend = Backend()
    groups = sample_groups(backend, Grader(), SamplingSpec(n=2, seed=5), 0, [[0], [2]], ["x", "y"], pool, max_draws=3)
    assert len(groups.prompt_ids) == 2 and all(len(set(r)) == 2 for r in groups.rewards)
    assert groups.prompt_ids[0] == [2] and groups.references[0] == "y"  # the step's own mixed group first
    assert groups.stats["dynamic_filled_groups"] == 0 and groups.stats["dynamic_draws"] >= 2
    assert all(None not in call for call in backend.calls)  # a prompt too long is never drawn


def test_at_the_cap_the_batch_is_filled_with_dropped_groups():
    pool = ([[0], [1]], ["a", "b"])  # nothing to draw that carries a signal
    groups = sample_groups(Backend(), Grader(), SamplingSpec(n=2, seed=5), 3, [[0], [1]], ["x", "y"], pool, max_draws=2)
    assert groups.stats == {"dynamic_draws": 2.0, "dynamic_dropped_groups": 4.0, "dynamic_filled_groups": 2.0}
    assert groups.references == ["x", "y"]  # the step's own groups, in order


def test_without_it_one_draw_and_no_grading():
    groups = sample_groups(Backend(), None, SamplingSpec(n=2), 0, [[0], [2]], ["x", "y"])
    assert groups.rewards is None and groups.stats == {}


def test_only_a_graded_objective_can_sample_dynamically():
    recipe = from_dict(RLRecipe, {"name": "o", "student": {"tiny": dict(TINY)}, "teacher": {"tiny": dict(TINY)},
                                  "objective": {"name": "opd"}, "rollout": {"dynamic_sampling": True}}, "r.yaml")
    with pytest.raises(UserError, match="key 'rollout.dynamic_sampling': drops groups whose rewards are all equal"):
        validate(recipe)


def test_a_grpo_run_keeps_only_groups_with_a_signal(tmp_path, models):  # noqa: F811
    recipe = _grpo_recipe(tmp_path, models[0])
    recipe["rollout"].update({"dynamic_sampling": True, "max_draws": 3})
    run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)))
    for row in metrics_of(tmp_path / "runs" / "g"):
        assert 1 <= row["dynamic_draws"] <= 3, row
        # only the groups filled in at the cap can be flat
        assert row["zero_advantage_group_frac"] == row["dynamic_filled_groups"] / recipe["rollout"]["prompts_per_step"], row
