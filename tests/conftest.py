import os
import sys
import time

import pytest

# The Triton interpreter executes @triton.jit kernels on CPU tensors; it must be chosen before
# triton is imported anywhere. The fp-fusion default changes in triton 3.10: pin it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_configure(config: pytest.Config) -> None:
    # Tests import benchmark modules (bench/) whose marks bench/conftest.py registers for its own
    # runs: registered here too, for the test session that imports them.
    config.addinivalue_line("markers", "expensive: long on a CPU machine (bench/conftest.py)")


# Every process this session starts inherits this mark in its environment (the tests' subprocess
# environments are copies of os.environ), so that one left running is found at the session's end
# even after its parent died and it was reparented out of this process's tree (a torchrun rank
# whose launcher was killed). Each session its own: a pytest started by a test marks its own.
SESSION_MARK = "NANOFAST_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"


def _marked(mark: str) -> set[int]:
    """The processes whose environment carries this session's mark."""
    needle = f"{SESSION_MARK}={mark}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.add(int(entry))
        except OSError:  # gone, or another user's
            pass
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:300]
    except OSError:
        return "?"


def leftover_processes() -> dict[int, int]:
    """The processes of this session still running, this one aside: its descendants, and every
    process carrying the session's mark. {pid: start time}."""
    from killing import alive, descendants, processes

    table = processes()
    left = descendants(os.getpid())
    left.update({p: table[p][1] for p in _marked(os.environ[SESSION_MARK]) if p in table})
    left.pop(os.getpid(), None)
    return {p: s for p, s in left.items() if alive(p, s)}


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown (pytest's own sessionfinish)
def pytest_sessionfinish(session, exitstatus):
    """No process of the suite may outlive it: what is still running now is killed, listed, and
    fails the session. torch's compile workers, which live as long as the process that started
    them (torch shuts them down at exit), are shut down first; a process gets a few seconds to
    finish exiting."""
    if not sys.platform.startswith("linux"):
        return
    from killing import kill_tree

    compile_workers = sys.modules.get("torch._inductor.async_compile")
    if compile_workers is not None:
        compile_workers.shutdown_compile_workers()
    # multiprocessing's resource tracker of this process (started by the first test that uses
    # multiprocessing) lives as long as the process by design: stop it as Python does at exit,
    # by closing its pipe. A tracker of a process that died has no one to close it: that one counts.
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None:
        tracker._resource_tracker._stop()
    deadline = time.monotonic() + 5
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not left:
        return
    lines = [f"  pid {pid}: {_cmdline(pid)}" for pid in sorted(left)]
    try:
        kill_tree(next(iter(left)), also=left)
        outcome = "killed now"
    except AssertionError as e:
        outcome = f"could not all be killed: {e}"
    message = "\n".join([f"ERROR: {len(left)} process(es) of the test session still running at its end ({outcome}):",
                         *lines])
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
