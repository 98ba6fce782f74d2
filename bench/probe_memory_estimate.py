"""The memory estimate (parallel/memory.py, `python launch/memory.py`) against what a GPU run holds: for a few slices of
`keye_30b_a3b_lm` (the 30B-A3B language model's full width, fewer layers, 16 experts, one GPU), the estimate's rows and
total beside the measured peaks of three training steps (torch.cuda.max_memory_allocated and max_memory_reserved), with
the optimizer step measured apart (the memory allocated when it starts, its peak, and the difference: its temporaries).

    torchrun --standalone --nproc_per_node 1 bench/probe_memory_estimate.py --out $OUT/memory_estimate.json
    ... --only l8_64k_full,l8_64k_full_offload --timeout 150 --budget 280      # some of them; limits in seconds
    python bench/probe_memory_estimate.py --list                                  # the configurations (any machine)
    python bench/probe_memory_estimate.py --estimate-only --out est.json          # the estimates alone (any machine)

Each configuration runs in a subprocess of its own (a fresh one-process group, its own CUDA context), so one that runs
out of memory or hangs is recorded (status "oom", "error" or "timeout", with its output's tail) and the rest still
run; one whose start would pass the --budget (seconds since the probe began) is recorded as "skipped". The JSON is
rewritten after every configuration. Per configuration: `estimate` (GiB per row, `total`, `host`, and
`optimizer_step` = the estimate's temporaries of the optimizer step, `optimizer_step_phase` = what the estimate holds
then), and `steps`: per step `peak_allocated_gib`, `peak_reserved_gib`, `forward_backward_peak_gib`,
`before_optimizer_gib`, `optimizer_peak_gib`, `optimizer_temporaries_gib`, `allocated_after_gib`, the loss; with
offload its counters (`copy_waits`: times a layer's forward waited for older copies to the host).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.supervise import free_port  # noqa: E402 (the repository on the path first)

GIB = 2 ** 30
STEPS = 3
# name: (LM layers, text tokens per sequence, parallel.recompute, parallel.offload)
CONFIGS = {
    "l4_16k_none": (4, 16384, "none", "none"),
    "l4_16k_selective": (4, 16384, "selective", "none"),
    "l4_32k_selective_offload": (4, 32768, "selective", "activations"),
    "l8_64k_full": (8, 65536, "full", "none"),
    "l8_64k_full_offload": (8, 65536, "full", "activations"),
    "l8_1k_none": (8, 1024, "none", "none"),   # short: the optimizer step makes the peak
}
BASE = ["recipe=keye_30b_a3b_lm", "parallel=single", "model.lm.num_experts=16", "train.micro_batch_size=1",
        "train.global_batch_size=1", f"train.steps={STEPS}", "train.warmup_steps=1", "train.checkpoint.enabled=false",
        "train.wandb.enabled=false", "train.memory_check=warn"]


def overrides(name: str, run_dir: str) -> list[str]:
    """The Hydra overrides of configuration `name` (ValueError naming the known ones if there is none such)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    layers, seq, recompute, offload = CONFIGS[name]
    return BASE + [f"model.lm.num_layers={layers}", f"train.seq_length={seq}", f"parallel.recompute={recompute}",
                   f"parallel.offload={offload}", f"run_dir={run_dir}"]


def estimate_record(ovr: list[str]) -> dict:
    """The estimate of the configuration on one rank, in GiB: its rows, total, host memory, and the optimizer step's
    phase (what is allocated then, and its temporaries)."""
    from parallel.memory import estimate, inputs_from_config, optimizer_step_bytes, step_phase_bytes
    from train.launch import compose_config, validate

    cfg, layout = validate(compose_config(ovr), world_size=1)
    m = inputs_from_config(cfg, layout)
    est = estimate(m)
    return {"rows": {k: v / GIB for k, v in est.rows.items()}, "total": est.total / GIB, "host": est.host / GIB,
            "optimizer_step": optimizer_step_bytes(m, rank=est.stage) / GIB,
            "optimizer_step_phase": step_phase_bytes(m, rank=est.stage) / GIB}


