"""What the on-policy loop adds to a rollout batch between scoring and the objective, each off
unless the recipe (or the objective's needs) asks for it:

  overlong shaping   DAPO (arXiv 2503.14476, eq. 13), rollout.overlong_buffer L_cache: with
                     L_max = rollout.max_new_tokens, a response of |y| tokens gets
                         R_length = 0                              |y| ≤ L_max − L_cache
                                    (L_max − L_cache − |y|) / L_cache   in the buffer
                                    −1                             |y| > L_max
                     times rollout.overlong_penalty (verl's overlong_buffer.penalty_factor), added
                     to the verifiable reward before the group advantage (signals.reward_shaping_B).
  truncated IS       rollout.importance_cap C: every token's loss × min(π_old(y_t) / π_rollout(y_t), C),
                     π_rollout the log-prob the generation backend reported for the sampled token
                     (batch["importance_weight"], applied by policy.PolicyLoss to any objective):
                     verl's tis_imp_ratio_cap, TRL's vllm_importance_sampling_cap. ≈ 1 unless the
                     backend samples with other weights or numerics than the trainer (vLLM).
  prompt history     the PROMPT_HISTORY need (DCPO's smooth standardisation): per prompt, the rewards
                     of every earlier step it was drawn in, replayed from prompt_history.jsonl in
                     the run folder on resume (rows past the resumed step are dropped, as metrics').
May import: losses, generation, runfolder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from posttrain.losses.grpo import shaped_rewards
from posttrain.losses.objective import PROMPT_HISTORY
from posttrain.runfolder import MetricsLog, logged_steps

HISTORY_FILE = "prompt_history.jsonl"


def overlong_penalty(lengths_B: torch.Tensor, max_new_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's R_length per response (module docstring), times `factor`, float64."""
    expected = max_new_tokens - buffer
    exceed_B = lengths_B.to(torch.float64) - expected
    return torch.where(lengths_B > max_new_tokens, -1.0, (-exceed_B / buffer).clamp(max=0.0)) * factor


def recorded_logprobs(completions, rollouts, shape_BT, device) -> torch.Tensor:
    """The backend's log-prob of each sampled token at its loss position ([B, T], zero elsewhere)."""
    recorded_BT = torch.zeros(shape_BT, dtype=torch.float32)
    for row, (completion, rollout) in enumerate(zip(completions, rollouts)):
        start = rollout.prompt_len - 1  # the position that predicts the first response token
        recorded_BT[row, start : start + len(completion.logprobs)] = torch.tensor(completion.logprobs)
    return recorded_BT.to(device)


def importance_weights(old_logprob_BT, recorded_BT, mask_BT, cap: float) -> torch.Tensor:
    """min(π_old / π_rollout, C) at the loss positions, 0 elsewhere (float32)."""
    log_ratio_BT = (old_logprob_BT.float() - recorded_BT.float()).masked_fill(~mask_BT, 0.0)
    return log_ratio_BT.exp().clamp(max=cap) * mask_BT


def prompt_key(prompt_ids: list[int]) -> str:
    """A prompt's identity in the history: its token ids (so the same prompt drawn again, by the
    step's draw or by dynamic sampling, finds its past rewards)."""
    return hashlib.sha1(",".join(map(str, prompt_ids)).encode()).hexdigest()[:20]


