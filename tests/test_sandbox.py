"""The HumanEval code sandbox: canonical solutions pass, and a hostile set of completions — each
an attempt to forge a pass or to reach the host — fails on every problem, run as root and as an
unprivileged user, with honest neighbours passing and nothing left behind."""

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from posttrain.eval import code_sandbox
from posttrain.eval.code_sandbox import CodeSandbox, assemble_program
from posttrain.eval.sandbox_wire import WireError, decode, encode
from tests.helpers import BENCHMARKS, REPO, run_cli
from tests.sandbox_attacks import THREAD_BOUND

DATA = BENCHMARKS
HUMANEVAL = DATA / "humaneval.jsonl.gz"
needs_data = pytest.mark.skipif(not HUMANEVAL.is_file(), reason="../shared/benchmarks is not beside the checkout")
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make test installs it as root)")
MARK = "posttrain-leak"  # every file or process an attack manages to create carries this name
SANDBOX_UIDS = (100_000, 100_000 + 10_000 * 1000)  # where CodeSandbox takes a uid per sample when root


def humaneval_rows():
    return [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")]


# --- the wire ----------------------------------------------------------------------------------


def test_plain_data_round_trips_and_nothing_else_crosses():
    values = [None, True, False, 0, -5, 10**5000, 1.5, float("inf"), -0.0, "x\ud800é", b"\x00\xff",
              [1, [2, (3, "a")]], (), {1: {"a": (1, 2)}, (1, 2): None, frozenset({1}): 2}, {1, 2.5}, frozenset()]
    for value in values:
        back = decode(json.loads(json.dumps(encode(value))))
        assert back == value and type(back) is type(value)
    nan = decode(encode(float("nan")))
    assert nan != nan

    class AlwaysEqual(str):
        def __eq__(self, other):
            return True

    back = decode(encode(AlwaysEqual("x")))
    assert type(back) is str and back != "y"
    for bad in (object(), print, 1j, bytearray(b"x"), iter([object()])):  # an iterator of plain data crosses
        with pytest.raises(WireError):
            encode(bad)
    for forged in (5, "s", {"i": "1"}, ["i", 5], ["d", [[["l", []], None]]], ["x", []], ["l", [["q", 1]]]):
        with pytest.raises(WireError):
            decode(forged)
    deep = None
    for _ in range(500):
        deep = ["l", [deep]]
    with pytest.raises(WireError):
        decode(deep)


# --- honest code -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox():
    return CodeSandbox(workers=2, timeout=3, memory_mb=512, allow_weak=True)  # the weak one where bubblewrap is missing


@needs_bwrap
def test_the_strong_layer_is_used_when_bubblewrap_is_there(sandbox):
    assert sandbox.isolation == "bubblewrap + seccomp + rlimits" and sandbox.warning() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="samples get uids of their own only as root")
def test_two_sandboxes_never_share_sample_uids(sandbox):
    """Two evals whose pids agreed mod 10000 (or two sandboxes in one process) took the same uids:
    a shared process limit, and in the weak mode one sweeping (killing) the other's samples."""
    other = CodeSandbox(workers=2, timeout=3, allow_weak=True)
    assert abs(other.first_uid - sandbox.first_uid) >= 1000
    assert SANDBOX_UIDS[0] <= other.first_uid and other.first_uid + 1000 <= SANDBOX_UIDS[1]


def test_chat_style_fenced_code_is_accepted(sandbox):
    prompt = 'def add(a, b):\n    """Add."""\n'
    completion = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert sandbox.run(assemble_program(prompt, completion, "def check(f):\n    assert f(2, 3) == 5\n", "add"))["passed"]
    continuation = "    return a + b\n\ndef unrelated():\n    raise SystemExit\n"  # cut at the stop sequence
    assert sandbox.run(assemble_program(prompt, continuation, "def check(f):\n    assert f(1, 1) == 2\n", "add"))["passed"]


