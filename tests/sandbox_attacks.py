"""Attacks on the weak code sandbox (no bubblewrap), run as the eval's user — root, or an ordinary
user made with useradd — and checked from the host: what each attack did, not only what the
sample says it did. Used by tests/test_sandbox_weak.py; `python -m tests.sandbox_attacks` prints
the per-attack table (root and user, the weak layer as built and, for comparison, without its
Landlock and user-namespace layers)."""

from __future__ import annotations

import gzip
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import BENCHMARKS, REPO

HUMANEVAL = BENCHMARKS / "humaneval.jsonl.gz"
MARK = "posttrain-leak"
USER = "ptsandbox"  # the ordinary user the attacks also run as (made with useradd, as root)
SECRET, TOKEN = "SECRET-ORIGINAL", "hf_posttrain_attack_test_token"
SHARED_DIRS = ("/tmp", "/dev/shm", "/var/tmp", "/run/lock")

# Each attack is the body of f(x): it returns what it achieved (a list of strings), so that the
# test `assert f(1) == []` fails with the achievements in its message. Placeholders: BENCH, HOME,
# VICTIM (pid), ADDRESS (of the victim's secret), WORLD (a root-owned world-writable file), MARK.
ATTACKS = {
    "read the benchmark file": """
    try:
        data = open(BENCH, "rb").read()
        return ["read %d bytes" % len(data)]
    except OSError as err:
        return []
""",
    "write outside scratch": """
    done = []
    for path, mode in ((WORLD, "w"), ("/tmp/MARK-out", "w"), ("/var/tmp/MARK-out", "w"), (HOME + "/MARK-out", "w")):
        try:
            with open(path, mode) as f:
                f.write("overwritten")
            done.append(path)
        except OSError:
            pass
    return done
""",
    "write /proc/PID/mem of another process": """
    try:
        with open("/proc/%d/mem" % VICTIM, "r+b", buffering=0) as f:
            f.seek(ADDRESS)
            f.write(b"CHANGED")
        return ["wrote"]
    except OSError:
        return []
""",
    "read /proc/PID/environ of another process": """
    try:
        data = open("/proc/%d/environ" % VICTIM, "rb").read()
        return ["read environ" + (" with the token" if b"TOKEN" in data else "")]
    except OSError:
        return []
""",
    "append to ~/.bashrc": """
    try:
        with open(HOME + "/.bashrc", "a") as f:
            f.write("echo MARK\\n")
        return ["appended"]
    except OSError:
        return []
""",
    "delete a file in home": """
    import os
    done = []
    for attempt in (lambda: os.unlink(HOME + "/keep.txt"), lambda: os.rename(HOME + "/keep.txt", HOME + "/moved")):
        try:
            attempt()
            done.append("gone")
            break
        except OSError:
            pass
    return done
""",
    "chmod a file in home": """
    import os
    try:
        os.chmod(HOME + "/keep.txt", 0o777)
        return ["chmod"]
    except OSError:
        return []
""",
    "leave files in /dev/shm, /var/tmp, /run/lock": """
    done = []
    for top in ("/dev/shm", "/var/tmp", "/run/lock", "/tmp"):
        try:
            with open(top + "/MARK-big", "wb") as f:
                for _ in range(15):
                    f.write(b"x" * 2**20)
            done.append(top)
        except OSError:
            pass
    return done
""",
    "signal another process of the user": """
    import os, signal
    try:
        os.kill(VICTIM, signal.SIGTERM)
        return ["signalled"]
    except OSError:
        return []
""",
}
THREAD_BOUND = """
import threading as _threading
_stop, _started = _threading.Event(), 0
_threading.stack_size(32768)
try:
    for _ in range(100):
        _threading.Thread(target=_stop.wait, daemon=True).start()
        _started += 1
except RuntimeError:
    pass
_stop.set()
_threading.stack_size(0)
assert 32 <= _started < 64, f"{_started} threads: a pool of 32 must work, a bomb must not"
"""
TEST = "def check(f):\n    got = f(1)\n    assert got == [], got\n"
VICTIM_SOURCE = f"""
import ctypes, os, sys
secret = ctypes.create_string_buffer({SECRET!r}.encode())
print(os.getpid(), ctypes.addressof(secret), flush=True)
sys.stdin.read()
print(secret.value.decode(), flush=True)
"""
EVAL_SOURCE = """
import json, sys
from posttrain.eval.code_sandbox import CodeSandbox
job = json.load(sys.stdin)
sandbox = CodeSandbox(workers=2, timeout=10, memory_mb=512, allow_weak=True, force_weak=True)
if job["layers"] != "all":  # for comparison: "none" is the weak mode as it was (seccomp, rlimits, a uid as root)
    sandbox.weak_layers = {"userns": job["layers"] == "userns", "landlock": job["layers"] == "landlock", "require": True}
verdicts = sandbox.run_many(job["programs"])
print(json.dumps([sandbox.isolation, verdicts, sandbox.scratch_root]))
sandbox.close()
"""


