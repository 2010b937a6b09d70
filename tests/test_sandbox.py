"""nanofast.sandbox: HumanEval pass/fail, and hostile snippets each contained and reported."""
import os
import platform
import socket
import sys
import textwrap
import time

import pytest

from nanofast import sandbox
from nanofast.sandbox import ExecutionResult, execute, run_humaneval

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

PROMPT = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n'
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
SECCOMP = platform.machine() in sandbox._SECCOMP_ARCHES


def run(code: str, **kwargs) -> ExecutionResult:
    return execute(textwrap.dedent(code), **kwargs)


# --- HumanEval ---------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("    return a + b\n", True),
    ("    return a - b\n", False),                      # wrong answer: an assertion fails
    ("    return a +\n", False),                        # syntax error
    ("    raise RuntimeError('no')\n", False),          # exception
    ("    import math\n    return math.floor(a + b)\n", True),   # stdlib imports still work
])
def test_humaneval_pass_fail(completion, expected):
    assert run_humaneval(PROMPT, completion, TEST, "add") is expected


FORGE_STATUS = """
import json, sys
status = json.loads(sys.argv[2])["status"]            # the wrapper's status file: writable, but
with open(status, "a") as f:                          # the lines must carry a token never shown
    f.write("ok\\n" + "0" * 32 + " ok\\n" + "started ok\\n")
import os
os._exit(0)
"""


@pytest.mark.parametrize("completion", [
    "    import sys\n    sys.exit(0)\n",                                   # exit 0 inside check()
    "    return a - b\nimport sys\nsys.exit(0)\n",                       # exit 0 before check() runs
    "    return a - b\nimport os\nos._exit(0)\n",                        # no cleanup, exit code 0
    "    return a - b\nraise SystemExit\n",
    "    return a - b\nimport builtins\nbuiltins.check = lambda candidate: None\n",  # patch check
    "    return a - b\nimport atexit, os\natexit.register(os._exit, 0)\n",  # exit code forced to 0
    "    return a - b\nimport os\nprint('ok')\nprint('PASSED')\nos._exit(0)\n",  # print a pass marker
    "    return a - b\n" + FORGE_STATUS,                                  # forge the status file
    "    return a - b\nimport signal\nsignal.raise_signal(signal.SIGKILL)\n",  # kill the harness
    "    return a - b\nimport os\nos.kill(os.getppid(), 9)\n",          # ... or its parent
])
def test_hostile_completions_do_not_pass(completion):
    """A wrong completion passes only if check() returns: the wrapper's status line, which carries
    a per-run token the program never sees, not the exit code, says whether the program ran to
    its end."""
    assert run_humaneval(PROMPT, completion, TEST, "add") is False


def test_early_exits_and_exit_codes_are_reported_exactly():
    assert execute("import sys\nsys.exit(0)\n").error == "exit code 0 before the end of the program"
    assert execute("import os\nos._exit(0)\n").error == "exit code 0 before the end of the program"
    r = execute("import os\nos._exit(102)\n")     # the code the wrapper once used for MemoryError
    assert r.error == "exit code 102" and not r.memory_exceeded
    assert execute("import sys\nsys.exit(103)\n").error == "exit code 103"  # the setup-failure code
    assert execute("print('fine')\n").success


def test_humaneval_timeout_is_a_failure():
    start = time.monotonic()
    assert run_humaneval(PROMPT, "    while True:\n        pass\n", TEST, "add", timeout=1.0) is False
    assert time.monotonic() - start < 3.0


def test_success_captures_output():
    r = execute("import sys\nprint('hello')\nprint('warn', file=sys.stderr)\n")
    assert r == ExecutionResult(True, "hello\n", "warn\n", False, False, None, r.isolation)


def test_failure_reports_exit_code_and_traceback():
    r = execute("x = 1\nraise ValueError('boom')\n")
    assert not r.success and r.error == "exit code 1"
    assert "ValueError: boom" in r.stderr and 'File "<sandbox>", line 2' in r.stderr
    r = execute("import sys\nsys.exit(3)\n")
    assert not r.success and r.error == "exit code 3" and not r.timed_out and not r.memory_exceeded


# --- time, processes ---------------------------------------------------------------------------