HONEST = r'''```python
import glob, pathlib, zlib, json, tempfile, threading, sys, os
def f(n, items):
    """Honest code: stdlib imports, files in its own tmp, a thread, deep recursion, memory, prints."""
    if not isinstance(n, int):
        raise TypeError("n must be an int")
    print("working on", n, file=sys.stderr)
    print("x" * 50_000)
    path = pathlib.Path(tempfile.gettempdir()) / "scratch.txt"
    path.write_text(str(n))
    assert glob.glob(str(path)) and zlib.decompress(zlib.compress(b"ab")) == b"ab"
    box = []
    worker = threading.Thread(target=lambda: box.append(int(path.read_text())))
    worker.start(); worker.join()
    import asyncio, concurrent.futures, time  # a pool of 32 threads (once 6 filled 512 MB), an event loop
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert sum(pool.map(lambda v: (time.sleep(0.02), v)[1], range(64))) == 2016
    assert asyncio.run(asyncio.sleep(0, result=7)) == 7
    depth = lambda k: 0 if k == 0 else 1 + depth(k - 1)
    big = bytearray(100 * 2**20)
    items.append(n)  # changes the caller's list, as in the original harness
    return [depth(5000) + box[0], len(big) // 2**20, sorted(items, key=lambda v: -v)]
```'''


def test_honest_code_works_and_in_place_changes_reach_the_test(sandbox):
    test = ("def check(candidate):\n    items = [3, 1]\n    assert candidate(2, items) == [5002, 100, [3, 2, 1]]\n"
            "    assert items == [3, 1, 2]\n    try:\n        candidate('x', [])\n    except TypeError:\n        pass\n"
            "    else:\n        raise AssertionError('the TypeError did not reach the test')\n")
    verdict = sandbox.run(assemble_program("", HONEST, test, "f"))
    assert verdict == {"passed": True, "error": None}


def test_stop_iteration_cannot_cut_a_test_short(sandbox):
    # list(map(candidate, ...)) would end early at a StopIteration and compare equal to [].
    solution = "def f(x):\n    raise StopIteration\n"
    verdict = sandbox.run(assemble_program("", solution, "def check(c):\n    assert list(map(c, [1, 2])) == []\n", "f"))
    assert verdict == {"passed": False, "error": "the entry point raised StopIteration: "}


def test_a_failing_test_names_its_line(sandbox):
    verdict = sandbox.run(assemble_program("def f(x):\n", "    return x\n", "def check(c):\n    assert c(1) == 2\n", "f"))
    assert verdict["passed"] is False and verdict["error"] == "AssertionError at test.py:2: assert c(1) == 2"


@needs_data
def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    rows = humaneval_rows()
    sandbox = CodeSandbox(workers=2, timeout=10, allow_weak=True)
    canonical = sandbox.run_many([assemble_program(r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]) for r in rows])
    failed = [(r["task_id"], v["error"]) for r, v in zip(rows, canonical) if not v["passed"]]
    assert not failed, failed
    empty = sandbox.run_many([assemble_program(r["prompt"], "    pass\n", r["test"], r["entry_point"]) for r in rows])
    assert not any(v["passed"] for v in empty)


# --- the hostile set ---------------------------------------------------------------------------
# Each is a chat-style completion (a fenced block, used whole) defining the entry point ENTRY.
# FORGERS try to get a wrong answer graded as passing; the others try to reach the host. Most
# return None, which passes no HumanEval problem (the empty bodies above), so any pass is forged.

