"""The code sandbox without bubblewrap: refused unless allowed, labelled when allowed, and its weak
layer (a user namespace, Landlock, seccomp) holding against the attacks that got through it before
— as root and as an ordinary user — with nothing left behind, also when the eval is killed.
Forced with POSTTRAIN_SANDBOX=weak (or force_weak=True) where bubblewrap is installed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.errors import UserError
from posttrain.eval import code_sandbox
from posttrain.eval.code_sandbox import CodeSandbox, assemble_program
from posttrain.eval.sandbox_wire import decode, encode, landlock_abi
from tests import sandbox_attacks
from tests.helpers import BENCHMARKS, REPO, run_cli

HUMANEVAL = BENCHMARKS / "humaneval.jsonl.gz"
needs_data = pytest.mark.skipif(not HUMANEVAL.is_file(), reason="../shared/benchmarks is not beside the checkout")
needs_landlock = pytest.mark.skipif(landlock_abi() < 1, reason="this kernel has no Landlock (Linux >= 5.13 with landlock among its LSMs)")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"),
                                reason="needs root, setpriv and useradd to run as an ordinary user")
FAST_PROBLEMS = ["HumanEval/0", "HumanEval/53"]
PROMPT, TEST = "def f(x):\n    \"\"\"Twice x.\"\"\"\n", "def check(c):\n    assert c(2) == 4\n"


@pytest.fixture(scope="module", autouse=True)
def no_user_left_behind():
    yield
    sandbox_attacks.remove_created_users()  # the ordinary user made for the attacks, if this run made it


@pytest.fixture(scope="module")
def weak():
    sandbox = CodeSandbox(workers=2, timeout=5, memory_mb=512, allow_weak=True, force_weak=True)
    yield sandbox
    sandbox.close()


def test_without_bubblewrap_code_grading_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setattr(code_sandbox.shutil, "which", lambda name: None)
    with pytest.raises(UserError) as refused:
        CodeSandbox(workers=1)
    assert "apt-get install bubblewrap" in str(refused.value) and "--allow-weak-sandbox" in str(refused.value)
    with pytest.raises(UserError, match="scoring.allow_weak_sandbox: true"):
        code_sandbox.check_strong_sandbox(False, code_sandbox.WEAK_SANDBOX_KEY)
    code_sandbox.check_strong_sandbox(True, code_sandbox.WEAK_SANDBOX_KEY)


@needs_data
def test_eval_refuses_then_labels_every_code_number_weak(tmp_path, monkeypatch):
    import gzip

    rows = [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")][:2]
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps({"index": i, "completion": r["canonical_solution"]}) + "\n"
                                   for i, r in enumerate(rows)))
    monkeypatch.setenv("POSTTRAIN_SANDBOX", "weak")
    out = tmp_path / "graded"
    args = ["eval", "--benchmark", "humaneval", "--data-dir", str(BENCHMARKS), "--limit", "2", "--completions",
            str(completions), "--out", str(out)]
    refused = run_cli(*args, check=False)
    assert refused.returncode == 2 and not out.exists()
    lines = [line for line in refused.stderr.splitlines() + refused.stdout.splitlines() if line.strip()]
    assert len(" ".join(lines).split("error:")) == 2 and "apt-get install bubblewrap" in " ".join(lines)
    graded = run_cli(*args, "--allow-weak-sandbox")
    results = json.loads((out / "results.json").read_text())
    assert results["sandbox"] == "weak" and results["benchmarks"]["humaneval"]["sandbox"] == "weak"
    assert results["code_sandbox"].startswith("weak: ")
    printed = " ".join((graded.stdout + graded.stderr).split())
    assert "100.00†" in printed and "weak sandbox: forgeable" in printed
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["sandbox"] for s in samples] == ["weak", "weak"]


def test_weak_mode_grades_honest_code_and_reports_its_layers(weak):
    assert weak.mode == "weak" and weak.isolation.startswith("weak: seccomp")
    if landlock_abi() >= 1:
        assert f"Landlock ABI {landlock_abi()}" in weak.isolation and weak.weak_layers["landlock"]
    honest = ("    import asyncio, zipfile, logging, email.message, concurrent.futures, pickle, gzip, tempfile, pathlib\n"
              "    p = pathlib.Path(tempfile.gettempdir()) / 'scratch.txt'\n    p.write_text('hi')\n"
              "    assert p.read_text() == 'hi'\n    return 2 * x\n")
    assert weak.run(assemble_program(PROMPT, honest, TEST, "f")) == {"passed": True, "error": None}


# --- generators, as the original harness compares them -------------------------------------------


def test_returned_iterators_cross_as_iterators():
    gen = (i for i in [1, 2])
    back = decode(json.loads(json.dumps(encode(gen))))
    assert type(back) is type(iter([])) and back != [1, 2] and list(back) == [1, 2] and list(back) == []
    assert decode(encode(range(1, 10, 3))) == range(1, 10, 3)
    assert list(decode(encode(map(str, [1])))) == ["1"]


@needs_data
def test_generator_solutions_of_problems_33_and_37_pass(weak):
    rows = {r["task_id"]: r for r in sandbox_attacks.humaneval_rows()}
    generators = {
        "HumanEval/33": "    l = list(l)\n    l[::3] = sorted(l[::3])\n    return (v for v in l)\n",
        "HumanEval/37": "    l = list(l)\n    l[::2] = sorted(l[::2])\n    yield from l\n",
    }
    for task, body in generators.items():
        row = rows[task]
        verdict = weak.run(assemble_program(row["prompt"], body, row["test"], row["entry_point"]))
        assert verdict == {"passed": True, "error": None}, (task, verdict)
    # a generator is not a list: a test comparing with == fails, as in the original harness
    verdict = weak.run(assemble_program("def f(x):\n", "    return (v for v in [x])\n",
                                        "def check(c):\n    assert c(1) == [1]\n", "f"))
    assert verdict["passed"] is False


# --- nothing left behind ----------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="sample uids (and their lock files) only as root")
def test_uid_lock_files_are_removed_when_the_sandbox_closes_or_its_eval_died():
    stale = code_sandbox.UID_LOCKS / "9999.lock"  # as a killed eval leaves it: nobody holds it
    code_sandbox.UID_LOCKS.mkdir(mode=0o700, exist_ok=True)
    stale.write_text("")
    first = CodeSandbox(workers=1, allow_weak=True, force_weak=True)
    assert not stale.exists()
    second = CodeSandbox(workers=1, allow_weak=True, force_weak=True)
    held = [Path(first.uid_lock.name), Path(second.uid_lock.name)]
    assert held[0] != held[1] and all(path.exists() for path in held)
    first.close()
    second.close()
    assert not any(path.exists() for path in held)


def test_a_killed_eval_leaves_no_scratch_behind():
    """SIGKILL gives the eval no time to clean up: the sample's private /tmp and /dev/shm (user
    namespace) go with it, its scratch root is removed by the next sandbox to start."""
    script = ("from posttrain.eval.code_sandbox import CodeSandbox, assemble_program\n"
              "program = assemble_program('def f():\\n', '    open(\"/tmp/x\", \"w\").write(\"x\")\\n"
              "    import time; time.sleep(1234.5)\\n', 'def check(c):\\n    c()\\n', 'f')\n"
              "sandbox = CodeSandbox(workers=1, timeout=120, allow_weak=True, force_weak=True)\n"
              "print(sandbox.scratch_root, flush=True)\n"
              "sandbox.run_many([program])\n")
    eval_process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                                    stdout=subprocess.PIPE, text=True)
    try:
        root = eval_process.stdout.readline().strip()
        deadline = time.time() + 30
        while not any(Path(root).glob("sample-*")):
            assert time.time() < deadline and eval_process.poll() is None
            time.sleep(0.1)
        time.sleep(1)
    finally:
        eval_process.send_signal(signal.SIGKILL)
        eval_process.wait()
    assert Path(root).exists()  # what the next start finds
    CodeSandbox(workers=1, allow_weak=True, force_weak=True).close()
    assert not Path(root).exists()


# --- the attacks that got through the weak mode before --------------------------------------------


def assert_all_blocked(got: dict, threads_bounded: bool = True) -> None:
    """Every attack blocked, no forged pass, nothing left; honest code passes (and the thread bomb
    is bounded where the sample's task count is its own: a uid or user namespace of its own)."""
    through = {attack: (got.get(attack), got["host"].get(attack)) for attack in sandbox_attacks.ATTACKS
               if not sandbox_attacks.blocked(got, attack)}
    assert not through, (got["isolation"], through)
    assert got["forged"] == 0 and not got["host"]["scratch folder left"]
    honest = got["honest"] if threads_bounded else got["honest"][:1]
    assert honest == [{"passed": True, "error": None}] * len(honest), got["honest"]


@needs_data
@needs_landlock
def test_weak_layer_blocks_the_attacks_as_root():
    if os.geteuid() != 0:
        pytest.skip("as root: samples under uids of their own")
    assert_all_blocked(sandbox_attacks.run_attacks(None, FAST_PROBLEMS))


@needs_data
@needs_landlock
@needs_root
def test_weak_layer_blocks_the_attacks_as_an_ordinary_user():
    assert_all_blocked(sandbox_attacks.run_attacks(sandbox_attacks.ensure_user(), FAST_PROBLEMS))


@needs_data
@needs_landlock
@needs_root
@pytest.mark.slow
def test_no_problem_is_forged_by_reading_the_tests_in_the_weak_mode():
    """The forger that read the reference tests from the benchmark file passed 158/164 before."""
    every = [r["task_id"] for r in sandbox_attacks.humaneval_rows()]
    for user in (None, sandbox_attacks.ensure_user()):
        assert_all_blocked(sandbox_attacks.run_attacks(user, every))


@needs_data
@needs_landlock
@needs_root
@pytest.mark.slow
def test_landlock_alone_still_blocks_the_file_attacks():
    """Where the kernel refuses unprivileged user namespaces, Landlock (and seccomp) still hold."""
    for user in (None, sandbox_attacks.ensure_user()):
        assert_all_blocked(sandbox_attacks.run_attacks(user, FAST_PROBLEMS, layers="landlock"), threads_bounded=user is None)


@needs_data
def test_rl_with_a_code_reward_is_refused_before_any_folder_unless_the_recipe_allows_it(tmp_path, monkeypatch):
    from tests.helpers import write_recipe
    from tests.test_grpo import _code_recipe, _humaneval_prompts

    source, _ = _humaneval_prompts(tmp_path)
    recipe = _code_recipe(tmp_path, source)
    recipe["train"]["steps"] = 1
    monkeypatch.setenv("POSTTRAIN_SANDBOX", "weak")
    refused = run_cli("rl", "--recipe", str(write_recipe(tmp_path, recipe)), check=False)
    assert refused.returncode == 2 and not (tmp_path / "runs").exists()
    assert "scoring.allow_weak_sandbox: true" in " ".join(refused.stderr.split())
    recipe["scoring"]["allow_weak_sandbox"] = True  # the key that allows it (its effect: tests/test_grpo.py)
    from posttrain.config import RLRecipe, from_dict

    assert from_dict(RLRecipe, recipe, "test").scoring.allow_weak_sandbox is True
