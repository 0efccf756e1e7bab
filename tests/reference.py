"""Plain full-logits reference implementations of every objective, written from the formulas in
../shared/PAPERS.md independently of posttrain/losses (they materialise [N, V] logits and let
autograd do everything). The chunked engine must agree with these."""

import torch


def logits_of(hidden_NH, weight_VH):
    return hidden_NH @ weight_VH.t()


def sft(hidden, weight, inputs, params):
    logp = logits_of(hidden, weight).log_softmax(-1)
    return -logp.gather(1, inputs["target_ids"][:, None]).sum()


def dft(hidden, weight, inputs, params):
    logp = logits_of(hidden, weight).log_softmax(-1).gather(1, inputs["target_ids"][:, None])
    return -(logp.exp().detach() * logp).sum()


def otr_draws(logits, kappa, uniforms):
    """Inverse-CDF draws from softmax(logits / κ), written plainly."""
    probs = (logits / kappa).softmax(-1)
    cdf = probs.cumsum(-1)
    u = uniforms.to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=logits.shape[1] - 1)


def otr(hidden, weight, inputs, params):
    logits = logits_of(hidden, weight)
    draws = otr_draws(logits.detach(), params.kappa, inputs["otr_uniforms"])
    logp = logits.log_softmax(-1).gather(1, draws)
    reward = torch.where(draws == inputs["target_ids"][:, None], 1.0, params.beta).to(logp.dtype)
    return -(reward * logp).sum() / params.k


def opd(hidden, weight, inputs, params):
    logp = logits_of(hidden, weight).log_softmax(-1).gather(1, inputs["target_ids"][:, None])[:, 0]
    adv = inputs["advantage"].to(logp.dtype)
    if not params.ppo_clip:
        return -(adv * logp).sum()
    ratio = (logp - inputs["old_logprob"].to(logp.dtype)).exp()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - params.clip_low, 1 + params.clip_high))
    if params.dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * params.dual_clip), per_token)
    return per_token.sum()


def lsm_support(n, inputs, params):
    """S_t as a sorted list of ids, built with Python sets from the two top-K lists."""
    teacher = set(inputs["teacher_topk_ids"][n].tolist())
    student = set(inputs["student_topk_ids"][n].tolist())
    support = {"teacher": teacher, "student": student, "union": teacher | student,
               "overlap": teacher & student}[params.support]
    if params.add_sampled_token:
        support = support | {int(inputs["target_ids"][n])}
    return sorted(support)


def lsm(hidden, weight, inputs, params):
    """Reverse KL on S_t, with q from the teacher's full distribution (inputs["teacher_logprob_NV"])."""
    logp_full = logits_of(hidden, weight).log_softmax(-1)
    total = logp_full.new_zeros(())
    for n in range(hidden.shape[0]):  # one position at a time: obviously right, not fast
        ids = lsm_support(n, inputs, params)
        if not ids:
            continue  # an empty overlap: nothing to match
        p = logp_full[n, ids].exp()
        q = inputs["teacher_logprob_NV"][n, ids].to(p.dtype).exp()
        if params.renormalize is True:
            p, q = p / p.sum(), q / q.sum()
        if params.renormalize == "tail":
            eps = torch.finfo(p.dtype).eps  # masses below rounding are floored (lsm.py's convention)
            p = torch.cat([p, (1 - p.sum()).clamp(min=eps).reshape(1)])
            q = torch.cat([q, (1 - q.sum()).clamp(min=eps).reshape(1)])
        total = total + (p * (p.log() - q.log())).sum()
    return total


def forward_kl(hidden, weight, inputs, params):
    """KL(q ‖ π) on the teacher's top-K ids, both renormalised there (or not), with q from the
    teacher's full distribution (inputs["teacher_logprob_NV"])."""
    logp_full = logits_of(hidden, weight).log_softmax(-1)
    total = logp_full.new_zeros(())
    for n in range(hidden.shape[0]):
        ids = sorted(inputs["teacher_topk_ids"][n].tolist())
        p = logp_full[n, ids].exp()
        q = inputs["teacher_logprob_NV"][n, ids].to(p.dtype).exp()
        if params.renormalize:
            p, q = p / p.sum(), q / q.sum()
        total = total + (q * (q.log() - p.log())).sum()
    return total


def jsd(hidden, weight, inputs, params):
    """The generalised JSD of the GKD paper (eq. 1) in TRL's convention, on the teacher's top-K ids
    (inputs["support_ids"] when given: a teacher cache's), renormalised there (or not), q from the
    teacher's full distribution: m = β q + (1 − β) π, β KL(q ‖ m) + (1 − β) KL(π ‖ m); β = 0 is
    KL(q ‖ π) and β = 1 is KL(π ‖ q) (TRL special-cases both ends)."""
    logp_full = logits_of(hidden, weight).log_softmax(-1)
    supports = inputs.get("support_ids", inputs.get("teacher_topk_ids"))
    total = logp_full.new_zeros(())
    for n in range(hidden.shape[0]):
        ids = sorted(supports[n].tolist())
        p = logp_full[n, ids].exp()
        q = inputs["teacher_logprob_NV"][n, ids].to(p.dtype).exp()
        if params.renormalize:
            p, q = p / p.sum(), q / q.sum()
        if params.beta == 0:
            total = total + (q * (q / p).log()).sum()
        elif params.beta == 1:
            total = total + (p * (p / q).log()).sum()
        else:
            m = params.beta * q + (1 - params.beta) * p
            total = total + params.beta * (q * (q / m).log()).sum() + (1 - params.beta) * (p * (p / m).log()).sum()
    return total


