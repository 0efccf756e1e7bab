"""The transformers backend: batched `generate` with left padding and a KV cache.

Sampling (temperature, top-k, top-p) is done by one logits processor of ours, placed last, that
also records the log-probability of each sampled token under the distribution it was drawn
from. (transformers puts user processors before its own warpers, so its warpers are switched off
and ours does their job.) Only one [rows, V] row of log-probs is kept at a time.
"""

from __future__ import annotations

import torch

from posttrain.generation.spec import Completion, SamplingSpec, stop_token_ids


def warp_logits(scores_BV: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the smallest set with mass ≥ p), as vLLM does."""
    scores = scores_BV.float() / spec.temperature if spec.temperature > 0 else scores_BV.float()
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


class _SampleAndRecord:
    """A LogitsProcessor: warps the scores and records sampled tokens' log-probs."""

    def __init__(self, spec: SamplingSpec):
        self.spec = spec
        self.previous_logprobs_BV = None
        self.chosen = []  # per step: [rows] log-prob of the token sampled at that step

    def __call__(self, input_ids_BL, scores_BV):
        if self.previous_logprobs_BV is not None:
            self.chosen.append(self.previous_logprobs_BV.gather(1, input_ids_BL[:, -1:]).squeeze(1))
        warped = warp_logits(scores_BV, self.spec) if self.spec.temperature > 0 else scores_BV.float()
        self.previous_logprobs_BV = warped.log_softmax(dim=-1)
        return warped

    def finish(self, last_tokens_B):
        if self.previous_logprobs_BV is not None:
            self.chosen.append(self.previous_logprobs_BV.gather(1, last_tokens_B[:, None]).squeeze(1))
        return torch.stack(self.chosen, dim=1) if self.chosen else None


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
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        recorder = _SampleAndRecord(spec)
        greedy = spec.temperature == 0
        copies = 1 if greedy else spec.n  # transformers refuses n > 1 greedy returns: copied below
        config = GenerationConfig(
            do_sample=not greedy, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
            max_new_tokens=spec.max_new_tokens, num_return_sequences=copies, eos_token_id=self.stop_ids,
            pad_token_id=pad_id, use_cache=True, return_dict_in_generate=True,
        )
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
            )
        self.model.train(was_training)
        new_tokens = out.sequences[:, width:].cpu()
        logprobs = recorder.finish(out.sequences[:, -1])
        logprobs = logprobs.cpu() if logprobs is not None else torch.zeros(new_tokens.shape)
        completions = [self._completion(new_tokens[i], logprobs[i], spec) for i in range(new_tokens.shape[0])]
        return [completions[i * copies : (i + 1) * copies] * (spec.n // copies) for i in range(len(prompts))]

    def _completion(self, tokens, logprobs, spec) -> Completion:
        ids = tokens.tolist()
        stops = [i for i, t in enumerate(ids) if t in self.stop_ids]
        if stops:
            ids, finish = ids[: stops[0] + 1], "stop"
        else:
            finish = "length"
        return Completion(token_ids=ids, logprobs=logprobs[: len(ids)].tolist(), finish_reason=finish,
                          text=self.tokenizer.decode(ids, skip_special_tokens=True))