FORGERS = {
    "frame inspection": """
import sys, gc
def ENTRY(*args, **kwargs):
    seen = {}
    frame = sys._getframe()
    while frame:  # the grader's frames: a nonce, the test, expected values, a check function?
        seen.update(frame.f_locals)
        seen.update(frame.f_globals)
        frame = frame.f_back
    for obj in gc.get_objects():
        if callable(obj) and getattr(obj, "__name__", "") == "check":
            obj.__code__ = (lambda candidate: None).__code__
    for key in ("nonce", "expected", "answer", "test", "check"):
        if key in seen:
            return seen[key]
    return None
""",
    "settrace and setprofile": """
import sys, threading
def hook(frame, event, arg):
    if frame.f_code.co_name == "check":
        frame.f_globals["check"] = lambda candidate: None
        sys.exit(0)
    return hook
sys.settrace(hook); threading.settrace(hook)
sys.setprofile(hook); threading.setprofile(hook)
def ENTRY(*args, **kwargs):
    return None
""",
    "always-equal object": """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __lt__ = __le__ = __gt__ = __ge__ = __eq__
    def __hash__(self): return 0
    def __bool__(self): return True
    def __abs__(self): return 0
    def __float__(self): return 0.0
    def __len__(self): return 0
    def __iter__(self): return iter(())
    def __sub__(self, other): return self
    __rsub__ = __add__ = __radd__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __round__ = __sub__
def ENTRY(*args, **kwargs):
    return Anything()
""",
    "always-equal subclasses of plain types": """
class Str(str):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = str.__hash__
class List(list):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
def ENTRY(*args, **kwargs):
    return Str("forged") if len(args) % 2 else List(["forged"])
""",
    "reading the tests": """
import json, glob, os, re, zlib
def tests_text():
    found = []
    for path in [DATAFILE, *glob.glob("/*/*/*/humaneval*"), *glob.glob("/tmp/*"), "/proc/self/cmdline"]:
        try:
            raw = open(path, "rb").read()
            found.append((zlib.decompress(raw, 47) if path.endswith(".gz") else raw).decode())
        except Exception:
            pass
    for pid in os.listdir("/proc"):  # the checker's command line or environment?
        for part in ("cmdline", "environ"):
            try:
                found.append(open(f"/proc/{pid}/{part}", errors="replace").read())
            except Exception:
                pass
    return "\\n".join(found)
ANSWERS = {}
for line in tests_text().splitlines():
    try:
        row = json.loads(line)
    except ValueError:
        continue
    if isinstance(row, dict) and row.get("entry_point") == "ENTRY":
        for test_line in row["test"].splitlines():
            match = re.match(r"\\s*assert candidate\\((.*)\\) == (.*)$", test_line)
            if match:
                try:
                    ANSWERS[repr(eval("(" + match.group(1) + ",)"))] = eval(match.group(2))
                except Exception:
                    pass
def ENTRY(*args, **kwargs):
    return ANSWERS.get(repr(tuple(args)))
""",
    "patching builtins": """
import builtins, math
builtins.abs = lambda x: 0
builtins.all = builtins.any = lambda *a: True
math.isclose = lambda *a, **k: True
math.fabs = lambda x: 0.0
def ENTRY(*args, **kwargs):
    return 1e9  # with the checker's abs() patched, `abs(candidate(x) - expected) < 1e-6` would pass
""",
    "forged replies on every descriptor": """
import os, json, struct
def ENTRY(*args, **kwargs):
    fake = json.dumps(["return", None, [], {}]).encode()
    for fd in range(0, 64):
        try:
            os.write(fd, struct.pack(">I", len(fake)) + fake)
        except OSError:
            pass
    return None
""",
    "exceptions that are not errors": """
import sys
def ENTRY(*args, **kwargs):
    if args and isinstance(args[0], (int, float)) and args[0] > 3:
        raise SystemExit(0)
    raise type("AssertionError", (BaseException,), {})("forged")
""",
    "exit before the tests": """
import os, sys
def ENTRY(*args, **kwargs):
    return None
print("passed")
sys.stdout.flush()
os._exit(0)
""",
}

