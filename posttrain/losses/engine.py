"""The chunked LM-head engine: loss and gradients without [tokens, vocab] logits.

`head_loss(hidden_NH, weight_VH, ...)` returns Σ_t ℓ_t over N (already masked) positions. Its
forward pass walks the tokens in chunks and, for each chunk, computes the logits, the loss and
the gradient of the loss with respect to the logits, then immediately folds that gradient into
grad_hidden (g @ W) and grad_weight (gᵀ @ h). Backward only scales the stored gradients. At any
moment at most two [chunk, V] fp32 buffers exist (logits and probabilities/gradient), reused
across chunks.

Dense path (objective.full_vocab(params) is True), per chunk:
    z = h Wᵀ                                  logits, fp32
    targets = objective.targets(...)          [c, J] token ids (may read z, e.g. OTR's draws)
    p = softmax(z)  (into the second buffer)  also gives lse and the entropy
    ℓ, d = loss and ∂ℓ/∂log p at the targets  autograd on the small [c, J] tensor
    g = scatter(d) − (Σ_j d_j) · p            = ∂ℓ/∂z for any loss of log-softmax values
Support path (LSM on given ids): z_S = h · W[ids] is [c, K]; ℓ and ∂ℓ/∂z_S come from autograd on
that small tensor; grad_hidden = Σ_k d_k W[ids_k]; grad_weight gets d_k h at rows ids_k. The
head costs 2·H·K per token instead of 2·H·V.

On CUDA with bf16 the matmuls run in bf16 (fp32 accumulate) and all elementwise work is fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.losses.objective import Objective

LOSS_WEIGHT = "loss_weight"  # per-token input: the aggregation weight w_t (losses/aggregation.py)
HEAD_BUFFER_BYTES = 160 * 2**20  # default memory budget of the per-chunk buffer (see README: chunk size)
SCRATCH_ROWS = 16  # rows per block of the softmax-statistics / sampling scratch buffer


def head_loss(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    objective: Objective,
    params: Any,
    inputs: dict[str, torch.Tensor],
    *,
    chunk_tokens: int | None = None,
    generator: torch.Generator | None = None,
    matmul_dtype: torch.dtype | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Σ_t ℓ_t over the N rows of hidden_NH (each row one loss position).

    inputs: per-token tensors with leading dimension N (target_ids, rewards, supports, ...).
    stats: if given, filled with per-objective diagnostic sums over the N tokens (floats).
    matmul_dtype: dtype of the head matmuls (default: the weight's dtype).
    """
    if hidden_NH.shape[0] == 0:
        # Nothing to score; keep the graph connected so backward still works.
        return (hidden_NH.sum() + weight_VH.sum()) * 0.0
    if objective.sample_inputs is not None:
        inputs = {**inputs, **objective.sample_inputs(params, hidden_NH.shape[0], generator, hidden_NH.device)}
    plan = _Plan(objective, params, inputs, chunk_tokens, matmul_dtype, stats if stats is not None else {})
    return _ChunkedHeadLoss.apply(hidden_NH, weight_VH, plan)


class _Plan:
    """Everything the autograd function needs besides the two differentiable tensors."""

    def __init__(self, objective, params, inputs, chunk_tokens, matmul_dtype, stats):
        self.objective, self.params, self.inputs = objective, params, inputs
        self.chunk_tokens, self.matmul_dtype, self.stats = chunk_tokens, matmul_dtype, stats


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, plan: _Plan):
        loss_sum, grad_hidden, grad_weight = _run(hidden_NH, weight_VH, plan, ctx.needs_input_grad[1])
        # Kept as attributes, not save_for_backward: backward hands them to autograd and drops its
        # own reference, so the first accumulation into weight.grad can take the tensor instead of
        # cloning it (a clone would double the largest tensor of the step).
        ctx.grads = (grad_hidden, grad_weight)
        ctx.recompute = (hidden_NH.detach(), weight_VH.detach(), plan)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            # A second backward through the same graph (retain_graph, gradcheck): recompute.
            hidden_NH, weight_VH, plan = ctx.recompute
            quiet = _Plan(plan.objective, plan.params, plan.inputs, plan.chunk_tokens, plan.matmul_dtype, {})
            _, grad_hidden, grad_weight = _run(hidden_NH, weight_VH, quiet, ctx.needs_input_grad[1])
        else:
            grad_hidden, grad_weight = ctx.grads
            ctx.grads = None
        grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None