REFERENCES = {"sft": sft, "dft": dft, "otr": otr, "opd": opd, "lsm": lsm, "forward_kl": forward_kl, "jsd": jsd,
              "kd_topk": jsd}


# --- PPO with a value model (#24): from Schulman et al. 2017 (PPO) and 2015 (GAE) ---------------


def ppo(hidden, weight, inputs, params):
    """PPO-clip on given advantages, with the dual clip −A·c for A < 0 (verl's clip_ratio_c)."""
    logp = logits_of(hidden, weight).log_softmax(-1).gather(1, inputs["target_ids"][:, None])[:, 0]
    adv = inputs["advantage"].to(logp.dtype)
    ratio = (logp - inputs["old_logprob"].to(logp.dtype)).exp()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - params.clip_low, 1 + params.clip_high))
    if params.dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * params.dual_clip), per_token)
    return per_token.sum()


REFERENCES["ppo"] = ppo


def gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """One response's (A_t, R_t) as the GAE paper writes them, a sum per position, no recursion:
    δ_t = r_t + γ V_{t+1} − V_t (V after the last token 0), A_t = Σ_k (γλ)^k δ_{t+k}, R_t = A_t + V_t."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values)]


def clipped_value_loss(value, old_value, returns, clip):
    """½ max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²) per position, clip written with min/max."""
    clipped = torch.minimum(torch.maximum(value, old_value - clip), old_value + clip)
    return 0.5 * torch.maximum((value - returns) ** 2, (clipped - returns) ** 2)


def full_reverse_kl(hidden, weight, teacher_logprob_NV):
    logp = logits_of(hidden, weight).log_softmax(-1)
    return (logp.exp() * (logp - teacher_logprob_NV)).sum()


# --- the verifiable-reward policy-loss family (#24): each from its paper's formula ---------------


def _sampled_logprob(hidden, weight, inputs):
    return logits_of(hidden, weight).log_softmax(-1).gather(1, inputs["target_ids"][:, None])[:, 0]


def gspo(hidden, weight, inputs, params):
    """GSPO (arXiv 2507.18071, eq. 5–7) literally, one sequence at a time:
    −(1/G) Σ_i min(s_i A_i, clip(s_i, 1 − ε_lo, 1 + ε_hi) A_i), s_i = exp(mean_t log(π_θ/π_old)).
    inputs["sequence"]: the sequence index of each token; G = the number of sequences."""
    logp = _sampled_logprob(hidden, weight, inputs)
    sequences = inputs["sequence"].tolist()
    count = max(sequences) + 1
    total = logp.new_zeros(())
    for i in range(count):
        rows = [n for n, s in enumerate(sequences) if s == i]
        if not rows:
            continue
        s_i = (logp[rows] - inputs["old_logprob"][rows].to(logp.dtype)).mean().exp()
        a_i = inputs["advantage"][rows[0]].to(logp.dtype)
        total = total - torch.minimum(s_i * a_i, s_i.clamp(1 - params.clip_low, 1 + params.clip_high) * a_i)
    return total / count


def cispo_token(hidden, weight, inputs, params):
    """MiniMax-M1 eq. 4–5 per token: −sg[clip(ρ, 1 − ε_lo, 1 + ε_hi)] · A · log π_θ."""
    logp = _sampled_logprob(hidden, weight, inputs)
    ratio = (logp - inputs["old_logprob"].to(logp.dtype)).exp().detach()
    low = 0.0 if params.clip_low is None else 1 - params.clip_low
    weight_is = torch.clamp(ratio, low, 1 + params.clip_high)
    return -weight_is * inputs["advantage"].to(logp.dtype) * logp


def sapo_token(hidden, weight, inputs, params):
    """SAPO (arXiv 2511.20347) per token: −(4/τ) σ(τ(ρ − 1)) A, τ = τ_pos for A > 0 else τ_neg."""
    logp = _sampled_logprob(hidden, weight, inputs)
    ratio = (logp - inputs["old_logprob"].to(logp.dtype)).exp()
    out = []
    for n in range(len(logp)):
        a = inputs["advantage"][n].to(logp.dtype)
        tau = params.tau_pos if a > 0 else params.tau_neg
        out.append(-(4.0 / tau) * torch.sigmoid(tau * (ratio[n] - 1)) * a)
    return torch.stack(out)


def dcpo_bounds(q, clip_low, clip_high, cap):
    """DCPO §4.1: 0.5 + ½√max(1 − 4ε_lo/q, 0) ≤ r ≤ 0.5 + ½√(1 + 4ε_hi/q), the upper one capped."""
    import math

    low = 0.5 + 0.5 * math.sqrt(max(1 - 4 * clip_low / q, 0.0))
    high = min(0.5 + 0.5 * math.sqrt(1 + 4 * clip_high / q), cap)
    return low, high


def dcpo_token(hidden, weight, inputs, params):
    """DCPO's clipped surrogate per token with the dynamic bounds and the dual clip c for A < 0."""
    logp = _sampled_logprob(hidden, weight, inputs)
    out = []
    for n in range(len(logp)):
        old = inputs["old_logprob"][n].to(logp.dtype)
        a = inputs["advantage"][n].to(logp.dtype)
        if params.dynamic_clip:
            low, high = dcpo_bounds(float(old.exp()), params.clip_low, params.clip_high, max(params.dual_clip, 10.0))
        else:
            low, high = 1 - params.clip_low, 1 + params.clip_high
        ratio = (logp[n] - old).exp()
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(low, high))
        if a < 0:
            loss = torch.minimum(loss, -a * params.dual_clip)
        out.append(loss)
    return torch.stack(out)