INTRUDERS = {
    "re-importing posix": """
import sys
del sys.modules["posix"]
import posix
def ENTRY(*args, **kwargs):
    home = posix.environ.get(b"HOME", b"/root").decode()
    for attempt in (lambda: posix.fork(), lambda: posix.kill(posix.getppid(), 9), lambda: posix.kill(-1, 9),
                    lambda: posix.system("sleep 1234.5 &"), lambda: open(home + "/MARK-posix", "w").write("x"),
                    lambda: posix.unlink(DATAFILE)):
        try:
            attempt()
        except BaseException:
            pass
    return None
""",
    "ctypes": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def ENTRY(*args, **kwargs):
    for attempt in (lambda: libc.fork(), lambda: libc.syscall(57), lambda: libc.syscall(56, 17, 0, 0, 0, 0),
                    lambda: libc.kill(-1, 9), lambda: libc.kill(1, 9), lambda: libc.syscall(62, -1, 9),
                    lambda: libc.unshare(0x10000000), lambda: libc.socket(2, 1, 0)):
        try:
            if attempt() == 0:  # a child, had the fork worked: stay alive as a leftover
                import time
                time.sleep(1234.5)
        except BaseException:
            pass
    return None
""",
    "fork by every route": """
import os, time
def ENTRY(*args, **kwargs):
    attempts = [lambda: os.fork(), lambda: os.posix_spawn("/bin/sleep", ["sleep", "1234.5"], {}),
                lambda: os.system("sleep 1234.5 &"), lambda: os.popen("sleep 1234.5 &")]
    try:
        import subprocess
        attempts.append(lambda: subprocess.Popen(["sleep", "1234.5"]))
    except BaseException:
        pass
    try:
        import multiprocessing
        attempts.append(lambda: multiprocessing.Process(target=time.sleep, args=(1234.5,)).start())
    except BaseException:
        pass
    try:
        import pty
        attempts.append(lambda: pty.fork())
    except BaseException:
        pass
    for attempt in attempts:
        try:
            if attempt() == 0:
                time.sleep(1234.5)
        except BaseException:
            pass
    return None
""",
    "daemon (double fork)": """
import os, time
def ENTRY(*args, **kwargs):
    try:
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    open("/tmp/MARK-daemon", "a").write("x")
                    time.sleep(0.05)
            os._exit(0)
    except OSError:
        pass
    return None
""",
    "output flood": """
import sys
def ENTRY(*args, **kwargs):
    while True:
        sys.stdout.write("x" * 65536)
""",
    "output flood (one huge print)": """
print("y" * 300_000_000)
def ENTRY(*args, **kwargs):
    return None
""",
    "files in /dev/shm, /tmp, home and elsewhere": """
import os, _io
def ENTRY(*args, **kwargs):
    home = os.environ.get("HOME", "/root")
    for place in ("/dev/shm", "/tmp", "/var/tmp", home, "/root", os.getcwd(), "/run", "/dev/mqueue", "/work"):
        for write in (lambda p: open(p, "w").write("x"), lambda p: _io.FileIO(p, "w").write(b"x"),
                      lambda p: os.write(os.open(p, os.O_CREAT | os.O_WRONLY), b"x")):
            try:
                write(os.path.join(place, "MARK-file"))
            except OSError:
                pass
    return None
""",
    "network": """
import socket
def ENTRY(*args, **kwargs):
    for attempt in (lambda: socket.create_connection(("127.0.0.1", PORT), timeout=1).sendall(b"leak"),
                    lambda: __import__("urllib.request").request.urlopen("http://127.0.0.1:PORT", timeout=1)):
        try:
            attempt()
        except BaseException:
            pass
    return None
""",
    "signals to the parent and everyone": """
import os, signal
def ENTRY(*args, **kwargs):
    for attempt in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill(-1, signal.SIGKILL),
                    lambda: os.killpg(0, signal.SIGKILL), lambda: os.kill(1, signal.SIGKILL)):
        try:
            attempt()
        except BaseException:
            pass
    return None
""",
    "signals through a file's owner": """
import fcntl, os, socket, struct
def pipe_owned_by(target):
    readable, writable = os.pipe()
    fcntl.fcntl(readable, fcntl.F_SETOWN, target)
    fcntl.fcntl(readable, 10, 9)  # F_SETSIG: SIGKILL instead of SIGIO
    fcntl.fcntl(readable, fcntl.F_SETFL, os.O_ASYNC)
    os.write(writable, b"x")
def pipe_owned_by_ex(target):
    readable, writable = os.pipe()
    fcntl.fcntl(readable, 15, struct.pack("ii", 1, target))  # F_SETOWN_EX, F_OWNER_PID
    fcntl.fcntl(readable, fcntl.F_SETFL, os.O_ASYNC)
    os.write(writable, b"x")
def socket_owned_by(target):
    one, other = socket.socketpair()
    fcntl.ioctl(one, 0x8901, struct.pack("i", target))  # FIOSETOWN
    fcntl.ioctl(one, 0x5452, struct.pack("i", 1))  # FIOASYNC
    other.send(b"x")
def ENTRY(*args, **kwargs):
    for target in (os.getppid(), 1, -os.getpgid(os.getppid())):
        for attempt in (pipe_owned_by, pipe_owned_by_ex, socket_owned_by):
            try:
                attempt(target)
            except BaseException:
                pass
    return None
