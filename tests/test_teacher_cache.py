"""`posttrain teacher-cache` and training from it (teacher_cache.py, teacher_cache_reader.py,
losses/kd_topk.py): the cache holds what a direct teacher pass computes, training from it equals
training with the teacher live, an interrupted run resumes, and a cache that does not belong to
the student, its data or its own manifest is refused in one line, nothing written."""

import dataclasses
import json
import shutil

import pytest
import torch

from posttrain.config import DataConfig, TrainRecipe, from_dict
from posttrain.data.sft import build_examples, collate, load_rows
from posttrain.errors import UserError
from posttrain.losses import OBJECTIVES, forward_kl, jsd, kd_topk
from posttrain.losses.objective import TokenSignals
from posttrain.models import load_policy
from posttrain.config import ModelConfig
from posttrain.policy import PolicyLoss
from posttrain.runfolder import file_sha256
from posttrain import teacher_cache
from posttrain.teacher_cache import MANIFEST, write_teacher_cache
from posttrain.teacher_cache_reader import open_cache
from posttrain.scoring import score_pair
from posttrain.train import train
from tests.helpers import TINY, metrics_of, run_cli, write_recipe

K = 8


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from posttrain.data import synthetic

    path = tmp_path_factory.mktemp("data") / "demos.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic.make_rows("in_domain", 24, 7)))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, models, data_file):  # noqa: F811
    """The cache made by the real command: small shards, so that it has several."""
    out = tmp_path_factory.mktemp("cache") / "c"
    proc = run_cli("teacher-cache", "--teacher", str(models[0]), "--data", str(data_file), "--k", str(K),
                   "--out", str(out), "--shard-tokens", "150", "--batch-size", "3", "--max-length", "96")
    return out, proc.stderr