def _run(hidden_NH, weight_VH, plan: _Plan, need_weight_grad: bool):
    n_tokens, hidden_size = hidden_NH.shape
    vocab = weight_VH.shape[0]
    acc_dtype = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
    mm_dtype = plan.matmul_dtype or weight_VH.dtype
    weight_mm = weight_VH.detach().to(mm_dtype)
    grad_hidden = torch.empty(n_tokens, hidden_size, dtype=acc_dtype, device=hidden_NH.device)
    grad_weight = (
        torch.zeros(vocab, hidden_size, dtype=acc_dtype, device=weight_VH.device) if need_weight_grad else None
    )
    loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden_NH.device)
    dense = plan.objective.full_vocab(plan.params)
    # the support path's ids per position, from the objective itself (a first row of its inputs)
    support_width = None if dense else plan.objective.targets(
        plan.params, None, {k: v[:1] for k, v in plan.inputs.items()}, None).shape[1]
    chunk = _chunk_size(plan.chunk_tokens, n_tokens, vocab, hidden_size, support_width)
    if dense:
        # The reused buffers (see module docstring): logits/gradient, and a few rows of scratch.
        logits_buf = torch.empty(chunk, vocab, dtype=acc_dtype, device=hidden_NH.device)
        scratch_buf = torch.empty(min(SCRATCH_ROWS, chunk), vocab, dtype=acc_dtype, device=hidden_NH.device)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h_CH = hidden_NH[start:end].detach()
        inputs_C = {k: v[start:end] for k, v in plan.inputs.items()}
        if dense:
            loss_C, stats_C = _dense_chunk(
                h_CH, weight_mm, plan, inputs_C, logits_buf[: end - start], scratch_buf,
                grad_hidden[start:end], grad_weight,
            )
        else:
            loss_C, stats_C = _support_chunk(h_CH, weight_mm, plan, inputs_C, grad_hidden[start:end], grad_weight)
        loss_sum += loss_C.sum()
        for key, value in stats_C.items():
            plan.stats[key] = plan.stats.get(key, 0.0) + value.double().sum()
    plan.stats["tokens"] = plan.stats.get("tokens", 0.0) + torch.tensor(float(n_tokens), dtype=torch.float64)
    grad_hidden = grad_hidden.to(hidden_NH.dtype)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight_VH.dtype)
    return loss_sum.to(hidden_NH.dtype if hidden_NH.dtype == torch.float64 else torch.float32), grad_hidden, grad_weight


def _no_grad_logit_chunks(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, chunk_tokens: int | None,
                          matmul_dtype: torch.dtype | None):
    """(start, end, z_CV, lse_C1, H_C) for each chunk of rows: the loss pass's chunked logits buffer
    and softmax statistics (log-sum-exp, entropy), in fp32 (fp64 for fp64 inputs), for the no-grad
    probes below; nothing of size [N, V] exists."""
    n_tokens, hidden_size = hidden_NH.shape
    vocab = weight_VH.shape[0]
    acc_dtype = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
    weight_mm = weight_VH.detach().to(matmul_dtype or weight_VH.dtype)
    chunk = _chunk_size(chunk_tokens, n_tokens, vocab, hidden_size, None)
    logits_buf = torch.empty(chunk, vocab, dtype=acc_dtype, device=hidden_NH.device)
    scratch_buf = torch.empty(min(SCRATCH_ROWS, chunk), vocab, dtype=acc_dtype, device=hidden_NH.device)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        z_CV = logits_buf[: end - start]
        _matmul_into(z_CV, hidden_NH[start:end].detach().to(weight_mm.dtype), weight_mm.t())
        lse_C1, entropy_C = _softmax_stats(z_CV, scratch_buf)[:2]
        yield start, end, z_CV, lse_C1, entropy_C


