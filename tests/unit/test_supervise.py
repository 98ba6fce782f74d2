"""launch/supervise.run_torchrun: past its deadline a torchrun command's workers stop too.

torchrun starts each worker in a session of its own, so `subprocess.run(..., timeout=...)`, which kills torchrun
alone, leaves the workers running (the control below): in the suite they would keep both cores busy for the
tests after a timed-out one, on a GPU their memory.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.supervise import run_torchrun

pytestmark = pytest.mark.slow  # starts torchrun four times, 20 s each

WORKER = """import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes: it holds no CPU or memory
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _start(tmp_path, runner):
    script, pid_file = tmp_path / "worker.py", tmp_path / "pid"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script),
           str(pid_file)]
    with pytest.raises(subprocess.TimeoutExpired):
        runner(cmd)
    return int(pid_file.read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


def test_timeout_stops_the_workers(tmp_path):
    # 20 s: torchrun's own start (it imports torch) plus the worker's, on a loaded 2-core machine
    pid = _start(tmp_path, lambda cmd: run_torchrun(cmd, timeout=20, grace=30))
    assert _gone_within(pid, 5), "the worker outlived run_torchrun's timeout"


def test_control_subprocess_run_leaves_the_worker_running(tmp_path):
    pid = _start(tmp_path, lambda cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=20))
    try:
        assert _alive(pid), "subprocess.run stopped the worker: the test above would not see the fault"
    finally:
        if _alive(pid):
            os.kill(pid, 9)


DRIVER = """import sys
from launch.supervise import run_torchrun
run_torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", sys.argv[1],
              sys.argv[2]], timeout=300, grace=30)
"""


def test_ctrl_c_in_the_caller_stops_torchrun_and_its_workers(tmp_path):
    """torchrun runs in a session of its own, so a Ctrl-C meant for the caller (a test run, a benchmark) never reached
    it: before, torchrun and its workers ran on after the caller had gone."""
    script, pid_file, driver = tmp_path / "worker.py", tmp_path / "pid", tmp_path / "driver.py"
    script.write_text(WORKER)
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    # SIGINT as a terminal's Ctrl-C delivers it to the caller (its default disposition, not an inherited 'ignore')
    proc = subprocess.Popen([sys.executable, str(driver), str(script), str(pid_file)], env=env,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60   # torchrun's start and the worker's, each importing torch
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    torchrun = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "KeyboardInterrupt" in err, err[-2000:]     # the caller still sees its interrupt
        assert _gone_within(worker, 10), "the worker outlived the Ctrl-C of run_torchrun's caller"
        assert not any(_alive(p) for p in torchrun), "torchrun outlived the Ctrl-C of run_torchrun's caller"
    finally:
        for pid in [worker, *torchrun]:   # what the fault leaves running is this test's to end
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# torchrun as it stops a worker that ignores SIGTERM: it passes the signal on, waits (its shutdown timeout, 30 s by
# default) and ignores the signal meanwhile; the worker runs in a session of its own, as torchrun starts each
AGENT = """import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
time.sleep(300)
"""
STUBBORN = """import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(300)
"""


def _wait_for_pid(pid_file: Path, proc=None, seconds: float = 60) -> int:
    deadline = time.monotonic() + seconds
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, f"{pid_file} was not written"
        assert proc is None or proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    return int(pid_file.read_text())


@pytest.mark.parametrize("agent", ["stand-in", "torchrun"])
def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, agent):
    """Past the grace only torchrun's process group was killed: the worker, in a session of its own, ran on. Under
    the stand-in agent above, and under torchrun itself, whose shutdown timeout (30 s) outlasts the grace."""
    script, pid_file = tmp_path / "worker.py", tmp_path / "pid"
    script.write_text(STUBBORN)
    cmd, timeout, grace = ([sys.executable, "-c", AGENT, STUBBORN, str(pid_file)], 5, 1) if agent == "stand-in" else (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script),
         str(pid_file)], 20, 3)
    worker = None
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            run_torchrun(cmd, timeout=timeout, grace=grace)
        worker = _wait_for_pid(pid_file, seconds=1)
        assert _gone_within(worker, 5), "a worker that ignores SIGTERM outlived run_torchrun's grace"
    finally:
        if worker is None and pid_file.exists() and pid_file.read_text():
            worker = int(pid_file.read_text())
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


STOPPING_DRIVER = """import sys
from launch.supervise import run_torchrun
run_torchrun([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], timeout=300, grace=300)
"""


def test_a_second_ctrl_c_kills_the_workers_too(tmp_path):
    """A second Ctrl-C while torchrun stops ends the wait at once: it killed torchrun's process group alone, and the
    worker, in a session of its own, ran on."""
    pid_file, driver = tmp_path / "pid", tmp_path / "driver.py"
    driver.write_text(STOPPING_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(driver), AGENT, STUBBORN, str(pid_file)], env=env,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    worker = None
    try:
        worker = _wait_for_pid(pid_file, proc)
        agent = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        proc.send_signal(signal.SIGINT)
        time.sleep(1)                      # run_torchrun now waits out its grace for the stand-in torchrun
        assert proc.poll() is None and _alive(worker)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert "KeyboardInterrupt" in err, err[-2000:]
        assert _gone_within(worker, 5), "the worker outlived a second Ctrl-C of run_torchrun's caller"
        assert not any(_alive(p) for p in agent), "torchrun outlived a second Ctrl-C of run_torchrun's caller"
    finally:
        if proc.poll() is None:
            proc.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)
