"""Grade HumanEval samples so that the verdict cannot be forged and the host is not touched.

Per sample, two processes that share only two pipes (see sandbox_wire.py):
  the sample   runs the completed program inside the sandbox and answers calls to its entry
               point; it never sees the test, the expected values or anything of this process;
  the checker  runs the benchmark's `check(candidate)` unchanged, outside the sandbox, with
               `candidate` a proxy that sends the arguments and decodes the answer; only plain
               data crosses (None, bool, int, float, str, bytes and containers of these).
The verdict is the checker's: it passes only if `check` returned and every call was answered
with plain data in time.

The sandbox, strongest first (`CodeSandbox.isolation` says which one graded a run):
  bubblewrap   new PID, network, IPC, UTS and mount namespaces; a read-only root holding only the
               system libraries and the Python installation; private size-limited tmpfs /tmp and
               /dev/shm; everything in it dies with its parent (--die-with-parent, PID namespace).
               As root the sample also drops to an unprivileged uid of its own.
  seccomp      in every mode: no new processes (threads are fine), no exec, signals only to
               itself, no sockets, no namespaces/mounts, no ptrace.
  rlimits      address space, CPU seconds, file size, open files, no core files.
Plus a wall-clock limit per sample and per call, and the sample's output read through a capped
buffer (over the cap: that sample fails).

Without bubblewrap (not installed, or unable to run) the sandbox is weak and an eval refuses to
grade code unless asked to (`allow_weak`); the weak layer is what an ordinary user can have:
  user namespace  where the kernel allows one: private size-limited tmpfs /tmp and /dev/shm (gone with
               the sample, however the eval ends), its own IPC and UTS namespaces, no capabilities;
  Landlock     (Linux >= 5.13) file access confined to reading the interpreter, its standard library and
               system libraries, and to its private scratch folder (no benchmark file, no home, no /proc:
               nor another process's memory or environment); on ABI 6+ no signals out of the sandbox;
  seccomp      as above, and no changes to file metadata (chmod, chown, xattrs, times: not Landlock's);
  scratch      TMPDIR and HOME in a folder of this sandbox, removed after each sample, at close, and by
               the next sandbox when this process was killed (its folder names the pid and start time).
A weak sandbox's scores can be forged where a layer is missing (`isolation` says which are there).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STOP_SEQUENCES = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]  # the original harness's
WIRE_SOURCE = (Path(__file__).parent / "sandbox_wire.py").read_text()
STRONG = "bubblewrap"
FORCE_WEAK_ENV = "POSTTRAIN_SANDBOX"  # =weak: grade in the weak mode although bubblewrap is there (tests)
INSTALL_HINT = "apt-get install bubblewrap"
WEAK_SANDBOX_KEY = "set scoring.allow_weak_sandbox: true"  # how an rl recipe allows it (eval: --allow-weak-sandbox)
SCRATCH_PREFIX = "posttrain-sandbox-"  # + pid-starttime: a sandbox's scratch root in the temporary directory
TMP_BYTES, SHM_BYTES = 16 * 2**20, 2**20  # the private /tmp and /dev/shm (as under bubblewrap)
# glibc gives each new thread a malloc arena of 64 MB of address space (up to 8 per core): under
# RLIMIT_AS, 6 threads were all a sample could start. Two arenas, as for a single-threaded program.
ARENAS = ("MALLOC_ARENA_MAX", "2")
MAX_TASKS = 64  # processes and threads of one sample (the interpreter's own included; ThreadPoolExecutor takes up to 32)


def check_strong_sandbox(allow_weak: bool, weak_flag: str) -> None:
    """Before anything is written (a run folder): UserError when bubblewrap is missing and the weak
    sandbox was not allowed. (A bubblewrap that is there but fails is found by CodeSandbox's probe.)"""
    if not allow_weak and (os.environ.get(FORCE_WEAK_ENV) == "weak" or not shutil.which("bwrap")):
        raise _refusal(f"weak mode forced ({FORCE_WEAK_ENV}=weak)" if shutil.which("bwrap")
                       else "bubblewrap (bwrap) is not installed", weak_flag)


def _refusal(reason: str, weak_flag: str) -> Exception:
    from posttrain.errors import UserError

    return UserError(f"code grading needs the bubblewrap sandbox ({reason}): install it ({INSTALL_HINT}), "
                     f"or {weak_flag} to grade in a weak sandbox whose scores can be forged")


def assemble_program(prompt: str, completion: str, test: str, entry_point: str) -> dict:
    """HumanEval: the prompt continued by the completion (original harness), or — for a chat
    model — the last fenced ```python block, appended after the prompt so that its full
    definition of the entry point replaces the prompt's stub. The test stays with the checker."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", completion, flags=re.DOTALL)
    if blocks:
        body = blocks[-1]
    else:
        body = completion
        cut = [body.find(stop) for stop in STOP_SEQUENCES if body.find(stop) >= 0]
        body = body[: min(cut)] if cut else body
    return {"prompt": prompt, "solution": f"{prompt}{body}\n", "test": test, "entry_point": entry_point}


class CodeSandbox:
    """`allow_weak`: grade although bubblewrap is missing (else UserError, naming `weak_flag`, the
    caller's way to allow it); `force_weak` (or POSTTRAIN_SANDBOX=weak): the weak mode even with
    bubblewrap (tests). `mode` is "strong" or "weak"; `isolation` says which layers graded."""

    def __init__(self, workers: int = 2, timeout: float = 10.0, memory_mb: int = 1024, output_limit: int = 2**20,
                 allow_weak: bool = False, weak_flag: str = "pass --allow-weak-sandbox", force_weak: bool | None = None):
        self.workers, self.timeout = min(max(1, workers), 1000), timeout
        self.memory_mb, self.output_limit = memory_mb, output_limit
        self.as_root = os.geteuid() == 0
        # As root, each parallel slot's sample runs as its own unprivileged uid, from a block of 1000
        # per sandbox so that two evals on one machine never share (or sweep) each other's uids: a
        # block is held by a lock for this object's life (pid % 10000 alone once collided).
        self.first_uid, self.uid_lock = _uid_block() if self.as_root else (-1, None)
        self.scratch_root: str | None = None
        self._finalizer = weakref.finalize(self, _release, self.uid_lock, None)
        self.python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        self.slots: queue.Queue = queue.Queue()
        for slot in range(self.workers):
            self.slots.put(slot)
        if force_weak is None:
            force_weak = os.environ.get(FORCE_WEAK_ENV) == "weak"
        self.bwrap, self.seccomp = None if force_weak else shutil.which("bwrap"), True
        self.weak_layers = {"userns": False, "landlock": False}  # what the weak mode's probe found working
        self.weak_reasons = [f"weak mode forced ({FORCE_WEAK_ENV}=weak)" if force_weak else "bubblewrap (bwrap) is not installed"]
        if not self.bwrap and not allow_weak:  # refused before any probe
            self._refuse(weak_flag)
        if not self.bwrap:
            self._make_scratch_root()
        self.isolation = self._probe()
        self.mode = "strong" if self.isolation.startswith(STRONG) else "weak"
        if self.mode == "weak" and not allow_weak:  # bubblewrap is there but failed
            self._refuse(weak_flag)
        if self.mode == "weak" and not self.as_root:
            # The samples run as this user and see this process: not dumpable, its memory and
            # descriptors (the checkers' verdict pipes) are out of their reach through /proc.
            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0

    # --- which isolation this machine allows ----------------------------------------------------

    def _refuse(self, weak_flag: str) -> None:
        self.close()
        raise _refusal(self.weak_reasons[0], weak_flag)

    def _make_scratch_root(self) -> None:
        """The folder that holds each sample's scratch folder (weak mode); ones left by killed
        sandboxes of this user are removed first."""
        _remove_stale_scratch()
        top = tempfile.gettempdir()
        self.scratch_root = os.path.join(top, f"{SCRATCH_PREFIX}{os.getpid()}-{_start_time(os.getpid())}")
        shutil.rmtree(self.scratch_root, ignore_errors=True)
        os.mkdir(self.scratch_root, 0o700)
        if self.as_root:  # each sample's uid reaches its own folder, never lists the others
            os.chmod(self.scratch_root, 0o711)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _release, self.uid_lock, self.scratch_root)

    def _probe(self) -> str:
        """Grade a sample that tries to fork: with bubblewrap first, then without."""
        probe = {"prompt": "", "entry_point": "f", "test": "def check(f):\n    assert f() == 'blocked'\n",
                 "solution": "import os\ndef f():\n    try:\n        pid = os.fork()\n    except OSError:\n"
                             "        return 'blocked'\n    if pid == 0:\n        os._exit(0)\n    return 'forked'\n"}
        reasons = []
        self.seccomp = False  # probe with seccomp optional, then require what worked
        if self.bwrap:
            for _ in range(2):  # twice: a machine busy enough to time the first one out
                verdict = self.run(probe)
                if verdict["error"] is None or "AssertionError" in verdict["error"]:
                    break
            if verdict["error"] is None or "AssertionError" in verdict["error"]:
                self.seccomp = verdict["passed"]
                return STRONG + (" + seccomp" if self.seccomp else "") + " + rlimits"
            reasons.append(f"bubblewrap failed ({verdict['error'][:200]})")
            self.weak_reasons = reasons
            self.bwrap = None
        else:
            reasons.append(self.weak_reasons[0])
        if self.scratch_root is None:
            self._make_scratch_root()
        return self._probe_weak(reasons)

    def _probe_weak(self, reasons: list) -> str:
        self.weak_reasons = reasons
        """The weak layers this machine allows: all of them first, then fewer (a kernel without user
        namespaces or Landlock ends a sample that asks for them), each sample reporting what it got."""
        probe = {"prompt": "", "entry_point": "f",
                 "test": "def check(f):\n    fork, layers = f()\n    raise AssertionError(f'fork={fork} layers={layers}')\n",
                 "solution": "import os\ndef f():\n    layers = os.environ.get('POSTTRAIN_SANDBOX_LAYERS', '')\n"
                             "    try:\n        pid = os.fork()\n    except OSError:\n        return 'blocked', layers\n"
                             "    if pid == 0:\n        os._exit(0)\n    return 'forked', layers\n"}
        got = ""
        for userns, landlock in ((True, True), (False, True), (False, False)):
            self.weak_layers = {"userns": userns, "landlock": landlock}
            for _ in range(2):  # twice: a machine busy enough to time the first one out
                verdict = self.run(probe)
                if "layers=" in (verdict["error"] or ""):
                    break
            if "layers=" in (verdict["error"] or ""):
                self.seccomp = "fork=blocked" in verdict["error"]
                got = verdict["error"].split("layers=")[-1]
                break
        else:
            self.seccomp = False
        self.weak_layers = {"userns": "userns" in got.split(), "landlock": "landlock-" in got}
        self.weak_layers["require"] = True
        landlock = next((word for word in got.split() if word.startswith("landlock-")), None)
        if not self.seccomp:
            reasons.append("seccomp unavailable")
        if landlock is None:
            reasons.append("Landlock unavailable (Linux >= 5.13 with landlock among its LSMs)")
        if not self.weak_layers["userns"]:
            reasons.append("no unprivileged user namespace")
        layers = [("seccomp" if self.seccomp else ""), (f"Landlock ABI {landlock.split('-')[1]}" if landlock else ""),
                  ("user namespace" if self.weak_layers["userns"] else ""), ("separate uid" if self.as_root else ""),
                  "rlimits"]
        reach = ("file access confined to the interpreter and a scratch folder" if landlock
                 else "the sample can reach files this user can")
        return f"weak: {' + '.join(x for x in layers if x)} only; {', '.join(reasons)}: {reach}"

    def warning(self) -> str | None:
        """One line for the start of an eval when the strong layer is missing."""
        if self.isolation.startswith(STRONG):
            return None
        return (f"warning: code sandbox is {self.isolation}; its scores can be forged "
                f"(install bubblewrap for the full sandbox: {INSTALL_HINT})")

    # --- grading ---------------------------------------------------------------------------------

    def grade(self, problems: list[dict], completions: list[str]) -> list[dict]:
        """{"passed", "error"} per completion of a HumanEval-style problem (its `prompt`, `test`,
        `entry_point`): the one path from completion text to verdict that `posttrain eval` and the
        rl loop's code reward share."""
        return self.run_many([assemble_program(p["prompt"], c, p["test"], p["entry_point"])
                              for p, c in zip(problems, completions)])

    def close(self) -> None:
        """Release the block of sample uids (as root; its lock file removed) for other sandboxes on
        this machine, and remove the scratch root (weak mode)."""
        self._finalizer()
        self.uid_lock = None

    def run_many(self, programs: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: dict) -> dict:
        """{"passed": bool, "error": str | None} for one program from `assemble_program`."""
        slot = self.slots.get()
        uid = self.first_uid + slot if self.as_root else -1
        workdir = None if self.bwrap else tempfile.mkdtemp(prefix="sample-", dir=self.scratch_root)
        try:
            if workdir and self.as_root:
                os.chown(workdir, uid, uid)
            return self._grade(program, uid, workdir)
        finally:
            if self.as_root and not self.bwrap:  # (under bubblewrap the PID namespace did this)
                _kill_uid(uid)
                _remove_files_of(uid)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            self.slots.put(slot)

    def _grade(self, program: dict, uid: int, workdir: str | None) -> dict:
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        info_r, info_w = os.pipe() if self.bwrap else (None, None)
        try:
            popen = subprocess.Popen(self._sample_command(uid, info_w, workdir), stdin=requests_r, stdout=replies_w,
                                     stderr=subprocess.PIPE, cwd=workdir or "/", env=self._sample_env(workdir),
                                     start_new_session=True, pass_fds=(info_w,) if self.bwrap else ())
            if info_w is not None:
                os.close(info_w)
                info_w = None
            sample = _Sample(popen, info_r)
            checker = subprocess.Popen([sys.executable, "-I", "-S", "-c", WIRE_SOURCE, "check", str(requests_w),
                                        str(replies_r)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, pass_fds=(requests_w, replies_r), env={"LANG": "C.UTF-8"})
        finally:
            for fd in (requests_r, requests_w, replies_r, replies_w, info_w):
                if fd is not None:
                    os.close(fd)
        output = _CappedOutput(sample, self.output_limit)
        job = {**program, "timeout": self.timeout, "call_timeout": self.timeout,
               "memory": max(2 * self.memory_mb, 1024) * 2**20}
        try:
            stdout, stderr = checker.communicate(json.dumps(job).encode(), timeout=self.timeout + 10)
        except subprocess.TimeoutExpired:
            checker.kill()
            stdout, stderr = checker.communicate()
        finally:
            sample.stop()  # the checker is gone: a sample that is not busy has ended by now
            output.join()
        # Only a checker that finished (os._exit(0) right after its verdict) has a verdict.
        verdict = _parse_verdict(checker.returncode, stdout, stderr)
        if output.flooded:
            return {"passed": False, "error": f"the sample printed more than {self.output_limit} bytes"}
        if not verdict["passed"] and output.tail and "process ended" in (verdict["error"] or ""):
            verdict["error"] += ": " + output.tail.decode(errors="replace").strip()[-500:]
        return verdict

    def _sample_command(self, uid: int, info_fd: int | None, workdir: str | None = None) -> list[str]:
        preload = self.as_root and not self.bwrap
        # Threads are tasks too: without a bound, one sample (~700 threads at 512 MB) could use up a
        # machine's PIDs (often 32768). Bounded where the count is the sample's own: its uid as root,
        # its user namespace (bubblewrap's, or the weak mode's where it has one: the sample applies it).
        max_tasks = MAX_TASKS if self.as_root or self.bwrap else 0
        limits = [str(self.memory_mb * 2**20), str(int(self.timeout) + 1), str(uid), str(int(self.seccomp)),
                  str(int(preload)), str(max_tasks)]
        serve = [self.python, "-I", "-S", "-c", WIRE_SOURCE, "serve", *limits]
        if self.bwrap:
            return self._bwrap_args(info_fd) + serve
        policy = {"read": self._readable(), "scratch": workdir, "tmp_bytes": TMP_BYTES, "shm_bytes": SHM_BYTES,
                  "max_tasks": MAX_TASKS, "userns": False, "landlock": False, "require": False, **self.weak_layers}
        return serve + [json.dumps(policy)]

    def _readable(self) -> list[str]:
        """What the weak mode's sample may read (Landlock): the interpreter, its standard library and
        the system's shared libraries, as under bubblewrap."""
        base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
        wanted = ["/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32", "/usr/share/zoneinfo",
                  base["stdlib"], base["platstdlib"], sysconfig.get_config_var("LIBDIR") or "/usr/lib", self.python,
                  "/etc/ld.so.cache"]
        return sorted({os.path.realpath(path) for path in wanted if os.path.exists(path)})

    def _sample_env(self, workdir: str | None) -> dict:
        home = workdir or "/tmp"
        return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", ARENAS[0]: ARENAS[1]}

    def _bwrap_args(self, info_fd: int) -> list[str]:
        """Namespaces, and a read-only root with only what the interpreter needs."""
        args = [self.bwrap, "--info-fd", str(info_fd), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
                "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8", "--setenv", *ARENAS]
        if not self.as_root:
            args.append("--unshare-user")
        # The interpreter, its standard library and its shared libraries, never its whole prefix: a
        # prefix of /usr would show /usr/local, /usr/src, /usr/share (a checkout, a benchmark file).
        base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
        wanted = ["/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/share/zoneinfo", base["stdlib"], base["platstdlib"],
                  sysconfig.get_config_var("LIBDIR") or "/usr/lib", self.python, "/etc/ld.so.cache"]
        wanted = [os.path.realpath(path) for path in wanted]
        bound: list[str] = []
        made: set[str] = set()
        for path in sorted(set(wanted)):
            if not os.path.exists(path) or any(path == b or path.startswith(b + "/") for b in bound):
                continue
            for parent in reversed(Path(path).parents[:-1]):  # parents made world-traversable
                if str(parent) not in made:
                    made.add(str(parent))
                    args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", path, path]
            bound.append(path)
        for top in ("/lib", "/lib64", "/lib32", "/bin"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        args += ["--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--size", str(16 * 2**20), "--tmpfs", "/tmp",
                 "--perms", "1777", "--size", str(2**20), "--tmpfs", "/dev/shm",
                 "--remount-ro", "/", "--chdir", "/tmp", "--"]
        return args


class _Sample:
    """The sample's process tree. Under bubblewrap it is stopped by killing its PID namespace's init
    (the kernel then kills the rest, and bwrap reaps it): killing bwrap itself would leave its
    child a zombie under a PID 1 that may never reap it. The init is held by a pidfd, taken as the
    sandbox starts, so that a recycled PID is never signalled."""

    def __init__(self, popen: subprocess.Popen, info_fd: int | None):
        self.popen, self.init_pidfd = popen, None
        if info_fd is not None:
            self.init_pidfd = _namespace_init(info_fd)
            os.close(info_fd)
        self.lock = threading.Lock()  # the output reader may kill it while the grader stops it

    def kill(self) -> None:
        with self.lock:
            if self.init_pidfd is not None:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            elif self.popen.poll() is None:
                _kill_group(self.popen, wait=False)

    def stop(self) -> None:
        for wait in (0.5, 2.0):
            try:
                self.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                self.kill()
        _kill_group(self.popen)  # whatever is left in its group (never needed under bubblewrap)
        with self.lock:
            if self.init_pidfd is not None:
                os.close(self.init_pidfd)
                self.init_pidfd = None


def _namespace_init(info_fd: int) -> int | None:
    """A pidfd for bwrap's --info-fd {"child-pid": N}: the PID namespace's init."""
    data = b""
    while select.select([info_fd], [], [], 5)[0]:
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
        try:
            pid = int(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError):
            continue
        try:
            return os.pidfd_open(pid)
        except OSError:  # already gone
            return None
    return None


class _CappedOutput:
    """Reads the sample's stdout+stderr in a thread, keeping the last 2 kB; kills the sample when
    it has written more than `limit` bytes."""

    def __init__(self, sample: _Sample, limit: int):
        self.sample, self.limit, self.total, self.tail, self.flooded = sample, limit, 0, b"", False
        self.stream = sample.popen.stderr
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while chunk := self.stream.read1(65536):
            self.total += len(chunk)
            self.tail = (self.tail + chunk)[-2000:]
            if self.total > self.limit and not self.flooded:
                self.flooded = True
                self.sample.kill()

    def join(self) -> None:
        # EOF comes when every process holding the pipe is gone; a process that closed it is
        # caught by the PID namespace (bubblewrap) or the uid sweep (root).
        self.thread.join(timeout=5)
        self.stream.close()


def _parse_verdict(returncode: int, stdout: bytes, stderr: bytes) -> dict:
    if returncode != 0:  # killed (its time, CPU or memory limit) or crashed: no verdict to read
        how = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        return {"passed": False, "error": f"the checker was stopped ({how}): " + stderr.decode(errors="replace").strip()[-500:]}
    try:
        verdict = json.loads(stdout.decode().strip().splitlines()[-1])
        return {"passed": verdict["passed"] is True, "error": verdict["error"]}
    except (ValueError, IndexError, KeyError, TypeError):
        return {"passed": False, "error": "checker failed: " + stderr.decode(errors="replace").strip()[-500:]}


def _kill_group(proc: subprocess.Popen, wait: bool = True) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if wait:
        proc.wait()


# Where any user may create files (the weak mode as root: the sample's uid may write only there).
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")


def _remove_files_of(uid: int, tops: tuple = SHARED_WRITABLE) -> None:
    """Delete what the sandbox uid created in the usual world-writable places (after _kill_uid):
    its own entries, and inside any world-writable directory there (the only others it can write)."""
    for top in tops:
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                if info.st_uid == uid:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                elif entry.is_dir(follow_symlinks=False) and info.st_mode & 0o002:
                    _remove_files_of(uid, (entry.path,))
            except OSError:
                pass


UID_LOCKS = Path("/run" if os.path.isdir("/run") else tempfile.gettempdir()) / "posttrain-sandbox-uids"


def _uid_block() -> tuple[int, object]:
    """The first of 1000 uids no other live sandbox on this machine holds, and the held lock (its
    file is removed when the sandbox closes; one left by a killed eval is removed here)."""
    UID_LOCKS.mkdir(mode=0o700, exist_ok=True)
    for stale in UID_LOCKS.glob("*.lock"):
        handle = _lock(stale)
        if handle is not None:
            _unlock(handle)
    for step in range(10_000):
        block = (os.getpid() + step) % 10_000
        handle = _lock(UID_LOCKS / f"{block}.lock")
        if handle is not None:
            return 100_000 + block * 1000, handle
    raise RuntimeError("every block of sandbox uids is in use")


def _lock(path: Path):
    """An open, locked handle on `path`, or None if another sandbox holds it. The lock counts only if
    the file is still the one at `path` (a sandbox closing may have just removed it)."""
    try:
        handle = open(path, "a")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
            return handle
    except OSError:
        pass
    handle.close()
    return None


def _unlock(handle) -> None:
    """Remove the lock file (still locked: no other sandbox holds it), then release it."""
    try:
        os.unlink(handle.name)
    except OSError:
        pass
    handle.close()


def _release(uid_lock, scratch_root: str | None) -> None:
    if uid_lock is not None and not uid_lock.closed:
        _unlock(uid_lock)
    if scratch_root:
        shutil.rmtree(scratch_root, ignore_errors=True)


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with its pid, a name no later process reuses."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _remove_stale_scratch() -> None:
    """Scratch roots of this user's sandboxes whose process is gone (killed: SIGKILL leaves no time
    to clean up), named SCRATCH_PREFIX + pid-starttime in the temporary directory."""
    top = tempfile.gettempdir()
    try:
        names = os.listdir(top)
    except OSError:
        return
    for name in names:
        match = re.fullmatch(re.escape(SCRATCH_PREFIX) + r"(\d+)-(\d+)", name)
        if not match:
            continue
        path = os.path.join(top, name)
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        if _start_time(int(match.group(1))) != match.group(2):
            shutil.rmtree(path, ignore_errors=True)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as the sandbox uid (anything that escaped the group)."""
    for _ in range(20):  # repeat: a process may be starting others while we look
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            except (OSError, StopIteration):
                continue
            if str(uid) in uids:
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not found:
            return
        time.sleep(0.01)