def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    r = execute("while True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - start
    assert r.timed_out and not r.success and r.error == "timeout"
    assert 1.0 <= elapsed < 2.5


def test_fork_bomb_is_contained():
    start = time.monotonic()
    r = execute("import os\nwhile True:\n    os.fork()\n", timeout=3.0)
    assert not r.success and r.error == "blocked: os.fork"
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("code, error", [
    ("import subprocess\nsubprocess.Popen(['sleep', '30'])\n", "blocked: subprocess.Popen"),
    ("import os\nos.system('sleep 30')\n", "blocked: os.system"),
    ("import posix\nposix.fork()\n", "blocked: os.fork"),
    ("import multiprocessing\n", "blocked: import multiprocessing"),
    ("import ctypes\n", "blocked: import ctypes"),
])
def test_process_creation_is_blocked(code, error):
    r = execute(code)
    assert not r.success and r.error == error


@pytest.mark.skipif(not SECCOMP, reason="no seccomp table for this machine")
def test_kernel_refuses_new_tasks_past_the_guards():
    # threading is not guarded in-process: the seccomp filter (clone) is what refuses it.
    r = execute("print(open('/proc/self/status').read())\n"
                "import threading\nthreading.Thread(target=print).start()\n")
    assert "Seccomp:\t2" in r.stdout and "NoNewPrivs:\t1" in r.stdout
    assert not r.success and "can't start new thread" in r.stderr


def test_grandchild_is_killed_with_the_group(tmp_path):
    # fork is blocked inside the sandbox, so the group kill is tested on the parent-side runner
    # with an unrestricted child that leaves a sleeping grandchild holding the pipes.
    pid_file = tmp_path / "grandchild.pid"
    child = ("import subprocess, sys\n"
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
             "print('spawned', flush=True)\n")
    for extra, timeout in (("", 10.0), ("import time; time.sleep(60)\n", 1.5)):
        start = time.monotonic()
        out = sandbox._run_group([sys.executable, "-c", child + extra], cwd=str(tmp_path),
                                 env=dict(os.environ), timeout=timeout, max_output=4096)
        assert time.monotonic() - start < timeout + 2.0   # no hang on the grandchild's pipe
        assert out.stdout == "spawned\n" and out.timed_out == bool(extra)
        grandchild = int(pid_file.read_text())
        deadline = time.monotonic() + 2.0
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (SIGKILLed, waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_without_pidfd_the_parent_polls(monkeypatch):
    def no_pidfd(pid):
        raise OSError("pidfd_open unavailable")
    monkeypatch.setattr(sandbox.os, "pidfd_open", no_pidfd, raising=False)
    assert execute("print('ok')\n").stdout == "ok\n"
    start = time.monotonic()
    assert execute("while True:\n    pass\n", timeout=0.5).timed_out
    assert time.monotonic() - start < 2.0


# --- memory, files, output, stdin --------------------------------------------------------------

def test_memory_hog_is_reported():
    r = execute("x = bytearray(4 * 1024 ** 3)\n", memory_mb=256)
    assert r.memory_exceeded and not r.success and r.error == "memory limit"
    r = execute("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n", memory_mb=256)
    assert r.memory_exceeded and r.error == "memory limit"


def test_huge_file_write_is_limited():
    r = run("""
        import os
        try:
            with open('big.bin', 'wb') as f:
                for _ in range(100):
                    f.write(b'x' * 2 ** 20)
        finally:
            print(os.path.getsize('big.bin'))
        """)
    assert not r.success and "File too large" in r.stderr
    assert int(r.stdout) <= sandbox.MAX_FILE_BYTES


def test_writes_in_cwd_work_and_the_directory_is_removed():
    r = run("""
        import os, tempfile
        with open('out.txt', 'w') as f:
            f.write('data')
        os.mkdir('sub', 0)                      # even one the parent cannot list
        with tempfile.TemporaryDirectory() as d, tempfile.NamedTemporaryFile(dir=d) as t:
            t.write(b'x')                       # both cleaned up: removal inside is allowed
        open('gone', 'w').close()
        os.remove('gone')
        assert sorted(os.listdir('.')) == ['out.txt', 'sub'], os.listdir('.')
        print(os.getcwd())
        print(open('out.txt').read())
        """)
    assert r.success, r.stderr
    cwd, content = r.stdout.split()
    assert content == "data" and os.path.basename(cwd) == "work"
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))


