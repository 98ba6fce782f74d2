"""launch/supervise.run_torchrun: past its deadline a torchrun command's workers stop too.

torchrun starts each worker in a session of its own, so `subprocess.run(..., timeout=...)`, which kills torchrun
alone, leaves the workers running (the control below): in the suite they would keep both cores busy for the
tests after a timed-out one, on a GPU their memory.
"""

import os
import subprocess
import sys
import time

import pytest

from launch.supervise import run_torchrun

pytestmark = pytest.mark.slow  # starts torchrun twice, 20 s each

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
