"""Runs launch/pretrain.py under torchrun in a subprocess and reads what the run wrote."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launch.supervise import free_port, run_torchrun  # noqa: F401 (free_port: the tests' import)
from train.metrics import read_record

REPO = Path(__file__).resolve().parent.parent
# Runs in tests are short: no wandb, short warmup, and no checkpoints unless a test asks for them.
QUIET = ["train.wandb.enabled=false", "train.warmup_steps=1", "train.log_interval=1"]


def run_pretrain(nproc: int, overrides: list[str], run_dir: Path, *, timeout: int = 600,
                 check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "launch" / "pretrain.py"), *QUIET, *overrides, f"run_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("TRITON_INTERPRET", None)
    proc = run_torchrun(cmd, cwd=REPO, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run sets aside the records of the steps it trains again; were one
    left, the last record would win)."""
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = read_record(line)   # a skipped step's loss: NaN again
        out[rec["step"]] = rec["loss"]
    return out


def run_layouts(nproc: int, layouts: dict[str, list[str]], tmp: Path, *, timeout: int = 900,
                digests: bool = False, evals: bool = False) -> dict[str, dict[int, float]]:
    """Trains each named layout (a list of overrides) in one job of `nproc` ranks forked from the warm
    process of `run_ranks`; returns name -> {step: loss} (and, with digests=True, also name ->
    {parameter: [sum, abs sum]} of rank 0 after training; with evals=True instead name -> train.eval's
    results, [{"step", "val_loss", ...}]). `{root}` in an override is replaced by the
    job's run root (to point one entry at another's run). The same job runs under torchrun with
    `torchrun --standalone --nproc_per_node N tests/dist/layouts_driver.py OUT RUN_ROOT SPEC`."""
    data = run_layouts_all(nproc, layouts, tmp, timeout=timeout)
    if evals:
        return data["losses"], data["evals"]
    return (data["losses"], data["digests"]) if digests else data["losses"]


def run_layouts_all(nproc: int, layouts: dict[str, list[str]], tmp: Path, *, timeout: int = 900) -> dict:
    """As run_layouts; returns everything the job recorded: "losses" (name -> {step: loss}), "extras" (name ->
    {step: the step's further metrics}), "grad_norms" (likewise), "digests", "evals" and "held" (name -> what rank
    0's trainer held for training: gradient buffer elements, the parameters its optimizers update)."""
    out = tmp / "layouts.json"
    spec = ";".join(f"{name}={' '.join(QUIET + ov)}" for name, ov in layouts.items())
    run_ranks(nproc, "tests.dist.layouts_driver:run", (str(out), str(tmp / "runs"), spec), tmp / "logs",
              timeout=timeout)
    data = json.loads(out.read_text())
    data["losses"] = {name: {int(k): v for k, v in steps.items()} for name, steps in data["losses"].items()}
    data["extras"] = {name: {int(k): v for k, v in steps.items()} for name, steps in data["extras"].items()}
    data["grad_norms"] = {name: {int(k): v for k, v in steps.items()} for name, steps in data["grad_norms"].items()}
    return data


# ------------------------------------------------------------------------------------ forked rank jobs
# Starting a rank under torchrun costs ~11 CPU-seconds of imports (torch, megatron-core with the torch.compile
# machinery its decorators pull in, hydra), more than the few training steps a parity test runs. `run_ranks`
# forks the ranks instead from one warm process (multiprocessing's fork server) that imported those modules
# once per test session. Each rank gets the environment torchrun would give it (RANK, LOCAL_RANK,
# WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR / MASTER_PORT, GROUP_RANK) and runs the named function
# (run_launch: a whole launch, train.launch.run; run_script: an entry point's script as a process of its own).
# The tests of what torchrun carries (signals through the SLURM node script, a killed rank, SIGINT to one rank,
# the README's command) keep running torchrun (run_pretrain).
_PRELOAD = ["torch", "torch.distributed", "megatron.core", "hydra", "train.config", "train.launch",
            "train.trainer", "tests.gc_frozen"]