def dcpo_smooth_advantages(steps: list[list[float]], epsilon: float) -> list[float]:
    """DCPO §4.2 for ONE prompt: `steps` holds its rollouts' rewards at each step it was drawn in,
    the last one the current step; returns the current rollouts' advantages."""
    import statistics

    def standardised(r, values):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        centred = r - statistics.fmean(values)
        return 0.0 if std == 0 or centred == 0 else centred / (std + epsilon)

    current, everything, i = steps[-1], [r for step in steps for r in step], len(steps)
    out = []
    for r in current:
        new, total = standardised(r, current), standardised(r, everything)
        smooth_new = (i - 1) / i * new + 1 / i * total
        smooth_total = 1 / i * new + (i - 1) / i * total
        out.append(smooth_new if abs(smooth_new) < abs(smooth_total) else smooth_total)
    return out


TOKEN_REFERENCES = {"cispo": cispo_token, "sapo": sapo_token, "dcpo": dcpo_token}


def self_teacher_logprobs(model, prompt: list[int], response: list[int]) -> list[torch.Tensor]:
    """OPSD's teacher (arXiv 2601.18734) at each response token: the model's own full-vocabulary
    log-probs [V] after `prompt` (the privileged one) + the response so far, one plain float64
    forward of the whole sequence, read position by position (no chunking, no batching)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
    return [logits[len(prompt) + j - 1].log_softmax(-1) for j in range(len(response))]


def dpo(hidden, weight, inputs, params):
    """DPO (arXiv 2305.18290, eq. 7), the mean over pairs of −log σ(β[Δ(y_w) − Δ(y_l)]) with
    Δ(y) = Σ_t (log π(y_t) − log π_ref(y_t)): position n belongs to sequence inputs["row"][n];
    sequences 2i and 2i + 1 are pair i's chosen and rejected responses."""
    logp = logits_of(hidden, weight).log_softmax(-1).gather(1, inputs["target_ids"][:, None])[:, 0]
    log_ratio = logp - inputs["reference_logprob"].to(logp.dtype)
    pairs = int(inputs["row"].max()) // 2 + 1
    total = logp.new_zeros(())
    for i in range(pairs):
        chosen = log_ratio[inputs["row"] == 2 * i].sum()
        rejected = log_ratio[inputs["row"] == 2 * i + 1].sum()
        total = total - torch.nn.functional.logsigmoid(params.beta * (chosen - rejected))
    return total / pairs


def tdpo(hidden, weight, inputs, params):
    """TDPO (arXiv 2404.11999; the authors' tdpo_loss): per sequence Δ = Σ_t (log π(y_t) − log π_ref(y_t))
    and the sequential KL D = Σ_t Σ_v π_ref(v)(log π_ref(v) − log π(v)) from π_ref's full rows
    inputs["reference_vocab_logprob"]; TDPO1 z = Δ_w − Δ_l − (D_l − D_w), TDPO2 z = Δ_w − Δ_l −
    α(D_l − sg[D_w]); the mean over pairs of −log σ(β z). Rows as in dpo()."""
    logp_full = logits_of(hidden, weight).log_softmax(-1)
    ref_full = inputs["reference_vocab_logprob"].to(logp_full.dtype)
    targets = inputs["target_ids"][:, None]
    log_ratio = (logp_full.gather(1, targets) - ref_full.gather(1, targets))[:, 0]
    kl = (ref_full.exp() * (ref_full - logp_full)).sum(-1)
    pairs = int(inputs["row"].max()) // 2 + 1
    total = logp_full.new_zeros(())
    for i in range(pairs):
        chosen, rejected = inputs["row"] == 2 * i, inputs["row"] == 2 * i + 1
        margin = log_ratio[chosen].sum() - log_ratio[rejected].sum()
        if params.variant == "tdpo1":
            z = margin - (kl[rejected].sum() - kl[chosen].sum())
        else:
            z = margin - params.alpha * (kl[rejected].sum() - kl[chosen].sum().detach())
        total = total - torch.nn.functional.logsigmoid(params.beta * z)
    return total / pairs