@pytest.mark.parametrize("snippet, error", [
    ("import os\nos.system('touch {victim}.new')\n", "blocked: os.system"),
    ("import os\nos.remove('{victim}')\n", "blocked: os.remove"),
    ("import os\nos.unlink('{victim}')\n", "blocked: os.unlink"),
    ("import shutil\nshutil.rmtree('{victim_dir}')\n", "blocked: shutil.rmtree"),
    ("import shutil\nshutil.move('{victim}', 'stolen')\n", "blocked: shutil.move"),
    ("import os\nos.chmod('{victim}', 0)\n", "blocked: os.chmod"),
    ("open('{victim}', 'w').write('overwritten')\n", "blocked: open"),
    ("import pathlib\npathlib.Path('{victim}').write_text('overwritten')\n", "blocked: open"),
    ("import os\nos.open('{victim}', os.O_WRONLY | os.O_TRUNC)\n", "blocked: os.open"),
    ("import os\nos.symlink('{victim}', 'link')\nopen('link', 'w').write('x')\n", "blocked: open"),
])
def test_destructive_calls_outside_the_sandbox_are_blocked(tmp_path, snippet, error):
    victim_dir = tmp_path / "keep"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("precious")
    r = execute(snippet.format(victim=victim, victim_dir=victim_dir))
    assert not r.success and r.error == error, r.stderr
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 != 0
    assert sorted(p.name for p in victim_dir.iterdir()) == ["precious.txt"]


def test_stdout_flood_is_truncated_without_hanging():
    start = time.monotonic()
    r = execute("import sys\nsys.stdout.write('x' * 10 ** 7)\nprint('END')\n", max_output=1000)
    assert r.success and time.monotonic() - start < 5.0
    assert len(r.stdout) < 1100 and "bytes truncated" in r.stdout and r.stdout.endswith("END\n")
    start = time.monotonic()
    r = execute("while True:\n    print('y' * 1000)\n", timeout=1.0, max_output=4096)
    assert r.timed_out and len(r.stdout) < 4200 and time.monotonic() - start < 3.0


def test_stdin_is_at_eof():
    start = time.monotonic()
    r = execute("import sys\nprint(repr(sys.stdin.read()))\ninput()\n", timeout=3.0)
    assert r.stdout == "''\n" and "EOFError" in r.stderr and time.monotonic() - start < 2.0


# --- network, environment ----------------------------------------------------------------------

@pytest.mark.parametrize("snippet", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
    # past the guards: the class itself, found by introspection; the kernel has to refuse it
    "s = [c for c in object.__subclasses__() if c.__name__ == 'socket'][0](2, 1)\n"
    "s.connect(('127.0.0.1', {port}))\n",
])
def test_no_network_connection(snippet):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        r = execute(snippet.format(port=listener.getsockname()[1]), timeout=4.0)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):   # nothing in the accept queue
            listener.accept()
    assert not r.success and not r.timed_out


def test_network_namespace_when_permitted():
    r = execute("import os\nprint(os.readlink('/proc/self/ns/net'))\n")
    assert r.success, r.stderr
    if r.stdout.strip() == os.readlink("/proc/self/ns/net"):
        pytest.skip("unshare(CLONE_NEWNET) is not permitted here: the in-process block stands alone")
    r = execute("print(open('/proc/self/net/dev').read())\n")
    interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line]
    assert interfaces == ["lo"]


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANOFAST_TEST_SECRET", "hunter2-secret")
    r = execute("import os\nprint(sorted(os.environ.items()))\nos.environ['OMP_NUM_THREADS'] = '1'\n")
    assert r.success and "hunter2-secret" not in r.stdout and "NANOFAST_TEST_SECRET" not in r.stdout


# --- escapes past the Python guards: the operating system has to hold -------------------------

ISOLATED = execute("pass\n").isolation != "none"
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="the kernel refuses new namespaces here: the sandbox "
                                                          "falls back to seccomp, limits and the in-process guards")
