"""The on-policy step's metrics: per-process sums (summed over processes by the loop), then
per-token or per-rollout means; and the run's closing summary. Only what a source produced is
reported (no teacher: no reverse KL row rather than a 0 that reads as a measurement).
May import: losses (TokenSignals), scoring (repetition), generation (SamplingSpec).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain.generation import SamplingSpec
from posttrain.losses.objective import TokenSignals
from posttrain.scoring import repetition_loops


def step_sums(signals: TokenSignals, mask_BT, trained_BT, completions, diagnostics: dict, stats: dict,
              gap_sum: float | None, extra: dict[str, float]) -> dict[str, float]:
    """This process's sums over all response tokens (`mask_BT`) and rollouts (`completions`);
    `extra`: counts reported as they are, summed over processes (dynamic sampling's)."""
    return {
        "tokens": float(mask_BT.sum()), "rollouts": float(len(completions)),
        **teacher_sums(signals, mask_BT), **verifiable_reward_sums(signals),
        **({"entropy_sum": float(signals.entropy_BT[mask_BT].sum())} if signals.entropy_BT is not None else {}),
        "length_sum": float(sum(len(c.token_ids) for c in completions)),
        "truncated": float(sum(c.finish_reason == "length" for c in completions)),
        "repetition": float(sum(repetition_loops([c.token_ids for c in completions]))),
        "trained_tokens": float(trained_BT.sum()),
        **({"gap_sum": gap_sum} if gap_sum is not None else {}),
        **extra,
        **{f"diag_{k}": v * float(mask_BT.sum()) for k, v in diagnostics.items()},
        **{f"stat_{k}": float(v) for k, v in stats.items()},
    }


def step_row(sums: dict[str, float], losses: list[float], grad_norms: list[float], lr: float,
             times: dict[str, float]) -> dict:
    """The metrics row of one step from the sums over all processes; `times`: generate, score, train (s)."""
    tokens, count = max(sums["tokens"], 1.0), max(sums["rollouts"], 1.0)
    engine_tokens = max(sums.pop("stat_tokens", 1.0), 1.0)
    return {
        "loss": sum(losses) / max(len(losses), 1), "lr": lr, "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
        **teacher_metrics(sums, tokens), **verifiable_reward_metrics(sums),
        **value_metrics(sums),
        **({"entropy": sums["entropy_sum"] / tokens} if "entropy_sum" in sums else {}),  # no scoring pass: none
        "response_length": sums["length_sum"] / count, "truncated_frac": sums["truncated"] / count,
        "repetition_frac": sums["repetition"] / count, "response_tokens": tokens,
        "trained_token_frac": sums["trained_tokens"] / tokens,
        **({"rollout_logprob_gap": sums["gap_sum"] / tokens} if "gap_sum" in sums else {}),
        **{k[5:]: v / tokens for k, v in sums.items() if k.startswith("diag_")},
        **{f"train_{k[5:]}": v / engine_tokens for k, v in sums.items() if k.startswith("stat_")},
        **{f"time_{k}": v for k, v in times.items()},
        "rollouts_per_s": count / max(sum(times.values()), 1e-9),
        **{k: v for k, v in sums.items() if k.startswith("dynamic_")},
    }


def teacher_sums(signals: TokenSignals, mask_BT) -> dict[str, float]:
    """Per-process sums for the teacher metrics (none without a teacher)."""
    if signals.teacher_token_logprob_BT is None:
        return {}
    reward_N = (signals.teacher_token_logprob_BT - signals.old_logprob_BT)[mask_BT]
    exact_kl = signals.exact_reverse_kl_BT[mask_BT].sum() if signals.exact_reverse_kl_BT is not None else float("nan")
    return {"reward_sum": float(reward_N.sum()), "exact_kl_sum": float(exact_kl),
            "negative_sum": float((reward_N < 0).sum())}


def teacher_metrics(sums: dict, tokens: float) -> dict[str, float]:
    if "reward_sum" not in sums:
        return {}
    return {
        # exact Σ_v π(log π − log q) at the visited positions (local teacher), and the sampled-token
        # (k1) estimate E_y[log π_old(y) − log q(y)] that most tools report
        "reverse_kl": sums["exact_kl_sum"] / tokens, "reverse_kl_sampled": -sums["reward_sum"] / tokens,
        "reward_mean": sums["reward_sum"] / tokens, "negative_reward_frac": sums["negative_sum"] / tokens,
    }


def verifiable_reward_sums(signals: TokenSignals) -> dict[str, float]:
    """Per-process sums for the grader's metrics: rewards, their squares, and the groups (the
    rollouts of one prompt) whose rewards are all equal, which give GRPO no signal."""
    if signals.verifiable_reward_B is None:
        return {}
    reward_B, group_B = signals.verifiable_reward_B.cpu().double(), signals.group_B.cpu()
    groups = group_B.unique()
    flat = sum(bool((reward_B[group_B == g] == reward_B[group_B == g][0]).all()) for g in groups)
    return {"vr_sum": float(reward_B.sum()), "vr_square_sum": float((reward_B**2).sum()),
            "vr_rollouts": float(len(reward_B)), "vr_groups": float(len(groups)), "vr_flat_groups": float(flat)}


def verifiable_reward_metrics(sums: dict) -> dict[str, float]:
    if "vr_sum" not in sums:
        return {}
    count = max(sums["vr_rollouts"], 1.0)
    mean = sums["vr_sum"] / count
    variance = max(sums["vr_square_sum"] / count - mean**2, 0.0)
    return {"verifiable_reward_mean": mean, "verifiable_reward_std": variance**0.5,
            "zero_advantage_group_frac": sums["vr_flat_groups"] / max(sums["vr_groups"], 1.0)}


def value_sums(signals: TokenSignals, batch: dict, mask_BT) -> dict[str, float]:
    """Per-process sums over the response tokens for the value model's metrics (none without
    one): V_old, the returns R, the advantages A = R − V_old before whitening (after it their mean
    is 0 by construction), and the squares that give the explained variance
    1 − Var(R − V_old) / Var(R) (verl's critic/vf_explained_var)."""
    if signals.value_BT is None:
        return {}
    value_N, return_N = signals.value_BT[mask_BT].double(), batch["value_return"][mask_BT].double()
    error_N = return_N - value_N
    return {"v_tokens": float(mask_BT.sum()), "v_value_sum": float(value_N.sum()), "v_return_sum": float(return_N.sum()),
            "v_return_square_sum": float((return_N**2).sum()), "v_error_sum": float(error_N.sum()),
            "v_error_square_sum": float((error_N**2).sum())}


def value_metrics(sums: dict) -> dict[str, float]:
    if "v_tokens" not in sums:
        return {}
    tokens = max(sums["v_tokens"], 1.0)
    return_var = sums["v_return_square_sum"] / tokens - (sums["v_return_sum"] / tokens) ** 2
    error_var = sums["v_error_square_sum"] / tokens - (sums["v_error_sum"] / tokens) ** 2
    return {"value_mean": sums["v_value_sum"] / tokens, "return_mean": sums["v_return_sum"] / tokens,
            "advantage_mean": sums["v_error_sum"] / tokens,
            "explained_variance": 1.0 - error_var / (return_var + 1e-5)}  # verl's ε


def rollout_logprob_gap_sum(recorded_BT, batch, spec: SamplingSpec) -> float | None:
    """Σ |log-prob the generation backend recorded (rl_shaping.recorded_logprobs) − the student's π_old|
    over the loss positions. ≈ 0 unless the engine samples from other weights than the student's (a
    missed weight sync) or with other numerics. Only with plain sampling (temperature 1, no
    top-k/top-p): otherwise the backend records the warped distribution's log-probs, which differ
    from π_old by design."""
    if spec.temperature != 1.0 or spec.top_p < 1.0 or spec.top_k:
        return None
    mask_BT = batch["loss_mask"]
    return float((recorded_BT - batch["old_logprob"].float())[mask_BT].abs().sum())


def summary_rows(row: dict, steps: int, start_step: int, started: float, run_dir: Path) -> list:
    """The last step's numbers for the console, only those its sources produced."""
    rows = [("steps", f"{steps} ({start_step} before this session)")]
    if "reverse_kl" in row:
        rows += [("reverse KL exact / sampled", f"{row['reverse_kl']:.4f} / {row['reverse_kl_sampled']:.4f}"),
                 ("reward mean / negative share", f"{row['reward_mean']:.3f} / {row['negative_reward_frac']:.2f}")]
    if "verifiable_reward_mean" in row:
        rows += [("verifiable reward mean / std", f"{row['verifiable_reward_mean']:.3f} / {row['verifiable_reward_std']:.3f}"),
                 ("groups with zero advantage", f"{row['zero_advantage_group_frac']:.2f}")]
    if "value_loss" in row:
        rows.append(("value loss / explained variance", f"{row['value_loss']:.4f} / {row['explained_variance']:.3f}"))
    if row:
        rows.append(("repetition / truncated", f"{row['repetition_frac']:.2f} / {row['truncated_frac']:.2f}"))
    return rows + [("wall time", f"{time.time() - started:.1f} s"), ("checkpoint", str(run_dir / "final"))]
