"""`posttrain teacher-cache`: score a prompt/response set once with a teacher and keep, for every
response token, the teacher's top-K ids and log-probs, so that `posttrain train` (objective
kd_topk, data.teacher_cache: DIR) distils without the teacher in memory (teacher_cache_reader.py).

A cache is a folder:

    manifest.json        what the cache is of (the teacher: path, config and vocabulary sha256;
                         the data file: path, sha256, rows, how it was rendered; K; the examples'
                         token ids' sha256) and each shard's examples, tokens, size and sha256.
                         "complete": false until the last shard is in.
    shard-NNNNN.safetensors   a run of consecutive examples, their response tokens in order:
                         topk_ids [n, K] int32, topk_logprob [n, K] float32 (sorted, most likely
                         first), token_logprob [n] float32 (the response token's own log-prob),
                         loss_tokens [examples] int64 (tokens per example)

So a token costs 8·K + 4 bytes (K = 32: 260 B), printed with the total before scoring starts.
The log-probs are kept in float32, exactly as the teacher's scoring pass (scoring.score_tokens:
log-softmax in fp32, temperature 1) computes them, so training from the cache equals training
with the teacher live; float16 would halve them at the cost of that equality.

Each shard is written to a temporary file, synced and renamed into place, then listed in the
manifest (itself a synced temporary file renamed over the old one, as runfolder writes
checkpoints): a run killed at any moment leaves the shards the manifest lists intact, and the
same command continues after the last of them (a shard on disk that the manifest does not list, or whose sha256 no longer
matches, is scored again). The same --out with another teacher, data file, K or rendering is
refused, naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from posttrain.config import DataConfig, ModelConfig, SyntheticConfig
from posttrain.data.sft import build_examples, collate, load_rows
from posttrain.errors import UserError
from posttrain.models import load_policy
from posttrain.progress import console
from posttrain.runfolder import _fsync_dir, _fsync_file, file_sha256, read_json_object
from posttrain.scoring import score_tokens

MANIFEST = "manifest.json"
FORMAT = "posttrain-teacher-cache/1"
# How the data file was turned into examples: train's data section must render it the same way.
RENDER_KEYS = ("prompt_field", "response_field", "response_role", "system_prompt", "max_length", "format",
               "train_turns")
SHARD_FIELDS = ("topk_ids", "topk_logprob", "token_logprob", "loss_tokens")


def bytes_per_token(k: int) -> int:
    """int32 ids and float32 log-probs of the top-K, and the token's own float32 log-prob."""
    return 4 * k + 4 * k + 4


def vocab_sha256(tokenizer) -> str:
    """The vocabulary's fingerprint: sha256 of its (token, id) pairs, sorted."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()).hexdigest()


def examples_sha256(examples) -> str:
    """sha256 of every example's token ids and trained positions: the rendering the cache's
    token order follows (a student tokenizing the data differently cannot use it)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.token_ids, ex.prompt_len, ex.loss_spans]).encode())
    return digest.hexdigest()


def shard_plan(examples, shard_tokens: int) -> list[tuple[int, int]]:
    """[start, end) example ranges of about shard_tokens response tokens each (at least one example)."""
    plan, start, tokens = [], 0, 0
    for index, ex in enumerate(examples):
        tokens += ex.loss_tokens
        if tokens >= shard_tokens:
            plan.append((start, index + 1))
            start, tokens = index + 1, 0
    if start < len(examples):
        plan.append((start, len(examples)))
    return plan


# The command's flags for the data keys they set (DataConfig's names): an error about one names the flag.
FLAG_OF_KEY = {"prompt_field": "--prompt-field", "response_field": "--response-field", "max_length": "--max-length"}


def _examples(rows: list[dict], tokenizer, cfg: DataConfig, data: Path) -> list:
    """build_examples, its errors told about this command's flags (it has no recipe)."""
    try:
        return build_examples(rows, tokenizer, cfg, key="data")[0]
    except UserError as err:
        if err.key is None:
            raise
        field, message = err.key.removeprefix("data."), err.message.lstrip(":;, ")
        if field in FLAG_OF_KEY:
            raise UserError(f"--data {data}: {FLAG_OF_KEY[field]} {getattr(cfg, field)!r}: {message}") from None
        raise UserError(f"--data {data}: {message}") from None


