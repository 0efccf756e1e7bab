"""The hf generation backend on a tiny model. (The vllm backend is tested against real vLLM in
tests/test_vllm.py, `make test-vllm`.)"""

import pytest
import torch

from posttrain.config import TinyModelConfig
from posttrain.data.sft import render_prompt
from posttrain.generation import SamplingSpec, make_backend, stop_token_ids
from posttrain.generation.hf import warp_logits
from posttrain.models import build_tiny_model, build_tiny_tokenizer


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


def test_hf_greedy_returns_n_copies_with_untempered_logprobs(tiny):
    model, tokenizer = tiny
    backend = make_backend("hf", model=model, tokenizer=tokenizer)
    prompt = render_prompt(tokenizer, "Compute 1 + 2.", None)
    samples = backend.generate([prompt], SamplingSpec(n=3, temperature=0, max_new_tokens=8))[0]
    assert len(samples) == 3 and samples[0] == samples[1] == samples[2]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + samples[0].token_ids])).logits[0, len(prompt) - 1 : -1]
    assert samples[0].token_ids == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1).max(-1).values
    torch.testing.assert_close(torch.tensor(samples[0].logprobs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec, one_stops_early", [(SamplingSpec(n=4, temperature=1.0, max_new_tokens=16, seed=3), True),
                                                   (SamplingSpec(n=3, temperature=0.7, top_k=20, max_new_tokens=12, seed=8), False),
                                                   (SamplingSpec(n=2, temperature=0, max_new_tokens=10), False)])
def test_hf_backend_draws_what_transformers_generate_draws(tiny, spec, one_stops_early):
    """The backend's own decode loop against `generate` from the same seed: the same tokens, prompts
    of different lengths (left padding), rows that stop early (fed the pad id), greedy and sampled."""
    model, tokenizer = tiny
    backend = make_backend("hf", model=model, tokenizer=tokenizer)
    prompts = [render_prompt(tokenizer, "Compute 1 + 2.", None), render_prompt(tokenizer, "Compute 10 + 20 - 3 * 4.", None)]
    ours = [c.token_ids for samples in backend.generate(prompts, spec) for c in samples]
    width, copies = max(map(len, prompts)), spec.n if spec.temperature > 0 else 1
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    sampling = {"do_sample": True, "temperature": spec.temperature, "top_k": spec.top_k, "top_p": 1.0} \
        if spec.temperature > 0 else {"do_sample": False}
    torch.manual_seed(spec.seed)
    with torch.no_grad():
        sequences = model.generate(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(),
                                   max_new_tokens=spec.max_new_tokens, num_return_sequences=copies,
                                   eos_token_id=backend.stop_ids, pad_token_id=tokenizer.pad_token_id, **sampling)
    theirs = []
    for row in sequences[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in backend.stop_ids), None)
        theirs.append(row if stop is None else row[: stop + 1])
    expected = [theirs[i * copies + (j % copies)] for i in range(len(prompts)) for j in range(spec.n)]
    assert ours == expected
    if one_stops_early:  # this seed has a row that stops at once while the others run on (fed the pad id)
        assert any(len(t) < spec.max_new_tokens for t in ours)


def test_a_model_with_its_own_input_preparation_samples_through_generate(tiny):
    """Mamba keeps a state cache that our loop's attention-mask feeding would break: it goes through
    `generate`, and its recorded log-probs are still those of a full forward over the sample."""
    from transformers import MambaConfig, MambaForCausalLM

    from posttrain.generation.hf import own_loop_fits

    _, tokenizer = tiny
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         state_size=8, pad_token_id=tokenizer.pad_token_id)).eval()
    assert not own_loop_fits(model) and own_loop_fits(tiny[0])
    backend = make_backend("hf", model=model, tokenizer=tokenizer)
    prompts = [render_prompt(tokenizer, "Compute 1 + 2.", None), render_prompt(tokenizer, "Compute 10 + 20 - 3.", None)]
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=8, seed=1)
    for prompt, samples in zip(prompts, backend.generate(prompts, spec)):
        for c in samples:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
            expected = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", [SamplingSpec(n=3, temperature=1.0, max_new_tokens=16, seed=3),
                                  SamplingSpec(n=2, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=12, seed=8),
                                  SamplingSpec(n=1, temperature=0, max_new_tokens=10)])
def test_the_own_loop_and_generate_agree_bit_for_bit(tiny, spec):
    """Tokens and recorded log-probs of sample_tokens equal those of sample_with_generate (transformers'
    `generate` with our recording processor) from the same seed, exactly, on left-padded prompts."""
    from posttrain.generation.hf import sample_tokens, sample_with_generate

    model, tokenizer = tiny
    backend = make_backend("hf", model=model, tokenizer=tokenizer)
    prompts = [render_prompt(tokenizer, "Compute 1 + 2.", None), render_prompt(tokenizer, "Compute 10 + 20 - 3 * 4.", None)]
    width, pad = max(map(len, prompts)), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts]).repeat_interleave(spec.n, dim=0)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(spec.n, dim=0)
    results = []
    for sample in (sample_tokens, sample_with_generate):
        torch.manual_seed(spec.seed)
        results.append(sample(model, input_ids, mask, spec, backend.stop_ids, pad))
    (ours_tokens, ours_logprobs), (their_tokens, their_logprobs) = results
    assert torch.equal(ours_tokens, their_tokens) and torch.equal(ours_logprobs, their_logprobs)
