"""`posttrain report` picks each run's paper row from the run's own settings (config.yaml),
never from its name."""

import json

import yaml

from posttrain.paper_numbers import distill_paper_row
from posttrain.report import report


def _run(root, name, command, config):
    folder = root / name
    (folder / "final").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"# posttrain {command} --recipe x.yaml\n" + yaml.safe_dump({"name": name, **config}))
    return folder


def test_distill_rows_follow_the_runs_settings_not_their_names(tmp_path):
    runs = tmp_path / "runs"
    student = _run(runs, "base", "train", {"model": {"tiny": {}}, "objective": {"name": "sft"}, "train": {}})
    teacher = _run(runs, "teacher", "train", {"model": {"tiny": {}}, "objective": {"name": "sft"}, "train": {}})
    common = {"student": {"path": str(student / "final")}, "teacher": {"path": str(teacher / "final")}}
    # names that lie: "opd" sampled with top-p 0.9, "opd-topp" with 1.0 and the mask
    _run(runs, "opd", "distill", {**common, "objective": {"name": "opd"}, "rollout": {"top_p": 0.9}, "train": {}})
    _run(runs, "opd-topp", "distill", {**common, "objective": {"name": "opd"}, "rollout": {"top_p": 1.0},
                                       "train": {"mask_first_tokens": ["<|im_end|>"]}})
    _run(runs, "lsm", "distill", {**common, "objective": {"name": "lsm", "k": 32}, "rollout": {"top_p": 1.0}, "train": {}})
    report([runs], tmp_path / "out")
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "out" / "tables.md").read_text().splitlines()
            if line.startswith("| ")}
    assert "OPD + top-p" in rows["opd"] and "36.4" not in rows["opd"]
    assert "| 40.7 |" in rows["opd-topp"]
    assert "top-K without top-p" in rows["lsm"] and "41.7" not in rows["lsm"]


def test_paper_rows_by_setting():
    assert distill_paper_row("distilled", "opd", {}, False, 1.0)[0] == "36.4"
    assert distill_paper_row("distilled", "opd", {}, True, 1.0)[0] == "40.7"
    assert distill_paper_row("distilled", "lsm", {"k": 32}, False, 0.9)[0] == "41.7"
    assert distill_paper_row("distilled", "lsm", {"k": 32}, True, 0.9)[0] == "41.5"
    student_topk = distill_paper_row("distilled", "lsm", {"support": "student"}, False, 0.9)[0]
    assert student_topk.startswith("competitive with teacher top-K single-task")


def _eval_synthetic(folder, score):
    (folder / "eval").mkdir()
    (folder / "eval" / "results.json").write_text(json.dumps({"benchmarks": {"synthetic": {
        "metrics": {"avg@4": score}, "coverage": {"complete": True}}}}))


def _metrics(folder, rows):
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **row}) + "\n" for i, row in enumerate(rows)))


