"""What a launch finds in its run directory before it trains: a run_dir it cannot write (stopped with a config error
naming it, not a traceback per rank), and a STOP file an earlier launch left (removed, so the run does not stop
after its first step; one written after the launch began, by the job step's clock where a launch script gives it,
still stops it)."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from train.launch import check_run_dir
from train.preemption import LAUNCH_STARTED_ENV, StopRequests, launch_start


def _cfg(path):
    return SimpleNamespace(resolved_run_dir=lambda: str(path))


def test_run_dir_must_be_a_directory_the_launch_can_make(tmp_path):
    check_run_dir(_cfg(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()                   # judged, not made: an invalid launch writes nothing
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"run_dir=.*afile is a file, not a directory"):
        check_run_dir(_cfg(tmp_path / "afile"))
    with pytest.raises(ValueError, match=r"run_dir=.*afile/run/sub: cannot be made a directory \(.*afile is a file"):
        check_run_dir(_cfg(tmp_path / "afile" / "run" / "sub"))


def test_a_stop_file_from_before_the_launch_is_removed_and_a_new_one_kept(tmp_path, caplog):
    stop = tmp_path / "STOP"
    launched = time.time()
    stop.touch()
    os.utime(stop, (launched - 60, launched - 60))            # the last launch's
    requests = StopRequests(str(tmp_path), rank=0, signals=())
    with caplog.at_level(logging.WARNING):
        requests.drop_stale(launched)
    assert not stop.exists() and "written before this launch began" in caplog.text
    stop.touch()                                              # a user's, during the model build: honoured
    requests.drop_stale(launched)
    assert stop.exists()
    # its mtime from the kernel's coarse clock (a tick behind time.time()) or a filesystem's whole seconds: still
    # this launch's. Without the slack the assertion above failed once in CI: the file touched right after `launched`
    # read as older than it
    os.utime(stop, (launched - 1, launched - 1))
    requests.drop_stale(launched)
    assert stop.exists()
    stop.unlink()
    requests.drop_stale(launched)                             # nothing to do without one


KEEPS_STOP = """import sys
from train.launch import LAUNCHED, LAUNCHED_WARNING
from train.preemption import StopRequests
StopRequests(sys.argv[1], rank=0, signals=()).drop_stale(LAUNCHED)
print(LAUNCHED_WARNING)
"""


def test_a_stop_file_written_while_the_job_step_started_is_kept(tmp_path):
    """launch/slurm/pretrain.sbatch touches STOP on SLURM's warning as soon as the job step has begun; the trainer's
    own start (train/launch.py's import) comes seconds to minutes later. A warning in between was taken for an earlier
    launch's: its STOP removed ('written before this launch began'), the run trained on and the job was requeued
    without a checkpoint of the stop. The launch's start is now the earlier of the script's (KEYE_LAUNCH_STARTED)
    and the import's."""
    stop = tmp_path / "STOP"
    stop.touch()
    now = time.time()
    os.utime(stop, (now - 30, now - 30))                      # the warning, 30 s into the job step's start
    env = {**os.environ, LAUNCH_STARTED_ENV: f"{now - 60:.6f}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", KEEPS_STOP, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert stop.exists(), run.stderr[-3000:]
    assert run.stdout.strip() == "None"


def test_the_launch_start_is_the_earlier_of_the_script_and_the_process(tmp_path):
    assert launch_start(100.0, None) == (100.0, None)
    assert launch_start(100.0, "") == (100.0, None)
    assert launch_start(100.0, "40.5") == (40.5, None)
    assert launch_start(100.0, "160") == (100.0, None)        # another node's clock, ahead: the process's start
    for bad in ("yesterday", "nan", "-5", "inf"):
        start, warning = launch_start(100.0, bad)
        assert start == 100.0 and f"KEYE_LAUNCH_STARTED={bad!r} is not a time in seconds since the epoch" in warning


def test_a_fault_drill_with_a_misspelled_fault_stops_before_the_run(monkeypatch):
    """KEYE_FAULT names what the drill breaks: a fault name not in the list, or an argument that is not
    NAME=INTEGER, stops the launch naming the part (a misspelled drill used to run clean and 'pass')."""
    from train.faults import _parse, check_env

    assert _parse("kill_in_step:step=3:rank=1; nan_in_step:micro=1:doc=0") == [
        ("kill_in_step", {"step": 3, "rank": 1}), ("nan_in_step", {"micro": 1, "doc": 0})]
    for spec, message in (("kill_in_steps:step=3", r"'kill_in_steps' is not a fault; the faults are kill_in_save"),
                          ("kill_in_step:step3", r"'step3' in 'kill_in_step:step3' is not NAME=INTEGER"),
                          ("kill_in_step:stp=3", r"'stp=3' .* is not NAME=INTEGER with NAME one of step, rank"),
                          ("nan_in_step:rank=one", r"'rank=one' .* is not NAME=INTEGER")):
        monkeypatch.setenv("KEYE_FAULT", spec)
        with pytest.raises(ValueError, match=r"KEYE_FAULT=.*" + message):
            check_env()
    monkeypatch.delenv("KEYE_FAULT")
    check_env()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a directory nobody can make one in")
def test_a_run_dir_that_cannot_be_made_is_a_config_error_even_for_root(tmp_path):
    """os.access answers yes to root for any directory, so a root launch (a container's) under /proc or a
    root-squashed NFS mount passed the check and failed at its first write with a traceback on every rank: the check
    tries a write instead."""
    with pytest.raises(ValueError, match=r"run_dir=/proc/keye_run/sub: this process cannot write /proc \("):
        check_run_dir(_cfg("/proc/keye_run/sub"))
    check_run_dir(_cfg(tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []                     # the probe is removed


def test_rank_0_alone_looks_for_the_stop_file_and_every_rank_learns_of_it(tmp_path, monkeypatch):
    """At 4096 ranks every rank's look was 4096 stats a step of one file on the shared filesystem's metadata server;
    rank 0 now looks and the step's all-reduce (which the check made already) carries its answer. Eight ranks as
    threads whose all-reduce takes the maximum, as gloo's does; the STOP file's stats counted: 8 a step before, 1."""
    import pathlib
    import threading

    import torch

    from train import preemption

    world, steps = 8, 5
    flags, meet = [0.0] * world, threading.Barrier(world)

    class Dist:   # MAX over the world's threads
        ReduceOp = SimpleNamespace(MAX="max")

        @staticmethod
        def all_reduce(flag, op):
            rank = int(threading.current_thread().name)
            flags[rank] = float(flag.item())
            meet.wait()
            flag.fill_(max(flags))
            meet.wait()

    stats, real_stat = [], pathlib.Path.stat

    def stat(self, *a, **k):
        if self.name == "STOP":
            stats.append(threading.current_thread().name)
        return real_stat(self, *a, **k)

    monkeypatch.setattr(preemption, "dist", Dist)
    monkeypatch.setattr(pathlib.Path, "stat", stat)
    answers: dict[int, list] = {}

    def rank(r):
        requests = StopRequests(str(tmp_path), rank=r, signals=())
        answers[r] = [requests.requested(torch.device("cpu")) for _ in range(steps)]
        meet.wait()
        if r == 0:
            (tmp_path / "STOP").touch()
        meet.wait()
        answers[r].append(requests.requested(torch.device("cpu")))

    threads = [threading.Thread(target=rank, args=(r,), name=str(r)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(answers[r] == [None] * steps + [f"{tmp_path / 'STOP'} exists"] for r in range(world)), answers
    assert len(stats) == steps + 1 and set(stats) == {"0"}     # one look a step, rank 0's
