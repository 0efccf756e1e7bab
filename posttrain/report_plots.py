"""The report's plots (matplotlib, Agg): training curves, OTR's N_gt share, the token-probability
histogram (DFT Fig. 2), distillation KL and repetition, GRPO's reward and zero-advantage share, and the
accuracy of every seed. Rebuilt from run folders like the tables (report.py)."""

from __future__ import annotations

import statistics
from pathlib import Path

from posttrain.report_rows import BENCHMARK_LABELS, variants

def plots(runs, offline, distilled, rl, by_final, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def two_panels(runs, panels, filename):
        """One figure: for each (metric, title), the metric against step, a line per variant."""
        fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
        for ax, (key, title) in zip(axes, panels):
            for variant, group in variants(runs):
                _curve(ax, group, key, variant)
            ax.set(title=title, xlabel="step")
        axes[-1].legend(fontsize=8)
        save(fig, filename)

    if offline:
        two_panels(offline, [("loss", "training loss (each objective's own loss)"),
                             ("target_prob", "mean probability of the target token (training batches)")],
                   "offline_training_curves.png")

        otr = [(v, g) for v, g in variants(offline) if g[0].config["objective"]["name"] == "otr"]
        if otr:
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant, group in otr:
                _curve(ax, group, "n_gt_frac", variant)
            ax.set(title="OTR: mean N_gt / K (share of draws that hit the target)", xlabel="step")
            ax.legend(fontsize=8)
            save(fig, "otr_n_gt.png")

        with_probs = [(v, g) for v, g in variants(offline) if any(r.token_probs for r in g)]
        if with_probs:
            fig, ax = plt.subplots(figsize=(7, 4))
            first = next(r for _, g in with_probs for r in g if r.token_probs)
            edges = first.token_probs["log10_edges"]
            centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            ax.plot(centers, _normalised(first.token_probs["initial"]), "k--", label="base (before training)")
            for variant, group in with_probs:
                counts = [r.token_probs["final"] for r in group if r.token_probs]
                ax.plot(centers, _normalised([sum(c) for c in zip(*counts)]), label=variant)
            ax.set(title="probability of training tokens after training (cf. DFT paper Fig. 2)",
                   xlabel="log10 p(token)", ylabel="share of tokens", yscale="log")
            ax.legend(fontsize=8)
            save(fig, "token_probability_histogram.png")

    if distilled:
        two_panels(distilled, [("reverse_kl", "reverse KL to the teacher on rollouts (exact, per token)"),
                               ("repetition_frac", "share of rollouts with a repetition loop")],
                   "distill_reverse_kl_and_repetition.png")

    if rl:
        two_panels(rl, [("verifiable_reward_mean", "mean verifiable reward of the step's rollouts"),
                        ("zero_advantage_group_frac", "share of groups with zero advantage (all rewards equal)")],
                   "rl_reward_and_zero_advantage.png")

    scored = [(v, g) for v, g in variants(offline + distilled) if any(r.scores() for r in g)]
    if scored:
        benchmarks = sorted({b for _, g in scored for r in g for b in r.scores()})
        fig, axes = plt.subplots(1, len(benchmarks), figsize=(5 * len(benchmarks), 0.4 * len(scored) + 1.5), squeeze=False)
        for ax, bench in zip(axes[0], benchmarks):
            for y, (variant, group) in enumerate(scored):
                values = [r.scores()[bench] for r in group if bench in r.scores()]
                ax.scatter(values, [y] * len(values), s=18)
                if values:
                    ax.plot([statistics.fmean(values)] * 2, [y - 0.3, y + 0.3], "k-")
            ax.set_yticks(range(len(scored)), [v for v, _ in scored], fontsize=8)
            ax.set(title=f"{BENCHMARK_LABELS.get(bench, bench)} avg@k (dots: seeds, bar: mean)", xlabel="percent")
        save(fig, "accuracy_by_seed.png")
    return written


def _curve(ax, group: list[Run], key: str, label: str) -> None:
    """Mean over the seeds of a metric against step, smoothed by a trailing mean over ~5% of steps."""
    series = [[row.get(key) for row in run.metrics] for run in group if any(key in row for row in run.metrics)]
    if not series:
        return
    length = min(len(s) for s in series)
    means = [statistics.fmean(s[i] for s in series if s[i] is not None) for i in range(length)]
    window = max(1, length // 20)
    smooth = [statistics.fmean(means[max(0, i - window + 1) : i + 1]) for i in range(length)]
    ax.plot(range(1, length + 1), smooth, label=label)


def _normalised(counts: list[float]) -> list[float]:
    total = sum(counts) or 1.0
    return [max(c / total, 1e-6) for c in counts]