def test_compute_table_sums_phases_and_prices_the_gain(tmp_path):
    runs = tmp_path / "runs"
    base = _run(runs, "base", "train", {"model": {"tiny": {}}, "objective": {"name": "sft"}, "train": {}})
    _metrics(base, [{"step_seconds": 1.0, "tokens_per_s": 100.0, "response_tokens": 60}])
    _eval_synthetic(base, 20.0)
    sft = _run(runs, "sft", "train", {"model": {"path": str(base / "final")}, "objective": {"name": "sft"}, "train": {}})
    _metrics(sft, [{"step_seconds": 2.0, "tokens_per_s": 50.0, "response_tokens": 40}] * 2)
    _eval_synthetic(sft, 30.0)
    opd = _run(runs, "opd", "distill", {"student": {"path": str(base / "final")}, "teacher": {"path": str(sft / "final")},
                                        "objective": {"name": "opd"}, "train": {}})
    _metrics(opd, [{"time_generate": 3.0, "time_score": 1.0, "time_train": 1.0, "response_tokens": 100,
                    "trained_token_frac": 0.5}] * 4)
    _eval_synthetic(opd, 45.0)
    grpo = _run(runs, "grpo", "rl", {"student": {"path": str(base / "final")}, "objective": {"name": "grpo"}, "train": {}})
    _metrics(grpo, [{"time_generate": 1.0, "time_score": 0.5, "time_train": 0.5, "response_tokens": 10}] * 5)
    _eval_synthetic(grpo, 25.0)
    summary = report([runs], tmp_path / "out", with_papers=False)
    compute = summary["compute"]
    assert compute["sft"] == {"generate_s": 0.0, "score_s": 0.0, "train_s": 4.0, "generated_tokens": 0.0,
                              "input_tokens": 200.0, "trained_tokens": 80.0, "total_s": 4.0, "average": 30.0,
                              "start_average": 20.0, "gain_per_1000s": 2500.0}
    assert compute["opd"]["total_s"] == 20.0 and compute["opd"]["trained_tokens"] == 200.0
    assert compute["opd"]["gain_per_1000s"] == 1250.0  # (45 − 20) / 20 s × 1000
    assert compute["grpo"]["total_s"] == 10.0 and compute["grpo"]["gain_per_1000s"] == 500.0  # rl: no teacher, same phases
    assert compute["base"]["gain_per_1000s"] is None  # started from a model that is not a run here
    table = (tmp_path / "out" / "tables.md").read_text()
    assert "| opd | distill | 12.0 | 4.0 | 4.0 | 20.0 | 400 | 200 | 45.0 | 20.0 | 1250.00 |" in table


def _eval(folder, in_domain, ood):
    import json

    (folder / "eval").mkdir()
    bench = lambda value: {"metrics": {"avg@4": value}, "coverage": {"complete": True}}  # noqa: E731
    (folder / "eval" / "results.json").write_text(json.dumps(
        {"benchmarks": {"synthetic": bench(in_domain), "synthetic_ood": bench(ood)}}))


