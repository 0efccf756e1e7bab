"""Recipe validation: every user mistake is one clear line naming the file, the key and what is allowed."""

import pytest
import yaml

from posttrain.config import RLRecipe, EvalRecipe, TrainRecipe, from_dict, load_recipe
from posttrain.errors import UserError
from tests.helpers import run_cli, tiny_train_recipe, write_recipe


def error_of(path, schema=TrainRecipe, overrides=None) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, schema, overrides)
    return str(info.value)


def test_valid_recipe_loads_with_types_and_defaults(tmp_path):
    path = write_recipe(tmp_path, tiny_train_recipe(tmp_path, optim={"lr": "5e-5", "betas": [0.9, 0.95]}))
    recipe = load_recipe(path, TrainRecipe)
    assert recipe.optim.lr == 5e-5 and recipe.optim.betas == (0.9, 0.95)  # "5e-5" (a YAML string) is coerced
    assert recipe.train.precision == "auto" and recipe.objective.name == "sft"


def test_overrides_are_typed_by_the_schema(tmp_path):
    recipe = tiny_train_recipe(tmp_path, objective={"name": "otr"})
    path = write_recipe(tmp_path, recipe)
    loaded = load_recipe(path, TrainRecipe, ["optim.lr=1e-4", "objective.k=128", "train.max_steps=3",
                                             "data.system_prompt=null", "name=other", "model.tiny.arch=llama"])
    assert loaded.optim.lr == 1e-4 and isinstance(loaded.optim.lr, float)
    assert loaded.objective.params.k == 128 and loaded.train.max_steps == 3
    assert loaded.data.system_prompt is None and loaded.name == "other" and loaded.model.tiny.arch == "llama"


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write_recipe(tmp_path, tiny_train_recipe(tmp_path, optim={"lrr": 1e-4}))
    message = error_of(path)
    assert str(path) in message and "'optim.lrr'" in message and "did you mean 'optim.lr'" in message


def test_unknown_objective_param_is_checked_against_that_objective(tmp_path):
    path = write_recipe(tmp_path, tiny_train_recipe(tmp_path, objective={"name": "otr", "kapa": 1.5}))
    assert "did you mean 'objective.kappa'" in error_of(path)


def test_wrong_type_names_the_expected_type(tmp_path):
    path = write_recipe(tmp_path, tiny_train_recipe(tmp_path, optim={"lr": "fast"}))
    message = error_of(path)
    assert "'optim.lr'" in message and "must be a number" in message and "'fast'" in message


def test_bad_choice_lists_the_allowed_values(tmp_path):
    path = write_recipe(tmp_path, tiny_train_recipe(tmp_path, train={"precision": "fp8"}))
    assert "must be one of: auto, fp32, bf16" in error_of(path)
    path = write_recipe(tmp_path, tiny_train_recipe(tmp_path, objective={"name": "rloo"}))
    error = error_of(path)
    assert "'objective.name' must be one of: sft, dft, otr, " in error and "got 'rloo'" in error
    assert all(f" {name}," in error or f" {name};" in error for name in ("opd", "lsm", "grpo", "dpo", "ppo"))


def test_missing_required_key(tmp_path):
    recipe = tiny_train_recipe(tmp_path)
    del recipe["model"]
    message = error_of(write_recipe(tmp_path, recipe))
    assert "key 'model' is required" in message


