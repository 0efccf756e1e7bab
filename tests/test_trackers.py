"""Experiment trackers (report_to): the same rows as metrics.jsonl, read back from the tracker's
own files; a missing package is one line before anything runs."""

import importlib.util
import json

import pytest

from tests.helpers import BENCHMARKS, run_cli, tiny_train_recipe, write_recipe, metrics_of

tensorboard = pytest.importorskip("tensorboard", reason="the tensorboard extra (in `dev`) is not installed")


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_metrics_row_of_a_train_run(tmp_path):
    recipe = tiny_train_recipe(tmp_path, name="tb", report_to=["tensorboard"])
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    run_dir = tmp_path / "runs" / "tb"
    rows = metrics_of(run_dir)
    logged = scalars(run_dir / "tensorboard")
    assert len(rows) == 8
    for key in ("loss", "grad_norm", "lr", "response_tokens"):
        assert [step for step, _ in logged[f"train/{key}"]] == [row["step"] for row in rows]
        assert [value for _, value in logged[f"train/{key}"]] == pytest.approx([row[key] for row in rows], rel=1e-6)


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="../shared/benchmarks is not beside the checkout")
def test_eval_results_go_to_tensorboard(tmp_path):
    from posttrain.eval.benchmarks import load_benchmark

    bench = load_benchmark("math500", str(BENCHMARKS), 2)
    path = tmp_path / "completions.jsonl"
    path.write_text("\n".join(json.dumps({"index": i, "completion": c})
                              for i, c in ((0, bench.rows[0]["solution"]), (1, "\\boxed{nonsense}"))))
    run_cli("eval", "--benchmark", "math500", "--data-dir", str(BENCHMARKS), "--completions", str(path),
            "--out", str(tmp_path / "g"), "--report-to", "tensorboard")
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    logged = scalars(tmp_path / "g" / "tensorboard")
    assert logged["eval/math500/avg@1"] == [(0, pytest.approx(results["benchmarks"]["math500"]["metrics"]["avg@1"]))]
    assert results["benchmarks"]["math500"]["metrics"]["avg@1"] == 50.0  # percent: one of two right


def test_a_missing_tracker_package_is_one_line_before_the_run(tmp_path):
    missing = next((name for name in ("wandb", "trackio") if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("wandb and trackio are both installed")
    recipe = tiny_train_recipe(tmp_path, name="no-tracker", report_to=["tensorboard", missing])
    path = write_recipe(tmp_path, recipe)
    proc = run_cli("train", "--recipe", str(path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}: key 'report_to': {missing} is not installed; pip install 'posttrain[{missing}]'" in proc.stderr
    assert not (tmp_path / "runs" / "no-tracker").exists()
    proc = run_cli("train", "--recipe", str(path), "report_to=[mlflow]", check=False)
    assert proc.returncode == 2 and "must be one of: none, tensorboard, wandb, trackio" in proc.stderr


def test_none_means_no_tracker(tmp_path):
    recipe = tiny_train_recipe(tmp_path, name="plain", report_to="none", train={"max_steps": 1})
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    assert not (tmp_path / "runs" / "plain" / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional extra)")
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # run_cli's subprocess inherits the environment
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = tiny_train_recipe(tmp_path, name="wb", report_to=["wandb"], train={"max_steps": 2})
    run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)))
    assert list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