# what the fork server (and so every forked rank) starts with: one intra-op thread (as run_pretrain's
# OMP_NUM_THREADS=1), no wandb, and compiled (not interpreted) Triton, which is decided when a kernel module
# is imported
_SERVER_ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TRITON_INTERPRET": None}


def _fork_context():
    import multiprocessing as mp
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    if not getattr(_fork_context, "started", False):
        ctx.set_forkserver_preload(_PRELOAD)
        saved = _set_env(_SERVER_ENV)
        try:
            forkserver.ensure_running()
        finally:
            _set_env(saved)
        _fork_context.started = True
    return ctx


def _set_env(values: dict) -> dict:
    """Sets os.environ[k] = v for each item (None: unset); returns the previous values, same form."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old


def _rank_main(rank: int, world: int, port: int, target: str, args: tuple, log: str) -> None:
    import importlib

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.chdir(REPO)
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(*args)
    sys.stdout.flush()
    sys.stderr.flush()


def run_ranks(nproc: int, target: str, args: tuple, log_dir: Path, *, timeout: int = 900) -> None:
    """Runs `module:function(*args)` on `nproc` ranks forked from the warm fork server (a gloo world on
    127.0.0.1). Like torchrun, the first rank to fail stops the others; raises AssertionError with the
    failing ranks' log tails (logs in log_dir/rank<N>.log), or on timeout."""
    failed, _, logs = _fork_ranks(nproc, target, args, log_dir, timeout=timeout, grace=0)
    if failed:
        tails = "\n".join(f"--- rank {r} ({logs[r]}):\n{Path(logs[r]).read_text()[-6000:]}"
                          for r in range(nproc) if Path(logs[r]).exists())
        raise AssertionError(f"{target} on {nproc} ranks: {failed}\n{tails}")


