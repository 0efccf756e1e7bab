"""A run folder is the only record of a run: runs/<name>/

    config.yaml              the resolved recipe (every default filled in)
    metrics.jsonl            one JSON object per optimizer step
    checkpoints/step-NNNNNN/ HF model + tokenizer (loadable by from_pretrained) + trainer_state.pt
    final -> checkpoints/step-NNNNNN   the last checkpoint, once the run has finished
    eval/<benchmarks>/       results written by `posttrain eval --out` (optional)

Checkpoints are written to a temporary directory and renamed into place, so a run killed at
any moment leaves only complete checkpoints; `--resume` continues from the newest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from posttrain.errors import UserError

STATE_FILE = "trainer_state.pt"


def prepare_run_dir(out_dir: str, name: str, resume: bool) -> Path:
    """Create runs/<name>; refuse to overwrite an existing run (one that wrote its config, a
    metric or a checkpoint) unless resuming."""
    run_dir = Path(out_dir) / name
    used = (run_dir / "config.yaml").exists() or (run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir)
    if used and not resume:
        raise UserError(
            f"run folder {run_dir} already exists; add --resume to continue it, or pick another name (name=...)"
        )
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a half-written one is still a .tmp directory)."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        if path.is_dir() and path.name[5:].isdigit() and (path / STATE_FILE).exists():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


class MetricsLog:
    """Append-only metrics.jsonl; on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.tee = None  # set by open_logs: sends each row on to the experiment trackers (trackers.py)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [row for row in read_jsonl(self.path) if row.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
            if self.tee is not None:
                self.tee(row)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file, skipping a torn last line (the process may have been killed)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, runtime, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN atomically (all ranks call this; rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    if runtime.is_main:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=_without_tied_copies(model_state, model), safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        state = {
            "step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        if keep > 0:
            for _, old in checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def _without_tied_copies(state: dict, model) -> dict:
    """A state dict gathered from sharded parameters holds tied weights (embeddings = LM head) as
    two separate copies, which save_pretrained cannot deduplicate; keep only the source."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = getattr(base, "_tied_weights_keys", None)
    if not getattr(base.config, "tie_word_embeddings", False) or not isinstance(tied, dict):
        return state
    for target in tied:
        for key in [k for k in state if k == target or k.endswith("." + target)]:
            del state[key]
    return state


def load_trainer_state(checkpoint: Path, model, optimizer, scheduler, runtime) -> int:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns its step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=runtime.world_size > 1)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def mark_final(run_dir: Path, checkpoint: Path) -> None:
    link = run_dir / "final"
    tmp = run_dir / ".final.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(checkpoint.relative_to(run_dir))
    os.replace(tmp, link)
