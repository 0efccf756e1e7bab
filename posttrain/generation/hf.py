"""The transformers backend: batched sampling with left padding and a KV cache, in our own decode
loop over the model's forward (prefill, then one token per step).

The loop does what transformers' `generate` does for sampling, op for op (the same position ids,
cache, softmax and torch.multinomial on the same generator state, finished rows fed the pad id), so
its tokens are the ones `generate` draws from the same seed (tests/test_generation.py checks this
against `generate`); it skips `generate`'s per-token machinery (logits-processor lists, stopping
criteria objects, input preparation), a tenth of a rollout's time on small models. A model
with its own input preparation (Mamba, Phi-3) samples through `generate` (own_loop_fits). On CPU
the two agree bit for bit; on a GPU, `generate` switches MoE experts to another kernel for
decoding, so an MoE model's tokens may differ from `generate`'s there (not their distribution). Sampling
(temperature, top-k, top-p) is `warp_logits`, and each sampled token's log-probability under the
distribution it was drawn from is recorded as it is drawn; one [rows, V] row of log-probs at a time.
"""

from __future__ import annotations

import inspect

import torch

from posttrain.generation.spec import Completion, SamplingSpec, stop_token_ids


def warp_logits(scores_BV: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the smallest set with mass ≥ p), as vLLM does."""
    scores = scores_BV.float()
    if spec.temperature > 0 and spec.temperature != 1.0:  # x / 1.0 is x: skipped, not computed
        scores = scores / spec.temperature
    if spec.top_k and spec.top_k < scores.shape[-1]:
        kth = scores.topk(spec.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= spec.top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def drawn_from(scores_BV: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """The fp32 scores a token is drawn (or, greedy, picked) from: warped when sampling, raw when greedy."""
    return warp_logits(scores_BV, spec) if spec.temperature > 0 else scores_BV.float()


@torch.no_grad()
def sample_tokens(model, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, spec: SamplingSpec,
                  stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens [B, steps], their log-probs [B, steps]) for left-padded prompts; a row that has
    sampled a stop token is fed `pad_id` afterwards (as `generate` does), and the loop ends when
    every row has stopped or after spec.max_new_tokens. Draws from torch's global generator."""
    from transformers import DynamicCache

    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    # transformers' position ids for left padding: the count of real tokens before, 0 on the padding
    position_ids_BL = (attention_mask_BL.cumsum(-1) - 1).masked_fill(attention_mask_BL == 0, 0)
    stops = torch.tensor(stop_ids, device=input_ids_BL.device)
    unfinished_B = torch.ones(input_ids_BL.shape[0], dtype=torch.bool, device=input_ids_BL.device)
    tokens, logprobs = [], []
    logits_B1V = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=position_ids_BL,
                       use_cache=True, logits_to_keep=1, **{cache_key: cache}).logits
    for _ in range(spec.max_new_tokens):
        scores_BV = drawn_from(logits_B1V[:, -1, :], spec)
        if spec.temperature > 0:
            next_B = torch.multinomial(scores_BV.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            next_B = scores_BV.argmax(dim=-1)
        next_B = torch.where(unfinished_B, next_B, pad_id)
        tokens.append(next_B)
        logprobs.append(scores_BV.log_softmax(dim=-1).gather(1, next_B[:, None]).squeeze(1))
        unfinished_B &= ~torch.isin(next_B, stops)
        if not unfinished_B.any():
            break
        attention_mask_BL = torch.cat([attention_mask_BL, attention_mask_BL.new_ones(attention_mask_BL.shape[0], 1)], 1)
        position_ids_BL = position_ids_BL[:, -1:] + 1
        logits_B1V = model(input_ids=next_B[:, None], attention_mask=attention_mask_BL, position_ids=position_ids_BL,
                           use_cache=True, **{cache_key: cache}).logits
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


def own_loop_fits(model) -> bool:
    """Our loop feeds the model what `generate` feeds a model that keeps transformers' default
    input preparation (Qwen2, Llama, GPT-2, Gemma, …); a model that overrides it (Mamba's state
    cache, Phi-3's LongRoPE cache reset) samples through `generate` itself."""
    from transformers.generation.utils import GenerationMixin

    return type(model).prepare_inputs_for_generation is GenerationMixin.prepare_inputs_for_generation


class _SampleAndRecord:
    """For `generate`: a LogitsProcessor, placed last (transformers' own warpers switched off), that
    warps the scores as warp_logits does and records each sampled token's log-prob."""

    def __init__(self, spec: SamplingSpec):
        self.spec = spec
        self.previous_logprobs_BV = None
        self.chosen = []  # per step: [rows] log-prob of the token sampled at that step

    def __call__(self, input_ids_BL, scores_BV):
        if self.previous_logprobs_BV is not None:
            self.chosen.append(self.previous_logprobs_BV.gather(1, input_ids_BL[:, -1:]).squeeze(1))
        warped = drawn_from(scores_BV, self.spec)
        self.previous_logprobs_BV = warped.log_softmax(dim=-1)
        return warped

    def finish(self, last_tokens_B):
        if self.previous_logprobs_BV is not None:
            self.chosen.append(self.previous_logprobs_BV.gather(1, last_tokens_B[:, None]).squeeze(1))
        return torch.stack(self.chosen, dim=1) if self.chosen else None


@torch.no_grad()
def sample_with_generate(model, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, spec: SamplingSpec,
                         stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_tokens through transformers' `generate` (rows already repeated per sample)."""
    from transformers import GenerationConfig, LogitsProcessorList

    recorder = _SampleAndRecord(spec)
    config = GenerationConfig(
        do_sample=spec.temperature > 0, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
        max_new_tokens=spec.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
        return_dict_in_generate=True,
    )
    out = model.generate(input_ids=input_ids_BL, attention_mask=attention_mask_BL, generation_config=config,
                         logits_processor=LogitsProcessorList([recorder]))
    new_tokens = out.sequences[:, input_ids_BL.shape[1] :]
    logprobs = recorder.finish(out.sequences[:, -1])
    return new_tokens, logprobs if logprobs is not None else torch.zeros(new_tokens.shape)


class HFBackend:
    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)

    def update_weights(self, model) -> None:
        self.model = model  # samples come from the training module itself

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
        results = []
        per_call = max(1, self.batch_size // spec.n)
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            results.extend(self._generate_chunk(chunk, spec, seed=spec.seed + start))
        return results

    def _generate_chunk(self, prompts, spec, seed):
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        copies = 1 if spec.temperature == 0 else spec.n  # greedy: one sample per prompt, copied below
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            sample = sample_tokens if own_loop_fits(self.model) else sample_with_generate
            new_tokens, logprobs = sample(
                self.model, input_ids.repeat_interleave(copies, dim=0).to(device),
                attention_mask.repeat_interleave(copies, dim=0).to(device), spec, self.stop_ids, pad_id)
        self.model.train(was_training)
        completions = self._completions(new_tokens.cpu(), logprobs.cpu())
        return [completions[i * copies : (i + 1) * copies] * (spec.n // copies) for i in range(len(prompts))]

    def _completions(self, tokens_BS, logprobs_BS) -> list[Completion]:
        """Each row cut after its first stop token ("stop"), or whole ("length"); texts decoded in one call."""
        rows, finishes = [], []
        for ids in tokens_BS.tolist():
            stop = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
            rows.append(ids if stop is None else ids[: stop + 1])
            finishes.append("length" if stop is None else "stop")
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [Completion(token_ids=ids, logprobs=logprobs_BS[i, : len(ids)].tolist(), finish_reason=finish, text=text)
                for i, (ids, finish, text) in enumerate(zip(rows, finishes, texts))]
