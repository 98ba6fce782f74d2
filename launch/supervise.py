"""Runs a torchrun command in a child process with a deadline: what the tests and benchmarks that start runs call.

torchrun starts each worker in a session of its own (torch.distributed.elastic's subprocess handler), so killing
torchrun alone, as `subprocess.run(..., timeout=...)` does, orphans its workers: they keep their CPU cores or
their GPU memory for as long as they run, and the next test or benchmark case competes with them. Past the
deadline this sends SIGTERM to torchrun, which stops its workers (a training run checkpoints at its step boundary
and exits); only if that has not ended it after `grace` seconds is torchrun's process group killed.
"""

from __future__ import annotations

import os
import signal
import subprocess


def run_torchrun(cmd: list[str], *, timeout: float, grace: float = 90.0, **popen) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen)`, except that past the
    deadline torchrun's workers are stopped too; then raises subprocess.TimeoutExpired with what was read."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            try:  # a worker that outlived torchrun still holds the pipes
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out, err = "", "(no output: torchrun's workers outlived it)"
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
