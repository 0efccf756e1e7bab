"""Forward+backward of the LM head + loss: time and peak memory per objective, side by side.

Memory: each case runs once in a fresh subprocess (so one case's allocations cannot hide
another's peak): it allocates hidden [N, H] and weight [V, H], notes its resident memory, runs
forward+backward (peak = max RSS − that baseline).
Time: all cases in one process, `--rounds` rounds, each round running every case once in a new
random order (a fixed order favours or penalises whichever case follows another); the table gives
each case's fastest and median round. The machine's load average (before and after) and the thread
counts are printed with it: on a shared machine the ratios are only as good as the load was steady.

torch's `F.linear_cross_entropy` appears twice: with default options it takes the reference path
(full [N, V] logits, like dense); with `options=torch.nn.LinearCrossEntropyOptions()` torch 2.13
chunks it too (its own "auto" choices for CPU/fp32), the fair comparison for memory.

    python bench/head_bench.py                       # the issue's shape + a small-vocab shape
    python bench/head_bench.py --tokens 256 --hidden 256 --vocab 8192 --second-shape '' --rounds 3   # a quick check
    python bench/head_bench.py --tokens 256 --vocab 32000 --hidden 512 --only sft,dense
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    "dense": "F.cross_entropy on full [N, V] logits",
    "linear_ce": "torch F.linear_cross_entropy, default options (reference path: full logits)",
    "linear_ce_chunked": "torch F.linear_cross_entropy, options=LinearCrossEntropyOptions() (torch's chunking)",
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
    """The tensors of one case and a function that runs its forward+backward once (returning the
    loss and the gradients of hidden and weight)."""
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
        elif case == "linear_ce_chunked":
            loss = F.linear_cross_entropy(h, w, target, reduction="sum", options=torch.nn.LinearCrossEntropyOptions())
        else:
            objective = OBJECTIVES["lsm" if case.startswith("lsm") else case]
            loss = head_loss(h, w, objective, params or objective.Params(), inputs, generator=gen)
        loss.backward()
        return loss.detach(), h.grad, w.grad  # for checking that every case computes the same thing

    return step


def peak_memory(case: str, tokens: int, hidden: int, vocab: int) -> int:
    step = setup(case, tokens, hidden, vocab)
    base = _rss_bytes()
    step()
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)


def interleaved_times(cases: list[str], tokens: int, hidden: int, vocab: int, rounds: int, seed: int = 0) -> dict:
    """Every round runs each case once, in a new random order; returns {case: [seconds per round]}."""
    steps = {case: setup(case, tokens, hidden, vocab) for case in cases}
    times = {case: [] for case in cases}
    for case in cases:  # warm-up: first-touch page faults and library init are not the loss's cost
        steps[case]()
    order = list(cases)
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for case in order:
            start = time.perf_counter()
            steps[case]()
            times[case].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--second-shape", default="2048,512,32000", help="tokens,hidden,vocab of a second table ('' to skip)")
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds (each in a new random case order)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the measuring processes")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()
    unknown = [c for c in args.only.split(",") if c and c not in CASES] if not args.child else []
    if unknown:
        parser.error(f"--only: unknown case(s) {', '.join(unknown)}; allowed: {', '.join(CASES)}")
    if args.rounds < 1 or args.threads < 1 or min(args.tokens, args.hidden, args.vocab) < 1:
        parser.error("--rounds, --threads, --tokens, --hidden and --vocab must be ≥ 1")

    if args.child:  # a fresh process measuring one thing
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "time":
            load_before = os.getloadavg()
            result = {"times": interleaved_times(args.only.split(","), args.tokens, args.hidden, args.vocab, args.rounds),
                      "torch_threads": torch.get_num_threads(), "load_before": load_before, "load_after": os.getloadavg()}
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
                  "--rounds", str(args.rounds), "--threads", str(args.threads)]
        peaks = {}
        for case in cases:
            peaks[case] = _child([case, *common])
            print(f"  memory of {case} at N={tokens} H={hidden} V={vocab}", file=sys.stderr, flush=True)
        print(f"  timing {len(cases)} cases, {args.rounds} rounds in random order", file=sys.stderr, flush=True)
        timing = _child(["time", "--only", ",".join(cases), *common])
        rows = [{"case": c, "min_seconds": min(timing["times"][c]), "median_seconds": statistics.median(timing["times"][c]),
                 "seconds": timing["times"][c], "peak_bytes": peaks[c]} for c in cases]
        machine = {"cpu_count": os.cpu_count(), "torch_threads": timing["torch_threads"], "rounds": args.rounds,
                   "load_before": timing["load_before"], "load_after": timing["load_after"]}
        print_table(rows, tokens, hidden, vocab, machine)
        all_rows.append({"tokens": tokens, "hidden": hidden, "vocab": vocab, "machine": machine, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


def _child(args: list[str]):
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(rows, tokens, hidden, vocab, machine: dict) -> None:
    by_case = {r["case"]: r for r in rows}
    dense, sft = by_case.get("dense"), by_case.get("sft")
    load = " → ".join("/".join(f"{x:.2f}" for x in machine[k]) for k in ("load_before", "load_after"))
    print(f"\nLM head + loss, forward+backward, N={tokens} tokens, H={hidden}, V={vocab:,}, fp32, CPU")
    print(f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, {machine['rounds']} rounds in random "
          f"order; load average (1/5/15 min) {load}")
    print("| case | what | min (s) | median (s) | peak (MB) | min / dense | median / dense | peak / dense | median / chunked SFT |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(row, base, key):
        return f"{row[key] / base[key]:.2f}" if base else "-"

    for r in rows:
        print(f"| {r['case']} | {CASES[r['case']]} | {r['min_seconds']:.2f} | {r['median_seconds']:.2f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {ratio(r, dense, 'min_seconds')} | {ratio(r, dense, 'median_seconds')} | "
              f"{ratio(r, dense, 'peak_bytes')} | {ratio(r, sft, 'median_seconds')} |")


if __name__ == "__main__":
    main()
