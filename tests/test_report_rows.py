"""`posttrain report` picks each run's paper row from the run's own settings (config.yaml),
never from its name."""

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
