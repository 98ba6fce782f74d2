"""Runs launch/pretrain.py under torchrun in a subprocess and reads what the run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Runs in tests are short: no wandb, short warmup, and no checkpoints unless a test asks for them.
QUIET = ["train.wandb.enabled=false", "train.warmup_steps=1", "train.log_interval=1"]


def run_pretrain(nproc: int, overrides: list[str], run_dir: Path, *, timeout: int = 600,
                 check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "launch" / "pretrain.py"), *QUIET, *overrides, f"run_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record wins when a resumed run logged a step again)."""
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def run_layouts(nproc: int, layouts: dict[str, list[str]], tmp: Path, *, timeout: int = 900,
                digests: bool = False) -> dict[str, dict[int, float]]:
    """Trains each named layout (a list of overrides) in one torchrun job; returns name -> {step: loss}
    (and, with digests=True, also name -> {parameter: [sum, abs sum]} of rank 0 after training).
    `{root}` in an override is replaced by the job's run root (to point one entry at another's run)."""
    out = tmp / "layouts.json"
    spec = ";".join(f"{name}={' '.join(QUIET + ov)}" for name, ov in layouts.items())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "dist" / "layouts_driver.py"), str(out), str(tmp / "runs"), spec]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"layouts run failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    data = json.loads(out.read_text())
    losses = {name: {int(k): v for k, v in steps.items()} for name, steps in data["losses"].items()}
    return (losses, data["digests"]) if digests else losses


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a one-process or spawned gloo rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_one_process_megatron(seed: int):
    """A one-process gloo world with megatron's model-parallel groups of size 1 and its RNG tracker
    seeded; returns the ProcessGroupCollection the model builders take. Undo with
    `destroy_one_process_megatron()`."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from parallel.groups import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    init_distributed()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_one_process_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
