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
buffer (over the cap: that sample fails). Without bubblewrap the sample can read and write what
the user running the eval can (files in particular): a warning says so.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STOP_SEQUENCES = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]  # the original harness's
WIRE_SOURCE = (Path(__file__).parent / "sandbox_wire.py").read_text()
STRONG = "bubblewrap"
# glibc gives each new thread a malloc arena of 64 MB of address space (up to 8 per core): under
# RLIMIT_AS, 6 threads were all a sample could start. Two arenas, as for a single-threaded program.
ARENAS = ("MALLOC_ARENA_MAX", "2")
MAX_TASKS = 64  # processes and threads of one sample (the interpreter's own included; ThreadPoolExecutor takes up to 32)


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
    def __init__(self, workers: int = 2, timeout: float = 10.0, memory_mb: int = 1024, output_limit: int = 2**20):
        self.workers, self.timeout = min(max(1, workers), 1000), timeout
        self.memory_mb, self.output_limit = memory_mb, output_limit
        self.as_root = os.geteuid() == 0
        # As root, each parallel slot's sample runs as its own unprivileged uid, from a block of 1000
        # per sandbox so that two evals on one machine never share (or sweep) each other's uids: a
        # block is held by a lock for this object's life (pid % 10000 alone once collided).
        self.first_uid, self.uid_lock = _uid_block() if self.as_root else (-1, None)
        self.python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        self.slots: queue.Queue = queue.Queue()
        for slot in range(self.workers):
            self.slots.put(slot)
        self.bwrap, self.seccomp = shutil.which("bwrap"), True
        self.isolation = self._probe()
        if not self.isolation.startswith(STRONG) and not self.as_root:
            # The samples run as this user and see this process: not dumpable, its memory and
            # descriptors (the checkers' verdict pipes) are out of their reach through /proc.
            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0

    # --- which isolation this machine allows ----------------------------------------------------

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
            self.bwrap = None
        else:
            reasons.append("bubblewrap (bwrap) is not installed")
        verdict = self.run(probe)
        self.seccomp = verdict["passed"]
        if not self.seccomp:
            reasons.append("seccomp unavailable")
        layers = ("seccomp + " if self.seccomp else "") + ("separate uid + " if self.as_root else "") + "rlimits"
        return f"weak: {layers} only; {', '.join(reasons)}: the sample can reach files this user can"

    def warning(self) -> str | None:
        """One line for the start of an eval when the strong layer is missing."""
        if self.isolation.startswith(STRONG):
            return None
        return f"warning: code sandbox is {self.isolation} (install bubblewrap for the full sandbox)"

    # --- grading ---------------------------------------------------------------------------------

    def grade(self, problems: list[dict], completions: list[str]) -> list[dict]:
        """{"passed", "error"} per completion of a HumanEval-style problem (its `prompt`, `test`,
        `entry_point`): the one path from completion text to verdict that `posttrain eval` and the
        rl loop's code reward share."""
        return self.run_many([assemble_program(p["prompt"], c, p["test"], p["entry_point"])
                              for p, c in zip(problems, completions)])

    def close(self) -> None:
        """Release the block of sample uids (as root) for other sandboxes on this machine."""
        if self.uid_lock is not None:
            self.uid_lock.close()
            self.uid_lock = None

    def run_many(self, programs: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: dict) -> dict:
        """{"passed": bool, "error": str | None} for one program from `assemble_program`."""
        slot = self.slots.get()
        uid = self.first_uid + slot if self.as_root else -1
        workdir = None if self.bwrap else tempfile.mkdtemp(prefix="posttrain-sample-")
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
            popen = subprocess.Popen(self._sample_command(uid, info_w), stdin=requests_r, stdout=replies_w,
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

    def _sample_command(self, uid: int, info_fd: int | None) -> list[str]:
        preload = self.as_root and not self.bwrap
        # Threads are tasks too: without a bound, one sample (~700 threads at 512 MB) could use up a
        # machine's PIDs (often 32768). Bounded where the count is the sample's own: its uid as root,
        # its user namespace under bubblewrap; not in the weak mode as an ordinary user.
        max_tasks = MAX_TASKS if self.as_root or self.bwrap else 0
        limits = [str(self.memory_mb * 2**20), str(int(self.timeout) + 1), str(uid), str(int(self.seccomp)),
                  str(int(preload)), str(max_tasks)]
        serve = [self.python, "-I", "-S", "-c", WIRE_SOURCE, "serve", *limits]
        return self._bwrap_args(info_fd) + serve if self.bwrap else serve

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


def _uid_block() -> tuple[int, object]:
    """The first of 1000 uids no other live sandbox on this machine holds, and the held lock."""
    folder = Path("/run" if os.path.isdir("/run") else tempfile.gettempdir()) / "posttrain-sandbox-uids"
    folder.mkdir(mode=0o700, exist_ok=True)
    for step in range(10_000):
        block = (os.getpid() + step) % 10_000
        handle = open(folder / f"{block}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return 100_000 + block * 1000, handle
        except OSError:
            handle.close()
    raise RuntimeError("every block of sandbox uids is in use")


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
