"""Stop requests: SIGTERM / SIGUSR1 to a training process, or a STOP file in the run directory.

On a request every rank finishes its current step, the ranks agree (one all-reduce per step), a
checkpoint is written and training returns, so a requeued or rerun job resumes from exactly there.
- SIGTERM: what torchrun forwards to its workers when it is terminated (scancel, preemption); torchrun
  kills workers that have not exited TORCH_ELASTIC_SHUTDOWN_TIMEOUT s later (30 by default; launch/slurm/node.sh
  sets 600), so this path suits jobs whose step and save take less.
- SIGUSR1: SLURM's early warning (`sbatch --signal=USR1@<seconds>` delivered to the tasks). torchrun forwards it
  only when told to (`--signals-to-handle`, which launch/slurm/node.sh sets); by default it dies of it.
- STOP file: launch/slurm/pretrain.sbatch traps its own early-warning signal and touches
  <run_dir>/STOP; the workers see it at the next step boundary, with no grace limit. Rank 0 alone looks for it (the
  run directory is one for every rank: train/checkpoint.check_shared_run_dir) and the step's all-reduce carries its
  answer: one stat a step on the shared filesystem, not one per rank (4096 a step at 4096 ranks).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# A file's mtime comes from the kernel's coarse clock, up to a tick behind time.time(), and some filesystems keep
# whole seconds (or two): a STOP touched just after the launch began can read as older than it. A STOP an earlier
# launch left is minutes older (its trainer had ended, then this one was started and built its model).
STALE_SLACK_S = 2.0

STOP_FILE = "STOP"

# When the launch began, as launch/slurm/pretrain.sbatch (and node.sh, where it is not set) exports it at the start of
# the job step: seconds since the epoch (`date +%s.%N`). A STOP file older than the launch is stale, and the
# trainer's own start (its import) comes seconds to minutes after the job step's: a SLURM warning in between, whose
# STOP the script touched for this launch, was taken for an earlier launch's and removed.
LAUNCH_STARTED_ENV = "KEYE_LAUNCH_STARTED"


def launch_start(now: float, value: str | None) -> tuple[float, str | None]:
    """When this launch began, for StopRequests.drop_stale: the earlier of `now` (this process's start, near
    enough) and the time `value` (LAUNCH_STARTED_ENV's) names; with a warning to log where `value` is set and not
    such a time (it is then left out)."""
    if value is None or not value.strip():
        return now, None
    try:
        started = float(value)
    except ValueError:
        started = math.nan
    if not math.isfinite(started) or started <= 0:
        return now, (f"{LAUNCH_STARTED_ENV}={value!r} is not a time in seconds since the epoch (`date +%s.%N`, as "
                     f"launch/slurm/pretrain.sbatch sets it); ignored: this process's start stands for the launch's (a "
                     f"STOP file older than it is taken for an earlier launch's). Unset it, or set it to the job "
                     f"step's start")
    return min(now, started), None


class StopRequests:
    def __init__(self, run_dir: str, *, rank: int, signals=(signal.SIGTERM, signal.SIGUSR1)):
        """rank: this process's global rank; rank 0 alone looks for the STOP file (the module docstring)."""
        self.stop_file = Path(run_dir) / STOP_FILE
        self.watches_file = rank == 0
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def requested(self, device: torch.device) -> str | None:
        """Collective: the reason if any rank saw a signal or rank 0 the STOP file, else None."""
        local = 1.0 if self.signal_name else (2.0 if self.watches_file and self.stop_file.exists() else 0.0)
        flag = torch.tensor([local], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return None
        return self.signal_name or ("signal on another rank" if flag.item() == 1 else f"{self.stop_file} exists")

    def drop_stale(self, launched: float) -> None:
        """Removes a STOP file written before `launched` (this launch's start, time.time()), by more than
        STALE_SLACK_S: it asked an earlier launch to stop, one that had ended by then (a SLURM warning that came after
        the trainer finished, a crash), and would stop this one after its first step. Call on one rank before the
        first step."""
        try:
            made = self.stop_file.stat().st_mtime
        except FileNotFoundError:
            return
        if made < launched - STALE_SLACK_S:
            log.warning("%s was written before this launch began (%s): it asked an earlier launch to stop; removed",
                        self.stop_file, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(made)))
            self.clear_stop_file()

    def clear_stop_file(self) -> None:
        try:
            self.stop_file.unlink()
        except FileNotFoundError:
            pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()




def _die_with_parent() -> None:
    """Runs in the helper process: Linux sends it SIGKILL when the process that started it dies. Tied so, it ignores
    the stop signals (StopRequests'), which torchrun delivers to the worker's whole process group: an asynchronous
    save in flight at a stop reports its shards through it, and the stop's own save needs it too."""
    try:
        import ctypes

        tied = ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        tied = False
    if tied:  # untied, the signal is what ends it with the run
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)


def restart_checkpoint_helpers() -> None:
    """Starts, where this process has none alive, the multiprocessing Manager megatron-core's checkpoint writer reports
    through, and points the writer at it.

    megatron starts that Manager lazily with no tie to its parent. Two failures follow: torchrun
    delivers SIGTERM to a worker's whole process group, killing the Manager, and the final save on
    that signal fails with BrokenPipeError, as does an asynchronous save then in flight (its shards written, its
    report lost: the stop ended in a checkpoint error, without the stop's checkpoint); and a rank killed outright
    leaves its Manager running as an orphan (holding the job's output pipes). The Manager started here dies with
    the training process (PR_SET_PDEATHSIG) and ignores the stop signals.

    A live one of this process is kept, so trainers built one after another in a process (the tests' layout jobs,
    the benchmarks' cases) share it, each call with a queue of its own: spawning one (a fresh interpreter that imports
    torch, ~1.8 s of CPU) was each trainer's cost. One that died (SIGKILL, the out-of-memory killer: it ignores
    SIGINT, as every Manager does, and the stop signals) is replaced. Spawned, not forked: a forked server would
    inherit whatever lock another thread of the training process held at the fork (a test process's worker threads,
    a loader's), and a proxy's after-fork call into a stuck server hangs every later forked child of the process.
    """
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # SyncManager has no public liveness test: its server process is `_process`
    live = [m for pid, m in _MANAGERS if pid == os.getpid() and m._process.is_alive()]
    if live:
        manager = live[-1]
    else:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_die_with_parent)
        _MANAGERS.append((os.getpid(), manager))  # keep it referenced: its finalizer would shut the server down
    # a queue of its own for each call (a writer takes the queue of its save's start: a save in flight keeps its own),
    # so nothing a failed save left behind is read by a later trainer's
    filesystem_async._results_queue = manager.Queue()


_MANAGERS: list = []