def humaneval_rows() -> list[dict]:
    return [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")]


CREATED: list[str] = []  # users ensure_user made (remove_created_users deletes them)


def ensure_user() -> pwd.struct_passwd:
    """The ordinary user (as root): made with useradd when missing."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True, capture_output=True)
        CREATED.append(USER)
        return pwd.getpwnam(USER)


def remove_created_users() -> None:
    while CREATED:
        subprocess.run(["userdel", "--remove", CREATED.pop()], capture_output=True)


def as_user(user: pwd.struct_passwd | None) -> list[str]:
    if user is None:
        return []
    return [shutil.which("setpriv"), f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]


def python_for(user) -> str:
    return "/usr/bin/python3" if user is not None else sys.executable


def run_attacks(user: pwd.struct_passwd | None, forger_problems: list[str], layers: str = "all") -> dict:
    """Every attack once (and the "reading the tests" forger on `forger_problems`), graded by a weak
    sandbox in a process of `user` (None: this process's user, root), with its weak `layers` (all;
    for comparison only landlock, only userns, or none). {attack: what got through}."""
    home = Path(user.pw_dir) if user else Path(tempfile.mkdtemp(prefix="posttrain-attack-home-"))
    world = Path("/var/tmp") / f"{MARK}-world-writable"
    cleanup(None, world, home)  # nothing left from an earlier run counts against this one
    for name, text in ((".bashrc", "# original\n"), ("keep.txt", "keep\n")):
        (home / name).write_text(text)
        os.chmod(home / name, 0o644)
        if user:
            os.chown(home / name, user.pw_uid, user.pw_gid)
    world.write_text("original\n")
    os.chmod(world, 0o666)  # root-owned, world-writable (as root: created by root; as user: too)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(REPO), "HF_TOKEN": TOKEN,
           "LANG": "C.UTF-8"}
    victim = subprocess.Popen([*as_user(user), python_for(user), "-c", VICTIM_SOURCE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd="/")
    pid, address = (int(v) for v in victim.stdout.readline().split())
    programs, labels = [], []
    for name, body in ATTACKS.items():
        for key, value in (("BENCH", repr(str(HUMANEVAL))), ("HOME", repr(str(home))), ("VICTIM", str(pid)),
                           ("ADDRESS", str(address)), ("WORLD", repr(str(world))), ("MARK", MARK)):
            body = body.replace(key, value)
        programs.append({"prompt": "", "entry_point": "f", "test": TEST, "solution": "def f(x):" + body})
        labels.append(name)
    rows = {r["task_id"]: r for r in humaneval_rows()} if forger_problems else {}
    from tests.test_sandbox import FORGERS, hostile_completion  # the hostile set's forger that reads the tests
    from posttrain.eval.code_sandbox import assemble_program

    from tests.test_sandbox import HONEST  # honest neighbours: stdlib imports, its tmp, 32 threads, recursion

    honest_test = ("def check(candidate):\n    items = [3, 1]\n    assert candidate(2, items) == [5002, 100, [3, 2, 1]]\n"
                   "    assert items == [3, 1, 2]\n")
    programs += [assemble_program("", HONEST, honest_test, "f"),
                 assemble_program("def f(x):\n", "    return 2 * x\n" + THREAD_BOUND, "def check(c):\n    assert c(2) == 4\n", "f")]
    labels += ["honest", "honest"]
    for task in forger_problems:
        row = rows[task]
        completion = hostile_completion(FORGERS["reading the tests"], row["entry_point"], 9)
        programs.append(assemble_program(row["prompt"], completion, row["test"], row["entry_point"]))
        labels.append("forge by reading the tests")
    try:
        proc = subprocess.run([*as_user(user), python_for(user), "-c", EVAL_SOURCE], capture_output=True, text=True,
                              input=json.dumps({"programs": programs, "layers": layers}), env=env, cwd="/",
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        isolation, verdicts, scratch_root = json.loads(proc.stdout)
    finally:
        victim.stdin.close()
        victim_secret = victim.stdout.read().strip()
        victim.wait(timeout=10)
    got: dict = {"isolation": isolation}
    for label, verdict in zip(labels, verdicts):
        if label in ("forge by reading the tests", "honest"):
            got.setdefault(label, []).append(verdict["passed"] if label != "honest" else verdict)
        else:
            got[label] = [] if verdict["passed"] else [verdict["error"]]
    # What the host sees, whatever the sample said.
    host = {
        "write outside scratch": world.read_text() != "original\n" or any(
            Path(top, f"{MARK}-out").exists() for top in ("/tmp", "/var/tmp", str(home))),
        "write /proc/PID/mem of another process": victim_secret != SECRET,
        "append to ~/.bashrc": (home / ".bashrc").read_text() != "# original\n",
        "delete a file in home": not (home / "keep.txt").exists(),
        "chmod a file in home": (home / "keep.txt").exists() and (home / "keep.txt").stat().st_mode & 0o777 != 0o644,
        "leave files in /dev/shm, /var/tmp, /run/lock": any(f"{MARK}-big" in path for path in leftover_files()),
        "signal another process of the user": victim.returncode != 0,
        "scratch folder left": bool(scratch_root and os.path.exists(scratch_root)),
    }
    got["host"] = host
    got["forged"] = sum(got.pop("forge by reading the tests", []))
    cleanup(home if user is None else None, world, home)
    return got


def leftover_files() -> list[str]:
    found = []
    for top in SHARED_DIRS:
        try:
            found += [f"{top}/{name}" for name in os.listdir(top) if f"{MARK}-big" in name or f"{MARK}-out" in name]
        except OSError:
            pass
    return found


def cleanup(home: Path | None, world: Path, user_home: Path) -> None:
    for path in leftover_files() + [str(world), str(user_home / f"{MARK}-out")]:
        try:
            os.unlink(path)
        except OSError:
            pass
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


# Judged on the host alone: in a private tmpfs /tmp or /dev/shm a write succeeds and is gone with the sample.
HOST_ONLY = ("write outside scratch", "leave files in /dev/shm, /var/tmp, /run/lock")


def blocked(got: dict, attack: str) -> bool:
    """Blocked: the sample achieved nothing by its own account, and the host shows no trace."""
    if attack in HOST_ONLY:
        return not got["host"][attack]
    return not got.get(attack) and not got["host"].get(attack, False)


def table(rows: dict) -> str:
    columns = list(rows)
    lines = ["| attack | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for attack in [*ATTACKS, "forge by reading the tests"]:
        cells = []
        for column in columns:
            got = rows[column]
            if attack == "forge by reading the tests":
                cells.append(f"{got['forged']}/{got['problems']} forged")
            else:
                cells.append("blocked" if blocked(got, attack) else "NOT blocked")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines.append("| scratch folder left after the eval | " + " | ".join(
        "yes" if rows[c]["host"]["scratch folder left"] else "no" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    assert os.geteuid() == 0, "run as root (it also becomes an ordinary user)"
    problems = [r["task_id"] for r in humaneval_rows()] if "--all" in sys.argv else ["HumanEval/0", "HumanEval/2", "HumanEval/53"]
    user = ensure_user()
    results = {}
    for column, who, layers in (("root, weak layer", None, "all"), ("user, weak layer", user, "all"),
                                ("root, Landlock only", None, "landlock"), ("user, Landlock only", user, "landlock"),
                                ("root, userns only", None, "userns"), ("user, userns only", user, "userns"),
                                ("root, neither (as before)", None, "none"), ("user, neither (as before)", user, "none")):
        clock = time.time()
        got = run_attacks(who, problems, layers)
        got["problems"] = len(problems)
        results[column] = got
        print(f"{column}: {got['isolation']} ({time.time() - clock:.0f} s)", file=sys.stderr)
        print(json.dumps({k: v for k, v in got.items() if k != "isolation"}, default=str)[:3000], file=sys.stderr)
    remove_created_users()
    print(table(results))
