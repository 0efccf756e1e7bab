"""A support S_t of token ids per rollout position, read from the scoring signals: the teacher's
top-K, the student's (π_old's) top-K, their union or their overlap. The objectives that train on
a support (lsm, forward_kl) and the loop's support diagnostics read it from here, so both see the
same slots. Imports only losses/objective.py.
"""

from __future__ import annotations

import torch

from posttrain.losses.objective import TokenSignals


def support_slots(support: str, signals: TokenSignals) -> dict[str, torch.Tensor]:
    """The support S_t as [B, T, J] slots: ids, the teacher's log-prob there, and which slots are
    real (a slot is off when its id is already an earlier slot, or not in the intersection).
    Reads only the scoring signals (signals.fetch_signals), so the diagnostics and the loss see
    the same support."""
    if support == "student":
        ids = signals.student_topk_ids_BTK
        return {"ids": ids, "teacher_logprob": signals.teacher_logprob_at_student_topk_BTK,
                "valid": torch.ones_like(ids, dtype=torch.bool)}
    t_ids, t_logq = signals.teacher_topk_ids_BTK, signals.teacher_topk_logprob_BTK
    if support == "teacher":
        return {"ids": t_ids, "teacher_logprob": t_logq, "valid": torch.ones_like(t_ids, dtype=torch.bool)}
    s_ids = signals.student_topk_ids_BTK
    if support == "overlap":
        in_student = (t_ids.unsqueeze(-1) == s_ids.unsqueeze(-2)).any(-1)
        return {"ids": t_ids, "teacher_logprob": t_logq, "valid": in_student}
    # union: the teacher's K slots, then the student's K, each off when already among the teacher's
    s_in_teacher = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1)
    return {"ids": torch.cat([t_ids, s_ids], dim=-1),
            "teacher_logprob": torch.cat([t_logq, signals.teacher_logprob_at_student_topk_BTK], dim=-1),
            "valid": torch.cat([torch.ones_like(t_ids, dtype=torch.bool), ~s_in_teacher], dim=-1)}


def student_logprob_on_support(support: str, signals: TokenSignals) -> torch.Tensor:
    """π_old's log-probs at the slots of support_slots (same order), for the diagnostics."""
    if support == "student":
        return signals.student_topk_logprob_BTK
    if support in ("teacher", "overlap"):
        return signals.student_logprob_at_teacher_topk_BTK
    return torch.cat([signals.student_logprob_at_teacher_topk_BTK, signals.student_topk_logprob_BTK], dim=-1)
