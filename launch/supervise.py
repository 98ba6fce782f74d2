"""Runs a torchrun command in a child process with a deadline: what the tests and benchmarks that start runs call;
and `free_port`, a port for their rendezvous.

torchrun starts each worker in a session of its own (torch.distributed.elastic's subprocess handler), so killing
torchrun alone, as `subprocess.run(..., timeout=...)` does, orphans its workers: they keep their CPU cores or
their GPU memory for as long as they run, and the next test or benchmark case competes with them. Past the
deadline this sends SIGTERM to torchrun, which stops its workers (a training run checkpoints at its step boundary
and exits); only if that has not ended it after `grace` seconds are torchrun's process group and every process
below it killed (the workers among them: killing torchrun's group alone left a worker that ignores SIGTERM running,
in its session of its own). The same happens when the caller is interrupted (Ctrl-C): torchrun, in a session of its
own, does not get the terminal's SIGINT; a second Ctrl-C while it stops kills them at once.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path


def run_torchrun(cmd: list[str], *, timeout: float, grace: float = 90.0, **popen) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen)`, except that past the
    deadline torchrun's workers are stopped too; then raises subprocess.TimeoutExpired with what was read."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)
    below: set[tuple[int, int]] = set()   # the processes below torchrun, gathered as it is stopped
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc, grace, below)
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except BaseException:
        # Ctrl-C (KeyboardInterrupt) or another error in the caller: torchrun runs in a session of its own, so the
        # terminal's SIGINT never reached it, and it and its workers would run on after the caller is gone
        try:
            _stop(proc, grace, below)
        except BaseException:  # a second Ctrl-C while it stops: no more waiting
            _kill(proc, below)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop(proc: subprocess.Popen, grace: float, below: set[tuple[int, int]]) -> tuple[str, str]:
    """SIGTERM to torchrun, which stops its workers; torchrun's process group and the processes below it killed if it
    has not ended `grace` s later. `below` gathers those processes (the caller's to kill on a second Ctrl-C). Returns
    what was read of its output."""
    below |= _descendants(proc.pid)   # now: once torchrun has ended, its workers are no longer below it
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill(proc, below)
        try:  # a worker that outlived torchrun still holds the pipes
            return proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            return "", "(no output: torchrun's workers outlived it)"


def _kill(proc: subprocess.Popen, below: set[tuple[int, int]]) -> None:
    """SIGKILL to torchrun's process group and to every process below torchrun, those of `below` (gathered earlier)
    and those below it now: torchrun starts each worker in a session (and process group) of its own, which the
    group's kill does not reach."""
    below |= _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid, started in below:
        if _start_time(pid) == started:   # still that process, not another that took its pid since
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live process below `pid` (its children, theirs, ...), from /proc's children lists;
    empty where there is no /proc."""
    found: set[tuple[int, int]] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:   # ended meanwhile, or no /proc
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                started = _start_time(child)
                if started is not None and (child, started) not in found:
                    found.add((child, started))
                    todo.append(child)
    return found


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22), or None if it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])   # the command name, in parentheses, may hold spaces


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a rendezvous that binds it a few seconds later (a test's spawned gloo
    world, a torchrun agent's c10d store, a benchmark configuration's one-process group). Drawn below the kernel's
    ephemeral range: a port from bind(0) lies inside it, and any outgoing connection of another process (a gloo mesh,
    a store client, the suite's other worker) may take it as its local port before the rendezvous binds it; a
    torchrun agent that then cannot host its store connects to the port as a client, finds no store and exits, a
    one-process group fails with EADDRINUSE."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    draw = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(64):
        port = draw.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