def write_teacher_cache(teacher: str, data: Path, k: int, out: Path, *, data_cfg: DataConfig | None = None,
                        batch_size: int = 8, shard_tokens: int = 1 << 18, chunk_tokens: int = 1024,
                        dtype: str = "float32") -> dict:
    """Score `data` with `teacher` into `out` (resuming a partial cache of the same inputs);
    returns the manifest."""
    _check_out(out)
    if not data.is_file():
        raise UserError(f"--data {data}: not a file (a .jsonl, .json or .parquet of prompt/response rows)")
    cfg = dataclasses.replace(data_cfg or DataConfig(), source=str(data))
    rows = load_rows(cfg.source, cfg.split, SyntheticConfig(), None, "--data")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_policy(ModelConfig(path=teacher), "teacher", 0, device, dtype=getattr(torch, dtype))
    model.eval().requires_grad_(False)
    if k > len(tokenizer):
        raise UserError(f"--k {k}: more than the teacher's vocabulary ({len(tokenizer)} tokens)")
    examples = _examples(rows, tokenizer, cfg, data)
    plan = shard_plan(examples, shard_tokens)
    manifest = _identity(teacher, model, tokenizer, data, rows, cfg, k, dtype, examples, plan)
    done = _resume(out, manifest)
    tokens = sum(ex.loss_tokens for ex in examples)
    console.print(f"teacher-cache: {len(examples)} examples, {tokens:,} response tokens × {bytes_per_token(k)} bytes "
                  f"(K = {k}: int32 ids + float32 log-probs) = {tokens * bytes_per_token(k) / 2**20:,.1f} MiB in "
                  f"{len(plan)} shard(s) → {out}" + (f"; resuming after shard {len(done) - 1}" if done else ""),
                  highlight=False, soft_wrap=True)
    manifest["shards"] = done
    for number in range(len(done), len(plan)):
        start, end = plan[number]
        values = _score(model, examples[start:end], k, tokenizer.pad_token_id, batch_size, chunk_tokens, device)
        manifest["shards"].append(_write_shard(out, number, values, start, end))
        _write_manifest(out, manifest)
    manifest["complete"] = True
    _write_manifest(out, manifest)
    console.print(f"teacher-cache: complete, {len(plan)} shard(s), {sum(s['size'] for s in manifest['shards']):,} "
                  f"bytes → {out / MANIFEST}", highlight=False, soft_wrap=True)
    return manifest


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"--out {out}: a folder with other files and no {MANIFEST}; give a new or empty folder")


def _identity(teacher, model, tokenizer, data, rows, cfg, k, dtype, examples, plan) -> dict:
    """The manifest's record of what the cache is of (everything but the shards)."""
    config = Path(teacher) / "config.json"
    return {
        "format": FORMAT, "complete": False, "k": k, "bytes_per_token": bytes_per_token(k),
        "dtypes": {"topk_ids": "int32", "topk_logprob": "float32", "token_logprob": "float32"},
        "teacher": {"path": str(Path(teacher).resolve()) if Path(teacher).exists() else teacher,
                    "config_sha256": file_sha256(config) if config.is_file()
                    else hashlib.sha256(model.config.to_json_string().encode()).hexdigest(),
                    "vocab_sha256": vocab_sha256(tokenizer), "vocab_size": len(tokenizer), "dtype": dtype},
        "data": {"path": str(data.resolve()), "sha256": file_sha256(data), "rows": len(rows),
                 **{key: getattr(cfg, key) for key in RENDER_KEYS}},
        "examples": len(examples), "tokens": sum(ex.loss_tokens for ex in examples),
        "examples_sha256": examples_sha256(examples), "plan": [list(p) for p in plan],
    }


def _resume(out: Path, manifest: dict) -> list[dict]:
    """The intact shards of an earlier run of the same inputs (none for a new cache); another
    cache in `out` is refused, naming the first key that differs."""
    path = out / MANIFEST
    if not path.is_file():
        return []
    old = read_json_object(path)
    for key in ("format", "k", "teacher", "data", "examples_sha256", "plan"):
        if old.get(key) != manifest[key]:
            raise UserError(f"key '{key}': {old.get(key)!r} there, {manifest[key]!r} for this command: --out holds "
                            "another cache; give another --out (or remove it)", file=str(path))
    done = []
    for shard in old.get("shards", []):  # the listed shards up to the first damaged one
        if not (out / shard["file"]).is_file() or file_sha256(out / shard["file"]) != shard["sha256"]:
            break
        done.append(shard)
    return done


@torch.no_grad()
def _score(model, examples, k, pad_id, batch_size, chunk_tokens, device) -> dict[str, torch.Tensor]:
    """The teacher's top-K and the token's own log-prob at each response token of `examples`, in
    order (the per-example order of collate's loss mask)."""
    parts = {"topk_ids": [], "topk_logprob": [], "token_logprob": []}
    for start in range(0, len(examples), batch_size):
        batch = {key: v.to(device) for key, v in collate(examples[start:start + batch_size], pad_id).items()}
        scored = score_tokens(model, batch, k=k, chunk_tokens=chunk_tokens)
        mask = batch["loss_mask"]
        parts["topk_ids"].append(scored["topk_ids"][mask].to(torch.int32).cpu())
        parts["topk_logprob"].append(scored["topk_logprob"][mask].float().cpu())
        parts["token_logprob"].append(scored["token_logprob"][mask].float().cpu())
    values = {key: torch.cat(value) for key, value in parts.items()}
    values["loss_tokens"] = torch.tensor([ex.loss_tokens for ex in examples], dtype=torch.int64)
    return values


def _write_shard(out: Path, number: int, values: dict, start: int, end: int) -> dict:
    """shard-NNNNN.safetensors, written to a temporary name, synced, renamed; its manifest entry."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    final = out / f"shard-{number:05d}.safetensors"
    tmp = out / f".{final.name}.tmp{os.getpid()}"
    save_file({key: value.contiguous() for key, value in values.items()}, str(tmp))
    _fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_dir(out)
    return {"file": final.name, "examples": [start, end], "tokens": int(values["loss_tokens"].sum()),
            "size": final.stat().st_size, "sha256": file_sha256(final)}


def _write_manifest(out: Path, manifest: dict) -> None:
    """Replaced atomically, its new content synced before the rename (runfolder's pattern)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp)
    os.replace(tmp, out / MANIFEST)
    _fsync_dir(out)
