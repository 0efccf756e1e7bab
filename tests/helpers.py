"""Shared helpers: tiny recipes, running the real CLI, reading weights back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# The real benchmark files (never copied into the repository): ../shared/benchmarks beside the
# checkout, or POSTTRAIN_BENCHMARKS for a checkout elsewhere. Tests that need them skip without them.
BENCHMARKS = Path(os.environ.get("POSTTRAIN_BENCHMARKS", REPO.parent / "shared" / "benchmarks"))

TINY = {"arch": "qwen2", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64, "vocab_size": 320}


def tiny_train_recipe(tmp_path: Path, name: str = "t", objective: dict | None = None, **sections) -> dict:
    recipe = {
        "name": name,
        "out_dir": str(tmp_path / "runs"),
        "model": {"tiny": dict(TINY)},
        "data": {"source": "synthetic", "synthetic": {"split": "in_domain", "num_examples": 64}, "max_length": 96},
        "objective": objective or {"name": "sft"},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def write_recipe(tmp_path: Path, recipe: dict, filename: str = "recipe.yaml") -> Path:
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", POSTTRAIN_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `posttrain ...` exactly as a user would (a fresh interpreter)."""
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], cwd=cwd or REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"posttrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics_of(run_dir: Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def token_signals(batch: dict):
    """A TokenSignals from a dict of [B, T, ...] tensors named as the on-policy loop's fields
    without their shape suffix (old_logprob, teacher_topk_ids, ...), for objective unit tests."""
    import torch

    from posttrain.losses.objective import TokenSignals

    suffixed = {"old_logprob": "old_logprob_BT", "teacher_token_logprob": "teacher_token_logprob_BT",
                "teacher_topk_ids": "teacher_topk_ids_BTK", "teacher_topk_logprob": "teacher_topk_logprob_BTK",
                "student_topk_ids": "student_topk_ids_BTK", "student_topk_logprob": "student_topk_logprob_BTK",
                "student_logprob_at_teacher_topk": "student_logprob_at_teacher_topk_BTK",
                "teacher_logprob_at_student_topk": "teacher_logprob_at_student_topk_BTK",
                "reference_logprob": "reference_logprob_BT"}
    fields = {field: batch[key] for key, field in suffixed.items() if key in batch}
    shape_BT = batch["loss_mask"].shape
    fields.setdefault("old_logprob_BT", torch.zeros(shape_BT))
    return TokenSignals(entropy_BT=torch.zeros(shape_BT), group_B=torch.arange(shape_BT[0]), **fields)