class PromptHistory:
    """Per prompt: steps it was drawn in, rollouts, Σr, Σr² over all of them (float64)."""

    def __init__(self, log: MetricsLog | None):
        self.log = log
        self.stats: dict[str, list[float]] = {}

    @classmethod
    def open(cls, run_dir: Path, start_step: int, enabled: bool) -> PromptHistory:
        """The history of the steps before `start_step` from the run folder's log (a fresh run: empty)."""
        log = MetricsLog(run_dir / HISTORY_FILE, enabled=enabled)
        log.truncate_after(start_step)
        history = cls(log)
        if (run_dir / HISTORY_FILE).exists():
            for row in logged_steps(run_dir / HISTORY_FILE):
                if row.get("step", 0) <= start_step:
                    history._add(row["groups"])
        return history

    def _add(self, groups: list) -> None:
        for key, rewards in groups:
            entry = self.stats.setdefault(key, [0.0, 0.0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += len(rewards)
            entry[2] += sum(rewards)
            entry[3] += sum(r * r for r in rewards)

    def lookup(self, keys_B: list[str], device) -> dict[str, torch.Tensor]:
        """Each rollout's prompt's PAST statistics, as losses.objective.TokenSignals.reward_history."""
        rows = [self.stats.get(key, [0.0, 0.0, 0.0, 0.0]) for key in keys_B]
        table = torch.tensor(rows, dtype=torch.float64, device=device).reshape(len(rows), 4)
        return dict(zip(("steps", "count", "sum", "square_sum"), table.unbind(1)))

    def record(self, step: int, keys_B: list[str], reward_B: torch.Tensor) -> None:
        """This step's rewards, in memory and in the log (`step`: the step number metrics.jsonl uses)."""
        groups: dict[str, list[float]] = {}
        for key, reward in zip(keys_B, reward_B.tolist()):
            groups.setdefault(key, []).append(reward)
        self._add(list(groups.items()))
        if self.log is not None:
            self.log.append({"step": step, "groups": [[key, rewards] for key, rewards in groups.items()]})


def shape_batch(recipe, history: PromptHistory | None, step: int, batch: dict, signals, completions, recorded_BT,
                prompt_ids_B: list[list[int]]) -> dict[str, float]:
    """Sets signals.reward_shaping_B, signals.reward_history and batch["importance_weight"] where the
    recipe asks for them (`recorded_BT`: recorded_logprobs of the batch), records this step in the
    prompt history; returns this process's sums for the metrics (shaping_metrics turns the sums over
    processes into means)."""
    rollout, sums = recipe.rollout, {}
    if rollout.overlong_buffer is not None and signals.verifiable_reward_B is not None:
        lengths_B = torch.tensor([len(c.token_ids) for c in completions])
        penalty_B = overlong_penalty(lengths_B, rollout.max_new_tokens, rollout.overlong_buffer, rollout.overlong_penalty)
        signals.reward_shaping_B = penalty_B.to(signals.verifiable_reward_B.device)
        sums.update(shaping_overlong_sum=float(penalty_B.sum()), shaping_overlong_hit=float((penalty_B < 0).sum()),
                    shaping_rollouts=float(len(penalty_B)))
    if rollout.importance_cap is not None:
        mask_BT = batch["loss_mask"]
        weight_BT = importance_weights(batch["old_logprob"], recorded_BT, mask_BT, rollout.importance_cap)
        batch["importance_weight"] = weight_BT
        raw_BT = (batch["old_logprob"].float() - recorded_BT).exp()
        sums.update(shaping_is_weight_sum=float(weight_BT[mask_BT].sum()),
                    shaping_is_capped=float((raw_BT[mask_BT] > rollout.importance_cap).sum()),
                    shaping_is_tokens=float(mask_BT.sum()))
    if history is not None:
        keys_B = [prompt_key(ids) for ids in prompt_ids_B]
        signals.reward_history = history.lookup(keys_B, signals.verifiable_reward_B.device)
        history.record(step + 1, keys_B, shaped_rewards(signals).cpu())
    return sums


def shaping_metrics(totals: dict[str, float]) -> dict[str, float]:
    """The metrics row's entries from the sums over processes (only what was switched on)."""
    row = {}
    if "shaping_rollouts" in totals:
        count = max(totals["shaping_rollouts"], 1.0)
        row.update(overlong_penalty_mean=totals["shaping_overlong_sum"] / count,
                   overlong_frac=totals["shaping_overlong_hit"] / count)
    if "shaping_is_tokens" in totals:
        tokens = max(totals["shaping_is_tokens"], 1.0)
        row.update(importance_weight_mean=totals["shaping_is_weight_sum"] / tokens,
                   importance_capped_frac=totals["shaping_is_capped"] / tokens)
    return row


def open_history(run_dir: Path, start_step: int, runtime, needs: frozenset[str]) -> PromptHistory | None:
    """The prompt history when the objective declares PROMPT_HISTORY (resumed: replayed), else None."""
    return PromptHistory.open(run_dir, start_step, runtime.is_main) if PROMPT_HISTORY in needs else None