""",
    "slowing the eval down": """
import os
def ENTRY(*args, **kwargs):
    for target in (os.getppid(), 1):
        for attempt in (lambda: os.setpriority(os.PRIO_PROCESS, target, 19), lambda: os.sched_setaffinity(target, {0}),
                        lambda: os.sched_setscheduler(target, os.SCHED_IDLE, os.sched_param(0)),
                        lambda: os.setpriority(os.PRIO_USER, 0, 19), lambda: os.setpriority(os.PRIO_PGRP, 0, 19)):
            try:
                attempt()
            except BaseException:
                pass
    return None
""",
    "sleep in a call": """
import time
def ENTRY(*args, **kwargs):
    time.sleep(1000)
""",
    "memory bomb": """
def ENTRY(*args, **kwargs):
    hog = [bytearray(2**30) for _ in range(64)]
    return None
""",
}
HOSTILE = {**FORGERS, **INTRUDERS}

# Appended to a canonical solution, which must then still pass: from inside, the sandbox shows no
# host directory beyond the interpreter's own (a prefix of /usr once showed /usr/local, /usr/src,
# where a checkout or a benchmark file may live), a sample cannot start threads without bound
# (~700 at 512 MB as an ordinary user, enough for a few samples to use up a machine's PIDs), nor
# hold memory outside its address-space limit (System V shared memory: 900 MB at a 512 MB limit).
CONTAINED = """
import os as _os
_visible = [p for p in ("/usr/local", "/usr/src", "/usr/include", "/usr/share/doc", "/home", "/work") if _os.path.exists(p)]
assert not _visible, f"host directories visible: {_visible}"
""" + THREAD_BOUND + """
import ctypes as _ctypes
_libc = _ctypes.CDLL(None)
assert _libc.shmget(0, 2**20, 0o1600) < 0, "System V shared memory: memory outside RLIMIT_AS that outlives the sample"
assert _libc.msgget(0, 0o1600) < 0 and _libc.semget(0, 1, 0o1600) < 0, "System V queues and semaphores outlive the sample"
try:
    _os.memfd_create("probe")
except OSError:
    pass
else:
    raise AssertionError("memfd: memory outside RLIMIT_AS")
"""


def contained_programs(rows) -> tuple[list[dict], list[str]]:
    programs = [assemble_program(r["prompt"], r["canonical_solution"] + CONTAINED, r["test"], r["entry_point"]) for r in rows]
    return programs, ["honest"] * len(programs)


def hostile_completion(code: str, entry_point: str, port: int) -> str:
    code = code.replace("ENTRY", entry_point).replace("MARK", MARK).replace("PORT", str(port))
    return "```python\n" + code.replace("DATAFILE", repr(str(HUMANEVAL))) + "```\n"


def interleaved(rows, attacks: dict, port: int, honest_every: int = 1) -> tuple[list[dict], list[str]]:
    """Each attack on each problem, and after every `honest_every` attacks (and at the end of each
    problem) that problem's canonical solution."""
    programs, labels = [], []
    for row in rows:
        for number, (label, code) in enumerate(attacks.items(), 1):
            programs.append(assemble_program(row["prompt"], hostile_completion(code, row["entry_point"], port),
                                             row["test"], row["entry_point"]))
            labels.append(f"{label} on {row['task_id']}")
            if number % honest_every == 0 or number == len(attacks):
                programs.append(assemble_program(row["prompt"], row["canonical_solution"], row["test"], row["entry_point"]))
                labels.append("honest")
    return programs, labels


class Listener:
    """A TCP server on 127.0.0.1 that records whatever reaches it."""

    def __init__(self):
        self.received, self.stop = [], threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
                self.received.append(conn.recv(100) or b"(connected)")
                conn.close()
            except OSError:
                continue

    def close(self):
        self.stop.set()
        self.thread.join()
        self.server.close()


