"""The train side of a teacher cache (teacher_cache.py writes it): `posttrain train` with an
objective that reads the teacher's top-K (kd_topk) and data.teacher_cache: DIR.

  check_recipe(recipe)       no I/O: such an objective exactly when data.teacher_cache is set
  open_cache(recipe, rows)   every refusal before the run folder exists, each one line naming the
                             manifest and its key: an unfinished cache, another data file (sha256),
                             another rendering of it, a shard whose sha256 is not the manifest's,
                             a student whose vocabulary is not the teacher's (fingerprint), token
                             ids that differ (e.g. another chat template), objective.k > the cache's K
  TeacherCache.attach(examples)  the examples carrying, per response token, support_ids and
                             support_teacher_logprob (the first k of the cached top-K): collate
                             puts them at the loss positions, as the on-policy loop's forward_kl/jsd
                             get them from a live teacher
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from posttrain.config import TrainRecipe
from posttrain.data.sft import build_examples
from posttrain.errors import UserError
from posttrain.losses import OBJECTIVES
from posttrain.losses.objective import TEACHER_TOPK
from posttrain.models import load_policy, load_tokenizer
from posttrain.runfolder import file_sha256, read_json_object
from posttrain.teacher_cache import FORMAT, MANIFEST, RENDER_KEYS, examples_sha256, vocab_sha256


def reads_cache(recipe: TrainRecipe) -> bool:
    return TEACHER_TOPK in OBJECTIVES[recipe.objective.name].needs(recipe.objective.params)


def check_recipe(recipe: TrainRecipe) -> None:
    name, folder = recipe.objective.name, recipe.data.teacher_cache
    if reads_cache(recipe) and folder is None:
        raise UserError(f": {name} trains on a teacher's top-K stored by `posttrain teacher-cache`; set it to that "
                        "folder", key="data.teacher_cache")
    if folder is not None and not reads_cache(recipe):
        raise UserError(f": {name} does not read a teacher cache, so it would be ignored; use objective kd_topk or "
                        "remove it", key="data.teacher_cache")
    if folder is not None and recipe.data.max_examples is not None:
        raise UserError(": the teacher cache holds every row of its data file; remove it (or cache a file of just "
                        "the rows to train on)", key="data.max_examples")


@dataclasses.dataclass
class TeacherCache:
    k: int  # the top-K width trained on (objective.k, else the cache's K)
    digest: str  # examples_sha256 of the examples the cache was scored on
    topk_ids: list[torch.Tensor]  # per example: [loss tokens, K] int32
    topk_logprob: list[torch.Tensor]  # per example: [loss tokens, K] float32

    def attach(self, examples: list) -> list:
        """The examples (as `posttrain train` built them) with the cache's values per response token."""
        if examples_sha256(examples) != self.digest:  # open_cache checked the same rendering already
            raise UserError(": the examples differ from those the cache was scored on", key="data.teacher_cache")
        return [dataclasses.replace(ex, per_token={"support_ids": ids[:, : self.k],
                                                   "support_teacher_logprob": logq[:, : self.k]})
                for ex, ids, logq in zip(examples, self.topk_ids, self.topk_logprob)]


def open_cache(recipe: TrainRecipe, rows: list[dict]) -> TeacherCache:
    """The cache of data.teacher_cache, checked against the recipe, the data file and the student."""
    folder = Path(recipe.data.teacher_cache)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f": {folder} is not a teacher cache (no {MANIFEST}); make one with `posttrain teacher-cache`",
                        key="data.teacher_cache")
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise UserError(f"is {manifest.get('format')!r}; this posttrain reads {FORMAT!r}", key="format", file=str(path))
    if manifest.get("complete") is not True:
        raise UserError("is false: the cache is unfinished; run the same `posttrain teacher-cache` command again "
                        "(it resumes)", key="complete", file=str(path))
    _check_data(recipe, manifest, path)
    _check_shards(folder, manifest, path)
    tokenizer = _student_tokenizer(recipe)
    if vocab_sha256(tokenizer) != manifest["teacher"]["vocab_sha256"]:
        raise UserError(f"differs from the student's vocabulary ({_model_name(recipe)}): the cache was made by "
                        f"{manifest['teacher']['path']} for another tokenizer; cache the data with a teacher that "
                        "shares the student's vocabulary", key="teacher.vocab_sha256", file=str(path))
    examples, _ = build_examples(rows, tokenizer, recipe.data)
    if examples_sha256(examples) != manifest["examples_sha256"]:
        raise UserError("differs from the examples the student's tokenizer makes of the data (same vocabulary, other "
                        "token ids: another chat template?); cache the data with the student's tokenizer and template",
                        key="examples_sha256", file=str(path))
    k = recipe.objective.params.k or manifest["k"]
    if k > manifest["k"]:
        raise UserError(f"({k}) is more than the cache's K ({manifest['k']}, {path})", key="objective.k")
    return TeacherCache(k=k, digest=manifest["examples_sha256"], **_load_shards(folder, manifest))


def _check_data(recipe: TrainRecipe, manifest: dict, path: Path) -> None:
    source = recipe.data.source
    if not Path(source).is_file():
        raise UserError(f": {source!r}; with data.teacher_cache it is the data file the cache was scored on "
                        f"({manifest['data']['path']})", key="data.source")
    if file_sha256(Path(source)) != manifest["data"]["sha256"]:
        raise UserError(f"is that of {manifest['data']['path']}, not of data.source {source} (sha256 differs): the "
                        "cache is of another data file; cache this one with `posttrain teacher-cache`",
                        key="data.sha256", file=str(path))
    for key in RENDER_KEYS:
        cached, wanted = manifest["data"].get(key), getattr(recipe.data, key)
        if cached != wanted:
            raise UserError(f"is {cached!r}, the recipe's data.{key} is {wanted!r}: the cache rendered the data "
                            "otherwise; set the recipe's to the cache's", key=f"data.{key}", file=str(path))


def _check_shards(folder: Path, manifest: dict, path: Path) -> None:
    for number, shard in enumerate(manifest["shards"]):
        file = folder / shard["file"]
        if not file.is_file() or file_sha256(file) != shard["sha256"]:
            state = "is missing" if not file.is_file() else "does not match it"
            raise UserError(f"({shard['sha256'][:16]}…): {file} {state}; the cache is damaged, make it again",
                            key=f"shards[{number}].sha256", file=str(path))


def _load_shards(folder: Path, manifest: dict) -> dict[str, list[torch.Tensor]]:
    """Per example, views into each shard's tensors (no copy)."""
    from safetensors.torch import load_file

    out = {"topk_ids": [], "topk_logprob": []}
    for shard in manifest["shards"]:
        values = load_file(str(folder / shard["file"]))
        sizes = values["loss_tokens"].tolist()
        for key in out:
            out[key].extend(values[key].split(sizes))
    return out


def _student_tokenizer(recipe: TrainRecipe):
    """The student's tokenizer only (a tiny model is built, it is small), before open_run loads it."""
    cfg = recipe.model
    if cfg.path is None:  # model.tiny (or neither: load_policy says which to set)
        return load_policy(cfg, "model", recipe.seed, "cpu")[1]
    return load_tokenizer(cfg.tokenizer or cfg.path)


def _model_name(recipe: TrainRecipe) -> str:
    return f"model.path {recipe.model.path}" if recipe.model.path else "model.tiny"
