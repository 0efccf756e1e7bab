"""`posttrain distill --check` and the same checks at the start of every distill run."""

import shutil

import pytest

from posttrain.config import TinyModelConfig
from posttrain.data.sft import Example
from posttrain.models import CHATML_TEMPLATE, build_tiny_model, build_tiny_tokenizer, load_tokenizer
from posttrain.preflight import determinism_findings, end_of_turn_id
from tests.helpers import TINY, run_cli, write_recipe, metrics_of
from tests.test_distill import distill_recipe


def teacher_with_template(tmp_path, models, template):  # noqa: F811
    """A copy of the fixture's teacher whose tokenizer renders chats with another template."""
    teacher_dir = tmp_path / "teacher-copy"
    shutil.copytree(models[0], teacher_dir)
    tokenizer = load_tokenizer(str(teacher_dir))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(teacher_dir)
    return teacher_dir


def test_check_on_a_good_pair_reports_numbers_and_writes_nothing(tmp_path, models):  # noqa: F811
    recipe = distill_recipe(tmp_path, models, {"name": "lsm", "k": 8})
    proc = run_cli("distill", "--check", "--recipe", str(write_recipe(tmp_path, recipe)))
    out = proc.stdout + proc.stderr
    assert "pre-flight: no problems found" in out, out
    # the trained teacher prefers its own samples to the weaker student's
    line = next(l for l in out.splitlines() if "teacher log-prob per token" in l)
    own, student = (float(part.split()[0]) for part in line.split(": ", 2)[2].split(", ")[:2])
    assert own > student
    assert "teacher scoring: same batch twice differs by 0.00e+00" in out
    assert not (tmp_path / "runs").exists()


def test_a_template_that_ends_turns_with_an_ordinary_token_is_refused(tmp_path, models):  # noqa: F811
    odd_end = CHATML_TEMPLATE.replace("'<|im_end|>' + '\\n'", "'\\n### End\\n'")
    assert odd_end != CHATML_TEMPLATE
    recipe = distill_recipe(tmp_path, models, {"name": "lsm", "k": 8}, name="refused")
    recipe["teacher"] = {"path": str(teacher_with_template(tmp_path, models, odd_end))}
    path = write_recipe(tmp_path, recipe)
    for args in (["--check"], []):
        proc = run_cli("distill", *args, "--recipe", str(path), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        out = proc.stdout + proc.stderr
        assert "error: key 'student': the teacher ends a turn with" in out
        assert "warning: key 'teacher': the chat templates end a turn differently" in out
        assert f"{path}: pre-flight found 1 fatal problem(s)" in out
    assert not (tmp_path / "runs" / "refused" / "final").exists()


def test_a_different_rendering_warns_and_the_run_goes_on(tmp_path, models):  # noqa: F811
    # (this run also checks that a distill run's rows reach TensorBoard: tests/test_trackers.py)
    with_system = ("{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}" + CHATML_TEMPLATE)
    recipe = distill_recipe(tmp_path, models, {"name": "opd"}, name="warned", steps=1)
    recipe["report_to"] = ["tensorboard"]
    recipe["teacher"] = {"path": str(teacher_with_template(tmp_path, models, with_system))}
    proc = run_cli("distill", "--recipe", str(write_recipe(tmp_path, recipe)))
    out = proc.stdout + proc.stderr
    assert "key 'teacher': the chat templates render the same prompt differently (from token 1: student 'user" in out
    assert (tmp_path / "runs" / "warned" / "final").exists()
    from tests.test_trackers import scalars

    [row] = metrics_of(tmp_path / "runs" / "warned")
    assert scalars(tmp_path / "runs" / "warned" / "tensorboard")["train/reverse_kl"] == [(1, pytest.approx(row["reverse_kl"]))]


def test_end_of_turn_is_read_from_the_template():
    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert end_of_turn_id(tokenizer) is None


def test_non_deterministic_scoring_is_reported():
    tokenizer = build_tiny_tokenizer(TINY["vocab_size"])
    config = TinyModelConfig(**{k: v for k, v in TINY.items() if k != "vocab_size"}, vocab_size=TINY["vocab_size"])
    model = build_tiny_model(config, len(tokenizer), seed=0)
    examples = [Example(list(range(5, 5 + n)), 2) for n in (9, 14, 6)]
    findings, info = determinism_findings({"student": model.eval()}, examples, tokenizer.pad_token_id)
    assert findings == [] and len(info) == 1
    model.config.attention_dropout = 0.5  # dropout left on: scores change from call to call
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    findings, _ = determinism_findings({"student": model.train()}, examples, tokenizer.pad_token_id)
    assert any("scoring the same batch twice differs" in f.message for f in findings)
