"""launch/slurm/node.sh run as srun runs it on a node (the SLURM variables set by hand, no SLURM here), with a stand-in
for launch/pretrain.py: a copy of the script in a directory laid out as the repository, so torchrun starts the
stand-in. torchrun gives workers stopping on a signal the time node.sh sets (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), not its
own 30 s, and tees their output into <RUN_LOG_DIR>/torchrun-node<K>/, as the README says."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch_util import free_port

pytestmark = pytest.mark.slow   # starts torchrun; one case waits out a 35 s save

REPO = Path(__file__).resolve().parents[2]

# the trainer as a stop signal finds it: it finishes its step and saves (FAKE_SAVE_S seconds), then exits 0
WORKER = """import os, signal, sys, time
from pathlib import Path
out, rank = Path(os.environ["FAKE_OUT"]), os.environ["RANK"]
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
print(f"rank {rank} says hello", flush=True)
print(f"rank {rank} warns", file=sys.stderr, flush=True)
(out / f"timeout{rank}").write_text(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", ""))
(out / f"ready{rank}").write_text(str(os.getpid()))
if os.environ.get("FAKE_SAVE_S"):
    while not got:
        time.sleep(0.05)
    time.sleep(float(os.environ["FAKE_SAVE_S"]))
    (out / f"saved{rank}").write_text("")
"""


@pytest.fixture
def node(tmp_path):
    """Starts node.sh (a copy, in a repository of its own whose launch/pretrain.py is WORKER) with `nproc` workers;
    returns (start, the run's log directory, the workers' output directory)."""
    fake_repo = tmp_path / "repo"
    (fake_repo / "launch" / "slurm").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "slurm" / "node.sh", fake_repo / "launch" / "slurm" / "node.sh")
    (fake_repo / "launch" / "pretrain.py").write_text(WORKER)
    out, logs = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "RUN_LOG_DIR": str(logs),
           "FAKE_OUT": str(out), "OMP_NUM_THREADS": "1"}
    for name in ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "PET_SHUTDOWN_TIMEOUT", "KEYE_LAUNCH_STARTED"):
        env.pop(name, None)
    procs = []

    def start(nproc: int, **extra):
        p = subprocess.Popen([str(fake_repo / "launch" / "slurm" / "node.sh")], cwd=tmp_path,
                             env={**env, "MASTER_PORT": str(free_port()), "GPUS_PER_NODE": str(nproc), **extra},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start, logs, out
    for p in procs:   # node.sh exec'd torchrun: a test that failed leaves it, and its workers, to end here
        if p.poll() is None:
            p.kill()
    for f in out.glob("ready*"):
        try:
            os.kill(int(f.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _wait_ready(out: Path, p, n: int = 1, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while len(list(out.glob("ready*"))) < n:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.1)


def test_a_save_longer_than_30_s_after_a_stop_signal_completes(node):
    """torchrun passes SIGUSR1 on (node.sh's --signals-to-handle) and killed the workers 30 s later, its default: a
    step plus a large model's stop checkpoint (37 s for a 30B save) ended with no checkpoint."""
    start, _, out = node
    p = start(1, FAKE_SAVE_S="35")
    _wait_ready(out, p)
    assert (out / "timeout0").read_text() == "600"        # node.sh's default, what torchrun's agent reads
    p.send_signal(signal.SIGUSR1)
    p.communicate(timeout=120)
    assert (out / "saved0").exists(), "torchrun killed the worker before its 35 s save ended"


def test_the_shutdown_timeout_given_reaches_torchrun(node):
    """TORCH_ELASTIC_SHUTDOWN_TIMEOUT set for node.sh is what torchrun waits: 2 s, and an 8 s save is cut short."""
    start, _, out = node
    p = start(1, FAKE_SAVE_S="8", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="2")
    _wait_ready(out, p)
    signalled = time.monotonic()
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=60)
    assert time.monotonic() - signalled < 7.5 and not (out / "saved0").exists(), err[-3000:]
    assert "Unable to shutdown process" in err, err[-3000:]    # torchrun killed it


def test_a_shutdown_timeout_that_is_not_seconds_is_named(node):
    start, _, _ = node
    p = start(1, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="10m")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2, err
    assert "node.sh: TORCH_ELASTIC_SHUTDOWN_TIMEOUT=10m is not a whole number of seconds" in err, err


def test_the_workers_output_is_teed_into_the_torchrun_log_directory(node):
    """node.sh passed --log_dir without --tee or --redirects: <run_dir>/torchrun-node<K>/ held empty directories,
    where the README said torchrun's logs were. Now each worker's stdout and stderr are there, and on the console."""
    start, logs, _ = node
    p = start(2)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    for rank in (0, 1):
        attempt = list((logs / "torchrun-node0").glob(f"77_*/attempt_0/{rank}"))
        assert len(attempt) == 1, list((logs / "torchrun-node0").rglob("*"))
        assert (attempt[0] / "stdout.log").read_text() == f"rank {rank} says hello\n"
        assert (attempt[0] / "stderr.log").read_text() == f"rank {rank} warns\n"
        assert f"[default{rank}]:rank {rank} says hello" in out and f"[default{rank}]:rank {rank} warns" in err