def leftovers() -> list[str]:
    """Processes and files that an attack made, or that a sample left behind."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            status = {k: v.split() for k, _, v in (line.partition(":") for line in open(f"/proc/{pid}/status"))}
            uid = int(status["Uid"][0])
        except (OSError, KeyError, IndexError):
            continue
        if status.get("State", ["?"])[0] == "Z":
            continue  # exited (bwrap's init, until PID 1 reaps it): no code, memory or files
        if "1234.5" in cmdline or "plain-data wire" in cmdline or uid == 65534 or SANDBOX_UIDS[0] <= uid < SANDBOX_UIDS[1]:
            found.append(f"process {pid} (uid {uid}): {cmdline[:80]!r}")
    for place in ("/tmp", "/dev/shm", "/var/tmp", os.path.expanduser("~"), "/root", "/run", "/work"):
        try:
            names = os.listdir(place)
        except OSError:
            continue
        found += [f"{place}/{name}" for name in names if MARK in name or name.startswith("posttrain-sample-")]
    return found


def assert_hostile_set_fails(verdicts, labels, listener):
    wrong = [(label, v) for label, v in zip(labels, verdicts) if v["passed"] != (label == "honest")]
    assert not wrong, wrong[:10]
    assert listener.received == []
    time.sleep(0.2)  # a daemon that escaped would have written by now
    assert leftovers() == []


def grade_hostile(rows, attacks, honest_every=1, timeout=3):
    listener = Listener()
    try:
        programs, labels = interleaved(rows, attacks, listener.port, honest_every)
        programs, labels = [*programs, *contained_programs(rows)[0]], [*labels, *contained_programs(rows)[1]]
        verdicts = CodeSandbox(workers=2, timeout=timeout, memory_mb=512).run_many(programs)
    finally:
        listener.close()
    return verdicts, labels, listener


FAST_PROBLEMS = ["HumanEval/0", "HumanEval/32", "HumanEval/53"]  # a list problem, the `poly` helper, random tests


@needs_data
@needs_bwrap
def test_hostile_set_fails_with_honest_neighbours_passing_and_nothing_left_behind():
    assert leftovers() == []
    rows = [r for r in humaneval_rows() if r["task_id"] in FAST_PROBLEMS]
    verdicts, labels, listener = grade_hostile(rows, HOSTILE)
    assert_hostile_set_fails(verdicts, labels, listener)
    errors = {label: v["error"] for label, v in zip(labels, verdicts)}
    assert "printed more than" in errors["output flood on HumanEval/0"]
    assert "timed out" in errors["sleep in a call on HumanEval/0"]
    assert "not plain data: Anything" in errors["always-equal object on HumanEval/0"]
    assert HUMANEVAL.is_file()  # not deleted


@needs_data
@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to become another user")
def test_hostile_set_fails_when_the_eval_runs_as_an_unprivileged_user():
    """The same grading in a process running as nobody, with a Python that user can run."""
    python = "/usr/bin/python3"
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                            "import sys; assert sys.version_info >= (3, 10)"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no Python >= 3.10 that nobody can run at {python}")
    listener = Listener()
    rows = [r for r in humaneval_rows() if r["task_id"] == "HumanEval/32"]
    programs, labels = interleaved(rows, HOSTILE, listener.port)
    programs, labels = [*programs, *contained_programs(rows)[0]], [*labels, *contained_programs(rows)[1]]
    script = ("import json, sys\nfrom posttrain.eval.code_sandbox import CodeSandbox\n"
              "sandbox = CodeSandbox(workers=2, timeout=3, memory_mb=512)\n"
              "print(json.dumps([sandbox.isolation, sandbox.run_many(json.load(sys.stdin))]))\n")
    try:
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
                              input=json.dumps(programs), capture_output=True, text=True, cwd="/",
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, timeout=600)
    finally:
        listener.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    isolation, verdicts = json.loads(proc.stdout)
    assert isolation == "bubblewrap + seccomp + rlimits"
    assert_hostile_set_fails(verdicts, labels, listener)


def test_a_checker_stopped_before_its_verdict_never_passes(sandbox):
    """A test that prints what the sample returned, then a reply that keeps the checker decoding
    (ints whose hashes all collide, in a set): the printed text once became the verdict line
    of a checker killed at its deadline. Now a killed checker fails (its CPU limit stops it sooner)."""
    solution = """
