"""Scale-out features: LoRA (train, merge, evaluate), the memory plan, and data parallelism
through the real launcher (torchrun, 2 gloo processes on CPU)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, cli_env, load_weights, run_cli, tiny_train_recipe, write_recipe, metrics_of



def test_lora_trains_merges_and_evaluates(tmp_path):
    recipe = tiny_train_recipe(tmp_path, name="lora", data={"prompt_field": "prompt"},
                               train={"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
                                      "save_every": 4, "epochs": 1})
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    run_dir = tmp_path / "runs" / "lora"
    assert (run_dir / "final").resolve() == (run_dir / "merged").resolve()
    assert (run_dir / "checkpoints" / "step-000008" / "adapter_config.json").exists()  # checkpoints hold the adapter

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.config import TinyModelConfig
    from posttrain.models import build_tiny_model, build_tiny_tokenizer

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final")  # a plain HF model, no peft needed
    def fresh_base():
        return build_tiny_model(TinyModelConfig(**recipe["model"]["tiny"]), len(build_tiny_tokenizer(320)), seed=0)

    reference = PeftModel.from_pretrained(fresh_base(), str(run_dir / "checkpoints" / "step-000008")).merge_and_unload()
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    untouched = fresh_base().state_dict()
    assert any((ours[k] - untouched[k]).abs().max() > 0 for k in ours if "q_proj" in k)  # LoRA changed it
    assert all(torch.equal(ours[k], untouched[k]) for k in ours if "k_proj" in k)  # not a LoRA target
    run_cli("eval", "--model", str(run_dir / "final"), "--benchmark", "synthetic", "--samples", "1", "--limit", "4",
            "--max-new-tokens", "16")
    assert json.loads((run_dir / "eval" / "results.json").read_text())["benchmarks"]["synthetic"]["metrics"]["problems"] == 4


def test_lora_run_resumes_from_its_adapter(tmp_path):
    common = {"lora": {"rank": 4, "alpha": 8}, "save_every": 2, "epochs": 1}
    straight = tiny_train_recipe(tmp_path, name="a", train=common, optim={"schedule": "constant"})
    run_cli("train", "--recipe", str(write_recipe(tmp_path, straight, "a.yaml")))
    first = tiny_train_recipe(tmp_path, name="b", train={**common, "max_steps": 4}, optim={"schedule": "constant"})
    run_cli("train", "--recipe", str(write_recipe(tmp_path, first, "b1.yaml")))
    second = tiny_train_recipe(tmp_path, name="b", train=common, optim={"schedule": "constant"})
    shutil.rmtree(tmp_path / "runs" / "b" / "merged")  # the unfinished run has no merged model yet
    run_cli("train", "--recipe", str(write_recipe(tmp_path, second, "b2.yaml")), "--resume", "--allow-changed-recipe")
    a, b = load_weights(tmp_path / "runs" / "a" / "final"), load_weights(tmp_path / "runs" / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_plan_is_printed_and_refuses_what_cannot_fit(tmp_path):
    recipe = tiny_train_recipe(tmp_path, train={"max_steps": 1})
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    assert "memory plan per process" in proc.stderr and "AdamW state" in proc.stderr
    huge = tiny_train_recipe(tmp_path, name="huge", train={"micro_batch_size": 50_000_000})
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, huge, "huge.yaml")), check=False)
    assert proc.returncode == 2 and "needs about" in proc.stderr and "gradient_checkpointing" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- two processes through the real launcher ----------------------------------------------


def torchrun(*args, nproc=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "posttrain.cli", *args]
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_processes_give_the_same_update_as_one(tmp_path, parallel):
    for name in ("one", "two"):
        recipe = tiny_train_recipe(tmp_path, name=name, objective={"name": "dft"},
                                   train={"micro_batch_size": 2, "max_steps": 4, "save_every": 2, "parallel": parallel})
        path = write_recipe(tmp_path, recipe, f"{name}.yaml")
        if name == "one":
            run_cli("train", "--recipe", str(path))
        else:
            proc = torchrun("train", "--recipe", str(path))
            assert f"2 process(es), {'FSDP2 (sharded)' if parallel == 'fsdp2' else 'DDP'}" in proc.stderr
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    a, b = load_weights(one / "final"), load_weights(two / "final")
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    rows_one, rows_two = metrics_of(one), metrics_of(two)
    assert len(rows_two) == 4  # rank 0 alone writes the run files
    for r1, r2 in zip(rows_one, rows_two):
        assert abs(r1["loss"] - r2["loss"]) < 1e-5 and abs(r1["grad_norm"] - r2["grad_norm"]) < 1e-4
        assert r1["response_tokens"] == r2["response_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_process_checkpoint_resumes(tmp_path, parallel):
    common = {"micro_batch_size": 2, "save_every": 2, "epochs": 1, "parallel": parallel}
    straight = tiny_train_recipe(tmp_path, name="a", train=common, optim={"schedule": "constant"})
    torchrun("train", "--recipe", str(write_recipe(tmp_path, straight, "a.yaml")))
    half = tiny_train_recipe(tmp_path, name="b", train={**common, "max_steps": 4}, optim={"schedule": "constant"})
    torchrun("train", "--recipe", str(write_recipe(tmp_path, half, "b1.yaml")))
    rest = tiny_train_recipe(tmp_path, name="b", train=common, optim={"schedule": "constant"})
    torchrun("train", "--recipe", str(write_recipe(tmp_path, rest, "b2.yaml")), "--resume", "--allow-changed-recipe")
    a, b = load_weights(tmp_path / "runs" / "a" / "final"), load_weights(tmp_path / "runs" / "b" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_two_process_distillation_with_sharded_student_and_teacher(tmp_path):
    from posttrain.config import TrainRecipe, from_dict
    from posttrain.train import train

    teacher = tiny_train_recipe(tmp_path, name="teacher", train={"max_steps": 4})
    train(from_dict(TrainRecipe, teacher, "fixture"))
    recipe = {
        "name": "d", "out_dir": str(tmp_path / "runs"),
        "student": {"path": str(tmp_path / "runs" / "teacher" / "final")},
        "teacher": {"path": str(tmp_path / "runs" / "teacher" / "final")},
        "prompts": {"source": "synthetic", "prompt_field": "prompt", "synthetic": {"num_examples": 64}},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 16},
        "objective": {"name": "lsm", "k": 8}, "optim": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": 2, "mini_batch_size": 8, "micro_batch_size": 2, "parallel": "fsdp2"},
    }
    proc = torchrun("distill", "--recipe", str(write_recipe(tmp_path, recipe, "d.yaml")))
    rows = metrics_of(tmp_path / "runs" / "d")
    assert len(rows) == 2 and rows[0]["rollouts_per_s"] > 0
    assert "teacher (frozen, sharded)" in proc.stderr and "FSDP2 (sharded)" in proc.stderr
    assert abs(rows[0]["reverse_kl"]) < 1e-4  # student = teacher at step 1: the exact KL is zero

