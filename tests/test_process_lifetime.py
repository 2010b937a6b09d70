"""Processes end when they should: train.py refuses to fall back to CPU silently (a broken GPU, a
multi-rank launch without one), torchrun's ranks die with their launcher, a wait notices a dead
launcher, the kill tests kill every process of a run, and the session's end finds leftovers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import killing
import train
from nanofast import common
from nanofast.common import Dist

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and the parent-death signal: Linux")


# ---- the device: no silent CPU fallback (issue 29, item 5) -----------------------------------
def device(cuda=False, gpus=0, world_size=1, asked_cpu=False, **env) -> str:
    return common.check_device(cuda, gpus, env, world_size, asked_cpu, reason=None)


def refusal(**kwargs) -> str:
    with pytest.raises(common.DeviceError) as e:
        device(**kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_usable_gpu_is_used_and_no_gpu_means_cpu_for_one_process():
    assert device(cuda=True, gpus=8) == device(cuda=True, gpus=8, world_size=8) == "cuda"
    assert device(cuda=True, gpus=8, world_size=8, asked_cpu=True) == "cuda"  # a preset names a size, not a device
    assert device() == "cpu"  # `python train.py --stage all` on a laptop: `make run`
    assert device(asked_cpu=True) == "cpu"


def test_gpus_present_but_unusable_is_an_error_unless_cpu_was_asked_for():
    message = refusal(gpus=8, world_size=8)
    assert message.startswith("8 NVIDIA GPU(s) present but CUDA cannot use them") and "NANOFAST_DEVICE=cpu" in message
    with pytest.raises(common.DeviceError, match=r"^1 NVIDIA GPU\(s\) present but CUDA cannot use them \(the driver "
                       r"is too old\): check nvidia-smi"):
        common.check_device(False, 1, {}, 1, False, reason="the driver is too old")
    with pytest.raises(common.DeviceError, match="CPU-only build: install a CUDA build of torch"):
        common.check_device(False, 2, {}, 1, False, cpu_only_build=True)
    assert refusal(gpus=1).startswith("1 NVIDIA GPU(s) present")  # one process too: not the cpu preset
    assert device(gpus=8, world_size=8, asked_cpu=True) == "cpu"  # --preset smoke|cpu|rehearsal
    assert device(gpus=8, world_size=8, NANOFAST_DEVICE="cpu") == "cpu"


@pytest.mark.parametrize("visible", ["", "-1", "8", "12,0", "NoDevFiles"])
def test_a_cuda_visible_devices_that_hides_every_gpu_is_named(visible):
    message = refusal(gpus=8, CUDA_VISIBLE_DEVICES=visible)
    assert f"CUDA_VISIBLE_DEVICES={visible!r} hides every one" in message and "indices 0-7" in message
    assert device(gpus=8, CUDA_VISIBLE_DEVICES=visible, asked_cpu=True) == "cpu"
    assert device(cuda=True, gpus=8, CUDA_VISIBLE_DEVICES="0") == "cuda"
    assert "hides" not in refusal(gpus=8, CUDA_VISIBLE_DEVICES="3")  # one stays visible: CUDA itself fails


def test_visible_gpus_reads_cuda_visible_devices_as_cuda_does():
    assert common.visible_gpus(None, 4) is None
    values = ("", "-1", "0", "0,1", "1,7,2", "3,-1,0", "GPU-1234", "x")
    assert [common.visible_gpus(v, 4) for v in values] == [0, 0, 1, 2, 1, 1, 1, 0]


def test_several_ranks_without_a_gpu_need_cpu_asked_for():
    """`torchrun --nproc_per_node=8 train.py --stage all` on a machine without a GPU: refused;
    the suite's `torchrun --nproc_per_node=2 train.py --stage all --preset smoke`: accepted."""
    assert refusal(world_size=8).startswith("8 ranks but no GPU")
    assert device(world_size=2, asked_cpu=True) == "cpu"
    assert device(world_size=2, NANOFAST_DEVICE="cpu") == "cpu"


def test_nanofast_device_forces_cpu_or_demands_cuda():
    assert device(cuda=True, gpus=8, world_size=8, NANOFAST_DEVICE="cpu") == "cpu"
    assert device(cuda=True, NANOFAST_DEVICE="cuda") == "cuda"
    assert refusal(NANOFAST_DEVICE="cuda", asked_cpu=True).startswith("NANOFAST_DEVICE=cuda but CUDA is unavailable")
    assert "expected cpu or cuda" in refusal(NANOFAST_DEVICE="gpu")


