"""Fixtures shared by several test modules, built once per session."""

import json

import pytest

from posttrain.config import TrainRecipe, from_dict
from tests.helpers import TINY, tiny_train_recipe

TEACHER = {**TINY, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A tiny teacher trained on the synthetic task, and a smaller student pretrained on its easy
    split: in-distribution but worse, as in the papers (in-process: these are only fixtures). Built
    once per session (about 40 s on one core) and only read by the tests that use it."""
    from posttrain.train import train

    tmp = tmp_path_factory.mktemp("models")
    teacher = tiny_train_recipe(tmp, name="teacher", data={"synthetic": {"split": "in_domain", "num_examples": 4096}},
                                optim={"lr": 1e-2}, train={"epochs": 2, "batch_size": 32, "micro_batch_size": 32})
    teacher["model"]["tiny"] = dict(TEACHER)
    student = tiny_train_recipe(tmp, name="student", data={"synthetic": {"split": "pretrain", "num_examples": 4096}},
                                optim={"lr": 1e-2}, train={"epochs": 1, "batch_size": 32, "micro_batch_size": 32})
    for recipe in (teacher, student):
        train(from_dict(TrainRecipe, recipe, "fixture"))
    return tmp / "runs" / "teacher" / "final", tmp / "runs" / "student" / "final"


@pytest.fixture(scope="session")
def boxer(tmp_path_factory):
    """A tiny student that answers "Compute a - (a-1)." with \\boxed{1} or \\boxed{2}, about half
    each, so the rewards of a group differ by construction, not by a seed's luck: SFT for a few
    seconds, in-process (only a fixture)."""
    from posttrain.train import train

    tmp = tmp_path_factory.mktemp("boxer")
    rows = tmp / "sft.jsonl"
    rows.write_text("".join(json.dumps({"problem": f"Compute {a} - {a - 1}.", "solution": f"\\boxed{{{1 + k}}}"}) + "\n"
                            for a in range(1, 9) for k in (0, 1)))
    recipe = tiny_train_recipe(tmp, name="student", data={"source": str(rows), "prompt_field": "problem",
                                                           "response_field": "solution", "max_length": 64},
                               optim={"lr": 1e-2}, train={"epochs": 100, "batch_size": 16, "micro_batch_size": 16})
    train(from_dict(TrainRecipe, recipe, "fixture"))
    return tmp / "runs" / "student" / "final"
