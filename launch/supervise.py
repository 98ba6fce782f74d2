"""Runs a torchrun command in a child process with a deadline: what the tests and benchmarks that start runs call;
and `free_port`, a port for their rendezvous.

torchrun starts each worker in a session of its own (torch.distributed.elastic's subprocess handler), so killing
torchrun alone, as `subprocess.run(..., timeout=...)` does, orphans its workers: they keep their CPU cores or
their GPU memory for as long as they run, and the next test or benchmark case competes with them. Past the
deadline this sends SIGTERM to torchrun, which stops its workers (a training run checkpoints at its step boundary
and exits); only if that has not ended it after `grace` seconds is torchrun's process group killed. The same happens
when the caller is interrupted (Ctrl-C): torchrun, in a session of its own, does not get the terminal's SIGINT.
"""

from __future__ import annotations

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
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc, grace)
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except BaseException:
        # Ctrl-C (KeyboardInterrupt) or another error in the caller: torchrun runs in a session of its own, so the
        # terminal's SIGINT never reached it, and it and its workers would run on after the caller is gone
        try:
            _stop(proc, grace)
        except BaseException:  # a second Ctrl-C while it stops: no more waiting
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop(proc: subprocess.Popen, grace: float) -> tuple[str, str]:
    """SIGTERM to torchrun, which stops its workers; its process group killed if it has not ended `grace` s later.
    Returns what was read of its output."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:  # a worker that outlived torchrun still holds the pipes
            return proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            return "", "(no output: torchrun's workers outlived it)"


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
