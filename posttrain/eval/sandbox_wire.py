"""The two programs a HumanEval sample is graded with, and the plain-data wire between them.

Stdlib only: code_sandbox.py runs this file's source with `python -I -S -c SOURCE ROLE ...`.

  serve   runs inside the sandbox: confines itself (rlimits, dropped uid, seccomp), executes the
          sample's program and then answers calls to its entry point, one message per call.
  check   runs outside the sandbox, in its own process: executes the benchmark's prompt (helper
          functions such as `poly`) and test, and calls `check(candidate)` where `candidate` is a
          proxy that sends the arguments to `serve` and decodes the answer. Prints the verdict.

Only plain data crosses: None, bool, int, float (NaN/inf included), str, bytes, ranges and lists,
tuples, dicts, sets and frozensets of these, and iterators (a returned generator: its items, drawn
in the sample, as a fresh built-in iterator), in a tagged JSON encoding (never pickle/marshal), at most
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
MAX_ITEMS = 2**22  # items drawn from an iterator the entry point returned (an endless one fails)


def _iterator(items):
    """What a returned iterator decodes to: a built-in iterator over fresh plain data (as in the
    original harness, it is not equal to a list, has no len() and can be consumed once)."""
    return iter(items)

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
    if type(value) is range:
        return ["r", [encode(value.start), encode(value.stop), encode(value.step)]]
    if hasattr(type(value), "__next__") and hasattr(type(value), "__iter__"):
        # An iterator (a generator, map, zip, ...): the original harness hands it to the test, which
        # consumes it (HumanEval/33 and /37 call tuple(candidate(...))). Its items are drawn here, in
        # the sample, and cross as plain data; the checker gets a fresh iterator over them.
        items, size = [], 0
        for item in value:
            items.append(encode(item, depth + 1))
            size += 1
            if size > MAX_ITEMS:
                raise WireError(f"an iterator of more than {MAX_ITEMS} items")
        return ["I", items]
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
            if tag in ("l", "t", "S", "F", "I"):
                items = [decode(item, depth + 1) for item in payload]
                return {"l": list, "t": tuple, "S": set, "F": frozenset, "I": _iterator}[tag](items)
            if tag == "r" and len(payload) == 3:
                bounds = [decode(item, depth + 1) for item in payload]
                if all(type(b) is int for b in bounds):
                    return range(*bounds)
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


def serve(memory_bytes, cpu_seconds, uid, require_seccomp, preload, max_tasks, weak_policy=None):
    """In the sandbox: confine this process, load the sample, answer calls until stdin closes.
    `weak_policy` (JSON, without bubblewrap): what the weak layer confines the sample to."""
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # the sample's prints go to the capped output pipe, never onto the wire
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _confine(memory_bytes, cpu_seconds, uid, require_seccomp, preload, max_tasks,
             json.loads(weak_policy) if weak_policy else None)
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


def _confine(memory_bytes, cpu_seconds, uid, require_seccomp, preload, max_tasks, weak=None):
    """Before any sample code: limits, an unprivileged uid (when started as root), the weak layer
    (without bubblewrap: a user namespace with private tmpfs /tmp and /dev/shm where the kernel
    allows one, and Landlock), seccomp. `max_tasks` (threads included), 0 for none: only where the
    uid's count is this sample's alone (its own uid as root; a user namespace of its own, where the
    kernel counts per namespace)."""
    import resource
    import threading  # noqa: F401  (imported while the interpreter is surely readable)

    limits = [(resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
              (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_MSGQUEUE, 0)]
    ruleset = None
    if weak is not None and weak["landlock"]:  # read-only rules opened here: as root, before `uid` cannot reach them
        ruleset = landlock_ruleset(weak["read"])
        if ruleset is None and weak["require"]:
            os._exit(3)
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
    layers = []
    if weak is not None:
        private = _private_namespaces(weak["tmp_bytes"], weak["shm_bytes"]) if weak["userns"] else None
        if private is None and weak["userns"] and weak["require"]:
            os._exit(3)
        scratch = "/tmp" if private else weak["scratch"]
        os.chdir(scratch)
        os.environ.update(TMPDIR=scratch, HOME=scratch)
        if private:
            layers.append("userns")
            max_tasks = max_tasks or weak["max_tasks"]  # the count is this namespace's alone
        if ruleset is not None:
            writable = [scratch, "/dev/shm"] if private else [scratch]
            abi = landlock_restrict(ruleset, writable)
            if abi is None and weak["require"]:
                os._exit(3)
            if abi is not None:
                layers.append(f"landlock-{abi}")
        os.environ["POSTTRAIN_SANDBOX_LAYERS"] = " ".join(layers)  # read by code_sandbox's probe
    if max_tasks:
        limits.append((resource.RLIMIT_NPROC, max_tasks))
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))
    sys.setrecursionlimit(20_000)
    _die_with_parent()  # after setuid, which clears it
    if install_seccomp(weak is not None) is None and require_seccomp:
        os._exit(3)


# --- the weak layer: a user namespace and Landlock, for an ordinary user without bubblewrap -------

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _private_namespaces(tmp_bytes, shm_bytes):
    """unshare(2) a user namespace (mapped to this uid and gid only) with its own mount, IPC and UTS
    namespaces; private size-limited tmpfs on /tmp and /dev/shm, which the kernel frees with the
    namespace however the eval ends; then no capabilities left. None where the kernel refuses."""
    libc = _libc()
    CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x4000000, 0x8000000, 0x10000000
    uid, gid = os.geteuid(), os.getegid()
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: after setuid /proc/self/*_map belong to root
    try:
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS) != 0:
            return None
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1\n"), ("gid_map", f"{gid} {gid} 1\n")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 0x40000
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            os._exit(3)  # half made: a namespace this process cannot use (never reached in practice)
        for where, size in ((b"/tmp", tmp_bytes), (b"/dev/shm", shm_bytes)):
            options = f"size={size},nr_inodes=4096,mode=0700".encode()
            if libc.mount(b"tmpfs", where, b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options) != 0:
                os._exit(3)
        # No capabilities, even in this namespace (capset v3: effective, permitted, inheritable = 0).
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
            os._exit(3)
        return True
    except OSError:
        os._exit(3)
    finally:
        libc.prctl(4, 0, 0, 0, 0)


# Landlock (Linux >= 5.13): filesystem rights per ABI version; all that the kernel knows are handled,
# so everything not granted below is denied.
LANDLOCK_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
LANDLOCK_READ = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR
LANDLOCK_FILE_ONLY = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)  # rights a rule on a file may hold
LANDLOCK_DEVICES = {"/dev/null": (1 << 1) | (1 << 2) | (1 << 15), "/dev/zero": 1 << 2, "/dev/urandom": 1 << 2,
                    "/dev/random": 1 << 2}
SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self: the same on every architecture


def landlock_abi():
    """The kernel's Landlock ABI version, 0 when it has none (or has it disabled)."""
    version = _libc().syscall(SYS_LANDLOCK[0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(version, 0)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_ruleset(readable):
    """A ruleset fd handling every filesystem right of this kernel's ABI (and TCP, signals and
    abstract sockets where it can: ABI 4, 6), with `readable` (paths) granted read-only. None
    without Landlock."""
    abi = landlock_abi()
    if abi < 1:
        return None
    fs = LANDLOCK_FS[max(v for v in LANDLOCK_FS if v <= abi)]
    attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: bind+connect; scoped
    size = 8 * (3 if abi >= 6 else 2 if abi >= 4 else 1)
    fd = _libc().syscall(SYS_LANDLOCK[0], attr, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return None
    ruleset = {"fd": fd, "abi": abi, "fs": fs}
    for path in readable:
        _landlock_allow(ruleset, path, LANDLOCK_READ)
    for path, access in LANDLOCK_DEVICES.items():
        _landlock_allow(ruleset, path, access)
    return ruleset


def _landlock_allow(ruleset, path, access):
    try:
        target = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        import stat

        if not stat.S_ISDIR(os.fstat(target).st_mode):
            access &= LANDLOCK_FILE_ONLY
        rule = _PathBeneath(access & ruleset["fs"], target)
        return _libc().syscall(SYS_LANDLOCK[1], ruleset["fd"], 1, ctypes.byref(rule), ctypes.c_uint32(0)) == 0
    finally:
        os.close(target)


def landlock_restrict(ruleset, writable):
    """Grant `writable` every right, then confine this process (all its future threads) to the
    ruleset. The ABI version, or None if the kernel refused."""
    try:
        for path in writable:
            _landlock_allow(ruleset, path, ruleset["fs"])
        libc = _libc()
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: required to restrict oneself
            return None
        if libc.syscall(SYS_LANDLOCK[2], ruleset["fd"], ctypes.c_uint32(0)) != 0:
            return None
        return ruleset["abi"]
    finally:
        os.close(ruleset["fd"])


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


# Without bubblewrap, also file metadata: Landlock does not cover chmod, chown, extended attributes
# or timestamps, and the sample's uid may own files outside (an ordinary user's home, its Python).
_WEAK_ONLY = {
    "x86_64": dict(chmod=90, fchmod=91, chown=92, fchown=93, lchown=94, utime=132, utimes=235, futimesat=261,
                   fchownat=260, fchmodat=268, utimensat=280, setxattr=188, lsetxattr=189, fsetxattr=190,
                   removexattr=197, lremovexattr=198, fremovexattr=199, fchmodat2=452),
    "aarch64": dict(fchmod=52, fchmodat=53, fchownat=54, fchown=55, setxattr=5, lsetxattr=6, fsetxattr=7,
                    removexattr=14, lremovexattr=15, fremovexattr=16, utimensat=88, fchmodat2=452),
}


def seccomp_arch():
    return {"x86_64": _X86_64, "aarch64": _AARCH64}.get(os.uname().machine)


def install_seccomp(weak=False):
    """A BPF filter: threads yes, processes no; signals only to this process (and in the weak mode
    no changes to file metadata). None if unsupported."""
    arch = seccomp_arch()
    if arch is None:
        return None
    audit_arch, numbers, x32_bit = arch
    if weak:
        numbers = {**numbers, **_WEAK_ONLY[os.uname().machine]}
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
        serve(*(int(arg) for arg in sys.argv[2:8]), *sys.argv[8:9])
    else:
        check_main(int(sys.argv[2]), int(sys.argv[3]))