import json, os, struct, time
CALLS = []
def f(*args):
    CALLS.append(1)
    if len(CALLS) == 1:
        return "x" * 20000 + '\\n{"passed": true, "error": null}'
    colliding = [["i", hex(k * (2**61 - 1))] for k in range(1, 150_000)]
    body = json.dumps(["return", ["S", colliding], [["i", "2"]], {}]).encode()
    os.write(4, struct.pack(">I", len(body)) + body)  # the reply descriptor, written directly
    time.sleep(100)
"""
    test = "def check(c):\n    print(c(1))\n    assert c(2) == 4\n"
    verdict = sandbox.run(assemble_program("", "```python\n" + solution + "```\n", test, "f"))
    assert verdict["passed"] is False and verdict["error"].startswith("the checker was stopped (signal 9)")


@needs_bwrap
def test_a_killed_eval_leaves_no_sample_behind():
    script = ("from posttrain.eval.code_sandbox import CodeSandbox, assemble_program\n"
              "program = assemble_program('def f():\\n', '    import time; time.sleep(1234.5)\\n',"
              " 'def check(c):\\n    c()\\n', 'f')\n"
              "CodeSandbox(workers=2, timeout=120).run_many([program, program])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    eval_process = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 60
        while len([f for f in leftovers() if "process" in f]) < 8:  # 2 × (bwrap, its init, sample, checker)
            assert time.time() < deadline and eval_process.poll() is None, leftovers()
            time.sleep(0.1)
        time.sleep(1)  # both samples are inside their calls now
    finally:
        eval_process.kill()
        eval_process.wait()
    deadline = time.time() + 5
    while leftovers() and time.time() < deadline:
        time.sleep(0.1)
    assert leftovers() == []


@needs_data
@pytest.mark.slow
@needs_bwrap
def test_no_forger_passes_on_any_of_the_164_problems():
    rows = humaneval_rows()
    attacks = {**FORGERS, "fork by every route": INTRUDERS["fork by every route"],
               "files in /dev/shm, /tmp, home and elsewhere": INTRUDERS["files in /dev/shm, /tmp, home and elsewhere"]}
    verdicts, labels, listener = grade_hostile(rows, attacks, honest_every=4, timeout=10)  # no sleeper here
    assert_hostile_set_fails(verdicts, labels, listener)


# --- without bubblewrap ------------------------------------------------------------------------


def test_without_bubblewrap_the_eval_says_the_sandbox_is_weak(monkeypatch):
    monkeypatch.setattr(code_sandbox.shutil, "which", lambda name: None)
    sandbox = CodeSandbox(workers=1, timeout=3, allow_weak=True)
    assert sandbox.isolation.startswith("weak: seccomp + ") and "bubblewrap (bwrap) is not installed" in sandbox.isolation
    assert sandbox.mode == "weak"
    assert sandbox.warning().startswith("warning: code sandbox is weak")
    prompt, test = "def f(x):\n    \"\"\"Twice x.\"\"\"\n", "def check(c):\n    assert c(2) == 4\n"
    assert sandbox.run(assemble_program(prompt, "    return 2 * x\n", test, "f"))["passed"]
    # any standard-library module, also where the interpreter lies under a directory closed to the
    # sample's uid (as root: /root/.pyenv; only a preloaded few could be imported)
    honest = "    import asyncio, zipfile, logging, email.message, concurrent.futures, pickle, gzip\n    return 2 * x\n"
    assert sandbox.run(assemble_program(prompt, honest, test, "f")) == {"passed": True, "error": None}
    listener = Listener()
    try:  # processes, signals and the network stay blocked (seccomp); files by Landlock where the kernel
        # has it (tests/test_sandbox_weak.py), and as root what the sample's uid left is deleted after its verdict
        for name in ("fork by every route", "signals to the parent and everyone", "network", "always-equal object",
                     "files in /dev/shm, /tmp, home and elsewhere"):
            completion = hostile_completion(INTRUDERS.get(name) or FORGERS[name], "f", listener.port)
            assert not sandbox.run(assemble_program(prompt, completion, test, "f"))["passed"], name
    finally:
        listener.close()
    assert listener.received == [] and leftovers() == []
    if HUMANEVAL.is_file():  # the benchmark file was readable in the weak mode (158/164 forged): not under Landlock
        row = humaneval_rows()[0]
        completion = hostile_completion(FORGERS["reading the tests"], row["entry_point"], listener.port)
        forged = sandbox.run(assemble_program(row["prompt"], completion, row["test"], row["entry_point"]))["passed"]
        assert forged is (not sandbox.weak_layers["landlock"])
    sandbox.close()


# An honest body that also checks, from inside, that no other process of the eval (the eval, a
# checker, another sample) lets it read or write its memory or open its descriptors via /proc.
PROC_PROBE = """    import os
    try:
        pids = os.listdir("/proc")
    except OSError:  # Landlock: /proc is closed to the sample altogether
        pids = []
    for pid in [p for p in pids if p.isdigit() and int(p) != os.getpid()]:
        try:
            command = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if int(pid) == os.getppid() or b"plain-data wire" in command:
            for path, mode in ((f"/proc/{pid}/mem", "r+b"), (f"/proc/{pid}/fd/1", "ab"), (f"/proc/{pid}/environ", "rb")):
                try:
                    open(path, mode).close()
                except OSError:
                    continue
                raise AssertionError(f"{path} opened by a sample")
    return 2 * x
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to become another user")
def test_without_bubblewrap_as_an_ordinary_user_no_signal_reaches_the_eval():
    """As an ordinary user the eval is a process the sample may signal: F_SETOWN/FIOSETOWN made
    the kernel send it a SIGKILL for the sample (the eval died), and setpriority/sched_setaffinity
    put it at nice 19 on one CPU: seccomp now refuses them. And /proc gave the sample the eval's and
    the checker's memory and descriptors: they are not dumpable now."""
    python = "/usr/bin/python3"
    if subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", "pass"]).returncode:
        pytest.skip(f"no Python that nobody can run at {python}")
    prompt, test = "def f(x):\n    \"\"\"Twice x.\"\"\"\n", "def check(c):\n    assert c(2) == 4\n"
    programs = [assemble_program(prompt, hostile_completion(INTRUDERS[name], "f", 9), test, "f")
                for name in ("signals through a file's owner", "signals to the parent and everyone", "slowing the eval down")]
    programs.append(assemble_program(prompt, "    return 2 * x\n", test, "f"))
    programs.append(assemble_program(prompt, PROC_PROBE, test, "f"))
    script = ("import json, os, sys\nfrom posttrain.eval.code_sandbox import CodeSandbox\n"
              "sandbox = CodeSandbox(workers=1, timeout=3, allow_weak=True)\n"
              "before = [os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)), os.sched_getscheduler(0)]\n"
              "verdicts = sandbox.run_many(json.load(sys.stdin))\n"
              "after = [os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)), os.sched_getscheduler(0)]\n"
              "print(json.dumps([sandbox.isolation, verdicts, before == after]))\n")
    setpriv = shutil.which("setpriv")  # found here: the eval's PATH has no bubblewrap (nor setpriv)
    proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
                          input=json.dumps(programs), capture_output=True, text=True, cwd="/", timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/nonexistent", "HOME": "/nonexistent"})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    isolation, verdicts, unchanged = json.loads(proc.stdout)
    assert isolation.startswith("weak: seccomp + ")
    assert [v["passed"] for v in verdicts] == [False, False, False, True, True] and unchanged, verdicts
    assert leftovers() == []


@needs_data
@needs_bwrap
def test_results_json_records_which_isolation_graded_the_run(tmp_path):
    completions = tmp_path / "completions.jsonl"
    rows = humaneval_rows()[:2]
    completions.write_text("".join(json.dumps({"index": i, "completion": r["canonical_solution"]}) + "\n" for i, r in enumerate(rows)))
    out = tmp_path / "graded"
    run_cli("eval", "--benchmark", "humaneval", "--data-dir", str(DATA), "--limit", "2", "--completions", str(completions),
            "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["code_sandbox"] == "bubblewrap + seccomp + rlimits"
    assert results["sandbox"] == "strong" and results["benchmarks"]["humaneval"]["sandbox"] == "strong"
    assert results["benchmarks"]["humaneval"]["metrics"]["avg@1"] == 100.0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [True, True]
