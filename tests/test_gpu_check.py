"""bench/gpu_check.py (the GPU check a session lent a GPU runs, `make gpu-check`) at its tiny CPU
shape, so that it cannot rot between the rare sessions that have a GPU."""

import subprocess
import sys

from tests.helpers import REPO, cli_env


def test_gpu_check_cpu_smoke_writes_its_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(out)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = out.read_text()
    assert table.startswith("gpu_check --cpu-smoke on CPU")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| phase")]
    phases = [row.split(" | ")[0].strip("| ") for row in rows]
    assert phases.count("head") == 5 and phases.count("model") == 2 and phases.count("tests") == 1
    head = {row.split(" | ")[1].split(" (")[0]: row.split(" | ")[2] for row in rows if row.startswith("| head")}
    assert head["posttrain engine"] == "ok" and head["dense torch"] == "ok"
    # the engine and dense torch agree (same loss and hidden-state gradient, bf16 matmuls)
    dense = next(row for row in rows if "dense torch" in row)
    loss_diff, grad_diff = (float(x) for x in __import__("re").findall(r"rel\. diff ([0-9.e+-]+)", dense))
    assert loss_diff < 1e-2 and grad_diff < 5e-2
    assert all(" | ok (loss " in row for row in rows if row.startswith("| model"))
