"""The two programs a HumanEval sample is graded with, and the plain-data wire between them.

Stdlib only: code_sandbox.py runs this file's source with `python -I -S -c SOURCE ROLE ...`.

  serve   runs inside the sandbox: confines itself (rlimits, dropped uid, seccomp), executes the
          sample's program and then answers calls to its entry point, one message per call.
  check   runs outside the sandbox, in its own process: executes the benchmark's prompt (helper
          functions such as `poly`) and test, and calls `check(candidate)` where `candidate` is a
          proxy that sends the arguments to `serve` and decodes the answer. Prints the verdict.

Only plain data crosses: None, bool, int, float (NaN/inf included), str, bytes and lists, tuples,
dicts, sets and frozensets of these, in a tagged JSON encoding (never pickle/marshal), at most
MAX_MESSAGE bytes a message. The checker decodes into fresh built-in objects, so nothing the
sample defines (an `__eq__` that always says True, a patched builtin) can exist on its side.
"""

import base64
import builtins
import ctypes
import json
import os
import select
import struct
import sys
import time

MAX_MESSAGE = 16 * 2**20
MAX_DEPTH = 100
HEADER = struct.Struct(">I")


class WireError(Exception):
    """The other side broke the protocol, sent something that is not plain data, or went silent."""


# --- plain data <-> tagged JSON ----------------------------------------------------------------


