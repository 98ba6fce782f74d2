"""The video loader's DataLoader workers in a real launch (torchrun, 2 gloo ranks, recipe=keye_tiny).

A worker killed outright (SIGKILL, as the kernel's OOM killer does) made torch raise in its rank's main process,
wherever that rank was: often inside a collective of the step, which the other rank then waited in. The loader now
raises it at its next draw (data/video/loader.py _defer_worker_deaths), where a replica's ranks settle together. The
run must end at once, with the error on stderr; a rerun resumes from the last checkpoint (tests/dist/test_faults.py
checks those resumes).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch_util import QUIET, REPO

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def test_a_data_loader_worker_killed_mid_run_ends_the_run_at_once_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    steps = 400        # far more than run before the kill: a run that went on or hung would not end by itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "pretrain.py"), *QUIET, "recipe=keye_tiny",
           f"train.steps={steps}", "train.checkpoint.enabled=false", "data.video.num_workers=1", f"run_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    ranks: list[int] = []
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert agent.poll() is None, f"training exited early: {agent.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no step was logged"
            time.sleep(0.2)
        ranks = _children(agent.pid)
        assert len(ranks) == 2, ranks
        # rank processes by RANK: /proc/<pid>/environ holds it
        rank1 = next(p for p in ranks if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{p}/environ").read_bytes())
        workers = [c for c in _children(rank1) if _comm(c) == "pt_data_worker"]
        assert len(workers) == 1, [(c, _comm(c)) for c in _children(rank1)]
        os.kill(workers[0], signal.SIGKILL)
        killed = time.time()
        try:
            # before: the failed rank waited in the teardown's barrier for the other, itself inside a collective of
            # the step, until the process group's 30-minute timeout, with nothing on stderr
            _, err = agent.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not end within 120 s of its rank 1's DataLoader worker being killed")
        took = time.time() - killed
    finally:
        if agent.poll() is None:   # the run hung: end it, and its ranks and their workers, which outlive torchrun
            left = ranks + [c for r in ranks for c in _children(r)]
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert agent.returncode != 0
    said = f"DataLoader worker (pid {workers[0]}) is killed by signal: Killed"
    assert said in err, err[-3000:]
    assert said in (run_dir / "logs" / "rank1.log").read_text()
    trained = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert trained < steps, trained
    print(f"ended {took:.1f} s after the kill, at step {trained}")
