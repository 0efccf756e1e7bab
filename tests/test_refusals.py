"""The last tracebacks and silent accepts (issue 21): each is one `error:` line naming the file and
the key or flag, exit 2, nothing written and nothing already written lost. Through the real CLI.
Also: every package version that can move a number is recorded, the same way by train and eval."""

import json
import shutil

import pytest

from posttrain.runfolder import VERSIONED_PACKAGES
from tests.helpers import TINY, run_cli, tiny_train_recipe, write_recipe
from tests.test_integrity import distill_recipe, one_error_line


def tree(folder):
    """{relative path: bytes} of every file under `folder` (what a refused command must leave alone)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(tmp, tiny_train_recipe(tmp, train={"max_steps": 2}))
    run_cli("train", "--recipe", str(recipe))
    return tmp / "runs" / "t", recipe


def test_truncated_safetensors_is_one_line_naming_the_key_and_the_file(tmp_path):
    from posttrain.config import TinyModelConfig
    from posttrain.models import as_reloaded, build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    model = build_tiny_model(TinyModelConfig(**TINY), len(tokenizer), seed=0)
    folder = tmp_path / "broken"
    model.save_pretrained(folder)
    as_reloaded(tokenizer, model.config).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    recipe = tiny_train_recipe(tmp_path, model={"path": str(folder)})
    del recipe["model"]["tiny"]
    line = one_error_line(run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)), check=False))
    assert "recipe.yaml: key 'model.path'" in line and "model.safetensors" in line and "SafetensorError" in line
    assert not (tmp_path / "runs").exists()


def test_report_on_a_damaged_config_yaml_is_one_line(tmp_path, finished_run):
    run_dir = tmp_path / "t"
    shutil.copytree(finished_run[0], run_dir, symlinks=True)
    (run_dir / "config.yaml").write_text("name: [unclosed\n")
    line = one_error_line(run_cli("report", str(run_dir), "--out", str(tmp_path / "results"), check=False))
    assert f"{run_dir / 'config.yaml'}: not readable YAML" in line and "line 2" in line
    assert not (tmp_path / "results").exists()


def test_out_dir_that_cannot_be_created_is_one_line(tmp_path):
    recipe = write_recipe(tmp_path, tiny_train_recipe(tmp_path))
    line = one_error_line(run_cli("train", "--recipe", str(recipe), "out_dir=/proc/nope", check=False))
    assert "recipe.yaml: key 'out_dir': cannot create the run folder /proc/nope/t" in line


def test_resume_over_a_metrics_row_with_a_non_integer_step_is_one_line(tmp_path, finished_run):
    run_dir = tmp_path / "runs" / "t"
    shutil.copytree(finished_run[0], run_dir, symlinks=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": "x", "loss": 1}\n{"step": 3, "loss": 1}\n')  # the damaged row is not a torn last line
    before = tree(run_dir)
    line = one_error_line(run_cli("train", "--recipe", str(finished_run[1]), "--resume",
                                  f"out_dir={tmp_path / 'runs'}", check=False))
    assert f"{run_dir / 'metrics.jsonl'}: record 3 has key 'step' = 'x'; allowed: an integer ≥ 0" in line
    assert tree(run_dir) == before


def test_rollout_longer_than_the_models_positions_is_refused(tmp_path):
    recipe = write_recipe(tmp_path, distill_recipe(tmp_path))
    line = one_error_line(run_cli("rl", "--recipe", str(recipe), "rollout.max_new_tokens=5000", check=False))
    assert "recipe.yaml: key 'rollout.max_new_tokens' (5000): a prompt plus the new tokens must fit the student's " \
           "512 positions (max_position_embeddings); allowed: at most 511" in line
    assert not (tmp_path / "runs").exists()
    # room for a 1-token prompt, not for the real ones: refused once the prompts are tokenized, before any step
    line = one_error_line(run_cli("rl", "--recipe", str(recipe), "rollout.max_new_tokens=500", check=False))
    assert "key 'rollout.max_new_tokens' (500): the longest prompt (" in line and "512 positions" in line
    run_dir = tmp_path / "runs" / "d"
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists()
    assert not any((run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("content, expected", [
    ('{"index": true, "completion": "\\\\boxed{1}"}\n', "line 1: key 'index' is True"),
    ('{"index": 0, "completion": "x"}\n{"index": 1.0, "completion": "x"}\n', "line 2: key 'index' is 1.0"),
    ("", "holds no completions"),
    ("\n\n", "holds no completions"),
])
def test_completions_file_refusals(tmp_path, content, expected):
    completions = tmp_path / "c.jsonl"
    completions.write_text(content)
    line = one_error_line(run_cli("eval", "--completions", str(completions), "--benchmark", "synthetic",
                                  "--out", str(tmp_path / "e"), check=False))
    assert f"{completions}: {expected}" in line
    assert not (tmp_path / "e").exists()


def test_train_and_eval_record_the_same_versions(tmp_path, finished_run):
    versions = json.loads((finished_run[0] / "versions.json").read_text())
    assert set(versions) == {"python", *VERSIONED_PACKAGES}
    for package in ("python", "torch", "transformers", "tokenizers", "accelerate", "numpy", "peft", "safetensors",
                    "math-verify"):
        assert isinstance(versions[package], str) and versions[package], package
    completions = tmp_path / "c.jsonl"
    completions.write_text('{"index": 0, "completion": "\\\\boxed{1}"}\n')
    run_cli("eval", "--completions", str(completions), "--benchmark", "synthetic", "--out", str(tmp_path / "e"),
            "--workers", "1")
    assert json.loads((tmp_path / "e" / "results.json").read_text())["versions"] == versions


def test_resume_under_other_versions_is_recorded(tmp_path, finished_run):
    run_dir = tmp_path / "runs" / "t"
    shutil.copytree(finished_run[0], run_dir, symlinks=True)
    recorded = json.loads((run_dir / "versions.json").read_text())
    (run_dir / "versions.json").write_text(json.dumps({**recorded, "torch": "0.0.1"}))
    run_cli("train", "--recipe", str(finished_run[1]), "--resume", f"out_dir={tmp_path / 'runs'}")
    assert json.loads((run_dir / "versions.json").read_text()) == recorded
    [change] = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert change["changed"] == {"versions.torch": {"before": "0.0.1", "after": recorded["torch"]}}


@pytest.mark.parametrize("objective,unused", [
    ({"name": "tdpo", "variant": "tdpo1", "alpha": 0.9}, "alpha"),  # α weighs TDPO2's KL term only
    ({"name": "grpo", "kl_estimator": "k1"}, "kl_estimator"),  # kl_coef 0: no KL term to estimate
])
def test_an_objective_key_its_settings_never_read_is_refused(tmp_path, objective, unused):
    """Accepted and ignored, tdpo1 with alpha 0.9 trained byte-identically to alpha 0.5."""
    recipe = write_recipe(tmp_path, tiny_train_recipe(tmp_path, objective=objective))
    line = one_error_line(run_cli("train", "--recipe", str(recipe), check=False))
    assert f"key 'objective.{unused}' is not used" in line and "remove it" in line
    assert not (tmp_path / "runs").exists()