def measure(name: str, out: str) -> None:
    """One configuration, in this process (a subprocess of run_all): STEPS training steps, peaks per step."""
    import torch

    from parallel.groups import teardown
    from parallel.offload import total_stats
    from train.launch import compose_config, validate
    from train.noise import silence_known_warnings
    from train.trainer import Trainer

    silence_known_warnings()
    run_dir = tempfile.mkdtemp(prefix=f"probe_mem_{name}_")
    ovr = overrides(name, run_dir)
    rec = {"name": name, "overrides": ovr, "estimate": estimate_record(ovr), "steps": []}
    cfg, layout = validate(compose_config(ovr))
    tr = Trainer(cfg, layout)
    inner = tr.optimizer.step
    phase = {}

    def step(*args, **kwargs):  # the optimizer step apart: what is allocated when it starts, and its own peak
        torch.cuda.synchronize()
        phase["forward_backward_peak"] = torch.cuda.max_memory_allocated()
        phase["reserved_before"] = torch.cuda.max_memory_reserved()
        phase["before"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = inner(*args, **kwargs)
        torch.cuda.synchronize()
        phase["peak"] = torch.cuda.max_memory_allocated()
        return result

    tr.optimizer.step = step
    for _ in range(STEPS):
        phase.clear()
        torch.cuda.reset_peak_memory_stats()
        s = tr.train_step()
        torch.cuda.synchronize()
        fb, opt = phase.get("forward_backward_peak", 0), phase.get("peak", 0)
        rec["steps"].append({
            "loss": s.loss, "seconds": s.seconds,
            "peak_allocated_gib": max(fb, opt, torch.cuda.max_memory_allocated()) / GIB,
            "peak_reserved_gib": max(phase.get("reserved_before", 0), torch.cuda.max_memory_reserved()) / GIB,
            "forward_backward_peak_gib": fb / GIB, "before_optimizer_gib": phase.get("before", 0) / GIB,
            "optimizer_peak_gib": opt / GIB, "optimizer_temporaries_gib": (opt - phase.get("before", 0)) / GIB,
            "allocated_after_gib": torch.cuda.memory_allocated() / GIB})
    offloaders = getattr(tr, "offloaders", None)
    if offloaders:
        st = total_stats(offloaders)
        rec["offload"] = {"offloaded_gib": st.offloaded_bytes / GIB, "copy_waits": st.copy_waits,
                          "fetched": st.fetched, "prefetched": st.prefetched}
    rec["device"] = torch.cuda.get_device_name()
    Path(out).write_text(json.dumps(rec, indent=1))
    tr.close()
    teardown()


def child_env() -> dict:
    """The environment of a configuration's process: a one-process group of its own (not torchrun's store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "GROUP_", "ROLE_"))}
    env.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               WANDB_MODE="disabled")
    return env


def run_one(cmd: list[str], result: Path, *, timeout: float) -> dict:
    """Runs one configuration's command; its record (from `result`, the JSON it writes) with a status: "ok", "oom",
    "error" or "timeout" (the last three with the output's tail)."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        return {"status": "timeout", "seconds": round(time.time() - t0, 1),
                "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    rec = {"seconds": round(time.time() - t0, 1)}
    if p.returncode == 0 and result.exists():
        return {**json.loads(result.read_text()), **rec, "status": "ok"}
    out = p.stdout[-1500:] + p.stderr[-3000:]
    oom = "OutOfMemoryError" in out or "CUDA out of memory" in out
    return {**rec, "status": "oom" if oom else "error", "returncode": p.returncode, "tail": out}


def run_all(names: list[str], out: Path, *, timeout: float, budget: float, min_left: float = 30,
            cmd=None) -> list[dict]:
    """Each configuration in its own process, one after the other, for at most `timeout` seconds each, none started
    with less than `min_left` of the `budget` left; `out` rewritten after each. cmd(name, result path) -> the
    command (default: this script with --one)."""
    cmd = cmd or (lambda name, result: [sys.executable, str(Path(__file__).resolve()), "--one", name,
                                        "--out", str(result)])
    start, records = time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if budget - (time.time() - start) < min_left:
                rec = {"status": "skipped", "reason": f"the probe's budget of {budget:.0f} s"}
            else:
                left = budget - (time.time() - start)
                rec = run_one(cmd(name, Path(tmp) / f"{name}.json"), Path(tmp) / f"{name}.json",
                              timeout=min(timeout, left))
            records.append({"name": name, **rec})
            out.write_text(json.dumps({"configs": records}, indent=1))
            print(_line(records[-1]), flush=True)
    return records


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['name']}: {r['status']}"
    last = r["steps"][-1]
    est = r["estimate"]
    return (f"{r['name']}: estimate {est['total']:.2f} GiB, measured peak {last['peak_allocated_gib']:.2f} allocated "
            f"({last['peak_reserved_gib']:.2f} reserved); optimizer step: {last['optimizer_temporaries_gib']:.2f} "
            f"GiB temporaries (estimate {est['optimizer_step']:.2f}); {r['seconds']} s")


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="the JSON to write")
    ap.add_argument("--only", help="comma-separated configuration names (default: all)")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per configuration")
    ap.add_argument("--budget", type=float, default=285, help="seconds for the whole probe")
    ap.add_argument("--list", action="store_true", help="print the configurations and stop")
    ap.add_argument("--estimate-only", action="store_true", help="the estimates alone, no GPU needed")
    ap.add_argument("--one", help=argparse.SUPPRESS)   # a subprocess of run_all: one configuration
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    if a.list:
        for n in names:
            print(n, " ".join(overrides(n, "RUN_DIR")))
        return
    if not a.out:
        ap.error("--out is required")
    from train.noise import silence_known_warnings

    silence_known_warnings()
    if a.one:
        measure(a.one, a.out)
        return
    if a.estimate_only:
        with tempfile.TemporaryDirectory() as tmp:
            recs = [{"name": n, "estimate": estimate_record(overrides(n, f"{tmp}/{n}"))} for n in names]
        Path(a.out).write_text(json.dumps({"configs": recs}, indent=1))
        for r in recs:
            print(f"{r['name']}: estimate {r['estimate']['total']:.2f} GiB")
        return
    from bench.cli import require_gpus

    require_gpus(__file__, hint="--estimate-only gives the estimates here")
    if int(os.environ.get("RANK", "0")) != 0:   # started with more than one process: rank 0 runs them all
        return
    run_all(names, Path(a.out), timeout=a.timeout, budget=a.budget)


if __name__ == "__main__":
    main(sys.argv[1:])