def test_table2_rows_base_sft_dft_otr_rft_grpo_with_seeds(tmp_path):
    import json

    runs = tmp_path / "runs"
    base = _run(runs, "base", "train", {"model": {"tiny": {}}, "objective": {"name": "sft"}, "train": {}})
    _eval(base, 20.0, 10.0)
    model = {"path": str(base / "final")}
    rft_data = tmp_path / "rft.jsonl"
    sampled = tmp_path / "rft-samples"  # the eval that drew the RFT data: its cost is part of the RFT rows
    sampled.mkdir()
    (sampled / "results.json").write_text(json.dumps({"benchmarks": {"synthetic_train": {
        "generation_seconds": 30.0, "grading_seconds": 2.0, "tokens_generated": 5000}}}))
    rft_data.write_text(json.dumps({"prompt": "p", "solution": "s", "rft_source": str(sampled)}) + "\n")
    plain_data = tmp_path / "plain.jsonl"
    plain_data.write_text(json.dumps({"prompt": "p", "solution": "s"}) + "\n")
    for seed, (a, b) in enumerate([(30.0, 12.0), (34.0, 14.0)]):
        _eval(_run(runs, f"sft-seed{seed}", "train", {"model": model, "objective": {"name": "sft"},
                                                      "data": {"source": str(plain_data)}, "train": {}}), a, b)
        _eval(_run(runs, f"tuned-seed{seed}", "train", {"model": model, "objective": {"name": "sft"},
                                                        "data": {"source": str(rft_data)}, "train": {}}), a + 1, b)
        _eval(_run(runs, f"grpo-seed{seed}", "rl", {"student": model, "teacher": None,
                                                    "objective": {"name": "grpo"}, "train": {}}), a + 2, b)
        _eval(_run(runs, f"ppo-seed{seed}", "rl", {"student": model, "teacher": None, "critic": {"lr": 1e-3},
                                                   "objective": {"name": "ppo"}, "train": {}}), a - 1, b)
        _eval(_run(runs, f"dpo-seed{seed}", "train", {"model": model, "objective": {"name": "dpo"},
                                                      "data": {"source": str(plain_data), "format": "preference"},
                                                      "train": {}}), a - 2, b)
    other_base = _run(runs, "other-base", "train", {"model": {"tiny": {}}, "objective": {"name": "sft"}, "train": {}})
    _eval(_run(runs, "grpo-other-seed0", "rl", {"student": {"path": str(other_base / "final")}, "teacher": None,
                                                "objective": {"name": "grpo"}, "train": {}}), 99.0, 99.0)
    for name in ("tuned-seed0", "sft-seed0"):
        _metrics(runs / name, [{"step_seconds": 1.0, "tokens_per_s": 10.0, "response_tokens": 5}])
    _run(runs, "otr-beta0", "train", {"model": model, "objective": {"name": "otr", "beta": 0.0}, "train": {}})
    summary = report([runs], tmp_path / "out")
    text = (tmp_path / "out" / "tables.md").read_text()
    table2 = text[text.index("shaped like DFT Table 2"):]
    table2 = table2[: table2.index("\n### ")]  # up to the next table (compute)
    rows = {line.split("|")[1].strip(): line for line in table2.splitlines() if line.startswith("| ")}
    # after the header; otr-beta0 is not a Table 2 row, DPO is (by its data: preference pairs), not a Table 1 row
    assert list(rows)[1:] == ["base model", "sft", "tuned", "dpo", "grpo", "ppo"]
    # no samples.jsonl here: the seed mean without an interval (said under the table)
    assert "| 2 | 33.0 | 13.0 |" in rows["tuned"] and "| 23.97 |" in rows["tuned"]  # RFT by its data
    assert "| 32.00 |" in rows["grpo"] and "| 34.0 |" in rows["grpo"]
    assert "no per-problem samples (eval/samples.jsonl)" in table2
    assert "not in Table 2 (Table 1: 15.92)" in rows["base model"]
    assert "| 23.20 |" in rows["dpo"] and "| 28.66 |" in rows["ppo"] and "| 31.0 |" in rows["ppo"]
    assert [r["method"] for r in summary["tables"]["table2"]] == ["base model", "sft", "tuned", "dpo", "grpo", "ppo"]
    offline_table = text[text.index("shaped like DFT Table 1"):text.index("shaped like DFT Table 2")]
    assert "| dpo |" not in offline_table
    assert "Not in this table (started from another model than base): grpo-other-seed0" in text
    assert "tuned" not in [r["method"] for r in summary["tables"]["offline"]]
    assert (summary["compute"]["tuned-seed0"]["generate_s"], summary["compute"]["tuned-seed0"]["score_s"]) == (30.0, 2.0)
    assert summary["compute"]["sft-seed0"]["generate_s"] == 0.0


def test_a_damaged_metrics_line_is_an_error_not_a_dropped_step(tmp_path):
    import pytest

    from posttrain.errors import UserError
    from posttrain.runfolder import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed while appending the last line
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # damaged in the middle
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    path.write_text('[1, 2]\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 1 is not a JSON object"):
        read_jsonl(path)
    path.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_jsonl(path)
    run = _run(tmp_path / "runs", "r", "train", {"model": {"tiny": {}}, "objective": {"name": "sft"}, "train": {}})
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text("{")
    with pytest.raises(UserError, match="results.json: not valid JSON"):
        report([tmp_path / "runs"], tmp_path / "out")


def test_table2_says_when_the_base_run_is_missing(tmp_path):
    runs = tmp_path / "runs"
    _eval(_run(runs, "grpo-seed0", "rl", {"student": {"path": "/elsewhere/base/final"}, "teacher": None,
                                          "objective": {"name": "grpo"}, "train": {}}), 20.0, 10.0)
    report([runs], tmp_path / "out")
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "not a run among the report's folders: no base row" in text
