"""Scoring rollout tokens without gradients: the student's π_old and the teacher's signals (the
numeric passes behind signals.py's scorers, preflight's checks and train's token histogram).

`score_tokens` runs a model over a batch and, at the loss positions only, returns the log-prob
of the target token, the top-K ids and log-probs, and optionally the log-probs at given ids.
It walks the positions in chunks, so only [chunk, V] logits exist at a time and only
[B, T, K] is kept. `score_pair` returns TokenSignals' fields by name. May import: models.
"""

from __future__ import annotations

import torch

from posttrain.models import decoder_and_head


@torch.no_grad()
def hidden_at_loss_positions(model, batch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states at the loss positions [N, H], the LM-head weight [V, H]); with a
    temperature the hidden states are divided by it, so h Wᵀ are the logits / temperature."""
    decoder, weight_VH = decoder_and_head(model)
    hidden_BTH = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden_NH = hidden_BTH[batch["loss_mask"]]
    return (hidden_NH if temperature == 1.0 else hidden_NH / temperature), weight_VH


def _chunk_logprobs(hidden_CH, weight_VH, vocab: int, matmul_dtype) -> torch.Tensor:
    weight = weight_VH[:vocab] if matmul_dtype is None else weight_VH[:vocab].to(matmul_dtype)
    return (hidden_CH.to(weight.dtype) @ weight.t()).float().log_softmax(dim=-1)


@torch.no_grad()
def score_tokens(model, batch: dict, *, k: int = 0, at_ids_BTJ: torch.Tensor | None = None, entropy: bool = False,
                 chunk_tokens: int = 1024, matmul_dtype: torch.dtype | None = None,
                 temperature: float = 1.0) -> dict[str, torch.Tensor]:
    hidden_NH, weight_VH = hidden_at_loss_positions(model, batch, temperature)
    mask_BT = batch["loss_mask"]
    targets_N = batch["target_ids"][mask_BT]
    at_ids_NJ = at_ids_BTJ[mask_BT] if at_ids_BTJ is not None else None
    out = {}
    for start in range(0, hidden_NH.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, hidden_NH.shape[0])
        logp_CV = _chunk_logprobs(hidden_NH[start:end], weight_VH, weight_VH.shape[0], matmul_dtype)
        values = {"token_logprob": logp_CV.gather(1, targets_N[start:end, None]).squeeze(1)}
        if entropy:
            values["entropy"] = -(logp_CV.exp() * logp_CV).sum(dim=-1)
        if k:
            top = logp_CV.topk(k, dim=-1)
            values["topk_logprob"], values["topk_ids"] = top.values, top.indices
        if at_ids_NJ is not None:
            values["at_logprob"] = logp_CV.gather(1, at_ids_NJ[start:end])
        _store(out, values, start, hidden_NH.shape[0])
    return {key: _unmask(value, mask_BT) for key, value in out.items()}


@torch.no_grad()
def score_pair(student, teacher, batch: dict, *, k: int, chunk_tokens: int = 1024,
               matmul_dtype: torch.dtype | None = None, temperature: float = 1.0,
               teacher_batch: dict | None = None) -> dict[str, torch.Tensor]:
    """Student (π_old) and teacher in one chunked pass over the loss positions: both models'
    log-probs of the sampled token, both top-K supports with each model's log-probs on the
    other's, the student's entropy, and the exact per-position reverse KL Σ_v π(v)(log π − log q).
    (Padded vocabulary rows beyond the smaller head are ignored; they are never real tokens.)
    `teacher_batch`: what the teacher reads instead of `batch` (a self-teacher's privileged
    prompt + the same responses: data/privileged.py); its loss positions are the batch's, in order."""
    hidden_student_NH, weight_student_VH = hidden_at_loss_positions(student, batch, temperature)
    hidden_teacher_NH, weight_teacher_VH = hidden_at_loss_positions(teacher, teacher_batch or batch, temperature)
    if hidden_teacher_NH.shape[0] != hidden_student_NH.shape[0]:
        raise RuntimeError("the teacher's batch has a different number of loss positions")  # a wiring bug
    vocab = min(weight_student_VH.shape[0], weight_teacher_VH.shape[0])
    mask_BT = batch["loss_mask"]
    targets_N = batch["target_ids"][mask_BT]
    out = {}
    for start in range(0, hidden_student_NH.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, hidden_student_NH.shape[0])
        logp_student_CV = _chunk_logprobs(hidden_student_NH[start:end], weight_student_VH, vocab, matmul_dtype)
        logp_teacher_CV = _chunk_logprobs(hidden_teacher_NH[start:end], weight_teacher_VH.to(weight_student_VH.device), vocab, matmul_dtype)
        top_student, top_teacher = logp_student_CV.topk(k, dim=-1), logp_teacher_CV.topk(k, dim=-1)
        p_student_CV = logp_student_CV.exp()
        _store(out, {  # TokenSignals' fields
            "old_logprob_BT": logp_student_CV.gather(1, targets_N[start:end, None]).squeeze(1),
            "teacher_token_logprob_BT": logp_teacher_CV.gather(1, targets_N[start:end, None]).squeeze(1),
            "student_topk_ids_BTK": top_student.indices, "student_topk_logprob_BTK": top_student.values,
            "teacher_topk_ids_BTK": top_teacher.indices, "teacher_topk_logprob_BTK": top_teacher.values,
            "teacher_logprob_at_student_topk_BTK": logp_teacher_CV.gather(1, top_student.indices),
            "student_logprob_at_teacher_topk_BTK": logp_student_CV.gather(1, top_teacher.indices),
            "entropy_BT": -(p_student_CV * logp_student_CV).sum(dim=-1),
            "exact_reverse_kl_BT": (p_student_CV * (logp_student_CV - logp_teacher_CV)).sum(dim=-1),
        }, start, hidden_student_NH.shape[0])
    return {key: _unmask(value, mask_BT) for key, value in out.items()}


