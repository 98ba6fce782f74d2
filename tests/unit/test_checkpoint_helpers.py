"""The helper process megatron-core's checkpoint writer reports its write results through (train/preemption.py
restart_checkpoint_helpers): one per training process, kept across the trainers it builds, replaced when it died,
deaf to the stop signals torchrun sends the whole process group, and gone with the process that started it."""
import multiprocessing as mp
import os
import signal
import time

from megatron.core.dist_checkpointing.strategies import filesystem_async

from train import preemption


def _helpers() -> list:
    return [m for pid, m in preemption._MANAGERS if pid == os.getpid()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"   # a zombie has died
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


def test_one_helper_per_process_kept_across_trainers_and_replaced_when_dead():
    preemption.restart_checkpoint_helpers()
    first, queue = _helpers()[-1], filesystem_async._results_queue
    preemption.restart_checkpoint_helpers()          # the next trainer of this process
    assert _helpers()[-1] is first and first._process.is_alive()   # old code: a new helper per call
    assert filesystem_async._results_queue is not queue  # a queue of its own: nothing left by an earlier save
    for sig in (signal.SIGTERM, signal.SIGUSR1):     # torchrun's stop signals reach the whole process group
        os.kill(first._process.pid, sig)
    time.sleep(0.2)
    assert first._process.is_alive()
    filesystem_async._results_queue.put({"rank": 0})
    assert filesystem_async._results_queue.get(timeout=10) == {"rank": 0}
    assert not first._process.is_alive() or os.kill(first._process.pid, signal.SIGKILL) is None  # e.g. the OOM killer
    first._process.join(10)
    preemption.restart_checkpoint_helpers()
    second = _helpers()[-1]
    assert second is not first and second._process.is_alive()
    filesystem_async._results_queue.put("after")
    assert filesystem_async._results_queue.get(timeout=10) == "after"


def _start_and_report(conn) -> None:
    preemption.restart_checkpoint_helpers()
    conn.send(_helpers()[-1]._process.pid)
    time.sleep(60)


def test_the_helper_dies_with_the_process_that_started_it():
    """A rank killed outright (SIGKILL: no finalizer runs) leaves no helper behind holding the job's pipes."""
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    trainer = ctx.Process(target=_start_and_report, args=(child_end,))
    trainer.start()
    try:
        assert parent_end.poll(30)
        helper = parent_end.recv()
        assert _alive(helper)
    finally:
        trainer.kill()
        trainer.join()
    assert _wait_dead(helper)