def _probe_dtype(hidden_NH: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32


@torch.no_grad()
def head_entropy(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, *, chunk_tokens: int | None = None,
                 matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Entropy of softmax(h Wᵀ) for each of the N rows, [N] fp32, no gradient."""
    entropy_N = torch.empty(hidden_NH.shape[0], dtype=_probe_dtype(hidden_NH), device=hidden_NH.device)
    if hidden_NH.shape[0] == 0:
        return entropy_N
    for start, end, _, _, entropy_C in _no_grad_logit_chunks(hidden_NH, weight_VH, chunk_tokens, matmul_dtype):
        entropy_N[start:end] = entropy_C
    return entropy_N


@torch.no_grad()
def head_token_logprob(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, target_ids_N: torch.Tensor, *,
                       chunk_tokens: int | None = None, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """log softmax(h Wᵀ) at each row's target id, [N] (fp32, or fp64 for fp64 inputs), no gradient:
    the loss pass's chunked logits and softmax statistics, so the values are the ones the loss sees."""
    logprob_N = torch.empty(hidden_NH.shape[0], dtype=_probe_dtype(hidden_NH), device=hidden_NH.device)
    if hidden_NH.shape[0] == 0:
        return logprob_N
    for start, end, z_CV, lse_C1, _ in _no_grad_logit_chunks(hidden_NH, weight_VH, chunk_tokens, matmul_dtype):
        logprob_N[start:end] = (z_CV.gather(1, target_ids_N[start:end, None]) - lse_C1).squeeze(1)
    return logprob_N


@torch.no_grad()
def head_probe(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, probe, params: Any, inputs: dict[str, torch.Tensor],
               *, chunk_tokens: int | None = None, matmul_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """probe(params, logp_CV, inputs_C) -> {name: [C]} on each chunk's full-vocabulary
    log-softmax(h Wᵀ), no gradient, concatenated to [N]: per-token quantities of the current
    policy's whole distribution (Objective.current_policy_probe: TDPO's KL(π_ref ‖ π_θ) per
    position). One [chunk, V] buffer, turned into log-probs in place."""
    if hidden_NH.shape[0] == 0:  # the probe's keys, empty
        empty_0V = hidden_NH.new_empty(0, weight_VH.shape[0], dtype=_probe_dtype(hidden_NH))
        return probe(params, empty_0V, inputs)
    parts: dict[str, list[torch.Tensor]] = {}
    for start, end, z_CV, lse_C1, _ in _no_grad_logit_chunks(hidden_NH, weight_VH, chunk_tokens, matmul_dtype):
        logp_CV = z_CV.sub_(lse_C1)
        for key, value_C in probe(params, logp_CV, {k: v[start:end] for k, v in inputs.items()}).items():
            parts.setdefault(key, []).append(value_C)
    return {key: torch.cat(values) for key, values in parts.items()}


def _chunk_size(requested, n_tokens, vocab, hidden_size, support_width: int | None) -> int:
    """Tokens per chunk: `requested`, or as many as fit the buffer budget. support_width: ids per
    position on the support path (None: the dense path)."""
    if requested:
        return max(1, min(requested, n_tokens))
    if support_width is None:
        per_token = vocab * 4  # one fp32 row of the logits/gradient buffer
    else:
        per_token = 2 * support_width * hidden_size * 4  # gathered rows + outer product
    largest = max(16, min(n_tokens, HEAD_BUFFER_BYTES // per_token))
    # Equal chunks: a small last chunk would run its matmuls at poor efficiency.
    n_chunks = -(-n_tokens // largest)
    return -(-n_tokens // n_chunks)


def _dense_chunk(h_CH, weight_mm, plan, inputs_C, z_CV, scratch_RV, grad_hidden_CH, grad_weight):
    objective, params = plan.objective, plan.params
    h_mm = h_CH.to(weight_mm.dtype)
    _matmul_into(z_CV, h_mm, weight_mm.t())
    targets_CJ = objective.targets(params, z_CV, inputs_C, scratch_RV)
    lse_C1, entropy_C = _softmax_stats(z_CV, scratch_RV)

    logp_CJ = z_CV.gather(1, targets_CJ) - lse_C1
    loss_C, stats_C, d_CJ = _loss_and_score_grad(objective, params, logp_CJ, targets_CJ, inputs_C)

    # g = ∂ℓ/∂z = scatter(d) − (Σ_j d_j) p with p = exp(z − lse), in place over the logits, a
    # block of rows at a time so that the three passes run on data still in cache
    scale_C1 = -d_CJ.sum(dim=1, keepdim=True)
    rows = scratch_RV.shape[0]
    for r0 in range(0, z_CV.shape[0], rows):
        z_CV[r0 : r0 + rows].sub_(lse_C1[r0 : r0 + rows]).exp_().mul_(scale_C1[r0 : r0 + rows])
    z_CV.scatter_add_(1, targets_CJ, d_CJ)
    _fold_gradient(z_CV, h_CH, h_mm, weight_mm, grad_hidden_CH, grad_weight)
    return loss_C, {"entropy": entropy_C, **stats_C}


def _softmax_stats(z_CV, scratch_RV):
    """Row log-sum-exp and entropy of softmax(z), a few rows at a time through the scratch.

    entropy = lse − Σ_v p_v z_v; the dot is a batched matmul, so nothing of size [c, V] is made.
    """
    lse_C1 = z_CV.new_empty(z_CV.shape[0], 1)
    entropy_C = z_CV.new_empty(z_CV.shape[0])
    rows = scratch_RV.shape[0]
    for r0 in range(0, z_CV.shape[0], rows):
        block_RV = z_CV[r0 : r0 + rows]  # max, exp, sum and dot on rows still in cache
        max_R1 = block_RV.amax(dim=1, keepdim=True)
        exp_RV = torch.sub(block_RV, max_R1, out=scratch_RV[: block_RV.shape[0]]).exp_()
        sum_exp_R1 = exp_RV.sum(dim=1, keepdim=True)
        p_dot_z_R1 = torch.bmm(exp_RV.unsqueeze(1), block_RV.unsqueeze(2)).view(-1, 1) / sum_exp_R1
        lse_C1[r0 : r0 + rows] = max_R1 + sum_exp_R1.log()
        entropy_C[r0 : r0 + rows] = (lse_C1[r0 : r0 + rows] - p_dot_z_R1).squeeze(1)
    return lse_C1, entropy_C


def _support_chunk(h_CH, weight_mm, plan, inputs_C, grad_hidden_CH, grad_weight):
    objective, params = plan.objective, plan.params
    ids_CK = objective.targets(params, None, inputs_C, None)
    h_mm = h_CH.to(weight_mm.dtype)
    rows_CKH = weight_mm[ids_CK]
    z_CK = torch.bmm(rows_CKH, h_mm.unsqueeze(2)).squeeze(2).to(grad_hidden_CH.dtype)
    loss_C, stats_C, d_CK = _loss_and_score_grad(objective, params, z_CK, ids_CK, inputs_C)
    grad_h = torch.bmm(d_CK.unsqueeze(1).to(rows_CKH.dtype), rows_CKH).squeeze(1)
    grad_hidden_CH.copy_(grad_h)
    if grad_weight is not None:
        outer_CKH = d_CK.unsqueeze(2) * h_CH.to(grad_weight.dtype).unsqueeze(1)
        grad_weight.index_add_(0, ids_CK.reshape(-1), outer_CKH.reshape(-1, h_CH.shape[1]))
    return loss_C, stats_C


def _loss_and_score_grad(objective, params, scores_CJ, targets_CJ, inputs_C):
    """The objective's loss on the small score tensor, times each token's aggregation weight
    (LOSS_WEIGHT, when given: the one place every objective is aggregated), and ∂/∂scores by
    autograd. Stats stay unweighted."""
    with torch.enable_grad():
        scores = scores_CJ.detach().requires_grad_(True)
        loss_C, stats_C = objective.token_loss(params, scores, targets_CJ, inputs_C)
        if LOSS_WEIGHT in inputs_C:
            loss_C = loss_C * inputs_C[LOSS_WEIGHT].to(loss_C.dtype)
        (d_CJ,) = torch.autograd.grad(loss_C.sum(), scores)
    return loss_C.detach(), {k: v.detach() for k, v in stats_C.items()}, d_CJ


def _matmul_into(out_fp32, a, b):
    """out = a @ b with an fp32 (or fp64) result whatever the input dtype."""
    if a.dtype == out_fp32.dtype:
        torch.mm(a, b, out=out_fp32)
    else:
        out_fp32.copy_(_mm_wide(a, b, out_fp32.dtype))


def _mm_wide(a, b, dtype):
    """a @ b returned in `dtype`; uses mm's out_dtype (fp32 output of bf16 inputs) where the
    backend has it (CUDA), else rounds through the input dtype like an ordinary bf16 matmul."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.mm(a, b).to(dtype)


def _fold_gradient(g_CV, h_CH, h_mm, weight_mm, grad_hidden_CH, grad_weight):
    """grad_hidden = g @ W and grad_weight += gᵀ @ h for one chunk."""
    if g_CV.dtype == weight_mm.dtype:
        torch.mm(g_CV, weight_mm, out=grad_hidden_CH)
        if grad_weight is not None:
            grad_weight.addmm_(g_CV.t(), h_CH.to(g_CV.dtype))
        return
    g_mm = g_CV.to(weight_mm.dtype)
    grad_hidden_CH.copy_(_mm_wide(g_mm, weight_mm, grad_hidden_CH.dtype))
    if grad_weight is not None:
        grad_weight.add_(_mm_wide(g_mm.t(), h_mm, grad_weight.dtype))


def inverse_cdf_draws(z_CV, temperature: float, uniforms_CK, scratch_RV) -> torch.Tensor:
    """K i.i.d. draws per row from softmax(z / temperature), by inverse CDF.

    Uses K uniforms per row (never V): for each block of rows, the tempered probabilities go
    into the scratch buffer, become a CDF by an in-place cumulative sum, and a binary search
    finds each draw. z is left untouched.
    """
    draws_CK = torch.empty(uniforms_CK.shape, dtype=torch.long, device=z_CV.device)
    rows = scratch_RV.shape[0]
    for r0 in range(0, z_CV.shape[0], rows):
        block_RV = z_CV[r0 : r0 + rows]
        cdf_RV = scratch_RV[: block_RV.shape[0]]
        torch.sub(block_RV, block_RV.amax(dim=1, keepdim=True), out=cdf_RV).mul_(1.0 / temperature).exp_()
        torch.cumsum(cdf_RV, dim=1, out=cdf_RV)
        thresholds_RK = uniforms_CK[r0 : r0 + rows].to(cdf_RV.dtype) * cdf_RV[:, -1:]
        # right=True: a zero-probability token (an empty CDF step) can never be drawn
        torch.searchsorted(cdf_RV, thresholds_RK, right=True, out=draws_CK[r0 : r0 + rows])
    return draws_CK.clamp_(max=z_CV.shape[1] - 1)