def _store(out: dict, values: dict, start: int, n: int) -> None:
    """Write one chunk's per-position values into [N, ...] buffers (allocated on first use)."""
    for key, value in values.items():
        if key not in out:
            out[key] = value.new_empty(n, *value.shape[1:])
        out[key][start : start + value.shape[0]] = value


def _unmask(values_N, mask_BT):
    """Scatter per-position values back to [B, T, ...] (zeros where the mask is off)."""
    out = values_N.new_zeros(*mask_BT.shape, *values_N.shape[1:])
    out[mask_BT] = values_N
    return out


REPETITION_BUDGET = 1 << 22  # elements of one [S, P, L] comparison (~100 MB of int64 and bool): sequences in chunks


def repetition_loops(token_lists: list[list[int]], max_period: int = 32, min_span: int = 24,
                     min_repeats: int = 3) -> list[bool]:
    """Per sequence: True if some block of ≤ max_period tokens repeats back to back at least
    `min_repeats` times over ≥ min_span tokens (the degenerate loop the LSM paper reports on
    drifted rollouts). Every period p ≤ max_period of a chunk of sequences is checked in one
    [S, P, L] comparison (a step's 64 rollouts cost one pass, not 64 × 32 small ones; chunks keep
    it within REPETITION_BUDGET however long the rollouts). Period p loops when the longest run of
    positions with ids[t] == ids[t + p] is at least max(min_span, min_repeats·p) − p, and only
    periods with min_repeats whole blocks count."""
    width = max((len(t) for t in token_lists), default=0)
    if width == 0:
        return [False] * len(token_lists)
    per_chunk = max(1, REPETITION_BUDGET // (max_period * width))
    return [verdict for start in range(0, len(token_lists), per_chunk)
            for verdict in _repetition_chunk(token_lists[start : start + per_chunk], width, max_period, min_span,
                                             min_repeats)]


def _repetition_chunk(token_lists: list[list[int]], width: int, periods: int, min_span: int,
                      min_repeats: int) -> list[bool]:
    lengths_S = torch.tensor([len(t) for t in token_lists])
    # padding: distinct negative ids past each sequence's end, so that no padded position equals another
    padded = [list(t) + list(range(-len(t) - 1, -width - periods - 1, -1)) for t in token_lists]
    ids_SW = torch.tensor(padded, dtype=torch.long)  # W = width + periods
    ids_SL = ids_SW[:, :width]
    shifted_SPL = ids_SW[:, 1:].unfold(1, width, 1)[:, :periods]  # [s, p-1, t] = ids[t + p]
    period_P = torch.arange(1, periods + 1)
    same_SPL = shifted_SPL == ids_SL[:, None, :]
    position_L = torch.arange(width)
    # run length ending at each position: distance to the last mismatch before it
    last_miss_SPL = torch.where(same_SPL, -1, position_L).cummax(dim=-1).values
    longest_SP = (position_L - last_miss_SPL).masked_fill(~same_SPL, 0).max(dim=-1).values
    needed_P = torch.clamp(period_P * min_repeats, min=min_span)
    counted_SP = period_P[None, :] <= torch.div(lengths_S, min_repeats, rounding_mode="floor")[:, None]
    return ((longest_SP + period_P >= needed_P) & counted_SP).any(dim=-1).tolist()
