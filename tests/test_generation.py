"""Generation backends: hf for real on a tiny model; vllm's request/response mapping against a
stand-in module that follows vLLM's documented API (vLLM cannot be installed here)."""

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import TinyModelConfig
from posttrain.data.sft import Example, collate, render_prompt
from posttrain.generation import SamplingSpec, make_backend, stop_token_ids
from posttrain.generation.hf import warp_logits
from posttrain.generation.vllm import VLLMBackend, VLLMTeacher
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.scoring import score_tokens


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer(320)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=64), len(tokenizer), seed=0)
    return model.eval(), tokenizer


def test_warp_logits_top_k_and_top_p():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(warp_logits(scores, SamplingSpec(top_k=2))[0, 2:]).all()
    kept = ~torch.isinf(warp_logits(scores, SamplingSpec(top_p=0.7))[0])
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7 ≤ 0.8: smallest set with mass ≥ p
    kept = ~torch.isinf(warp_logits(scores, SamplingSpec(top_p=0.5))[0])
    assert kept.tolist() == [True, False, False, False]
    tempered = warp_logits(scores, SamplingSpec(temperature=2.0))
    torch.testing.assert_close(tempered, scores / 2)


def test_hf_backend_samples_n_per_prompt_with_exact_logprobs(tiny):
    model, tokenizer = tiny
    backend = make_backend("hf", model=model, tokenizer=tokenizer)
    prompts = [render_prompt(tokenizer, "Compute 1 + 2.", None), render_prompt(tokenizer, "Compute 10 + 20 - 3.", None)]
    spec = SamplingSpec(n=3, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12, seed=5)
    out = backend.generate(prompts, spec)
    assert [len(samples) for samples in out] == [3, 3]
    assert out == backend.generate(prompts, spec)  # seeded
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # n different draws, not copies
    for prompt, samples in zip(prompts, out):
        for c in samples:
            assert c.finish_reason in ("stop", "length") and len(c.token_ids) == len(c.logprobs) <= 12
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in backend.stop_ids
            # the recorded log-probs are those of the warped distribution the token came from
            with torch.no_grad():
                logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
            expected = warp_logits(logits, spec).log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_stop_tokens_include_eos_and_end_of_turn(tiny):
    _, tokenizer = tiny
    vocab = tokenizer.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= set(stop_token_ids(tokenizer))


# --- a stand-in for the vllm module, following its documented API --------------------------


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list
    prompt_logprobs: list | None
    outputs: list = field(default_factory=list)


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class StandInLLM:
    """Runs a real tiny HF model behind vLLM's LLM interface."""

    instances = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.weight_loads, self.cache_resets = kwargs, [], 0, 0
        self.model = None
        StandInLLM.instances.append(self)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            worker=SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(load_weights=self._load))))))

    def _load(self, weights):
        self.loaded = dict(weights)
        self.weight_loads += 1

    def reset_prefix_cache(self):
        self.cache_resets += 1

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params))
        params = params if isinstance(params, list) else [params] * len(requests)
        outputs = []
        for i, (request, sp) in enumerate(zip(requests, params)):
            ids = request["prompt_token_ids"]
            prompt_lps = None
            if getattr(sp, "prompt_logprobs", None):
                with torch.no_grad():
                    logp = self.model(torch.tensor([ids])).logits[0].log_softmax(-1)
                prompt_lps = [None]
                for t in range(1, len(ids)):
                    row = logp[t - 1]
                    top = row.topk(sp.prompt_logprobs)
                    entry = {int(tok): Logprob(float(lp), rank + 1) for rank, (lp, tok) in enumerate(zip(top.values, top.indices))}
                    if ids[t] not in entry:
                        entry[ids[t]] = Logprob(float(row[ids[t]]), int((row > row[ids[t]]).sum()) + 1)
                    prompt_lps.append(entry)
            samples = []
            seed = getattr(sp, "seed", None) or 0
            for j in range(getattr(sp, "n", 1)):
                tokens = [(seed + j) % 7 + 3, 2] if j % 2 == 0 else [(seed + j) % 5 + 3] * sp.max_tokens
                lps = [{tok: Logprob(-0.5 - k, 1)} for k, tok in enumerate(tokens)]
                samples.append(CompletionOutput(j, f"sample{j}", tokens, None, lps, "stop" if j % 2 == 0 else "length"))
            outputs.append(RequestOutput(str(i), ids, prompt_lps, samples))
        return outputs


STAND_IN = SimpleNamespace(LLM=StandInLLM, SamplingParams=SamplingParams)


def test_vllm_backend_maps_requests_and_responses(tiny):
    _, tokenizer = tiny
    backend = VLLMBackend("/models/student", tokenizer, seed=3, vllm_module=STAND_IN)
    llm = backend.llm
    assert llm.kwargs["model"] == "/models/student" and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    spec = SamplingSpec(n=2, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=4, seed=10)
    out = backend.generate([[5, 6, 7], [8, 9]], spec)
    requests, params = llm.calls[-1]
    assert requests == [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}]
    assert [p.seed for p in params] == [10, 11]  # one seed per prompt, n samples inside it
    assert all(p.n == 2 and p.top_k == -1 and p.logprobs == 0 and p.max_tokens == 4 for p in params)
    assert params[0].stop_token_ids == stop_token_ids(tokenizer) and params[0].temperature == 0.7
    first, second = out[0]
    assert first.finish_reason == "stop" and first.token_ids[-1] == 2 and first.logprobs == [-0.5, -1.5]
    assert second.finish_reason == "length" and len(second.token_ids) == 4 and second.text == "sample1"


def test_vllm_backend_pushes_weights_in_place(tiny):
    model, tokenizer = tiny
    backend = VLLMBackend("/models/student", tokenizer, vllm_module=STAND_IN)
    backend.update_weights(model)
    assert backend.llm.weight_loads == 1 and backend.llm.cache_resets == 1
    assert set(backend.llm.loaded) == set(model.state_dict())


def test_vllm_receives_merged_weights_from_a_lora_student(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    student = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)  # a non-zero update to merge
    backend = VLLMBackend("/models/student", tokenizer, vllm_module=STAND_IN)
    backend.update_weights(student)
    loaded, expected = backend.llm.loaded, copy.deepcopy(student).merge_and_unload().state_dict()
    assert set(loaded) == set(expected)
    for name in expected:
        torch.testing.assert_close(loaded[name], expected[name])


def test_vllm_teacher_scores_like_the_local_teacher(tiny):
    model, tokenizer = tiny
    teacher = VLLMTeacher("/models/teacher", k=5, vllm_module=STAND_IN)
    teacher.llm.model = model
    assert teacher.llm.kwargs["max_logprobs"] == 5
    prompt = render_prompt(tokenizer, "Compute 1 + 2.", None)
    examples = [Example(prompt + [40, 41, 42, 2], len(prompt)), Example(prompt[:-2] + [50, 2], len(prompt) - 2)]
    batch = collate(examples, tokenizer.pad_token_id)
    remote = teacher.score(batch)
    local = score_tokens(model, batch, k=5)
    mask = batch["loss_mask"]
    torch.testing.assert_close(remote["token_logprob"][mask], local["token_logprob"][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote["topk_logprob"][mask], local["topk_logprob"][mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(remote["topk_ids"][mask], local["topk_ids"][mask])