def encode(value, depth=0):
    """Plain data as tagged JSON values; subclasses of the plain types become the base type."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deep")
    if value is None or value is True or value is False:
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return ["i", hex(int.__index__(value))]
    if isinstance(value, float):
        return ["f", float.hex(float.__float__(value))]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, bytes):
        return ["b", base64.b64encode(bytes(value)).decode()]
    for kind, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F")):
        if isinstance(value, kind):
            return [tag, [encode(item, depth + 1) for item in kind.__iter__(value)]]
    if isinstance(value, dict):
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]]
    raise WireError(f"not plain data: {type(value).__name__}")


def decode(data, depth=0):
    """Tagged JSON back to plain data, rejecting anything else (the checker's only way in)."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deep")
    if data is None or data is True or data is False:
        return data
    if type(data) is not list or len(data) != 2 or type(data[0]) is not str:
        raise WireError("malformed value")
    tag, payload = data
    try:
        if tag == "i" and type(payload) is str:
            return int(payload, 16)
        if tag == "f" and type(payload) is str:
            return float.fromhex(payload)
        if tag == "s" and type(payload) is str:
            return payload
        if tag == "b" and type(payload) is str:
            return base64.b64decode(payload, validate=True)
        if type(payload) is list:
            if tag in ("l", "t", "S", "F"):
                items = [decode(item, depth + 1) for item in payload]
                return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
            if tag == "d" and all(type(p) is list and len(p) == 2 for p in payload):
                return {decode(k, depth + 1): decode(v, depth + 1) for k, v in payload}
    except (ValueError, TypeError, OverflowError) as err:  # bad number, unhashable key, ...
        raise WireError(f"malformed value: {err}") from None
    raise WireError("malformed value")


# --- framing: a 4-byte length, then UTF-8 JSON ------------------------------------------------


def send(fd, message):
    body = json.dumps(message).encode()
    if len(body) > MAX_MESSAGE:
        raise WireError(f"message over {MAX_MESSAGE} bytes")
    data = HEADER.pack(len(body)) + body
    while data:
        data = data[os.write(fd, data):]


def receive(fd, deadline=None):
    """One message; WireError if it is too large, malformed, or not complete by `deadline`."""
    (length,) = HEADER.unpack(_read_exactly(fd, HEADER.size, deadline))
    if length > MAX_MESSAGE:
        raise WireError(f"message over {MAX_MESSAGE} bytes")
    try:
        return json.loads(_read_exactly(fd, length, deadline))
    except (ValueError, RecursionError):
        raise WireError("malformed message") from None


def _read_exactly(fd, size, deadline):
    chunks, left = [], size
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise WireError("timed out")
        chunk = os.read(fd, min(left, 2**20))
        if not chunk:
            raise WireError("the sample's process ended")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- the sample's side -------------------------------------------------------------------------


def serve(memory_bytes, cpu_seconds, uid, require_seccomp, preload, max_tasks):
    """In the sandbox: confine this process, load the sample, answer calls until stdin closes."""
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # the sample's prints go to the capped output pipe, never onto the wire
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _confine(memory_bytes, cpu_seconds, uid, require_seccomp, preload, max_tasks)
    import threading

    # Deep recursion through C code (sorted(key=...), map, ...) needs a large C stack.
    threading.stack_size(min(256 * 2**20, memory_bytes // 4))
    server = threading.Thread(target=_answer_calls, args=(requests, replies))
    server.start()
    # The sample's own threads get the usual stack: with the large one, 3 threads filled the
    # address-space limit and a ThreadPoolExecutor failed with "can't start new thread".
    threading.stack_size(0)
    server.join()
    os._exit(0)


def _answer_calls(requests, replies):
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    entry = None
    while True:
        try:
            message = receive(requests)
        except WireError:
            os._exit(0)
        if message[0] == "load":
            entry, reply = _load(message[1], message[2], namespace)
        else:
            reply = _call(entry, message[1], message[2])
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        send(replies, reply)


def _load(source, entry_point, namespace):
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
        entry = namespace[entry_point]
        if not callable(entry):
            return None, ["error", f"{entry_point} is not a function"]
        return entry, ["ok"]
    except BaseException as err:  # SystemExit too: the program must define the function
        return None, ["error", _describe(err)]


def _call(entry, args_data, kwargs_data):
    args = [decode(a) for a in args_data]
    kwargs = {k: decode(v) for k, v in kwargs_data.items()}
    try:
        result = entry(*args, **kwargs)
    except BaseException as err:
        return ["raise", type(err).__name__, str(err)[:1000], isinstance(err, Exception)]
    try:
        # The arguments after the call too, so that in-place changes reach the test as they
        # would in the original harness.
        return ["return", encode(result), [encode(a) for a in args], {k: encode(v) for k, v in kwargs.items()}]
    except (WireError, RecursionError) as err:
        return ["error", f"the entry point returned {err}"]
    except BaseException as err:
        return ["error", f"encoding the result failed: {_describe(err)}"]


def _describe(err):
    return f"{type(err).__name__}: {err}"[:2000]


def _confine(memory_bytes, cpu_seconds, uid, require_seccomp, preload, max_tasks):
    """Before any sample code: limits, an unprivileged uid (when started as root), seccomp.
    `max_tasks` (threads included), 0 for none: only where the uid's count is this sample's alone
    (its own uid as root; a user namespace of its own, where the kernel counts per namespace)."""
    import resource
    import threading  # noqa: F401  (imported while the interpreter is surely readable)

    limits = [(resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
              (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_MSGQUEUE, 0)]
    if max_tasks:
        limits.append((resource.RLIMIT_NPROC, max_tasks))
    if uid >= 0:
        for name in PRELOAD if preload else ():  # without bubblewrap the interpreter may be unreadable to `uid`
            try:
                __import__(name)
            except ImportError:
                pass
        held = _hold_import_path() if preload else {}
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        _use_import_path(held)
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))
    sys.setrecursionlimit(20_000)
    _die_with_parent()  # after setuid, which clears it
    if install_seccomp() is None and require_seccomp:
        os._exit(3)


def _hold_import_path():
    """The import path as descriptors opened while still root: /proc/self/fd/N reaches the standard
    library after setuid even where a parent directory (say /root, 0700) is closed to `uid`."""
    held = {}
    for entry in sys.path:
        try:
            held[entry] = f"/proc/self/fd/{os.open(entry, os.O_RDONLY | os.O_DIRECTORY)}"
        except OSError:  # a zip that does not exist, ...
            continue
    return held


def _use_import_path(held):
    """sys.path, and the __path__ of packages already imported (importlib, ...), through `held`."""
    if not held:
        return
    sys.path[:] = list(held.values())
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if type(paths) is list:
            for i, path in enumerate(paths):
                for old, new in held.items():
                    if path == old or path.startswith(old + "/"):
                        paths[i] = new + path[len(old):]
                        break
    sys.path_importer_cache.clear()


PRELOAD = ("math", "cmath", "re", "collections", "collections.abc", "itertools", "functools", "heapq", "bisect",
           "string", "typing", "hashlib", "fractions", "decimal", "statistics", "random", "operator", "copy",
           "datetime", "json", "numbers", "array", "queue", "unicodedata", "textwrap", "calendar", "struct", "time",
           "secrets", "enum", "dataclasses", "abc", "contextlib", "traceback", "types", "warnings", "base64",
           "glob", "pathlib", "zlib", "io", "csv", "difflib", "pprint", "tempfile", "threading", "sys")


# --- seccomp: no new processes, no signals to others, no sockets, no namespaces ----------------
# Nor memory outside RLIMIT_AS: System V shared memory (attach, fill, detach, again: as much as
# the machine has; without bubblewrap it also outlives the sample, as do message queues and
# semaphores) and memfd (16 MB each, up to the open-file limit). POSIX message queues: RLIMIT_MSGQUEUE.

# Syscall numbers per architecture (AUDIT_ARCH value, syscalls, x32 bit).
_X86_64 = (0xC000003E, dict(
    clone=56, clone3=435, fork=57, vfork=58, execve=59, execveat=322, kill=62, tkill=200, tgkill=234, prlimit64=302,
    ptrace=101, process_vm_readv=310, process_vm_writev=311, socket=41, connect=42, unshare=272, setns=308,
    mount=165, umount2=166, pivot_root=155, chroot=161, keyctl=250, add_key=248, request_key=249, bpf=321,
    perf_event_open=298, userfaultfd=323, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
    pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, kcmp=312, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297,
    open_tree=428, move_mount=429, fsopen=430, fsmount=432, fcntl=72, ioctl=16, setpriority=141, ioprio_set=251,
    sched_setaffinity=203, sched_setscheduler=144, sched_setparam=142, sched_setattr=314, shmget=29, shmat=30,
    semget=64, msgget=68, msgsnd=69, memfd_create=319), 0x40000000)
_AARCH64 = (0xC00000B7, dict(
    clone=220, clone3=435, execve=221, execveat=281, kill=129, tkill=130, tgkill=131, prlimit64=261, ptrace=117,
    process_vm_readv=270, process_vm_writev=271, socket=198, connect=203, unshare=97, setns=268, mount=40,
    umount2=39, pivot_root=41, chroot=51, keyctl=219, add_key=217, request_key=218, bpf=280, perf_event_open=241,
    userfaultfd=282, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, pidfd_open=434,
    pidfd_send_signal=424, pidfd_getfd=438, kcmp=272, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, open_tree=428,
    move_mount=429, fsopen=430, fsmount=432, fcntl=25, ioctl=29, setpriority=140, ioprio_set=30,
    sched_setaffinity=122, sched_setscheduler=119, sched_setparam=118, sched_setattr=274, shmget=194, shmat=196,
    semget=190, msgget=186, msgsnd=189, memfd_create=279), None)


# F_SETOWN, F_SETOWN_EX (fcntl); FIOSETOWN, SIOCSPGRP (ioctl, a socketpair's): the owner of a file
# gets SIGIO, or any signal F_SETSIG names, when the file is ready, and that owner may be any
# process this user may signal: in the weak mode as an ordinary user, the eval itself.
OWNER_COMMANDS = {"fcntl": (8, 15), "ioctl": (0x8901, 0x8902)}


# Scheduling: on this process only (pid 0), never on another (as an ordinary user without
# bubblewrap, the eval could be made to run at nice 19 on one CPU). setpriority and ioprio_set
# (PRIO_USER, IOPRIO_WHO_USER: every process of a user) are refused outright.
OWN_ONLY = ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")


def seccomp_arch():
    return {"x86_64": _X86_64, "aarch64": _AARCH64}.get(os.uname().machine)


def install_seccomp():
    """A BPF filter: threads yes, processes no; signals only to this process. None if unsupported."""
    arch = seccomp_arch()
    if arch is None:
        return None
    audit_arch, numbers, x32_bit = arch
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38
    me = os.getpid()
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if x32_bit:
        prog += [(JGE, 0, 1, x32_bit), (RET, 0, 0, EPERM)]
    for name, nr in numbers.items():
        if name == "clone":  # a thread (CLONE_THREAD) is fine, a process is not
            prog += [(JEQ, 0, 4, nr), (LD, 0, 0, 16), (JSET, 0, 1, 0x10000), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
        elif name in OWNER_COMMANDS:  # no signals to others through a file's owner (SIGIO, F_SETSIG)
            commands = OWNER_COMMANDS[name]
            prog += [(JEQ, 0, len(commands) + 3, nr), (LD, 0, 0, 24)]  # args[1]: the command
            prog += [(JEQ, len(commands) - i, 0, command) for i, command in enumerate(commands)]
            prog += [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
        elif name in ("kill", "tgkill", "prlimit64") or name in OWN_ONLY:  # only on itself: raise(), setrlimit()...
            own = me if name in ("kill", "tgkill") else 0
            prog += [(JEQ, 0, 4, nr), (LD, 0, 0, 16), (JEQ, 0, 1, own), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
        else:  # clone3 says ENOSYS so that the C library falls back to clone for threads
            prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ENOSYS if name == "clone3" else EPERM)]
    prog.append((RET, 0, 0, ALLOW))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*op) for op in prog])
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return None
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Program(len(prog), filters)), 0, 0) != 0:
        return None
    return True