UNGUARD = "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if getattr(f, '__name__', '') != 'ImportBlocker']\n"
ESCAPES = {  # name: a program that tries to reach {victim} (a file of the caller's) or the machine
    "io.FileIO over a file": "import _io\n_io.FileIO('{victim}', 'w').write(b'pwned')\n",
    "io.FileIO creating a file": "import _io\n_io.FileIO('{victim_dir}/new', 'w').write(b'pwned')\n",
    "libc open through ctypes": UNGUARD + "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "fd = libc.open(b'{victim_dir}/new', 0o1101, 0o644)\nassert fd >= 0, fd\nlibc.write(fd, b'pwned', 5)\n",
    "libc open of the root": UNGUARD + "import ctypes\nfd = ctypes.CDLL(None).open(b'/pwned', 0o101, 0o644)\n"
        "assert fd >= 0, fd\n",
    "read /etc/shadow": "print(open('/etc/shadow').read())\n",
    "read the parent's environment": "import os\nfor p in os.listdir('/proc'):\n    try:\n"
        "        print(open(f'/proc/{{p}}/environ', 'rb').read())\n    except OSError:\n        pass\n"
        "print(open(f'/proc/{{os.getppid()}}/environ', 'rb').read())\n",
    "a symlink out of the work dir": "import os, _io\nos.symlink('{victim}', 'l')\n_io.FileIO('l', 'w').write(b'pwned')\n",
    "a symlink to /etc": "import os\nos.symlink('/etc', 'etc')\nprint(open('etc/shadow').read())\n",
    "a hard link to the victim": "import os\nos.link('{victim}', 'h')\nopen('h', 'a').write('pwned')\n",
    "a hard link across mounts": "import os, sys\nos.link(sys.executable, 'python')\n",
    "/dev/shm": "import _io\n_io.FileIO('/dev/shm/nanofast-pwned', 'w').write(b'pwned')\n",
    "the Python installation": "import _io, sys\n_io.FileIO(sys.prefix + '/pwned', 'w').write(b'pwned')\n",
    "home directories": "import os\nprint(os.listdir('/root'), os.listdir('/home'))\n"
        "print(open(os.path.expanduser('~root/.bashrc')).read())\n",
}


@needs_isolation
@pytest.mark.parametrize("name", list(ESCAPES))
def test_escapes_past_the_guards_fail(name, tmp_path, monkeypatch):
    """Each program bypasses the in-process guards (FileIO, ctypes with the import blocker
    removed, links, /proc, /dev/shm) and must still fail: it sees a private read-only root with
    only Python, its libraries and its work directory, as the user nobody when run as root."""
    monkeypatch.setenv("NANOFAST_TEST_SECRET", "hunter2-secret")
    victim_dir = tmp_path / "keep"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("precious")
    r = execute(ESCAPES[name].format(victim=victim, victim_dir=victim_dir))
    assert not r.success, (r.stdout, r.stderr)
    assert victim.read_text() == "precious" and sorted(p.name for p in victim_dir.iterdir()) == ["precious.txt"]
    assert "hunter2-secret" not in r.stdout and "root:" not in r.stdout
    assert not os.path.exists("/pwned") and not os.path.exists("/dev/shm/nanofast-pwned")
    assert not os.path.exists(os.path.join(sys.prefix, "pwned"))


@needs_isolation
def test_the_program_sees_only_python_and_its_work_directory():
    r = execute("import os, sys\nprint(os.getuid() if os.geteuid() else 'root')\nprint(sorted(os.listdir('/')))\n"
                "print(os.listdir('/proc'))\nopen('here.txt', 'w').write('ok')\nprint(open('here.txt').read())\n")
    assert r.success, r.stderr
    uid, top, procs, written = r.stdout.splitlines()
    assert uid == ("65534" if os.geteuid() == 0 else "root") and written == "ok"
    assert "home" not in top and "sys" not in top and "run" not in top
    if os.geteuid() == 0:
        assert r.isolation == "mount, network namespaces; user nobody"
        assert [p for p in eval(procs) if p.isdigit()] == [p for p in eval(procs) if p.isdigit()][:1]  # itself only


# --- arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, word", [
    ({"timeout": 0}, ValueError, "timeout"),
    ({"timeout": -1.0}, ValueError, "timeout"),
    ({"timeout": float("nan")}, ValueError, "timeout"),
    ({"memory_mb": 15}, ValueError, "memory_mb"),
    ({"memory_mb": 64.0}, ValueError, "memory_mb"),
    ({"max_output": 0}, ValueError, "max_output"),
])
def test_argument_errors(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        execute("print(1)", **kwargs)


def test_argument_errors_code_and_humaneval():
    with pytest.raises(TypeError, match="code"):
        execute(b"print(1)")
    with pytest.raises(TypeError, match="completion"):
        run_humaneval(PROMPT, None, TEST, "add")
    with pytest.raises(ValueError, match="entry_point"):
        run_humaneval(PROMPT, "    return a + b\n", TEST, "add); import os; (")


def test_seccomp_program_shape():
    insns = sandbox._seccomp_program(0xC000003E, [57, 59], 302, True)
    assert insns[0] == (0x20, 0, 0, 4) and insns[-2:] == [(0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x50001)]
    deny, allow = len(insns) - 1, len(insns) - 2
    for i, (code, jt, jf, _) in enumerate(insns):   # every jump lands on an instruction
        if code in (0x15, 0x35):
            assert i + 1 + jt <= deny and i + 1 + jf <= deny
    assert insns[1][2] + 2 == deny and insns[-3][1] + len(insns) - 2 == allow
