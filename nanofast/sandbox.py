"""Run untrusted, model-generated Python (HumanEval completions) in a sandboxed subprocess.

Each call to execute() starts a fresh `python -I -B` process, in a new session (so the whole
process group can be killed), with stdin on /dev/null, a minimal environment (no secrets of the
parent) and its own temporary directory as cwd, HOME and TMPDIR; the directory is removed
afterwards. The child is this very file run as a script: before the program runs it sets up, in
order,

  1. the operating system's isolation (Linux; `_isolate`): new mount, network, IPC and UTS
     namespaces (plus a user namespace when not root) and a private root file system: a tmpfs
     holding read-only binds of only what the interpreter needs (/usr, /lib*, the Python
     installation, a few /etc files, /dev/null and friends) and the writable work directory,
     entered with pivot_root, the old root detached. No home directory, checkpoint, /etc/shadow,
     /dev/shm or other process is visible; as root it then becomes the user nobody, with a /proc
     that shows its own process only. The network namespace is empty (a down loopback). Where the
     kernel refuses new namespaces nothing of this happens (ExecutionResult.isolation says
     "none"); where they exist but a step fails, the run fails: a half-built sandbox never runs code;
  2. resource limits: RLIMIT_AS (memory_mb), RLIMIT_CPU (timeout + 1 s), RLIMIT_FSIZE
     (MAX_FILE_BYTES), RLIMIT_NOFILE (MAX_OPEN_FILES), RLIMIT_NPROC 0, RLIMIT_CORE 0;
  3. a seccomp filter (Linux x86_64/aarch64) that makes the kernel refuse with EPERM: new
     processes and threads (fork, clone, execve, ...), sockets, signals to other processes,
     ptrace, namespace/mount/module/reboot syscalls, and raising resource limits again;
  4. in-process guards in the spirit of OpenAI human-eval's reliability_guard, a second layer
     against a model's accidents: escaping or destructive functions (os.system, os.fork, os.kill,
     os.chmod, subprocess.Popen, socket.socket, ...) are replaced by functions raising
     SandboxViolation("blocked: <name>"); os.remove/unlink/rmdir/rename/replace/truncate,
     shutil.rmtree/move and writing with open()/os.open() raise it outside the sandbox directory
     only (tempfile needs them inside); ctypes, multiprocessing, resource, pty, ... cannot be
     imported. Python offers ways back to the originals (io.FileIO, object.__subclasses__(), the
     import machinery): layers 1-3 are what hold against them (tests/test_sandbox.py's escapes).

Whether the program ran to its end is not read from its exit code (a program can exit 0 at any
point: sys.exit(0), os._exit(0), an atexit hook): the wrapper writes `<token> <status>` lines to a
status file: "started" before the program, "ok" once it returned, "memory" on a MemoryError. The
token is a fresh random value per run, handed over on a pipe the wrapper reads and closes before
the program starts; it is not in argv, the environment or any file, so the program cannot write
a valid line. (Code that digs through the interpreter's own objects, frames or gc, could find it:
the in-process layer's limit.)

The parent enforces the wall-clock timeout, kills the whole process group (also when the child
exits normally, for anything it left behind), and keeps at most max_output bytes of each stream
while still draining the pipes, so a child flooding its output can neither hang nor exhaust it.

What remains possible: with isolation, reading the world-readable files of /usr and of the Python
installation, and filling the work directory up to MAX_FILE_BYTES per file; without it (kernels or
containers that refuse namespaces), everything the evaluating user can read, and writing where
that user may write: run the evaluator as a user without secrets there.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MAX_FILE_BYTES = 16 * 1024 * 1024   # RLIMIT_FSIZE: largest file the child may write
MAX_OPEN_FILES = 64                 # RLIMIT_NOFILE: plenty for a HumanEval program
_MIN_MEMORY_MB = 16                 # below this the interpreter itself cannot run
_EXIT_SETUP = 103                   # the child's exit code when the sandbox could not be set up
_DRAIN_S = 0.5                      # after the child is gone: how long to wait for the pipes' EOF
_REAP_S = 5.0                       # after SIGKILL: how long to wait for the child to be reaped
_TAIL_BYTES = 8192                  # of a truncated stream, this much of the end is kept too (tracebacks)

_CLONE_NEWNET = 0x40000000
_BLOCKED_RE = re.compile(r"blocked: ((?:import )?[\w.]+)")

# Syscall numbers the seccomp filter refuses, from the kernel's asm/unistd_64.h (x86_64) and
# asm-generic/unistd.h (aarch64); prlimit64 is refused only when it sets a limit.
_SECCOMP_ARCHES = {
    # machine: (AUDIT_ARCH_*, {name: nr}, prlimit64 nr, x32 ABI to refuse)
    "x86_64": (0xC000003E, {
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
        "socket": 41, "socketpair": 53, "kill": 62, "tkill": 200, "tgkill": 234,
        "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "unshare": 272,
        "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "reboot": 169, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "swapon": 167, "swapoff": 168,
        "setrlimit": 160, "bpf": 321, "perf_event_open": 298}, 302, True),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "execve": 221, "execveat": 281, "socket": 198,
        "socketpair": 199, "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271, "unshare": 97, "setns": 268,
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "reboot": 142,
        "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "swapon": 224, "swapoff": 225, "setrlimit": 164, "bpf": 280,
        "perf_event_open": 241}, 261, False),
}
_SECCOMP_ARCHES["arm64"] = _SECCOMP_ARCHES["aarch64"]

# In-process guards (the child only). Names missing on a platform are skipped.
# Not putenv: os.environ[...] = ... calls it, and the child's own environment is harmless.
_BLOCKED_OS = (
    "system", "popen", "kill", "killpg", "fork", "forkpty", "removedirs", "renames",
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chflags", "lchflags",
    "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setsid", "setpgid", "setpgrp", "execv", "execve", "execl", "execle", "execlp",
    "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe",
    "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "pidfd_open", "plock")
# Allowed inside the sandbox directory only (tempfile and friends need them there): name -> how
# many leading path arguments to check.
_SCOPED_OS = {"remove": 1, "unlink": 1, "rmdir": 1, "truncate": 1, "rename": 2, "replace": 2}
_BLOCKED_SHUTIL = ("chown",)
_SCOPED_SHUTIL = {"rmtree": 1, "move": 2}
_BLOCKED_SUBPROCESS = ("Popen", "call", "run", "check_call", "check_output", "getoutput",
                       "getstatusoutput")
_BLOCKED_SOCKET = ("socket", "SocketType", "create_connection", "create_server", "socketpair",
                   "fromfd", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr")
_BLOCKED_IMPORTS = frozenset((
    "ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty",
    "resource", "psutil", "tkinter", "joblib", "ipdb"))


@dataclass
class ExecutionResult:
    """What became of one sandboxed execution.

    success: the program ran to its end (the wrapper's token-carrying "ok") and exited with code
    0 within the limits; an exit before the end, even with code 0, is a failure. stdout/stderr: what it
    printed, at most max_output bytes each (decoded as UTF-8; a truncated stream keeps its
    beginning and its last few KiB around a "[... N bytes truncated ...]" marker). error: a short
    reason when not successful ("timeout", "memory limit", "exit code 1", "exit code 0 before the
    end of the program", "blocked: os.system", "sandbox setup failed", ...).
    """
    success: bool
    stdout: str
    stderr: str
    timed_out: bool
    memory_exceeded: bool
    error: str | None
    isolation: str = "none"  # what the operating system isolated ("none": only seccomp, limits, guards)


class SandboxViolation(PermissionError):
    """Raised inside the sandbox by a blocked function: "blocked: <name> ..."."""


class _Capture:
    """Keeps the first and the last bytes of a stream up to a cap, counting what was dropped."""

    def __init__(self, cap: int):
        self.tail_cap = min(_TAIL_BYTES, cap // 4)
        self.head_cap = cap - self.tail_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            over = len(self.tail) - self.tail_cap
            if over > 0:
                self.dropped += over
                del self.tail[:over]

    def text(self) -> str:
        if not self.dropped:
            return (self.head + self.tail).decode("utf-8", "replace")
        head, tail = self.head.decode("utf-8", "replace"), self.tail.decode("utf-8", "replace")
        return f"{head}\n[... {self.dropped} bytes truncated ...]\n{tail}"


@dataclass
class _Outcome:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def _has_exited(pid: int) -> bool:
    # WNOWAIT: the child stays a zombie, so its pid (= the group id) cannot be reused before killpg.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _run_group(argv: list[str], *, cwd: str, env: dict[str, str], timeout: float,
               max_output: int, pass_fds: tuple[int, ...] = ()) -> _Outcome:
    """Run argv as the leader of a new session; kill its whole process group when it exits or at
    the wall-clock timeout; capture both pipes up to max_output bytes each without ever blocking."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, close_fds=True, pass_fds=pass_fds)
    deadline = start + timeout
    out, err = _Capture(max_output), _Capture(max_output)
    captures = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    sel = selectors.DefaultSelector()
    try:
        pidfd = os.pidfd_open(proc.pid)   # readable once the child has exited (Linux >= 5.3)
    except (AttributeError, OSError):
        pidfd = None                      # fall back to polling waitid()
    timed_out = exited = False
    drain_until = math.inf
    try:
        for fd in captures:
            sel.register(fd, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if not exited and pidfd is None and _has_exited(proc.pid):
                exited = True
            if exited:
                if drain_until == math.inf:
                    _kill_group(proc.pid)  # whatever the child left behind in its group
                    drain_until = now + _DRAIN_S
                if len(sel.get_map()) == (1 if pidfd is not None else 0) or now >= drain_until:
                    break
                wait = drain_until - now
            elif now >= deadline:
                timed_out = True
                _kill_group(proc.pid)
                exited = True  # SIGKILL cannot be caught; the reap below waits for it
                continue
            else:
                wait = deadline - now
            if pidfd is None and not exited:
                wait = min(wait, 0.01)
            for key, _ in sel.select(max(wait, 0.0)):
                if key.fd == pidfd:
                    exited = True
                    continue
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if data:
                    captures[key.fd].feed(data)
                else:
                    sel.unregister(key.fd)
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        _kill_group(proc.pid)
        try:
            proc.wait(timeout=_REAP_S)
        except subprocess.TimeoutExpired:
            pass  # unkillable (D state): leave it rather than hang; returncode stays None
        proc.stdout.close()
        proc.stderr.close()
    rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    return _Outcome(rc, out.text(), err.text(), timed_out)


def _remove_tree(path: str) -> None:
    """rmtree that also copes with directories the child made unreadable (mkdir(mode=0))."""
    try:
        shutil.rmtree(path)
    except OSError:
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                try:
                    os.chmod(os.path.join(dirpath, name), 0o700)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


def execute(code: str, *, timeout: float = 5.0, memory_mb: int = 512,
            max_output: int = 64 * 1024) -> ExecutionResult:
    """Run `code` as a Python program in a fresh sandboxed subprocess (see the module docstring).

    timeout: wall-clock seconds, interpreter start included (> 0). memory_mb: address-space limit
    of the child (>= 16). max_output: bytes kept of stdout and of stderr each (> 0).
    Returns an ExecutionResult; never raises for anything the program does.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < _MIN_MEMORY_MB:
        raise ValueError(f"memory_mb must be an int >= {_MIN_MEMORY_MB}, got {memory_mb!r}")
    if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output <= 0:
        raise ValueError(f"max_output must be an int > 0, got {max_output!r}")
    if not sys.executable:
        raise RuntimeError("sys.executable is unknown: cannot start a sandboxed interpreter")
    script = os.path.abspath(__file__)

    root = tempfile.mkdtemp(prefix="nanofast-sandbox-")  # 0700; holds the program and the cwd
    token = secrets.token_hex(16)
    token_r, token_w = os.pipe()
    try:
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        program = os.path.join(root, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        newroot = os.path.join(root, "newroot")  # the child's private root is mounted here
        os.mkdir(newroot, 0o700)
        status = os.path.join(root, "status")
        open(status, "wb").close()
        os.write(token_w, token.encode())  # 32 bytes: within the pipe buffer, never blocks
        os.close(token_w)
        token_w = -1
        config = {"program": program, "work": work, "newroot": newroot, "status": status, "token_fd": token_r,
                  "memory_bytes": memory_mb * 1024 * 1024, "cpu_s": math.ceil(timeout) + 1}
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        outcome = _run_group([sys.executable, "-I", "-B", script, "--sandbox-child", json.dumps(config)],
                             cwd=work, env=env, timeout=timeout, max_output=max_output, pass_fds=(token_r,))
        with open(status, "rb") as f:
            reported = _reported(f.read(4096), token)
    finally:
        for fd in (token_r, token_w):
            if fd >= 0:
                os.close(fd)
        _remove_tree(root)
    return _result(outcome, reported)


def _reported(data: bytes, token: str) -> set[str]:
    """The statuses the child's wrapper wrote (`<token> <status>` lines). The program never saw
    the token, so a line it wrote cannot carry it."""
    prefix = token.encode() + b" "
    return {line[len(prefix):].decode("utf-8", "replace") for line in data.splitlines() if line.startswith(prefix)}


def _result(o: _Outcome, reported: set[str]) -> ExecutionResult:
    """Success needs the wrapper's word that the program ran to its end ("ok") and exit code 0:
    a program that exits early, even with code 0 (sys.exit(0), os._exit(0)), has not passed."""
    isolation = next((r.split("=", 1)[1] for r in reported if r.startswith("isolation=")), "none")

    def fail(error: str, *, timed_out: bool = False, memory: bool = False) -> ExecutionResult:
        return ExecutionResult(False, o.stdout, o.stderr, timed_out, memory, error, isolation)

    rc = o.returncode
    if o.timed_out:
        return fail("timeout", timed_out=True)
    if "memory" in reported:
        return fail("memory limit", memory=True)
    if "started" not in reported:
        return fail("sandbox setup failed")
    if rc == 0 and "ok" in reported:
        return ExecutionResult(True, o.stdout, o.stderr, False, False, None, isolation)
    if rc < 0:
        if -rc == signal.SIGXCPU:
            return fail("cpu time limit", timed_out=True)
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return fail(f"killed by signal {name}")
    lines = [line for line in o.stderr.splitlines() if line.strip()]
    match = _BLOCKED_RE.search(lines[-1]) if lines else None
    if match:
        return fail(f"blocked: {match.group(1)}")
    if rc == 0:  # sys.exit(0) or os._exit(0) before the program's end: not a pass
        return fail("exit code 0 before the end of the program")
    return fail(f"exit code {rc}")


def run_humaneval(prompt: str, completion: str, test: str, entry_point: str,
                  timeout: float = 5.0) -> bool:
    """True iff prompt + completion followed by the problem's test and check(entry_point) runs
    to its end in the sandbox, i.e. check() returned (the HumanEval pass criterion). A completion
    that exits early, with any code, or kills its process fails (see `execute`)."""
    for name, value in (("prompt", prompt), ("completion", completion), ("test", test),
                        ("entry_point", entry_point)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
    program = prompt + completion + "\n" + test + f"\ncheck({entry_point})\n"
    return execute(program, timeout=timeout).success


# ----------------------------------------------------------------------------------------------
# The child: this file run as `python -I -B sandbox.py --sandbox-child CONFIG`.

def _seccomp_program(arch: int, denied: list[int], prlimit_nr: int, x32: bool) -> list[tuple[int, int, int, int]]:
    """Classic-BPF seccomp filter as (code, jt, jf, k): EPERM for `denied` syscalls, for prlimit64
    with a new limit (args[2] != NULL), for other architectures and the x32 ABI; allow the rest."""
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06          # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
    allow_k, deny_k = 0x7FFF0000, 0x00050000 | 1       # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO|EPERM
    ops: list[tuple[int, object, object, int]] = [(ld, 0, 0, 4), (jeq, 0, "deny", arch), (ld, 0, 0, 0)]
    if x32:
        ops.append((jge, "deny", 0, 0x40000000))
    ops += [(jeq, "deny", 0, nr) for nr in denied]
    ops += [(jeq, 0, "allow", prlimit_nr),
            (ld, 0, 0, 32), (jeq, 0, "deny", 0),          # seccomp_data.args[2], low then high word
            (ld, 0, 0, 36), (jeq, "allow", "deny", 0)]
    labels = {"allow": len(ops), "deny": len(ops) + 1}
    ops += [(ret, 0, 0, allow_k), (ret, 0, 0, deny_k)]
    return [(code, labels[jt] - i - 1 if isinstance(jt, str) else jt,
             labels[jf] - i - 1 if isinstance(jf, str) else jf, k) for i, (code, jt, jf, k) in enumerate(ops)]


# ---- operating-system isolation (namespaces, a private read-only root, an unprivileged user) ----
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x20000, 0x4000000, 0x8000000, 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
_MS_KEEP = 2 | 4 | 8 | 1024 | 2048 | 4096   # nosuid, nodev, noexec, noatime, nodiratime, relatime: a
#                                            bind's remount must keep what its source mount locked
_NOBODY = 65534
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41}
_MNT_DETACH = 2
# What the interpreter needs to go on importing the standard library and loading its extension
# modules' shared libraries; nothing else of the machine is visible (no home directories, no
# checkpoints, no /etc/shadow, no /dev/shm, no other process's /proc).
_SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime",
                 "/etc/passwd", "/etc/group")
_DEVICES = ("null", "zero", "full", "random", "urandom")


def _isolate(config: dict, ctypes, libc) -> str:
    """Put this process in new mount, network, IPC and UTS namespaces (and a user namespace when not
    root), on a private root file system that shows read-only only what Python needs plus the
    writable work directory, then, as root, become the unprivileged user nobody. Returns what was
    done; "none" when the kernel refuses new namespaces (then the other layers stand alone). Any
    failure after the namespaces exist raises: a half-built sandbox never runs a program."""
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    root = os.geteuid() == 0
    if not root:
        flags |= _CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags) != 0:
        return "none"
    if not root:  # map our own uid to root inside: mounts become possible, nothing outside changes
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)

    def mount(source, target, fstype, mflags, data=None) -> None:
        if libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(mflags),
                      data and data.encode()) != 0:
            raise OSError(ctypes.get_errno(), f"mount {source} on {target}: {os.strerror(ctypes.get_errno())}")

    def bind(path: str, *, writable: bool = False) -> None:
        target = newroot + path
        if os.path.islink(path):  # /lib -> usr/lib on merged-/usr systems: the same link
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
            return
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        mount(path, target, None, _MS_BIND)
        if not writable:
            keep = os.statvfs(path).f_flag & _MS_KEEP
            mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | keep)

    newroot = config["newroot"]
    work = config["work"]
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)          # nothing we mount leaks back out
    mount("tmpfs", newroot, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}
    for path in [*_SYSTEM_PATHS, *sorted(prefixes)]:
        if os.path.lexists(path) and not any(path != q and path.startswith(q + "/") for q in prefixes):
            bind(path)
    for name in _DEVICES:
        if os.path.exists(f"/dev/{name}"):
            bind(f"/dev/{name}")
    bind(work, writable=True)
    os.makedirs(newroot + "/tmp", exist_ok=True)
    if root:  # a /proc of this user's processes only: after the switch to nobody, just this one
        os.makedirs(newroot + "/proc", exist_ok=True)
        mount("proc", newroot + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=invisible,subset=pid")
    os.chdir(newroot)
    if libc.syscall(ctypes.c_long(_PIVOT_ROOT[platform.machine()]), b".", b".") != 0:
        raise OSError(ctypes.get_errno(), f"pivot_root: {os.strerror(ctypes.get_errno())}")
    if libc.umount2(b".", _MNT_DETACH) != 0:                # the old root, stacked under the new one
        raise OSError(ctypes.get_errno(), f"umount old root: {os.strerror(ctypes.get_errno())}")
    mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(work)
    if not root:
        return "user, mount, network namespaces"
    os.chown(work, _NOBODY, _NOBODY)
    os.setgroups([])
    os.setresgid(_NOBODY, _NOBODY, _NOBODY)
    os.setresuid(_NOBODY, _NOBODY, _NOBODY)
    libc.prctl(4, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))  # PR_SET_DUMPABLE:
    return "mount, network namespaces; user nobody"   # /proc/self readable by its owner again


def _install_seccomp(ctypes, libc) -> bool:
    spec = _SECCOMP_ARCHES.get(platform.machine())
    if spec is None or libc is None or sys.byteorder != "little" or not sys.platform.startswith("linux"):
        return False
    arch, table, prlimit_nr, x32 = spec
    insns = _seccomp_program(arch, sorted(table.values()), prlimit_nr, x32)

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    array = (SockFilter * len(insns))(*[SockFilter(*insn) for insn in insns])
    prog = SockFprog(len(insns), array)
    ul = ctypes.c_ulong
    if libc.prctl(38, ul(1), ul(0), ul(0), ul(0)) != 0:          # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, ul(2), ctypes.byref(prog), ul(0), ul(0)) == 0   # PR_SET_SECCOMP, FILTER


def _set_limits(config: dict) -> None:
    import resource
    cpu = int(config["cpu_s"])
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
              (resource.RLIMIT_NOFILE, MAX_OPEN_FILES), (resource.RLIMIT_CPU, (cpu, cpu + 1))]
    if hasattr(resource, "RLIMIT_NPROC"):
        limits.append((resource.RLIMIT_NPROC, 0))   # counts per user; root is exempt (seccomp covers it)
    limits.append((resource.RLIMIT_AS, int(config["memory_bytes"])))   # last: the others allocate
    for which, value in limits:
        soft, hard = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(which, (soft, hard))


def _blocker(name: str):
    def blocked(*args, **kwargs):
        raise SandboxViolation(f"blocked: {name} is disabled in the sandbox")
    blocked.__name__ = blocked.__qualname__ = name.rsplit(".", 1)[-1]
    return blocked


def _install_guards(work: str) -> None:
    import builtins
    import io
    import _io
    import _socket
    import posix
    import socket
    work_real = os.path.realpath(work)

    def check_inside(path, name: str, *, dir_fd=None, follow: bool = True) -> None:
        """SandboxViolation unless path (relative to dir_fd when given) lies in the sandbox dir.
        follow=False resolves the parent only: unlinking a symlink never touches its target."""
        if isinstance(path, int):
            raise SandboxViolation(f"blocked: {name} on a file descriptor")
        path = os.fsdecode(path)
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        full = os.path.join(base, path)
        if follow:
            real = os.path.realpath(full)
        else:
            head, tail = os.path.split(os.path.normpath(full))
            real = os.path.join(os.path.realpath(head), tail)
        if real != os.devnull and os.path.commonpath([real, work_real]) != work_real:
            raise SandboxViolation(f"blocked: {name} outside the sandbox directory: {path!r}")

    def scoped(original, name: str, npaths: int):
        def guarded(*args, **kwargs):
            paths = list(args[:npaths]) + [kwargs[k] for k in ("path", "src", "dst") if k in kwargs]
            for path in paths:
                check_inside(path, name, dir_fd=kwargs.get("dir_fd", kwargs.get("src_dir_fd")),
                             follow=False)
            if "dst_dir_fd" in kwargs and len(paths) > 1:
                check_inside(paths[1], name, dir_fd=kwargs["dst_dir_fd"], follow=False)
            return original(*args, **kwargs)
        guarded.__name__ = guarded.__qualname__ = name.rsplit(".", 1)[-1]
        return guarded

    def check_write(path, name: str) -> None:
        check_inside(path, f"{name} for writing")

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and isinstance(mode, str) and any(c in mode for c in "wax+"):
            check_write(file, "open")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check_inside(path, "os.open for writing", dir_fd=dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    for module in (builtins, io, _io):
        module.open = guarded_open
    for module in (os, posix):   # os re-exports posix: both, or posix.fork() would still work
        module.open = guarded_os_open
        for name in _BLOCKED_OS:
            if hasattr(module, name):
                setattr(module, name, _blocker(f"os.{name}"))
        for name, npaths in _SCOPED_OS.items():
            setattr(module, name, scoped(getattr(module, name), f"os.{name}", npaths))
    for name, npaths in _SCOPED_SHUTIL.items():
        setattr(shutil, name, scoped(getattr(shutil, name), f"shutil.{name}", npaths))
    for module, names in ((shutil, _BLOCKED_SHUTIL), (subprocess, _BLOCKED_SUBPROCESS),
                          (socket, _BLOCKED_SOCKET), (_socket, _BLOCKED_SOCKET)):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _blocker(f"{module.__name__.lstrip('_')}.{name}"))

    class ImportBlocker:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname.partition(".")[0] in _BLOCKED_IMPORTS:
                raise SandboxViolation(f"blocked: import {fullname} is disabled in the sandbox")
            return None

    for name in list(sys.modules):   # those the setup itself imported must be imported anew
        if name.partition(".")[0] in _BLOCKED_IMPORTS:
            del sys.modules[name]
    sys.meta_path.insert(0, ImportBlocker)


def _child_main(config_json: str) -> None:
    import linecache
    import traceback
    import types
    try:
        config = json.loads(config_json)
        with open(config["program"], encoding="utf-8") as f:
            source = f.read()
        # The token proves to the parent that a status line is the wrapper's: read once, its pipe
        # closed, so the program can neither read it again nor see it in argv or the environment.
        token = os.read(config["token_fd"], 64)
        os.close(config["token_fd"])
        status_fd = os.open(config["status"], os.O_WRONLY | os.O_APPEND)
        os.chdir(config["work"])
        __import__("socket")  # now, before the memory limit: the guards patch it
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
        except (ImportError, OSError):
            ctypes = libc = None
        isolation = _isolate(config, ctypes, libc) if libc is not None and sys.platform.startswith("linux") else "none"
        _set_limits(config)
        if ctypes is not None:
            _install_seccomp(ctypes, libc)
        _install_guards(config["work"])
        del ctypes, libc
    except BaseException as exc:  # noqa: BLE001 - report whatever broke the setup, then stop
        sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
        sys.stderr.flush()
        os._exit(_EXIT_SETUP)
    report = _reporter(status_fd, token, os.write)  # the real os.write, captured before any program code
    del token
    report("started")
    report(f"isolation={isolation}")

    # The program runs as __main__ in a fresh module, not in this file's namespace.
    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    filename = "<sandbox>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show lines
    try:
        exec(compile(source, filename, "exec"), main.__dict__)
    except SystemExit:
        raise  # its own exit code, and no "ok": a program that exits early has not run to its end
    except MemoryError as exc:
        report("memory")
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except BaseException as exc:  # noqa: BLE001 - the program's own failure: its traceback, exit 1
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # without this frame
        sys.exit(1)
    report("ok")


def _reporter(fd: int, token: bytes, write):
    """report(status): one `<token> <status>` line on the status file, in one write(2) call."""
    def report(status: str) -> None:
        try:
            write(fd, token + b" " + status.encode() + b"\n")
        except OSError:
            pass  # the program closed or filled the fd: the parent then sees no such status
    return report


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--sandbox-child":
    _child_main(sys.argv[2])
