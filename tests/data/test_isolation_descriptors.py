"""The guarded decode child's protocol works from a process that holds many descriptors (data/video/isolation.py).

select() refuses a descriptor numbered 1,024 or more ("filedescriptor out of range in select()"), so a loader in a
process that held many files, sockets or process groups failed its first guarded call; the parity tests' layouts
job met it after some 15 layouts (their leaked process groups: tests/unit/test_process_groups.py). The reads poll.
"""

import os
import resource
import time

import pytest

from data.video.isolation import GuardedWorker, WorkerFailure, _read_msg, _write_msg

HIGH = 1500


@pytest.fixture
def high_descriptors():
    """Lets this process number descriptors past 1,024 (its soft limit raised within the hard one) and fills the
    numbers below HIGH, so new descriptors land above it; skips where the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < HIGH + 64:
        pytest.skip(f"the hard descriptor limit ({hard}) is below {HIGH + 64}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH + 64), hard))
    null = os.open(os.devnull, os.O_RDONLY)
    held = [os.dup(null) for _ in range(HIGH - null)]
    try:
        yield
    finally:
        for fd in held + [null]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_message_is_read_from_a_descriptor_past_1024(high_descriptors):
    r, w = os.pipe()
    try:
        assert r >= 1024
        _write_msg(w, ("ok", [1, 2]))
        assert _read_msg(r, time.monotonic() + 5) == ("ok", [1, 2])
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):  # nothing written: the deadline, not an error of the wait
            _read_msg(r, time.monotonic() + 0.2)
        assert time.monotonic() - t0 >= 0.2
        os.close(w)
        w = None
        assert _read_msg(r, time.monotonic() + 5) is None  # the writer gone: EOF, as a crashed child
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_a_guarded_call_and_its_timeout_past_1024(high_descriptors):
    worker = GuardedWorker(name="fds")
    try:
        assert worker.call("ping", timeout_s=60) == worker.proc.pid
        assert worker.proc.stdout.fileno() >= 1024
        with pytest.raises(WorkerFailure) as e:
            worker.call("_hang", timeout_s=1.0, seconds=60)
        assert e.value.reason == "timeout" and worker.proc is None
    finally:
        worker.close()


def test_a_deadline_past_one_poll_is_waited_in_several(monkeypatch):
    """A sample_timeout_s over 2^31 ms (~24.8 days; 1e7 s, say) was passed to one poll(), which refused it
    (OverflowError: timeout is too large) at every guarded call, so the first sample broke the DataLoader worker.
    The wait is now polls of at most _POLL_MAX_MS, to the deadline: the call answers, and a hang still ends at its
    deadline (shown with polls made short here, so that the deadline spans several)."""
    import data.video.isolation as iso

    worker = GuardedWorker(name="long")
    try:
        assert worker.call("ping", timeout_s=1e7) == worker.proc.pid
        monkeypatch.setattr(iso, "_POLL_MAX_MS", 50)
        t0 = time.monotonic()
        with pytest.raises(WorkerFailure) as e:
            worker.call("_hang", timeout_s=0.5, seconds=60)
        took = time.monotonic() - t0
        assert e.value.reason == "timeout" and worker.proc is None
        assert 0.5 <= took < 10, took    # at the deadline: not at the first short poll, nor the hang's 60 s
    finally:
        worker.close()
