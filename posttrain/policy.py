"""The one forward path from a batch to an objective's loss: body → masked hidden → chunked head.

`PolicyLoss` is an nn.Module so that DDP (accelerate) or FSDP2 (torch's fully_shard, scale.py)
wrap it as the root: the LM-head weight is then used inside the wrapped forward, where FSDP2 has
unsharded it. The head engine's settings (objective, params, chunk size, matmul dtype, scoring
temperature) are bound once, when a loop builds it; each call passes only what changes per
micro-batch (the batch, the random generator, the stats to fill).
"""

from __future__ import annotations

import torch

from posttrain.losses import head_loss
from posttrain.losses.engine import LOSS_WEIGHT, head_token_logprob
from posttrain.losses.engine import head_probe
from posttrain.models import decoder_and_head

NOT_PER_TOKEN = ("input_ids", "attention_mask", "loss_mask", "position_ids")
IMPORTANCE_WEIGHT = "importance_weight"  # [B, T]: rollout.importance_cap's min(π_old / π_rollout, C)


class PolicyLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, objective, params, *, chunk_tokens: int | None = None,
                 matmul_dtype: torch.dtype | None = None, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.objective, self.params = objective, params
        self.chunk_tokens = chunk_tokens  # tokens per LM-head chunk (None: from the engine's buffer budget)
        self.matmul_dtype = matmul_dtype  # dtype of the head matmuls (None: the weight's)
        self.temperature = temperature  # ≠ 1: the student is scored at logits / temperature

    def forward(self, batch, *, generator=None, stats=None):
        """Σ_t w_t ℓ_t over the batch's loss positions (B×T tensors; loss_mask picks positions,
        batch["loss_weight"] holds the aggregation weights w_t). temperature ≠ 1 scores the
        student at logits / temperature (dividing h divides h Wᵀ, and autograd carries the 1/T)."""
        temperature = self.temperature
        decoder, weight_VH = decoder_and_head(self.model)
        # A packed batch (data/packing.py) has position ids restarting per example and no attention
        # mask: transformers then attends block-diagonally, one example at a time. It reads the
        # boundaries off the position ids only without a KV cache, hence use_cache=False.
        if "position_ids" in batch:
            hidden_BTH = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 use_cache=False).last_hidden_state
        else:
            hidden_BTH = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask_BT = batch["loss_mask"]
        inputs = {k: v[mask_BT] for k, v in batch.items() if k not in NOT_PER_TOKEN}
        hidden_NH = hidden_BTH[mask_BT] if temperature == 1.0 else hidden_BTH[mask_BT] / temperature
        if self.objective.current_policy is not None:
            inputs.update(self.current_policy_inputs(hidden_NH, weight_VH, batch))
        if IMPORTANCE_WEIGHT in inputs:  # truncated IS (rl_shaping.py): a per-token factor on any objective's loss
            weight_N = inputs.pop(IMPORTANCE_WEIGHT)
            inputs[LOSS_WEIGHT] = weight_N * inputs[LOSS_WEIGHT] if LOSS_WEIGHT in inputs else weight_N
        return head_loss(
            hidden_NH, weight_VH, self.objective, self.params, inputs,
            chunk_tokens=self.chunk_tokens, generator=generator, matmul_dtype=self.matmul_dtype, stats=stats,
        )

    def current_policy_inputs(self, hidden_NH, weight_VH, batch) -> dict[str, torch.Tensor]:
        """The objective's per-token inputs that read the current policy (Objective.current_policy):
        log π_θ(y_t) at the loss positions from a no-grad head pass on the detached hidden states
        (no second body pass), scattered to [B, T], handed to the objective, gathered back to [N]."""
        mask_BT = batch["loss_mask"]
        logprob_N = head_token_logprob(hidden_NH.detach(), weight_VH, batch["target_ids"][mask_BT],
                                       chunk_tokens=self.chunk_tokens, matmul_dtype=self.matmul_dtype)
        logprob_BT = logprob_N.new_zeros(mask_BT.shape)
        logprob_BT[mask_BT] = logprob_N
        if self.objective.current_policy_probe is not None:  # values of π_θ's whole distribution (tdpo)
            inputs_N = {k: v[mask_BT] for k, v in batch.items() if k not in NOT_PER_TOKEN}
            probes_N = head_probe(hidden_NH.detach(), weight_VH, self.objective.current_policy_probe, self.params,
                                  inputs_N, chunk_tokens=self.chunk_tokens, matmul_dtype=self.matmul_dtype)
            batch = {**batch, **{key: value_N.new_zeros(mask_BT.shape).masked_scatter_(mask_BT, value_N)
                                 for key, value_N in probes_N.items()}}
        extra_BT = self.objective.current_policy(self.params, logprob_BT, batch)
        return {key: value[mask_BT] for key, value in extra_BT.items()}