def test_file_not_found_and_malformed_yaml(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim:\n  lr: 1\n bad indent: [\n")
    message = error_of(bad)
    assert str(bad) in message and "malformed YAML at line" in message


def test_override_errors_name_the_override(tmp_path):
    path = write_recipe(tmp_path, tiny_train_recipe(tmp_path))
    message = error_of(path, overrides=["optim.lrr=1e-4"])
    assert "override optim.lrr=1e-4" in message and "did you mean 'optim.lr'" in message
    assert "must look like key=value" in error_of(path, overrides=["optim.lr"])


@pytest.mark.parametrize(
    "section,key,value,allowed",
    [
        ("optim", "lr", -1, "a number > 0"),
        ("optim", "warmup_ratio", 1.0, "a number in [0, 1)"),
        ("optim", "betas", [0.9, 1.5], "a number in [0, 1)"),
        ("train", "micro_batch_size", 0, "an integer ≥ 1"),
        ("train", "max_steps", 0, "an integer ≥ 1"),
        ("train", "save_every", -1, "an integer ≥ 0"),
        ("objective", "k", 0, "an integer ≥ 1"),
        ("objective", "kappa", 0, "a number > 0"),
    ],
)
def test_out_of_range_values_name_the_allowed_range(tmp_path, section, key, value, allowed):
    recipe = tiny_train_recipe(tmp_path, objective={"name": "otr"})
    recipe.setdefault(section, {})[key] = value
    message = error_of(write_recipe(tmp_path, recipe))
    assert f"key '{section}.{key}' must be {allowed}, got" in message, message


def test_range_bounds_are_inclusive_or_open_as_declared(tmp_path):
    recipe = tiny_train_recipe(tmp_path, optim={"warmup_ratio": 0.0, "weight_decay": 0.0}, train={"save_every": 0})
    loaded = load_recipe(write_recipe(tmp_path, recipe), TrainRecipe)
    assert loaded.optim.warmup_ratio == 0.0 and loaded.train.save_every == 0
    distill = {"name": "d", "student": {"path": "s"}, "teacher": {"path": "t"},
               "objective": {"name": "opd", "dual_clip": None, "discount": 1.0}, "rollout": {"top_p": 1.0}}
    loaded = load_recipe(write_recipe(tmp_path, distill), RLRecipe)
    assert loaded.objective.params.dual_clip is None and loaded.objective.params.discount == 1.0
    path = write_recipe(tmp_path, distill)
    assert "must be a number > 1, got 1.0" in error_of(path, RLRecipe, ["objective.dual_clip=1"])
    assert "must be a number in (0, 1], got 0.0" in error_of(path, RLRecipe, ["rollout.top_p=0"])


def test_other_schemas_load(tmp_path):
    distill = {"name": "d", "student": {"path": "s"}, "teacher": {"path": "t"}, "objective": {"name": "lsm", "k": 16}}
    loaded = load_recipe(write_recipe(tmp_path, distill), RLRecipe)
    assert loaded.objective.params.k == 16 and loaded.rollout.backend == "hf"
    path = write_recipe(tmp_path, distill)
    for text, value in (("tail", "tail"), ("false", False), ("true", True)):
        renormalize = load_recipe(path, RLRecipe, [f"objective.renormalize={text}"]).objective.params.renormalize
        assert renormalize == value and type(renormalize) is type(value)
    message = error_of(path, RLRecipe, ["objective.renormalize=1"])
    assert "'objective.renormalize' must be one of: true, false, tail; got 1" in message
    assert "must be one of: teacher, student, union, overlap" in error_of(path, RLRecipe, ["objective.support=both"])
    loaded = load_recipe(write_recipe(tmp_path, {"benchmarks": "math500,gsm8k", "samples": 4}), EvalRecipe)
    assert loaded.benchmarks == ["math500", "gsm8k"]


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"optim": {"lrr": 1}}, "did you mean 'optim.lr'"),
        ({"optim": {"lr": "abc"}}, "must be a number"),
        ({"objective": {"name": "lsm"}}, "is an on-policy objective; run it with `posttrain rl`"),
        ({"optim": {"lr": 0}}, "key 'optim.lr' must be a number > 0, got 0"),
    ],
)
def test_cli_prints_one_line_and_exits_2(tmp_path, change, expected):
    recipe = tiny_train_recipe(tmp_path)
    recipe.update(change)
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"model": {"path": "/no/such/model"}}, "recipe.yaml: key 'model.path': '/no/such/model' does not exist"),
        ({"data": {"source": "/no/such/data.jsonl"}}, "recipe.yaml: key 'data.source': cannot load"),
    ],
)
def test_errors_found_while_loading_name_the_recipe_file(tmp_path, change, expected):
    """Paths are checked when the run opens them (after the run's header line): still one error line,
    naming the file and the key, last on stderr."""
    recipe = tiny_train_recipe(tmp_path)
    recipe.update(change)
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in proc.stderr


def test_cli_missing_recipe_file(tmp_path):
    proc = run_cli("train", "--recipe", str(tmp_path / "missing.yaml"), check=False)
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_a_retired_key_recorded_at_its_no_op_value_is_not_a_change(tmp_path):
    from posttrain.config import dump_yaml
    from posttrain.runfolder import recipe_changes

    recipe = from_dict(TrainRecipe, {"name": "r", "model": {"tiny": {}}, "objective": {"name": "sft"}}, "r.yaml")
    recorded = yaml.safe_load(dump_yaml(recipe))
    recorded["train"]["log_every"] = 1  # written by a posttrain that still had the key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert recipe_changes(tmp_path, recipe) == {}
    recorded["train"]["log_every"] = 5  # it never acted like that: say so
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert recipe_changes(tmp_path, recipe) == {"train.log_every": (5, "(absent)")}