# --- the checker's side ------------------------------------------------------------------------


class CandidateFailed(BaseException):
    """The sample answered with something that is not plain data, broke the wire, or timed out.
    A BaseException so that a test's `except Exception` cannot swallow it."""


class Candidate:
    """Stands for the sample's entry point in `check(candidate)`: plain data in, plain data out."""

    def __init__(self, requests, replies, call_timeout, deadline):
        self.requests, self.replies = requests, replies
        self.call_timeout, self.deadline = call_timeout, deadline
        self.failure = None  # once set, every later call fails too and the verdict is a failure
        self.calls = 0

    def _exchange(self, message):
        if self.failure:
            raise CandidateFailed(self.failure)
        try:
            send(self.requests, message)
            return receive(self.replies, min(self.deadline, time.monotonic() + self.call_timeout))
        except (WireError, OSError) as err:
            self.failure = f"{err}" if "timed out" not in str(err) else "a call timed out"
            raise CandidateFailed(self.failure) from None

    def load(self, solution, entry_point):
        reply = self._exchange(["load", solution, entry_point])
        if reply != ["ok"]:
            self.failure = str(reply[1])[:2000] if isinstance(reply, list) and len(reply) == 2 else "malformed reply"
            raise CandidateFailed(self.failure)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        reply = self._exchange(["call", [encode(a) for a in args], {k: encode(v) for k, v in kwargs.items()}])
        try:
            return self._answer(reply, args, kwargs)
        except WireError as err:
            self.failure = f"{err}"
            raise CandidateFailed(self.failure) from None

    def _answer(self, reply, args, kwargs):
        if type(reply) is not list or not reply or reply[0] not in ("return", "raise", "error"):
            raise WireError("malformed reply")
        if reply[0] == "error" and len(reply) == 2:
            raise WireError(str(reply[1])[:2000])
        if reply[0] == "raise" and len(reply) == 4:
            name, text, is_exception = str(reply[1]), str(reply[2]), reply[3] is True
            known = getattr(builtins, name, None)
            # StopIteration would end a test's `map(candidate, ...)` early: a failure, not an error.
            if (is_exception and isinstance(known, type) and issubclass(known, Exception)
                    and not issubclass(known, (StopIteration, StopAsyncIteration))):
                raise known(text)  # a test that expects ValueError sees a ValueError
            if is_exception and not isinstance(known, type):
                raise RuntimeError(f"{name}: {text}")
            self.failure = f"the entry point raised {name}: {text}"
            raise CandidateFailed(self.failure)
        if reply[0] == "return" and len(reply) == 4 and type(reply[2]) is list and type(reply[3]) is dict:
            result = decode(reply[1])
            if len(reply[2]) == len(args) and reply[3].keys() == kwargs.keys():
                for before, after in zip([*args, *kwargs.values()], [*reply[2], *reply[3].values()]):
                    _update_in_place(before, decode(after))
            return result
        raise WireError("malformed reply")


