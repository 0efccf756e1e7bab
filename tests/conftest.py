"""Fixtures shared by several test modules, built once per session."""

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