def test_the_gpu_probe_needs_no_cuda(tmp_path):
    """The driver's listing, else the device files: what a machine has when CUDA fails."""
    assert common.nvidia_gpus_present(tmp_path) == 0
    (tmp_path / "dev").mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (tmp_path / "dev" / name).touch()
    assert common.nvidia_gpus_present(tmp_path) == 2
    gpus = tmp_path / "proc" / "driver" / "nvidia" / "gpus"
    for bus in ("0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0"):
        (gpus / bus).mkdir(parents=True)
    assert common.nvidia_gpus_present(tmp_path) == 3


@pytest.fixture
def broken_gpus(monkeypatch):
    """This machine, as train.py sees one with 8 GPUs that CUDA cannot use."""
    monkeypatch.setattr(common, "nvidia_gpus_present", lambda root="/": 8, raising=False)
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "run_stages", lambda *a: pytest.fail("train.py ran on CPU"))
    for name in ("NANOFAST_DEVICE", "CUDA_VISIBLE_DEVICES", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def run_main(capsys, *argv) -> tuple[int, str]:
    code = train.main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_train_py_stops_on_gpus_it_cannot_use(broken_gpus, monkeypatch, capsys, tmp_path):
    base = str(tmp_path / "base")
    code, err = run_main(capsys, "--stage", "all", "--base-dir", base)
    assert code == 2 and err.startswith("error: 8 NVIDIA GPU(s) present but") and "\n" not in err, err
    assert "NANOFAST_DEVICE=cpu" in err and not Path(base).exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, err = run_main(capsys, "--stage", "all", "--base-dir", base)
    assert code == 2 and err.startswith("error: 8 NVIDIA GPU(s) present but CUDA_VISIBLE_DEVICES='' hides every one")
    monkeypatch.setenv("WORLD_SIZE", "8")
    code, err = run_main(capsys, "--stage", "all", "--preset", "speedrun", "--base-dir", base)
    assert code == 2 and "error: 8 NVIDIA GPU(s) present" in err  # the GPU preset does not ask for CPU
    assert common.choose_device(asked_cpu=True) == "cpu"  # what --preset smoke gives train.main
    monkeypatch.setenv("NANOFAST_DEVICE", "cpu")
    assert common.choose_device(asked_cpu=False) == "cpu"


def test_train_py_stops_a_multi_rank_launch_without_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(common, "nvidia_gpus_present", lambda root="/": 0, raising=False)
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "run_stages", lambda *a: pytest.fail("train.py ran on CPU"))
    monkeypatch.delenv("NANOFAST_DEVICE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")  # as torchrun sets it (without RANK: no process group here)
    code, err = run_main(capsys, "--stage", "all", "--base-dir", str(tmp_path / "base"))
    assert code == 2 and err.startswith("error: 8 ranks but no GPU") and "\n" not in err, err
    assert common.choose_device(asked_cpu=True) == "cpu"  # --preset smoke: the suite's torchrun runs


# ---- ranks die with their launcher (issue 29, item 7) -----------------------------------------
# train.py under torchrun, each rank recording its pid; rank 1 is slow (an hour in its tokenizer
# stage), so rank 0 waits at the stage's end (pipeline._join) as the rehearsal's ranks did.
SLOW_RANK = """
import os
if "RANK" in os.environ and os.environ.get("NANOFAST_PID_DIR"):
    import time
    from pathlib import Path
    from nanofast import pipeline

    Path(os.environ["NANOFAST_PID_DIR"], "rank" + os.environ["RANK"]).write_text(str(os.getpid()))

    def stage_tokenizer(run, t0):
        if run.dist.rank == 1:
            time.sleep(3600)
        pipeline._join(run, "tokenizer")

    pipeline.stage_tokenizer = stage_tokenizer
"""


