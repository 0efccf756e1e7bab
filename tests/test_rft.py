"""RFT: `posttrain eval` samples the training problems, `posttrain rft-data` keeps the correct
ones, `posttrain train` fine-tunes on them. (The whole pipeline runs in `make reproduce-smoke`:
the test fixtures' tiny models answer too few synthetic_train problems under the chat prompt.)"""

import json

from posttrain.data.synthetic import DATA_SEED, make_rows
from posttrain.eval.prompts import BOXED_INSTRUCTION
from tests.helpers import run_cli


def _eval_folder(tmp_path, records, prompt="chat"):
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "eval_config.json").write_text(json.dumps({"prompt": prompt, "completions": None}))
    base = {"benchmark": "synthetic_train", "prompt": "<rendered>", "gold": "1", "tokens": 3}
    (folder / "samples.jsonl").write_text("".join(json.dumps({**base, **r}) + "\n" for r in records))
    return folder


def test_rft_data_keeps_correct_model_ended_distinct_samples(tmp_path):
    records = [
        {"index": 3, "sample": 0, "completion": "a \\boxed{1}", "correct": True, "finish_reason": "stop"},
        {"index": 3, "sample": 1, "completion": "a \\boxed{1}", "correct": True, "finish_reason": "stop"},  # duplicate
        {"index": 3, "sample": 2, "completion": "b \\boxed{1}", "correct": True, "finish_reason": "stop"},
        {"index": 3, "sample": 3, "completion": "c \\boxed{1}", "correct": True, "finish_reason": "stop"},  # over max
        {"index": 0, "sample": 0, "completion": "\\boxed{2}", "correct": False, "finish_reason": "stop"},
        {"index": 0, "sample": 1, "completion": "\\boxed{1} 1 1 1", "correct": True, "finish_reason": "length"},
        {"index": 5, "sample": 1, "completion": "d \\boxed{1}", "correct": True, "finish_reason": "stop"},
    ]
    out = tmp_path / "rft.jsonl"
    proc = run_cli("rft-data", str(_eval_folder(tmp_path, records)), "--out", str(out), "--max-per-problem", "2")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(3, 0), (3, 2), (5, 1)]
    train_rows = make_rows("in_domain", 8, DATA_SEED)
    assert rows[0]["prompt"] == f"{train_rows[3]['problem']}\n{BOXED_INSTRUCTION}" == train_rows[3]["prompt"]
    assert rows[2]["solution"] == "d \\boxed{1}"
    assert "kept 3 of 7 samples (6 correct; dropped 1 cut off, 1 duplicates, 1 over the limit) for 2 problems" in " ".join(proc.stderr.split())


def test_rft_data_refuses_what_it_cannot_pair(tmp_path):
    folder = _eval_folder(tmp_path, [{"index": 0, "sample": 0, "completion": "x", "correct": True,
                                      "finish_reason": "stop"}], prompt="qwen-boxed")
    proc = run_cli("rft-data", str(folder), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "--prompt qwen-boxed" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("rft-data", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "not an eval folder" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
