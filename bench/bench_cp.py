"""Context-parallel training step of a full-width LM slice at 128K-256K+ tokens: time, memory, prediction.

    torchrun is started by this script itself, one process group per case (an OOM kills only its case):
    python bench/bench_cp.py --out $OUT/cp.json                       # 2 GPUs: CP 2, dense / DSA / KSA
    python bench/bench_cp.py --smoke --out /tmp/cp_smoke.json          # CPU: tiny recipes, gloo, 2 processes
    python bench/bench_cp.py --variants dense --seqs 262144 --offload both --out $OUT/offload.json
                                                  # the same cases without and with parallel.offload=activations

For each attention variant (dense, DSA sparse stage, KSA) and sequence length (text tokens; KSA adds one
summary per 8), a fresh `torchrun --nproc_per_node 2` runs the real Trainer (train/trainer.py) on the
Keye-30B-A3B language model cut to `--layers` layers (full width: hidden 2048, 32 / 4 heads, head dim
128, 128 experts top-8, FFN 768), CP 2 and EP 2 over the two GPUs, micro-batch 1, one sequence per
step, with the recompute setting of `--recompute` (default full, as the 256K recipe). It reports:
  * step time: the median of `--steps` steps after `--warmup` warm-up steps (the first step compiles
    Triton kernels and grows the allocator);
  * peak memory per GPU: torch.cuda.max_memory_allocated over the whole run, max over the two ranks
    (the CUDA context and NCCL buffers are outside it, as they are outside the estimate);
  * the estimate of parallel/memory.py for the same config and layout, and the ratio;
  * the largest context that fits: lengths are tried in increasing order (`--seqs`, then doubling
    beyond, up to `--max-seq`) and the search for a variant stops at its first OOM.
`--offload activations|both` runs the cases with `parallel.offload=activations` (parallel/offload.py, hooked in
by the Trainer itself: the same code path as training), or both without and with it; the records then also
carry the bytes offloaded per step, the predicted host memory and the process's peak resident host memory.
Writes everything to --out as JSON and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.cli import SMOKE, require_gpus  # noqa: E402

VARIANTS = {  # name -> (GPU overrides, smoke overrides)
    "dense": (["recipe=keye_tiny_lm", "model=keye_30b_a3b"], ["recipe=keye_tiny_lm"]),
    "dsa": (["recipe=keye_tiny_lm", "model=keye_30b_a3b_dsa", "model.lm.dsa.stage=sparse"],
            ["recipe=keye_tiny_dsa_sparse"]),
    "ksa": (["recipe=keye_tiny_lm", "model=keye_30b_a3b_ksa"], ["recipe=keye_tiny_ksa"]),
}


def _overrides(args, variant: str, seq: int, run_dir: str, offload: str = "none") -> list[str]:
    gpu, smoke = VARIANTS[variant]
    ov = list(smoke if args.smoke else gpu)
    ov += ["parallel=single", "parallel.cp=2", f"parallel.ep={1 if args.smoke else 2}",
           f"parallel.recompute={args.recompute}", f"parallel.cp_comm={args.cp_comm}",
           f"model.lm.num_layers={args.layers}", f"train.seq_length={seq}", "train.global_batch_size=1",
           "train.micro_batch_size=1", f"train.steps={args.warmup + args.steps + 1}", "train.warmup_steps=1",
           "train.checkpoint.enabled=false", "train.wandb.enabled=false", f"run_dir={run_dir}"]
    if offload != "none":
        ov += [f"parallel.offload={offload}", f"parallel.offload_layers={args.offload_layers}"]
    if not args.smoke:
        ov += ["train.precision=bf16", f"model.lm.max_position_embeddings={max(seq * 2, 262144)}"]
    return ov


# ---------------------------------------------------------------------------------------------- worker
def worker(args) -> None:
    """One case inside torchrun: build the Trainer, run warm-up + timed steps, write a JSON record."""
    from train.noise import silence_known_warnings

    silence_known_warnings()
    import torch
    import torch.distributed as dist

    from parallel.groups import teardown
    from parallel.memory import estimate, inputs_from_config
    from train.launch import compose_config, validate

    rec: dict = {"variant": args.variant, "seq": args.seq}
    report_offload = args.offload != "none" or args.report_offload
    if report_offload:
        rec["offload"] = args.offload
    with tempfile.TemporaryDirectory() as run_dir:
        cfg, layout = validate(compose_config(_overrides(args, args.variant, args.seq, run_dir, args.offload)))
        m = inputs_from_config(cfg, layout)
        rec["model_seq"] = m.model_seq
        est = estimate(m)
        rec["predicted_gib"] = est.total / 2 ** 30
        if report_offload:
            rec["predicted_host_gib"] = est.host / 2 ** 30
        from train.trainer import Trainer

        try:
            trainer = Trainer(cfg, layout)
            times = []
            for i in range(args.warmup + args.steps):
                stats = trainer.train_step()
                if i >= args.warmup:
                    times.append(stats.seconds)
            rec["step_s"] = statistics.median(times)
            rec["loss"] = stats.loss
            rec["status"] = "ok"
            if report_offload:
                import resource

                from parallel.offload import total_stats

                off = total_stats(trainer.offloaders)
                rec["offloaded_gib_per_step"] = off.offloaded_bytes / (args.warmup + args.steps) / 2 ** 30
                rec["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB
        except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
            # The other rank would wait in a collective until the NCCL timeout: record and leave at once
            # (torchrun then stops the whole case).
            rec.update(status="oom", error=str(e).splitlines()[0][:300],
                       peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
            Path(f"{args.record}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(rec))
            os._exit(3)
        peak = torch.tensor([torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0], dtype=torch.float64)
        if dist.is_initialized():
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            peak = peak.to(dev)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rec["peak_gib"] = float(peak.item()) / 2 ** 30
        if rec["peak_gib"]:
            rec["measured_over_predicted"] = rec["peak_gib"] / rec["predicted_gib"]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.record).write_text(json.dumps(rec))
    teardown()


# ----------------------------------------------------------------------------------------- orchestrator
def run_case(args, variant: str, seq: int, offload: str = "none") -> dict:
    from launch.supervise import run_torchrun

    record = Path(tempfile.mkdtemp()) / "rec.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--worker",
           "--variant", variant, "--seq", str(seq), "--record", str(record), "--layers", str(args.layers),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--recompute", args.recompute,
           "--cp-comm", args.cp_comm] + (["--smoke"] if args.smoke else [])
    if args.offload != "none":  # the default command line stays as it was
        cmd += ["--offload", offload, "--offload-layers", str(args.offload_layers), "--report-offload"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    try:
        proc = run_torchrun(cmd, cwd=REPO, env=env, timeout=args.timeout)
        oom_records = sorted(record.parent.glob(record.name + ".rank*"))
        if record.exists():
            rec = json.loads(record.read_text())
        elif oom_records:
            rec = json.loads(oom_records[0].read_text())
        else:
            tail = (proc.stdout[-1500:] + proc.stderr[-3000:])
            oom = "OutOfMemoryError" in tail or "CUDA out of memory" in tail
            rec = {"variant": variant, "seq": seq, "status": "oom" if oom else "error", "error": tail[-1200:]}
    except subprocess.TimeoutExpired:
        rec = {"variant": variant, "seq": seq, "status": "timeout"}
    if args.offload != "none":
        rec["offload"] = offload
    rec["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps({k: v for k, v in rec.items() if k != "error"}), flush=True)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_cp.json")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny recipes, gloo, 2 processes")
    p.add_argument("--variants", default="dense,dsa,ksa")
    p.add_argument("--seqs", default="", help="comma-separated text lengths (default 131072,262144; smoke 256,512)")
    p.add_argument("--max-seq", type=int, default=0, help="largest length the fit search tries (default 1M; smoke 512)")
    p.add_argument("--layers", type=int, default=0, help="default 4 (GPU), 2 (smoke)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--recompute", default="full", choices=("none", "selective", "full"))
    p.add_argument("--cp-comm", default="a2a", choices=("a2a", "allgather"))
    p.add_argument("--offload", default="none", choices=("none", "activations", "both"),
                   help="parallel.offload for every case; both: each case without, then with offload")
    p.add_argument("--offload-layers", type=int, default=-1,
                   help="parallel.offload_layers (-1: all but the last layer of each model chunk)")
    p.add_argument("--timeout", type=int, default=1200, help="per case, seconds (a hang counts as a failure)")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--report-offload", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.layers = args.layers or (2 if args.smoke else 4)
    if args.worker:
        if args.offload == "both":
            p.error("--offload both is for the orchestrator; a worker runs one mode")
        worker(args)
        return
    if args.offload_layers < -1:
        p.error(f"--offload-layers must be -1 or >= 0, got {args.offload_layers}")
    if not args.smoke:
        require_gpus(__file__, gpus=2, hint=SMOKE)
    modes = ["none", "activations"] if args.offload == "both" else [args.offload]
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else ([256, 512] if args.smoke else [131072, 262144])
    max_seq = args.max_seq or (512 if args.smoke else 1 << 20)
    results = {"args": vars(args), "cases": [], "largest_fit": {}}
    for variant in args.variants.split(","):
        for mode in modes:
            lengths, s = list(seqs), max(seqs)
            while s * 2 <= max_seq:  # the fit search continues past the requested lengths
                s *= 2
                lengths.append(s)
            largest = 0
            for seq in lengths:
                rec = run_case(args, variant, seq, mode)
                results["cases"].append(rec)
                if rec["status"] != "ok":
                    break
                largest = seq
            key = variant if args.offload == "none" else f"{variant}+offload={mode}"
            results["largest_fit"][key] = {"largest_ok": largest, "first_failure": None if rec["status"] == "ok"
                                           else {"seq": rec["seq"], "status": rec["status"]}}
            Path(args.out).write_text(json.dumps(results, indent=1))
    off = args.offload != "none"
    print(f"\n{'variant':<8}{'seq':>9}{'model seq':>11}" + (f"{'offload':>12}" if off else "")
          + f"{'status':>8}{'step s':>9}{'peak GiB':>10}{'pred GiB':>10}{'ratio':>7}"
          + (f"{'host GiB':>10}{'moved GiB':>11}" if off else ""))
    for r in results["cases"]:
        nan = float("nan")
        print(f"{r['variant']:<8}{r['seq']:>9}{r.get('model_seq', 0):>11}" + (f"{r.get('offload', ''):>12}" if off else "")
              + f"{r['status']:>8}{r.get('step_s', nan):>9.2f}"
              f"{r.get('peak_gib', nan):>10.2f}{r.get('predicted_gib', nan):>10.2f}"
              f"{r.get('measured_over_predicted', nan):>7.2f}"
              + (f"{r.get('host_peak_rss_gib', nan):>10.2f}{r.get('offloaded_gib_per_step', nan):>11.2f}" if off else ""))
    print("largest fit:", json.dumps(results["largest_fit"]))


if __name__ == "__main__":
    main()
