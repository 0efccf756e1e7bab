"""bench/head_bench.py: every case runs (torch's chunked linear_cross_entropy included), each round in
a new order, and the table states min, median, load and threads."""

import importlib.util
import subprocess
import sys

from tests.helpers import REPO


def _load_bench():
    spec = importlib.util.spec_from_file_location("head_bench", REPO / "bench" / "head_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_run_every_case_in_a_shuffled_order(monkeypatch, capsys):
    bench = _load_bench()
    order = []
    monkeypatch.setattr(bench, "setup", lambda case, *shape: (lambda: order.append(case)))
    cases = ["dense", "linear_ce", "linear_ce_chunked", "sft", "dft"]
    times = bench.interleaved_times(cases, 8, 8, 64, rounds=6)
    assert {c: len(t) for c, t in times.items()} == {c: 6 for c in cases}
    rounds = [tuple(order[len(cases) * (i + 1): len(cases) * (i + 2)]) for i in range(6)]  # after the warm-up
    assert all(sorted(r) == sorted(cases) for r in rounds) and len(set(rounds)) > 1
    rows = [{"case": c, "min_seconds": 1.0, "median_seconds": 2.0, "peak_bytes": 2**20} for c in cases]
    bench.print_table(rows, 8, 8, 64, {"cpu_count": 2, "torch_threads": 1, "rounds": 6,
                                        "load_before": (1.0, 0.5, 0.25), "load_after": (1.5, 0.5, 0.25)})
    table = capsys.readouterr().out
    assert "load average (1/5/15 min) 1.00/0.50/0.25 → 1.50/0.50/0.25" in table and "| min (s) | median (s) |" in table
    assert "LinearCrossEntropyOptions()" in table


def test_torch_chunked_case_computes_the_same_loss_and_gradients_as_dense():
    import torch

    bench = _load_bench()
    dense = bench.setup("dense", 64, 16, 300)()
    for case in ("linear_ce", "linear_ce_chunked", "sft"):
        for got, want in zip(bench.setup(case, 64, 16, 300)(), dense):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_flags_are_one_line_errors():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "head_bench.py"), "--only", "sft,nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown case(s) nope" in proc.stderr and "Traceback" not in proc.stderr
