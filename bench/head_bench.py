"""Forward+backward of the LM head + loss: time and peak memory per objective, side by side.

Memory: each case runs once in a fresh subprocess (so one case's allocations cannot hide
another's peak): it allocates hidden [N, H] and weight [V, H], notes its resident memory, runs
forward+backward (peak = max RSS − that baseline).
Time: all cases in one process, interleaved round-robin `--repeats` times, keeping each case's
fastest run: ratios are measured side by side, under the same conditions (on a small shared
machine, separate processes differ by ±15%).

    python bench/head_bench.py                       # the issue's shape + a small-vocab shape
    python bench/head_bench.py --tokens 256 --vocab 32000 --hidden 512 --only sft,dense
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = {
    "dense": "F.cross_entropy on full [N, V] logits",
    "linear_ce": "torch F.linear_cross_entropy (default options)",
    "sft": "chunked SFT",
    "dft": "chunked DFT",
    "otr": "chunked OTR, K = 256",
    "opd": "chunked OPD (PPO-clip)",
    "lsm": "chunked LSM, K = 32 (support path)",
    "lsm_norenorm": "chunked LSM, K = 32, no renormalisation (dense path)",
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def setup(case: str, tokens: int, hidden: int, vocab: int):
    """The tensors of one case and a function that runs its forward+backward once."""
    import torch
    import torch.nn.functional as F

    from posttrain.losses import OBJECTIVES, head_loss, lsm, opd, otr

    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=gen) * 0.5).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).requires_grad_(True)
    target = torch.randint(vocab, (tokens,), generator=gen)
    inputs = {"target_ids": target}
    params = None
    if case == "opd":
        params = opd.Params()
        inputs.update(old_logprob=torch.full((tokens,), -float(torch.log(torch.tensor(vocab)))),
                      reward=torch.randn(tokens, generator=gen), advantage=torch.randn(tokens, generator=gen))
    if case.startswith("lsm"):
        params = lsm.Params(k=32, renormalize=case == "lsm")
        ids = torch.randint(vocab, (tokens, 32), generator=gen)
        inputs.update(support_ids=ids, support_teacher_logprob=torch.randn(tokens, 32, generator=gen).log_softmax(-1),
                      support_valid=torch.ones(tokens, 32, dtype=torch.bool))
    if case == "otr":
        params = otr.Params(k=256, kappa=1.3, beta=-0.1)

    def step():
        h.grad = None
        w.grad = None
        if case == "dense":
            loss = F.cross_entropy(h @ w.t(), target, reduction="sum")
        elif case == "linear_ce":
            loss = F.linear_cross_entropy(h, w, target, reduction="sum")
        else:
            objective = OBJECTIVES["lsm" if case.startswith("lsm") else case]
            loss = head_loss(h, w, objective, params or objective.Params(), inputs, generator=gen)
        loss.backward()

    return step


def peak_memory(case: str, tokens: int, hidden: int, vocab: int) -> int:
    step = setup(case, tokens, hidden, vocab)
    base = _rss_bytes()
    step()
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)


def interleaved_times(cases: list[str], tokens: int, hidden: int, vocab: int, repeats: int) -> dict[str, float]:
    steps = {case: setup(case, tokens, hidden, vocab) for case in cases}
    best = {case: float("inf") for case in cases}
    for case in cases:  # warm-up: first-touch page faults and library init are not the loss's cost
        steps[case]()
    for _ in range(repeats):
        for case in cases:
            start = time.perf_counter()
            steps[case]()
            best[case] = min(best[case], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--second-shape", default="2048,512,32000", help="tokens,hidden,vocab of a second table ('' to skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()

    if args.child:  # a fresh process measuring one thing
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "time":
            result = interleaved_times(args.only.split(","), args.tokens, args.hidden, args.vocab, args.repeats)
        else:
            result = peak_memory(args.child, args.tokens, args.hidden, args.vocab)
        print(json.dumps(result))
        return

    shapes = [(args.tokens, args.hidden, args.vocab)]
    if args.second_shape:
        shapes.append(tuple(int(x) for x in args.second_shape.split(",")))
    cases = [c for c in CASES if not args.only or c in args.only.split(",")]
    all_rows = []
    for tokens, hidden, vocab in shapes:
        common = ["--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(vocab),
                  "--repeats", str(args.repeats), "--threads", str(args.threads)]
        peaks = {}
        for case in cases:
            peaks[case] = _child([case, *common])
            print(f"  memory of {case} at N={tokens} H={hidden} V={vocab}", file=sys.stderr, flush=True)
        print(f"  timing {len(cases)} cases interleaved, {args.repeats} rounds", file=sys.stderr, flush=True)
        times = _child(["time", "--only", ",".join(cases), *common])
        rows = [{"case": c, "seconds": times[c], "peak_bytes": peaks[c]} for c in cases]
        print_table(rows, tokens, hidden, vocab)
        all_rows.append({"tokens": tokens, "hidden": hidden, "vocab": vocab, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


def _child(args: list[str]):
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(rows, tokens, hidden, vocab) -> None:
    by_case = {r["case"]: r for r in rows}
    dense = by_case.get("dense")
    sft = by_case.get("sft")
    print(f"\nLM head + loss, forward+backward, N={tokens} tokens, H={hidden}, V={vocab:,}, fp32, CPU")
    print("| case | what | time (s) | peak (MB) | time / dense | peak / dense | time / chunked SFT |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rel_dense_t = f"{r['seconds'] / dense['seconds']:.2f}" if dense else "-"
        rel_dense_m = f"{r['peak_bytes'] / dense['peak_bytes']:.2f}" if dense else "-"
        rel_sft = f"{r['seconds'] / sft['seconds']:.2f}" if sft else "-"
        print(f"| {r['case']} | {CASES[r['case']]} | {r['seconds']:.2f} | {r['peak_bytes'] / 2**20:.0f} | "
              f"{rel_dense_t} | {rel_dense_m} | {rel_sft} |")


if __name__ == "__main__":
    main()
