"""`posttrain train` end to end on tiny models, through the real CLI."""

import os
import signal
import subprocess
import sys
import time

import torch

from tests.helpers import REPO, cli_env, load_weights, run_cli, tiny_train_recipe, write_recipe, metrics_of



def test_train_writes_a_loadable_checkpoint_and_metrics(tmp_path):
    recipe = tiny_train_recipe(tmp_path, train={"epochs": 2})
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    run_dir = tmp_path / "runs" / "t"
    rows = metrics_of(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))  # 64 examples / 8 × 2 epochs
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "response_tokens", "entropy", "target_prob"):
        assert key in rows[0], key
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert "train t (sft)" in proc.stderr  # the summary table

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert model.config.vocab_size >= len(tokenizer)
    assert (run_dir / "config.yaml").read_text().startswith("# posttrain train --recipe")


def test_dft_trains_through_the_cli(tmp_path):
    recipe = tiny_train_recipe(tmp_path, objective={"name": "dft"}, train={"epochs": 2})
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    rows = metrics_of(tmp_path / "runs" / "t")
    # DFT's loss −p·log p starts near 0 (p ≈ 1/V) and is not monotone in p: check p itself
    assert rows[-1]["target_prob"] > 2 * rows[0]["target_prob"]


def test_otr_trains_through_the_cli(tmp_path):
    recipe = tiny_train_recipe(tmp_path, objective={"name": "otr", "k": 32, "kappa": 1.3, "beta": -0.1},
                               train={"max_steps": 3})
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    rows = metrics_of(tmp_path / "runs" / "t")
    assert len(rows) == 3 and 0 < rows[0]["n_gt_frac"] < 1


def test_accumulation_8x1_equals_1x8(tmp_path):
    """The same step as one micro-batch of 8 or eight micro-batches of 1: the same update."""
    finals = {}
    for micro in (8, 1):
        recipe = tiny_train_recipe(tmp_path, name=f"mb{micro}", train={"micro_batch_size": micro, "max_steps": 3})
        run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe, f"mb{micro}.yaml")))
        finals[micro] = load_weights(tmp_path / "runs" / f"mb{micro}" / "final")
    initial_gap = max((finals[8][k] - finals[1][k]).abs().max().item() for k in finals[8])
    assert initial_gap < 1e-5, initial_gap
    rows8, rows1 = metrics_of(tmp_path / "runs" / "mb8"), metrics_of(tmp_path / "runs" / "mb1")
    for a, b in zip(rows8, rows1):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


def test_token_budget_batching_gives_the_same_update(tmp_path):
    finals = {}
    for name, train in (("count", {"micro_batch_size": 8}), ("budget", {"micro_batch_tokens": 150})):
        recipe = tiny_train_recipe(tmp_path, name=name, train={**train, "max_steps": 2})
        run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe, f"{name}.yaml")))
        finals[name] = load_weights(tmp_path / "runs" / name / "final")
    assert max((finals["count"][k] - finals["budget"][k]).abs().max().item() for k in finals["count"]) < 1e-5


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path):
    common = {"train": {"micro_batch_size": 1, "save_every": 2, "keep_checkpoints": 2, "epochs": 3}}
    recipe_a = tiny_train_recipe(tmp_path, name="straight", objective={"name": "otr", "k": 16}, **common)
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe_a, "a.yaml")))

    recipe_b = tiny_train_recipe(tmp_path, name="killed", objective={"name": "otr", "k": 16}, **common)
    path_b = write_recipe(tmp_path, recipe_b, "b.yaml")
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "train", "--recipe", str(path_b)], cwd=REPO,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-000006").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "final").exists()

    refused = run_cli("train", "--recipe", str(path_b), check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # nothing is overwritten by accident
    run_cli("train", "--recipe", str(path_b), "--resume")
    straight = load_weights(tmp_path / "runs" / "straight" / "final")
    resumed = load_weights(run_dir / "final")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [row["step"] for row in metrics_of(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) == [row["step"] for row in metrics_of(tmp_path / "runs" / "straight")]
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # keep_checkpoints