def _fork_ranks(nproc: int, target: str, args: tuple, log_dir: Path, *, timeout: int,
                grace: float) -> tuple[str | None, list[int | None], list[str]]:
    """run_ranks' work: returns (what failed or None, each rank's exit code, each rank's output file). After the
    first failure the others get `grace` seconds to end on their own (the errors every rank meets alike, each rank
    exiting with its own message), then are killed."""
    from multiprocessing.connection import wait

    ctx = _fork_context()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    logs = [str(log_dir / f"rank{r}.log") for r in range(nproc)]
    procs = [ctx.Process(target=_rank_main, args=(r, nproc, port, target, args, logs[r])) for r in range(nproc)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed = None
    try:
        pending = list(procs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                failed = failed or f"timed out after {timeout} s"
                break
            ready = wait([p.sentinel for p in pending], timeout=left)
            done = sorted((p for p in pending if p.sentinel in ready), key=procs.index)
            for p in done:
                p.join()
                pending.remove(p)
            # every rank found failed at once is named: which of them failed first cannot be told (a rank whose
            # peer died leaves its collective with an error of its own a moment later)
            bad = [f"rank {procs.index(p)} exited with {p.exitcode}" for p in done if p.exitcode != 0]
            if bad and failed is None:
                failed = "; ".join(bad)
                deadline = min(deadline, time.monotonic() + grace)
            if failed and not grace:
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    return failed, [p.exitcode for p in procs], logs


def _launch_main(overrides: list[str], env: dict) -> None:
    """What launch/pretrain.py does on a rank, on the forked rank: the config composed from the command line's
    overrides (Hydra's compose, as the entry point's) and train.launch.run, whose sys.exit(N) is the rank's exit
    code."""
    os.environ.update(env)
    from train.launch import compose_config, run

    run(compose_config(overrides))


def run_launch(nproc: int, overrides: list[str], run_dir: Path, *, timeout: int = 600, check: bool = True,
               env: dict | None = None, output_dir: Path | None = None) -> subprocess.CompletedProcess:
    """As run_pretrain, with the ranks forked from the warm fork server instead of started by torchrun: a launch
    costs its training, not ~20 CPU-seconds of imports. For tests of what the trainer does and says (a stop's
    message and exit code, the run directory it leaves, the rerun); how torchrun carries signals and failures is
    run_pretrain's (tests/dist/test_faults.py). Returns returncode (0, or the exit code of the lowest rank that failed),
    stdout '' and stderr (each rank's output, rank 0's first; the ranks' files in output_dir, by default
    `<run_dir>.ranks` beside the run directory)."""
    target_env = {"WANDB_MODE": "disabled", **(env or {})}
    log_dir = Path(output_dir or f"{run_dir}.ranks")
    failed, codes, logs = _fork_ranks(nproc, "tests.launch_util:_launch_main",
                                      ([*QUIET, *overrides, f"run_dir={run_dir}"], target_env), log_dir,
                                      timeout=timeout, grace=30)
    code = next((c for c in codes if c), 0)   # a rank killed at the timeout: -9
    err = "".join(Path(f).read_text() if Path(f).exists() else "" for f in logs)
    proc = subprocess.CompletedProcess(["run_launch", str(nproc), *overrides], code, "", err)
    if check and code != 0:
        raise AssertionError(f"run failed ({code}; {failed}): {overrides}\n{err[-8000:]}")
    return proc


def _script_main(script: str, argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """`python script *argv` in the forked process: its environment exactly `env`, its working directory `cwd`, its
    stdout and stderr the files `out` and `err`, the script's folder first on sys.path; the script runs as __main__,
    its sys.exit(N) (or an uncaught exception: 1, its traceback on stderr) is the process's exit code, and the exit
    functions it registered (atexit) run, as at an interpreter's exit."""
    import atexit
    import runpy

    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()


def run_script(script: Path, argv: list[str], *, env: dict | None = None, cwd: Path | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """As `subprocess.run([sys.executable, script, *argv], env=env, cwd=cwd, capture_output=True, text=True)`, with the
    process forked from the warm fork server instead of started: a launcher check that ends before training costs
    its check, not ~5 CPU-seconds of imports (torch, megatron-core, hydra). For the entry points' own exits (a config
    error's message and code before anything is built); not where the interpreter's start is what a test is about
    (a module hidden by a sitecustomize, which only a fresh interpreter reads). Returns returncode, stdout, stderr."""
    import tempfile

    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="run_script_") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        p = _fork_context().Process(target=_script_main, args=(str(script), [str(a) for a in argv], env,
                                                               str(cwd or os.getcwd()), out, err))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired([str(script), *argv], timeout)
        return subprocess.CompletedProcess([str(script), *argv], p.exitcode, Path(out).read_text(),
                                           Path(err).read_text())


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


def tiny_lm_pair(seed: int, num_layers: int):
    """Generator for a module fixture: in a one-process megatron world, the tiny MoE LM (fp32, CPU) built twice
    with identical weights, without and with full recompute; yields (LMConfig, {"none": model, "full": model}).
    Clears megatron's process-wide MoE aux-loss tracker around it: the tracker keeps one slot per layer of the
    first model that logged into it, and another test's model in this process may have had fewer layers."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from models.config import LMConfig, ModelParallelSizes
    from models.lm import build_lm, transformer_config

    pgs = init_one_process_megatron(seed)
    get_moe_layer_wise_logging_tracker().clear()
    lm = LMConfig(num_layers=num_layers, loss_chunk_tokens=0)
    models = {}
    for recompute in ("none", "full"):
        cfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True,
                                 recompute=None if recompute == "none" else recompute)
        models[recompute] = build_lm(lm, cfg, pg_collection=pgs, pp_rank=0, pp_size=1).train()
    models["full"].load_state_dict(models["none"].state_dict())
    try:
        yield lm, models
    finally:
        get_moe_layer_wise_logging_tracker().clear()
        destroy_one_process_megatron()


def destroy_one_process_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@contextlib.contextmanager
def one_rank_world():
    """The environment of a one-rank gloo world (a free port) that a Trainer built in this process makes its process
    groups in; afterwards megatron's model-parallel state, the process group, megatron's process-wide MoE aux-loss
    tracker (one slot per layer of the first model that logged into it) and the environment are as before."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    old = _set_env(env)
    try:
        yield
    finally:
        get_moe_layer_wise_logging_tracker().clear()
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        _set_env(old)