def _update_in_place(before, after):
    """What the entry point did to a mutable argument, done to the test's own object."""
    if type(before) is list and type(after) is list:
        before[:] = after
    elif type(before) in (dict, set) and type(after) is type(before):
        before.clear()
        before.update(after)


def check_main(requests, replies):
    """Job on stdin (JSON); one line of verdict JSON on stdout, and nothing else there: what the
    test prints (it may print what the sample returned) goes to /dev/null, so that a checker
    killed before its verdict can never leave a line on stdout that reads as one."""
    _die_with_parent()
    job = json.loads(sys.stdin.read())
    verdict_fd = os.dup(1)
    null = os.open("/dev/null", os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    import resource

    # Replies can be built to make decoding slow (ints whose hashes collide, in a set) or large
    # (16 MB of `[{},{},...]` is ~0.4 GB of objects): bounded here, not only by the grader's clock.
    resource.setrlimit(resource.RLIMIT_CPU, (int(job["timeout"]) + 1, int(job["timeout"]) + 1))
    resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
    start = time.monotonic()
    candidate = Candidate(requests, replies, job["call_timeout"], start + job["timeout"])
    verdict = {"passed": False, "error": None}
    try:
        candidate.load(job["solution"], job["entry_point"])
        namespace = {"__name__": "checker"}
        exec(_compile_prompt(job["prompt"]), namespace)  # helpers the test calls (poly, ...)
        namespace[job["entry_point"]] = candidate  # a test may call the function by its name
        exec(_compile_source(job["test"], "test.py"), namespace)
        namespace["check"](candidate)
        verdict["passed"] = candidate.failure is None
        verdict["error"] = candidate.failure
    except CandidateFailed as err:
        verdict["error"] = str(err)
    except BaseException as err:
        verdict["error"] = candidate.failure or _test_failure(err)
    verdict["calls"] = candidate.calls
    data = (json.dumps(verdict) + "\n").encode()
    while data:
        data = data[os.write(verdict_fd, data):]
    os._exit(0)


def _compile_prompt(prompt):
    """The benchmark's prompt (its imports and helper functions), its open stub closed by `pass`."""
    for source in (prompt, prompt + "    pass\n"):
        try:
            return _compile_source(source, "prompt.py")
        except SyntaxError:
            continue
    return compile("", "prompt.py", "exec")


def _compile_source(source, filename):
    import linecache

    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # for error lines
    return compile(source, filename, "exec")


def _test_failure(err):
    """The failing line of the test, e.g. `AssertionError at test.py:12: assert candidate(3) == 5`."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == "test.py"]
    where = f" at test.py:{frames[-1].lineno}: {frames[-1].line.strip()}" if frames else ""
    return f"{type(err).__name__}{where}{': ' + str(err) if str(err) else ''}"[:2000]


def _die_with_parent():
    """Killed with the process that started it; and not dumpable, so that a process of the same
    user (another sample, in the weak mode as an ordinary user) can neither read nor write its
    memory or open its descriptors through /proc (the kernel then asks for CAP_SYS_PTRACE)."""
    try:
        ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*(int(arg) for arg in sys.argv[2:8]))
    else:
        check_main(int(sys.argv[2]), int(sys.argv[3]))
