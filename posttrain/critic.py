"""The value model (critic) of an objective that declares VALUE (ppo), as verl's critic is built:

  - the student's architecture initialised from the student's starting weights (recipe.student;
    verl's critic.model.path is by default its actor's), its LM head replaced by a scalar head
    V(s_t) = w·h_t + b on the final hidden state of the position that predicts response token t
    (verl's values[:, -response_length - 1 : -1]); w ~ N(0, initializer_range), b = 0, drawn
    from the run seed, as transformers initialises a token-classification head;
  - V_old for the whole rollout batch without gradient (signals.fetch_signals), under the same
    autocast as its training forward, so the first update of a step starts at V = V_old;
  - trained on the same rows as each PPO mini-batch, with the same micro-batches and loss
    aggregation as the policy (verl's critic takes its actor's ppo_mini_batch_size, ppo_epochs
    and loss_agg_mode), one AdamW step per mini-batch: the recipe's `optim` at critic.lr, on the
    clipped value loss of losses/value.py;
  - saved in every checkpoint as critic.pt (weights, optimizer, schedule) and restored from it
    on --resume.

A separate model rather than a value head on the policy's body (verl, OpenRLHF and TRL's PPO
all keep it separate for LLMs): a shared body would let the value regression move the policy's
own representations, so the PPO ratio π_θ/π_old would drift from updates that are not the
policy's, and the two losses would need a weighting coefficient to tune; the policy also stays a
plain causal LM that checkpoints, evaluates and syncs into vLLM unchanged. The cost is a second
trained model's weights, gradients and AdamW state in memory.
May import: config, losses, models, optim, runfolder, runtime, scale, loop, errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.config import RLRecipe
from posttrain.errors import UserError
from posttrain.loop import accumulate_gradients, optimizer_step
from posttrain.losses.value import clipped_value_loss
from posttrain.models import load_policy
from posttrain.optim import build_optimizer, build_scheduler
from posttrain.runfolder import restore_optimizer
from posttrain.runtime import Runtime
from posttrain.scale import blocks_of, gathered, shard_fsdp2

CRITIC_FILE = "critic.pt"  # in each checkpoint folder: {"model", "optimizer", "scheduler"}
CRITIC_INPUTS = ("input_ids", "attention_mask", "old_value", "value_return")  # and value_mask as its loss_mask


class ValueModel(torch.nn.Module):
    """The transformer body and a scalar head; forward returns the weighted value loss."""

    def __init__(self, body: torch.nn.Module, hidden_size: int, init_std: float, seed: int, clip: float | None):
        super().__init__()
        self.body = body
        self.head = torch.nn.Linear(hidden_size, 1)
        self.clip = clip  # ε_v (critic.clip_value)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.nn.init.normal_(self.head.weight, std=init_std)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(device=next(body.parameters()).device)

    def values_at(self, batch: dict) -> torch.Tensor:
        """V at the batch's loss positions [N], float32: the head runs outside autocast, so a bf16
        body still gives fp32 values (what the regression and the advantages are computed in)."""
        hidden_BTH = self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden_NH = hidden_BTH[batch["loss_mask"]]
        with torch.autocast(device_type=hidden_NH.device.type, enabled=False):
            return torch.nn.functional.linear(hidden_NH.float(), self.head.weight.float(), self.head.bias.float())[:, 0]

    def forward(self, batch: dict, *, stats: dict | None = None) -> torch.Tensor:
        """Σ_t w_t ℓ_t over batch["loss_mask"] (w_t: batch["loss_weight"], else 1); `stats` gets the
        clipped and trained token counts."""
        mask_BT = batch["loss_mask"]
        value_N = self.values_at(batch)
        loss_N, clipped_N = clipped_value_loss(value_N, batch["old_value"][mask_BT], batch["value_return"][mask_BT],
                                               self.clip)
        if "loss_weight" in batch:
            loss_N = loss_N * batch["loss_weight"][mask_BT].to(loss_N.dtype)
        if stats is not None:
            stats["clipped"] = stats.get("clipped", 0.0) + float(clipped_N.sum())
            stats["tokens"] = stats.get("tokens", 0.0) + float(mask_BT.sum())
        return loss_N.sum()


@dataclass
class Critic:
    """The value model, wrapped for the run's processes, with its optimizer and schedule."""

    model: object  # ValueModel (DDP-wrapped or FSDP2-sharded with several processes)
    optimizer: object
    scheduler: object
    runtime: Runtime
    recipe: RLRecipe
    sums: dict = field(default_factory=dict)  # this process's sums since the last metrics()

    @classmethod
    def build(cls, recipe: RLRecipe, runtime: Runtime, total_updates: int, checkpoint: Path | None) -> Critic:
        """A new value model from the student's starting weights; from `checkpoint`'s critic.pt on resume."""
        student, _ = load_policy(recipe.student, "student", recipe.seed, runtime.device)
        config = student.config
        model = ValueModel(student.get_decoder(), config.hidden_size, getattr(config, "initializer_range", 0.02),
                           recipe.seed, recipe.critic.clip_value)
        if recipe.train.precision == "bf16-pure":  # as the student's weights (loop.apply_precision)
            model.to(torch.bfloat16)
        if recipe.train.gradient_checkpointing:
            model.body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optim_cfg = dataclasses.replace(recipe.optim, lr=recipe.critic.lr)
        model, optimizer = _wrap(model, optim_cfg, runtime)
        critic = cls(model, optimizer, build_scheduler(optimizer, optim_cfg, total_updates), runtime, recipe)
        if checkpoint is not None:
            critic.load(checkpoint)
        return critic

    @torch.no_grad()
    def values(self, batch: dict) -> torch.Tensor:
        """V_old [B, T] at the batch's loss positions (0 elsewhere), float32, no gradient."""
        model = self.model.module if hasattr(self.model, "module") else self.model  # outside DDP's forward
        with gathered(model):
            value_N = model.values_at(batch)
        value_BT = torch.zeros(batch["loss_mask"].shape, dtype=torch.float32, device=value_N.device)
        value_BT[batch["loss_mask"]] = value_N
        return value_BT

    def update(self, micro_batches: list[dict]) -> None:
        """One optimizer step on this process's part of a PPO mini-batch (the policy's micro-batches),
        regressing on the positions of value_mask (the whole responses)."""
        batches = [{**{k: m[k] for k in CRITIC_INPUTS}, "loss_mask": m["value_mask"]} for m in micro_batches]
        loss, _ = accumulate_gradients(self.model, self.runtime, batches, self.recipe.train.loss_aggregation,
                                       lambda index, micro: self.model(micro, stats=self.sums))
        grad_norm, skipped = optimizer_step(self.model, self.optimizer, self.scheduler, self.runtime,
                                            self.recipe.optim.grad_clip, loss)
        for key, value in (("loss", loss), ("grad_norm", grad_norm), ("updates", 1.0), ("skipped", float(skipped))):
            self.sums[key] = self.sums.get(key, 0.0) + value

    def metrics(self) -> dict[str, float]:
        """The critic's rows of the step's metrics since the last call: the value loss (mean over
        updates, summed over processes), the share of clipped value tokens, its gradient norm and lr."""
        sums, self.sums = self.sums, {}
        totals = self.runtime.sum_across_ranks({k: sums.get(k, 0.0) for k in ("loss", "clipped", "tokens")})
        updates = max(sums.get("updates", 0.0), 1.0)
        return {"value_loss": totals["loss"] / updates, "value_clip_frac": totals["clipped"] / max(totals["tokens"], 1.0),
                "critic_grad_norm": sums.get("grad_norm", 0.0) / updates, "critic_lr": self.scheduler.get_last_lr()[0],
                "critic_skipped_updates": sums.get("skipped", 0.0)}

    def checkpoint_files(self) -> dict[str, dict]:
        """{critic.pt: weights, optimizer, schedule}, full on the first process (all processes call this)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        return {CRITIC_FILE: {"model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict()}}

    def load(self, checkpoint: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        path = checkpoint / CRITIC_FILE
        if not path.is_file():
            raise UserError(f"--resume: {checkpoint} has no {CRITIC_FILE} (it was not trained with a value model), so "
                            f"{self.recipe.objective.name} cannot continue its critic; start a new run", recipe=True)
        state = torch.load(path, map_location="cpu", weights_only=False)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.runtime.world_size > 1)
        set_model_state_dict(self.model, state["model"], options=options)
        restore_optimizer(self.model, self.optimizer, self.scheduler, state["optimizer"], state["scheduler"], self.runtime)


def _wrap(model: ValueModel, optim_cfg, runtime: Runtime):
    """(model, optimizer) for the run's processes, as scale.wrap_for_training does for the policy:
    as is with one process, DDP (accelerate) or FSDP2 (train.parallel: fsdp2) with several."""
    if runtime.sharded:
        shard_fsdp2(model, blocks_of(model.body), runtime)
        return model, build_optimizer(model, optim_cfg)
    return runtime.accelerator.prepare(model, build_optimizer(model, optim_cfg))