def kd_recipe(tmp_path, models, data_file, cache_dir, objective=None, **data):  # noqa: F811
    return {"name": "kd", "out_dir": str(tmp_path / "runs"), "model": {"path": str(models[1])},
            "data": {"source": str(data_file), "teacher_cache": str(cache_dir), "max_length": 96, **data},
            "objective": objective or {"name": "kd_topk"}, "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "micro_batch_size": 4}}


def test_the_cache_holds_what_the_teacher_computes(cache, models, data_file):  # noqa: F811
    out, stderr = cache
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["k"] == K and len(manifest["shards"]) >= 3
    assert manifest["bytes_per_token"] == 8 * K + 4 and "68 bytes" in stderr  # sized up front
    assert manifest["data"]["sha256"] == file_sha256(data_file) and manifest["data"]["rows"] == 24
    from safetensors.torch import load_file

    shards = [load_file(str(out / s["file"])) for s in manifest["shards"]]
    assert all(file_sha256(out / s["file"]) == s["sha256"] for s in manifest["shards"])
    ids = torch.cat([s["topk_ids"] for s in shards])
    logq = torch.cat([s["topk_logprob"] for s in shards])
    token = torch.cat([s["token_logprob"] for s in shards])
    assert ids.dtype == torch.int32 and logq.dtype == torch.float32 and ids.shape == (manifest["tokens"], K)
    # a direct pass: all examples in one batch, the teacher's full log-softmax at every response token
    teacher, tokenizer = load_policy(ModelConfig(path=str(models[0])), "teacher", 0, "cpu")
    rows = load_rows(str(data_file), "train", None, None, "data")
    examples, _ = build_examples(rows, tokenizer, DataConfig(source=str(data_file), max_length=96))
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logp = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    logp_NV = logp[batch["loss_mask"]]
    torch.testing.assert_close(logq, logp_NV.gather(1, ids.long()), rtol=0, atol=2e-5)
    torch.testing.assert_close(token, logp_NV.gather(1, batch["target_ids"][batch["loss_mask"]][:, None])[:, 0],
                               rtol=0, atol=2e-5)
    kth_largest = logp_NV.topk(K + 1, dim=-1).values
    assert (logq[:, -1] >= kth_largest[:, K - 1] - 2e-5).all() and (logq[:, :-1] >= logq[:, 1:]).all()  # top-K, sorted


def test_training_from_the_cache_equals_training_with_the_teacher_live(tmp_path, cache, models, data_file):  # noqa: F811
    for live_name, params in (("forward_kl", kd_topk.Params()), ("jsd", kd_topk.Params(beta=0.5)),
                              ("jsd", kd_topk.Params(beta=0.5, renormalize=False))):
        recipe = from_dict(TrainRecipe, kd_recipe(tmp_path, models, data_file, cache[0],
                                                  {"name": "kd_topk", **dataclasses.asdict(params)}), "test")
        rows = load_rows(str(data_file), "train", None, None, "data")
        cached = open_cache(recipe, rows)
        student, tokenizer = load_policy(ModelConfig(path=str(models[1])), "model", 0, "cpu")
        teacher, _ = load_policy(ModelConfig(path=str(models[0])), "teacher", 0, "cpu")
        examples, _ = build_examples(rows, tokenizer, recipe.data)
        group = examples[3:11]  # one micro-batch, not aligned with the cache's shards or batches
        from_cache = collate(cached.attach(examples)[3:11], tokenizer.pad_token_id)
        live = collate(group, tokenizer.pad_token_id)
        signals = TokenSignals(group_B=torch.arange(len(group)), **score_pair(student, teacher, live, k=K))
        live_params = (forward_kl.Params(k=K) if live_name == "forward_kl"
                       else jsd.Params(k=K, beta=params.beta, renormalize=params.renormalize))
        live.update(OBJECTIVES[live_name].prepare(live_params, live, signals))
        results = []
        for objective, p, batch in ((OBJECTIVES["kd_topk"], params, from_cache), (OBJECTIVES[live_name], live_params, live)):
            student.zero_grad()
            loss = PolicyLoss(student, objective, p)(batch)
            loss.backward()
            results.append((loss.detach(), [q.grad.clone() for q in student.parameters()]))
        (loss_cache, grads_cache), (loss_live, grads_live) = results
        assert loss_cache.item() > 0
        torch.testing.assert_close(loss_cache, loss_live, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_cache, grads_live):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_train_from_the_cache_through_the_cli(tmp_path, cache, models, data_file):  # noqa: F811
    recipe = kd_recipe(tmp_path, models, data_file, cache[0], {"name": "kd_topk", "k": 4, "beta": 0.0})
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    rows = metrics_of(tmp_path / "runs" / "kd")
    assert len(rows) == 2 and all(r["loss"] > 0 and not r["skipped"] for r in rows)
    assert 0 < rows[0]["teacher_mass"] <= 1  # of the first 4 of the cached 8


def test_an_interrupted_cache_resumes_after_its_last_listed_shard(tmp_path, cache, models, data_file, monkeypatch):  # noqa: F811
    # interrupted at the worst moment: shard 1 renamed into place, the manifest not yet listing it
    out, calls = tmp_path / "c", []
    real = teacher_cache._write_manifest

    def interrupted(folder, manifest):
        calls.append(len(manifest["shards"]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(folder, manifest)

    monkeypatch.setattr(teacher_cache, "_write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(str(models[0]), data_file, K, out, data_cfg=DataConfig(max_length=96), batch_size=3,
                            shard_tokens=150)
    partial = json.loads((out / MANIFEST).read_text())
    assert not partial["complete"] and len(partial["shards"]) == 1 and (out / "shard-00001.safetensors").exists()
    monkeypatch.setattr(teacher_cache, "_write_manifest", real)
    proc = run_cli("teacher-cache", "--teacher", str(models[0]), "--data", str(data_file), "--k", str(K),
                   "--out", str(out), "--shard-tokens", "150", "--batch-size", "3", "--max-length", "96")
    assert "resuming after shard 0" in proc.stderr
    resumed, clean = (json.loads((folder / MANIFEST).read_text()) for folder in (out, cache[0]))
    assert resumed["complete"] and resumed["shards"] == clean["shards"]  # the same bytes as an uninterrupted run
    with pytest.raises(UserError, match="key 'k'"):  # the same --out for another K
        write_teacher_cache(str(models[0]), data_file, 4, out, data_cfg=DataConfig(max_length=96), shard_tokens=150)


def refused(tmp_path, recipe) -> str:
    with pytest.raises(UserError) as err:
        train(from_dict(TrainRecipe, recipe, "recipe.yaml"))
    assert not (tmp_path / "runs").exists()  # nothing written
    return str(err.value)


def test_refusals(tmp_path, cache, models, data_file):  # noqa: F811
    manifest = str(cache[0] / MANIFEST)
    # a student with another vocabulary
    other = kd_recipe(tmp_path, models, data_file, cache[0])
    other["model"] = {"tiny": {**TINY, "vocab_size": 300}}
    message = refused(tmp_path, other)
    assert message.startswith(f"{manifest}: key 'teacher.vocab_sha256'") and "\n" not in message
    # another data file
    moved = tmp_path / "other.jsonl"
    moved.write_text(data_file.read_text().replace("Compute", "Work out"))
    message = refused(tmp_path, {**kd_recipe(tmp_path, models, moved, cache[0])})
    assert message.startswith(f"{manifest}: key 'data.sha256'") and str(moved) in message
    # the data rendered otherwise
    assert f"{manifest}: key 'data.max_length'" in refused(tmp_path, kd_recipe(tmp_path, models, data_file, cache[0],
                                                                                   max_length=64))
    # a shard whose bytes are not the manifest's
    damaged = tmp_path / "damaged"
    shutil.copytree(cache[0], damaged)
    shard = damaged / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    message = refused(tmp_path, kd_recipe(tmp_path, models, data_file, damaged))
    assert message.startswith(f"{damaged / MANIFEST}: key 'shards[1].sha256'") and str(shard) in message
    # the recipe: kd_topk needs a cache, a cache needs kd_topk, objective.k at most the cache's K
    no_cache = kd_recipe(tmp_path, models, data_file, cache[0])
    del no_cache["data"]["teacher_cache"]
    assert "key 'data.teacher_cache'" in refused(tmp_path, no_cache)
    assert "key 'data.teacher_cache'" in refused(tmp_path, kd_recipe(tmp_path, models, data_file, cache[0], {"name": "sft"}))
    assert "key 'objective.k'" in refused(tmp_path, kd_recipe(tmp_path, models, data_file, cache[0],
                                                              {"name": "kd_topk", "k": K + 1}))


def test_the_cli_refuses_in_one_line_with_exit_2(tmp_path, cache, models, data_file):  # noqa: F811
    moved = tmp_path / "other.jsonl"
    moved.write_text("".join(data_file.read_text().splitlines(keepends=True)[:12]))  # the first half of the rows
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, kd_recipe(tmp_path, models, moved, cache[0]))),
                   check=False)
    assert proc.returncode == 2 and not (tmp_path / "runs").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{cache[0] / MANIFEST}: key 'data.sha256'" in lines[0]


def test_a_bad_field_flag_is_named_as_the_flag(tmp_path, models, data_file):  # noqa: F811
    out = tmp_path / "never"
    proc = run_cli("teacher-cache", "--teacher", str(models[0]), "--data", str(data_file), "--k", str(K),
                   "--out", str(out), "--prompt-field", "question", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and not out.exists()
    assert lines[0].startswith(f"error: --data {data_file}: --prompt-field 'question': the data has no field 'question'")
    assert "key '" not in lines[0]  # the command has no recipe
