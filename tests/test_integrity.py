"""Run integrity through the real CLI: nothing wrong is trained on, written or resumed silently.

Diverging runs, resumed runs whose recipe changed, damaged checkpoints, full disks, bad data and
recipes, and the tokenizer a checkpoint reloads to. Every case runs `posttrain` as a user would,
on tiny models with a few steps.
"""

import json
import math
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import TINY, cli_env, load_weights, run_cli, tiny_train_recipe, write_recipe, metrics_of



def one_error_line(proc) -> str:
    """The run failed with exit 2 and one `error:` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return lines[0]


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def all_finite(checkpoint) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_weights(checkpoint).values())


def train_recipe_file(tmp_path, name="t", filename="recipe.yaml", **sections):
    return write_recipe(tmp_path, tiny_train_recipe(tmp_path, name=name, **sections), filename)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step (tests copy it before changing it)."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = train_recipe_file(tmp, train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 3})
    run_cli("train", "--recipe", str(recipe))
    return tmp / "runs" / "t", recipe


def copy_of(finished_run, tmp_path):
    """(a copy of the finished run's folder, the CLI arguments that resume that copy)."""
    run_dir = tmp_path / "runs" / "t"
    shutil.copytree(finished_run[0], run_dir, symlinks=True)
    return run_dir, ["--recipe", str(finished_run[1]), "--resume", f"out_dir={tmp_path / 'runs'}"]


# ---------------------------------------------------------------------------------------------
# Non-finite values


@pytest.mark.parametrize("args", [
    ["train", "optim.lr=inf"], ["train", "optim.lr=.nan"], ["train", "objective.beta=nan"],
    ["train", "optim.weight_decay=-inf"], ["distill", "rollout.temperature=inf"],
])
def test_schema_refuses_non_finite_numbers(tmp_path, args):
    command, override = args
    recipe = tiny_train_recipe(tmp_path, objective={"name": "otr"})
    if command == "distill":
        recipe = distill_recipe(tmp_path)
    line = one_error_line(run_cli(command, "--recipe", str(write_recipe(tmp_path, recipe)), override, check=False))
    assert f"key '{override.split('=')[0]}'" in line and "finite" in line
    assert not (tmp_path / "runs").exists()


def test_eval_flag_refuses_infinite_temperature(tmp_path):
    completions = tmp_path / "c.jsonl"
    completions.write_text('{"index": 0, "completion": "\\\\boxed{1}"}\n')
    line = one_error_line(run_cli("eval", "--completions", str(completions), "--benchmark", "synthetic",
                                  "--temperature", "inf", "--out", str(tmp_path / "e"), check=False))
    assert "--temperature inf" in line and "finite" in line


def test_diverging_run_skips_updates_then_stops_without_checkpointing_them(tmp_path):
    """lr=1e10: step 1's update is finite but huge, then every loss is NaN. Those updates are
    skipped and logged; the run stops after 3 in a row, exit 2, with no checkpoint or `final`
    written after them."""
    recipe = train_recipe_file(tmp_path, optim={"lr": 1e10}, train={"max_steps": 8, "save_every": 1,
                                                                     "keep_checkpoints": 2})
    line = one_error_line(run_cli("train", "--recipe", str(recipe), check=False))
    assert "stopped at step 4" in line and "train.max_nonfinite_steps: 3" in line
    run_dir = tmp_path / "runs" / "t"
    rows = metrics_of(run_dir)
    assert [r["skipped"] for r in rows] == [False, True, True, True]
    assert checkpoint_names(run_dir) == ["step-000001"]
    assert not (run_dir / "final").exists()


def test_max_nonfinite_steps_is_a_recipe_key(tmp_path):
    recipe = train_recipe_file(tmp_path, optim={"lr": 1e10}, train={"max_steps": 8, "max_nonfinite_steps": 1})
    line = one_error_line(run_cli("train", "--recipe", str(recipe), check=False))
    assert "stopped at step 2" in line
    assert [r["skipped"] for r in metrics_of(tmp_path / "runs" / "t")] == [False, True]


def model_with_an_inf_weight(folder):
    """A tiny untied model whose embedding row for an id past the tokenizer's holds inf: it never
    enters a forward pass (training is finite), but the weights are not."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from posttrain.models import as_reloaded, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    config = Qwen2Config(vocab_size=len(tokenizer) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, eos_token_id=2,
                         pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[-1] = float("inf")
    model.save_pretrained(folder)
    as_reloaded(tokenizer, config).save_pretrained(folder)
    return folder


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    base = model_with_an_inf_weight(tmp_path / "base")
    recipe = tiny_train_recipe(tmp_path, train={"max_steps": 2, "save_every": 1})
    recipe["model"] = {"path": str(base)}
    line = one_error_line(run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)), check=False))
    assert "step 1: the weights are not finite (model.embed_tokens.weight)" in line
    assert "checkpoint not written" in line
    run_dir = tmp_path / "runs" / "t"
    assert checkpoint_names(run_dir) == [] and not (run_dir / "final").exists()


# ---------------------------------------------------------------------------------------------
# Resume: the recipe, damaged checkpoints, a finished run


def test_resume_refuses_a_changed_recipe_unless_allowed_and_records_it(tmp_path, finished_run):
    run_dir, _ = copy_of(finished_run, tmp_path)
    recipe = train_recipe_file(tmp_path, train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 3})
    config_before = (run_dir / "config.yaml").read_text()
    line = one_error_line(run_cli("train", "--recipe", str(recipe), "--resume", "optim.lr=0.01",
                                  "objective.name=dft", check=False))
    assert "optim.lr (0.003 → 0.01)" in line and "objective.name ('sft' → 'dft')" in line
    assert "--allow-changed-recipe" in line
    assert (run_dir / "config.yaml").read_text() == config_before

    run_cli("train", "--recipe", str(recipe), "--resume", "--allow-changed-recipe", "optim.lr=0.01",
            "train.max_steps=4")
    # the new recipe is the one in force: step 4's lr is 0.01 on a cosine over 4 steps
    assert metrics_of(run_dir)[3]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-12)
    [change] = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert change["resumed_at_step"] == 3
    assert change["changed"] == {"optim.lr": {"before": 0.003, "after": 0.01},
                                 "train.max_steps": {"before": 3, "after": 4}}
    assert "lr: 0.01" in (run_dir / "config.yaml").read_text()
    assert [r["step"] for r in metrics_of(run_dir)] == [1, 2, 3, 4]
    # the same recipe again is accepted without the flag
    run_cli("train", "--recipe", str(recipe), "--resume", "optim.lr=0.01", "train.max_steps=4")


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, finished_run):
    """step-3's weights and step-2's trainer state are truncated: resume says so, continues from
    step-1 and ends bit-identical to the uninterrupted run."""
    run_dir, resume = copy_of(finished_run, tmp_path)
    expected = {k: v.clone() for k, v in load_weights(run_dir / "final").items()}
    for name, file in (("step-000003", "model.safetensors"), ("step-000002", "trainer_state.pt")):
        path = run_dir / "checkpoints" / name / file
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = run_cli("train", *resume)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "step-000003 is damaged (model.safetensors has" in out
    assert "step-000002 is damaged (trainer_state.pt has" in out
    assert "from step-000001" in out
    final = load_weights(run_dir / "final")
    assert all(torch.equal(final[k], v) for k, v in expected.items())


def test_resume_of_a_finished_run_leaves_final_alone(tmp_path, finished_run):
    run_dir, resume = copy_of(finished_run, tmp_path)
    link, checkpoint = run_dir / "final", run_dir / "checkpoints" / "step-000003"
    # a run recorded before a key existed resumes when the key now holds its default
    config = run_dir / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if "max_nonfinite_steps" not in line))
    before = (os.lstat(link).st_ino, os.stat(checkpoint).st_ino, os.stat(checkpoint / "model.safetensors").st_mtime_ns)
    run_cli("train", *resume)
    after = (os.lstat(link).st_ino, os.stat(checkpoint).st_ino, os.stat(checkpoint / "model.safetensors").st_mtime_ns)
    assert after == before


def test_all_checkpoints_damaged_is_one_line(tmp_path, finished_run):
    run_dir, resume = copy_of(finished_run, tmp_path)
    for checkpoint in (run_dir / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").write_bytes(b"")
    line = one_error_line(run_cli("train", *resume, check=False))
    assert "no intact checkpoint" in line


def test_checkpoint_write_failure_is_one_line_and_loses_nothing(tmp_path, finished_run):
    """A file-size limit (as a full disk would) while writing step 4: one line, exit 2, no
    temporary folder left, the earlier checkpoints and `final` intact."""
    run_dir, resume = copy_of(finished_run, tmp_path)
    limit = 100_000  # model.safetensors fits; trainer_state.pt (Adam moments) does not
    assert (run_dir / "final" / "model.safetensors").stat().st_size < limit
    assert (run_dir / "final" / "trainer_state.pt").stat().st_size > limit
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "train", *resume, "--allow-changed-recipe", "train.max_steps=4"],
        env=cli_env(), capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = one_error_line(proc)
    assert "cannot write checkpoint" in line and "step-000004" in line and "step-000003" in line
    assert checkpoint_names(run_dir) == ["step-000001", "step-000002", "step-000003"]
    assert os.readlink(run_dir / "final") == "checkpoints/step-000003"
    assert all_finite(run_dir / "final")
    run_cli("train", *resume, "--allow-changed-recipe", "train.max_steps=4")  # the record is whole: resumes


# ---------------------------------------------------------------------------------------------
# Data and recipe mistakes: one line, exit 2


def _jsonl(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize("case, content, expected", [
    ("null", _jsonl([{"problem": "1+1", "solution": "2"}, {"problem": "2+2", "solution": None}]),
     "row 2 of"),
    ("missing", _jsonl([{"problem": "1+1"}, {"problem": "2+2", "solution": "4"}]), "row 1 of"),
    ("empty", "", "is empty"),
    ("latin1", '{"problem": "caf\xe9", "solution": "2"}\n'.encode("latin-1"), "is not UTF-8"),
])
def test_bad_data_is_one_line(tmp_path, case, content, expected):
    data = tmp_path / f"{case}.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe = train_recipe_file(tmp_path, data={"source": str(data)})
    line = one_error_line(run_cli("train", "--recipe", str(recipe), check=False))
    assert expected in line and "data." in line and str(recipe) in line
    assert not (tmp_path / "runs" / "t" / "config.yaml").exists()


@pytest.mark.parametrize("text, expected", [
    ("name: a\nname: b\n", "key 'name' appears twice"),
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
])
def test_bad_recipe_file_is_one_line(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_error_line(run_cli("train", "--recipe", str(path), check=False))
    assert expected in line and str(path) in line


@pytest.mark.parametrize("override", ["name=", "name=/tmp/elsewhere", "name=../up"])
def test_run_name_must_stay_under_out_dir(tmp_path, override):
    recipe = train_recipe_file(tmp_path)
    line = one_error_line(run_cli("train", "--recipe", str(recipe), override, check=False))
    assert "key 'name'" in line and "not absolute" in line


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    recipe = train_recipe_file(tmp_path)
    line = one_error_line(run_cli("train", "--recipe", str(recipe), f"out_dir={tmp_path / 'afile'}", check=False))
    assert "out_dir" in line and "is a file" in line
    assert (tmp_path / "afile").read_text() == "keep me"


def distill_recipe(tmp_path, **train):
    return {
        "name": "d", "out_dir": str(tmp_path / "runs"),
        "student": {"tiny": dict(TINY)}, "teacher": {"tiny": dict(TINY)},
        "prompts": {"source": "synthetic", "synthetic": {"split": "in_domain", "num_examples": 64}},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8},
        "objective": {"name": "lsm", "k": 8}, "optim": {"lr": 3e-3},
        "train": {"steps": 2, "mini_batch_size": 8, "micro_batch_size": 8, **train},
    }


def test_lsm_k_larger_than_the_vocabulary_is_one_line(tmp_path):
    recipe = write_recipe(tmp_path, distill_recipe(tmp_path))
    line = one_error_line(run_cli("distill", "--recipe", str(recipe), "objective.k=100000", check=False))
    assert "key 'objective.k' (100000) must be at most the vocabulary size (320)" in line


def test_diverging_distill_run_stops_in_one_line(tmp_path):
    """lr=1e10: step 1's update leaves a student whose probabilities are NaN; step 2 cannot
    sample. One line, exit 2, no checkpoint or `final` of the diverged weights."""
    recipe = write_recipe(tmp_path, distill_recipe(tmp_path, steps=4, save_every=2))
    line = one_error_line(run_cli("distill", "--recipe", str(recipe), "optim.lr=1e10", check=False))
    assert "stopped at step 2" in line and "NaN/inf" in line
    run_dir = tmp_path / "runs" / "d"
    assert [r["skipped_updates"] for r in metrics_of(run_dir)] == [0]
    assert checkpoint_names(run_dir) == [] and not (run_dir / "final").exists()


# ---------------------------------------------------------------------------------------------
# The tokenizer a checkpoint reloads to, and the optional token-probability probe

ROUND_TRIP_TEXTS = [
    "def f(x):\n    return x**2  # square\n\n\tif x<0: raise ValueError('neg')",
    "Compute 12+345=357. Then 0.5*1e-3 = 5e-4; 1,000,000 and -17/3.",
    "über naïve café — 日本語 ½ ∑ 🙂 \u00a0non-breaking\u2003em space",
    "   leading and trailing   \n\n\r\n  mixed\twhitespace  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n\\boxed{4}<|im_end|>",
    "(x)[y]{z} \"quoted\" 'single' don't it's I'm we'll they've",
]


def test_saved_tokenizer_reloads_to_the_one_trained_with(tmp_path, arch="qwen2"):
    """The checkpoint's tokenizer, loaded with AutoTokenizer (as eval, vLLM or a user would),
    is the tokenizer the run trained with: same pipeline, same ids on varied text; and saving
    it again reloads to the same."""
    from transformers import AutoTokenizer

    from posttrain.config import ModelConfig, TinyModelConfig
    from posttrain.models import load_policy

    recipe = tiny_train_recipe(tmp_path, train={"max_steps": 1})
    recipe["model"]["tiny"]["arch"] = arch
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    _, trained_with = load_policy(ModelConfig(tiny=TinyModelConfig(**recipe["model"]["tiny"])), "model", 0, "cpu")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "runs" / "t" / "final")
    reloaded.save_pretrained(tmp_path / "again")
    shutil.copy(tmp_path / "runs" / "t" / "final" / "config.json", tmp_path / "again")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    pipeline = json.loads(trained_with.backend_tokenizer.to_str())
    for tokenizer in (reloaded, again):
        assert json.loads(tokenizer.backend_tokenizer.to_str()) == pipeline
        for text in ROUND_TRIP_TEXTS:
            assert tokenizer(text)["input_ids"] == trained_with(text)["input_ids"], text
        assert tokenizer.eos_token == trained_with.eos_token and tokenizer.pad_token == trained_with.pad_token


def test_token_probs_are_off_by_default_and_a_sample_when_asked(tmp_path, finished_run):
    assert not (finished_run[0] / "token_probs.json").exists()
    recipe = train_recipe_file(tmp_path, train={"max_steps": 2, "token_probs_examples": 16})
    run_cli("train", "--recipe", str(recipe))
    probs = json.loads((tmp_path / "runs" / "t" / "token_probs.json").read_text())
    assert probs["examples"] == 16
    assert len(probs["initial"]) == len(probs["final"]) == len(probs["log10_edges"]) - 1
    # every response token of the 16 examples is counted once, before and after
    assert sum(probs["initial"]) == sum(probs["final"]) > 16