def wait_for(condition, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launcher ended (rc {proc.returncode}) before {what}:\n"
                                 + (log.read_text()[-3000:] if log else ""))
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def running(pid: int, start: int | None = None) -> bool:
    """Not gone, not a zombie (killed, not reaped yet), and (given its start time) not a new
    process under a reused pid. The test's own check, not the helpers' under test."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and (start is None or int(fields[19]) == start)


def cleanup(proc: subprocess.Popen, pids: dict[int, int]) -> None:
    """Whatever a failed test left: the processes it knows of, and the launcher's session."""
    for pid, start in pids.items():
        if running(pid, start):
            os.kill(pid, signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@LINUX
def test_torchrun_ranks_die_with_a_killed_launcher(tmp_path):
    """SIGKILL of torchrun's launcher process alone (not its group: torchrun starts each rank in a
    session of its own, out of reach of the launcher's group anyway): both ranks of train.py die
    within seconds, the one waiting at the stage's end and the busy one."""
    hooks, pids, base = tmp_path / "hooks", tmp_path / "pids", tmp_path / "base"
    hooks.mkdir()
    pids.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_RANK)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT)]), NANOFAST_PID_DIR=str(pids))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--stage", "tokenizer", "--preset", "smoke", "--base-dir", str(base)]
    log = tmp_path / "torchrun.log"
    ranks: dict[int, int] = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run_dir = base / "runs"
        wait_for(lambda: len(list(pids.iterdir())) == 2 and any(run_dir.glob("*/sync/tokenizer.rank0")),
                 "both ranks started and rank 0 waits at the stage's end", 240, proc, log)
        ranks = {int(p.read_text()): start_time(int(p.read_text())) for p in pids.iterdir()}
        assert all(running(p, s) for p, s in ranks.items())
        time.sleep(0.5)  # rank 0 is in its wait (a marker of its own, rank 1's missing)
        assert all(running(p, s) for p, s in ranks.items())
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only
        proc.wait()
        deadline = time.monotonic() + 10
        while (left := [p for p, s in ranks.items() if running(p, s)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"rank(s) {left} outlived their killed launcher:\n" + log.read_text()[-2000:]
    finally:
        cleanup(proc, ranks)


@LINUX
def test_a_wait_at_a_stage_end_stops_when_the_parent_dies(tmp_path):
    """Without the parent-death signal (off Linux, or a launcher that is not train.py's parent),
    pipeline._join watches the parent: reparented, the rank stops with an error at once instead of
    waiting up to --wait-minutes for ranks that will never come."""
    waiter = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from nanofast.common import Dist
        from nanofast.pipeline import Run, _join
        from nanofast.presets import make_settings
        run = Run(settings=make_settings("smoke", wait_minutes=10), base=Path(sys.argv[1]), device="cpu",
                  dist=Dist(0, 0, 2))
        Path(sys.argv[1], "waiting").write_text(str(os.getpid()))
        t0 = time.monotonic()
        try:
            _join(run, "pretrain")
        except RuntimeError as e:
            print(f"{time.monotonic() - t0:.1f} s: {e}", flush=True)
            sys.exit(3)
        """)
    middle = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], stdout=open(sys.argv[3], 'w'), "
              "stderr=subprocess.STDOUT)\n"
              "time.sleep(600)\n")
    log = tmp_path / "waiter.log"
    proc = subprocess.Popen([sys.executable, "-c", middle, waiter, str(tmp_path), str(log)], cwd=ROOT, env=ENV,
                            start_new_session=True)
    waiting: dict[int, int] = {}
    try:
        wait_for(lambda: (tmp_path / "waiting").is_file(), "the rank waits", 120, proc)
        pid = int((tmp_path / "waiting").read_text())
        waiting = {pid: start_time(pid)}
        time.sleep(0.5)
        assert running(pid, waiting[pid]), log.read_text()
        os.kill(proc.pid, signal.SIGKILL)  # its parent: it is reparented
        proc.wait()
        deadline = time.monotonic() + 5
        while running(pid, waiting[pid]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(pid, waiting[pid]), "the wait did not notice its parent died"
        time.sleep(0.2)
        assert "its parent (pid" in log.read_text() and "stopped waiting for rank(s) [1]" in log.read_text()
    finally:
        cleanup(proc, waiting)


def test_a_wait_at_a_stage_end_stops_when_the_recorded_launcher_is_gone(tmp_path, monkeypatch):
    """The launcher train.py recorded at startup (die_with_parent) is no longer the parent."""
    from nanofast.pipeline import Run, _join
    from nanofast.presets import make_settings

    monkeypatch.setattr(common, "_launcher", os.getppid() + 100_000)
    run = Run(settings=make_settings("smoke", wait_minutes=0.2), base=tmp_path, device="cpu", dist=Dist(1, 1, 2))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1: its launcher \(pid \d+\) is gone: stopped waiting for rank"):
        _join(run, "sft")
    assert time.monotonic() - t0 < 2


# ---- the kill tests kill every process of the run ---------------------------------------------
# A launcher like torchrun: children in sessions of their own, each with a grandchild in yet
# another; every process records its pid; once all have, the launcher "saves step 2".
TREE = """
import os, subprocess, sys, time
from pathlib import Path
pids, ckpt, role = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(pids / str(os.getpid())).write_text(role)
me = [sys.executable, "-c", Path(sys.argv[4]).read_text(), *sys.argv[1:3]]
if role == "launcher":
    for i in range(2):
        subprocess.Popen([*me, "rank", sys.argv[4]], start_new_session=True)
    while len(list(pids.iterdir())) < 5:
        time.sleep(0.01)
    ckpt.mkdir(parents=True)
    (ckpt / "model_000002.pt").write_text("")
    (ckpt / "optim_000002_rank0.pt").write_text("")
    (ckpt / "meta_000002.json").write_text("{}")
elif role == "rank":
    subprocess.Popen([*me, "worker", sys.argv[4]], start_new_session=True)
time.sleep(600)
"""


@LINUX
def test_kill_once_saved_kills_every_process_of_the_run(tmp_path):
    pids, ckpt, script = tmp_path / "pids", tmp_path / "ckpt", tmp_path / "tree.py"
    pids.mkdir()
    script.write_text(TREE)
    cmd = [sys.executable, "-c", TREE, str(pids), str(ckpt), "launcher", str(script)]
    try:
        killed = killing.kill_once_saved(cmd, tmp_path, ENV, ckpt, 2, tmp_path / "tree.log", timeout=60)
        started = {int(p.name): p.read_text() for p in pids.iterdir()}
        assert sorted(started.values()) == ["launcher", "rank", "rank", "worker", "worker"]
        time.sleep(0.2)
        assert [p for p in started if running(p)] == [], "kill_once_saved left processes of the run running"
        assert set(started) <= set(killed)
    finally:
        for p in pids.iterdir():
            if running(int(p.name)):
                os.kill(int(p.name), signal.SIGKILL)


@LINUX
def test_the_session_end_finds_and_kills_leftover_processes(tmp_path):
    """A test that leaves a process running (here one whose parent exited, reparented out of
    pytest's tree) fails the session, and the process is killed."""
    for name in ("conftest.py", "killing.py"):
        (tmp_path / name).write_text((ROOT / "tests" / name).read_text())
    (tmp_path / "test_leak.py").write_text(textwrap.dedent("""
        import subprocess, sys, time
        from pathlib import Path

        def test_leaks():
            sleeper = "import os, time; open('leaked.pid', 'w').write(str(os.getpid())); time.sleep(600)"
            orphaner = ("import subprocess, sys; "
                        f"subprocess.Popen([sys.executable, '-c', {sleeper!r}], start_new_session=True)")
            subprocess.run([sys.executable, "-c", orphaner], check=True)  # exits: the sleeper is orphaned
            while not Path("leaked.pid").is_file():
                time.sleep(0.01)
        """))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_leak.py"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    leaked = int((tmp_path / "leaked.pid").read_text())
    try:
        assert out.returncode == 1, out.stdout + out.stderr
        assert "1 passed" in out.stdout and "1 process(es) of the test session still running at its end (killed now)" \
            in out.stdout and f"pid {leaked}:" in out.stdout, out.stdout
        assert not running(leaked)
    finally:
        if running(leaked):
            os.kill(leaked, signal.SIGKILL)


def test_the_session_end_stops_this_processs_own_multiprocessing_tracker(tmp_path):
    """A test that uses multiprocessing starts the session's resource tracker, which lives as long
    as pytest by design: the session end stops it instead of reporting it as a leak."""
    for name in ("conftest.py", "killing.py"):
        (tmp_path / name).write_text((ROOT / "tests" / name).read_text())
    (tmp_path / "test_mp.py").write_text(textwrap.dedent("""
        import multiprocessing, os
        from multiprocessing import resource_tracker

        def test_uses_multiprocessing():
            multiprocessing.get_context("spawn").Lock()  # a semaphore: starts the resource tracker
            resource_tracker.ensure_running()
            open("tracker.pid", "w").write(str(resource_tracker._resource_tracker._pid))
        """))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mp.py"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "1 passed" in out.stdout and "still running" not in out.stdout, \
        out.stdout + out.stderr
    assert not running(int((tmp_path / "tracker.pid").read_text()))
