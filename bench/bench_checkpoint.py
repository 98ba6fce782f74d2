"""Checkpoint cost of a Keye-30B-A3B layout slice: how long training is blocked by an asynchronous save
against a synchronous one (same process, same model, same disk), and Hugging Face import / export speed.

Model: the keye_30b_a3b recipe's language model at full width (hidden 2048, 32 q / 4 kv heads, 128 experts
top-8, FFN 768, vocab 151,936) cut to `--layers` layers; bf16 weights, fp32 master weights and AdamW moments
(megatron's distributed optimizer), one GPU. A checkpoint holds the model and the optimizer state.

Cases, in this order, in one process:
  sync   ckpt.save_checkpoint(..., async_queue=None): shards written, checksummed and committed before it
         returns; the training loop is blocked for all of it.
  async  ckpt.save_checkpoint(..., async_queue=q): returns once the shards are staged in host memory; a
         forked writer writes them while training steps run; the trainer's per-step
         `maybe_finalize_async_calls(blocking=False)` commits (checksums + COMPLETE.json + rename) once
         the writer is done. Blocked time = the save call + every finalize call; also reported: step time
         while the write is in flight against steps without one, and the time until the commit.
  import models.hf.load_hf_into from a Qwen3-MoE safetensors checkpoint of the same slice (full-size tensor
         shapes, bf16, written by this script with random values), per GB; the page cache is warm (the
         files were just written), so this measures the converter, not the disk.
  export models.hf.export_hf of the sync checkpoint back to HF safetensors, per GB.

    python bench/bench_checkpoint.py --out $OUT/ckpt.json            # GPU
    python bench/bench_checkpoint.py --smoke --out /tmp/ckpt.json    # CPU: tiny recipe, checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.cli import SMOKE, require_gpus  # noqa: E402

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

import torch  # noqa: E402

from train.launch import compose_config, validate  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _steps(tr, n: int) -> list[float]:
    out = []
    for _ in range(n):
        _sync()
        out.append(tr.train_step().seconds)
    return out


def _profiled(args, name: str, fn):
    """fn(), under cProfile when --profile: the top of the cumulative profile goes to <out>.<name>.prof.txt."""
    if not args.profile:
        return fn()
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    out = prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
    Path(f"{args.out}.{name}.prof.txt").write_text(buf.getvalue())
    return out


def bench_saves(tr, args, res: dict) -> Path:
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from train import checkpoint as ckpt

    common = tr._common_state()
    base = _steps(tr, args.steps)
    res["step_s_no_save"] = statistics.median(base)

    # --- synchronous
    _sync()
    t0 = time.perf_counter()
    path = _profiled(args, "sync", lambda: ckpt.save_checkpoint(
        tr.run_dir, tr.step, tr.model, tr.optimizer, common, keep_last=1, dp_cp_group=tr.pgs.dp_cp))
    sync_s = time.perf_counter() - t0
    nbytes = _dir_bytes(path)
    res["sync"] = {"blocked_s": sync_s, "bytes": nbytes, "GB_per_s": nbytes / 1e9 / sync_s}
    print(f"sync save: {sync_s:.2f} s blocked, {nbytes / 1e9:.2f} GB", flush=True)
    keep = path.with_name(path.name + ".sync_copy")
    if keep.exists():
        shutil.rmtree(keep)
    os.replace(path, keep)  # kept for the export case; out of the way of pruning

    # --- asynchronous: one save, training continues until the commit
    q = AsyncCallsQueue()
    _steps(tr, 1)
    _sync()
    t0 = time.perf_counter()
    apath = _profiled(args, "async_call", lambda: ckpt.save_checkpoint(
        tr.run_dir, tr.step, tr.model, tr.optimizer, common, keep_last=1, dp_cp_group=tr.pgs.dp_cp, async_queue=q))
    call_s = time.perf_counter() - t0
    finalize_calls, in_flight_steps, n = [], [], 0
    while True:
        in_flight_steps.append(_steps(tr, 1)[0])
        f0 = time.perf_counter()
        q.maybe_finalize_async_calls(blocking=False)
        finalize_calls.append(time.perf_counter() - f0)
        n += 1
        if q.get_num_unfinalized_calls() == 0 or n >= args.max_async_steps:
            break
    if q.get_num_unfinalized_calls():
        f0 = time.perf_counter()
        q.maybe_finalize_async_calls(blocking=True)
        finalize_calls.append(time.perf_counter() - f0)
    commit_s = time.perf_counter() - t0
    assert (apath / ckpt.COMPLETE).is_file(), f"async checkpoint {apath} was not committed"
    blocked = call_s + sum(finalize_calls)
    res["async"] = {"save_call_s": call_s, "finalize_s": sum(finalize_calls), "blocked_s": blocked,
                    "steps_during_write": n, "step_s_during_write": statistics.median(in_flight_steps),
                    "save_to_commit_s": commit_s, "bytes": _dir_bytes(apath)}
    res["async_over_sync_blocked"] = blocked / sync_s
    print(f"async save: {blocked:.2f} s blocked (call {call_s:.2f} + finalize {sum(finalize_calls):.2f}), "
          f"committed after {commit_s:.2f} s and {n} steps", flush=True)
    q.close()
    shutil.rmtree(apath)
    return keep


def write_hf_slice(lm, out_dir: Path) -> int:
    """A Qwen3-MoE HF checkpoint with this slice's tensor names and full-size shapes, random bf16 values."""
    from models.hf import HFShardWriter
    from models.hf.qwen3_moe import hf_config_from_lm, hf_tensor_shapes

    shapes = hf_tensor_shapes(lm)
    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(0)
    names, groups, size = sorted(shapes), [[]], 0
    for n in names:  # ~2 GB files, as HF hub checkpoints are cut
        b = torch.Size(shapes[n]).numel() * 2
        if groups[-1] and size + b > 2e9:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += b
    writer = HFShardWriter(out_dir, len(groups))
    for g in groups:
        tensors = {}
        for n in g:
            t = torch.empty(shapes[n], dtype=torch.bfloat16, device=gen.device)
            t.normal_(0, 0.02, generator=gen)
            tensors[n] = t.cpu()
        writer.add_shard(tensors)
    writer.finish()
    cfg = hf_config_from_lm(lm, dtype=torch.bfloat16)
    cfg["torch_dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return writer.total_bytes


def bench_hf(tr, sync_ckpt: Path, args, res: dict) -> None:
    from models.hf import export_hf, load_hf_into

    lm = tr.cfg.model.lm
    work = Path(args.work)
    hf_dir = work / "hf_in"
    shutil.rmtree(hf_dir, ignore_errors=True)
    t0 = time.perf_counter()
    nbytes = write_hf_slice(lm, hf_dir)
    res["hf_write_s"] = time.perf_counter() - t0
    _sync()
    t0 = time.perf_counter()
    stats = load_hf_into(tr.model, hf_dir, lm=lm)
    _sync()
    s = time.perf_counter() - t0
    res["import"] = {"s": s, "bytes": nbytes, "s_per_GB": s / (nbytes / 1e9), "GB_per_s": nbytes / 1e9 / s, **stats}
    print(f"import: {s:.2f} s for {nbytes / 1e9:.2f} GB ({s / (nbytes / 1e9):.2f} s/GB)", flush=True)
    shutil.rmtree(hf_dir)
    out = work / "hf_out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ex = export_hf(sync_ckpt, out, lm=lm, max_shard_bytes=2 * 10**9, dtype=torch.bfloat16)
    s = time.perf_counter() - t0
    res["export"] = {"s": s, "bytes": ex["bytes"], "s_per_GB": s / (ex["bytes"] / 1e9), "files": len(ex["files"])}
    print(f"export: {s:.2f} s for {ex['bytes'] / 1e9:.2f} GB", flush=True)
    shutil.rmtree(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-async-steps", type=int, default=200)
    ap.add_argument("--work", default="/tmp/bench_ckpt", help="directory on the disk to measure")
    ap.add_argument("--profile", action="store_true", help="cProfile the save calls (tables beside --out)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny recipe on CPU: checks the script, not speed")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not args.smoke:
        require_gpus(__file__, hint=SMOKE)
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ["WANDB_MODE"] = "disabled"
    recipe = "keye_tiny_lm" if args.smoke else "keye_30b_a3b_lm"
    seq = 128 if args.smoke else args.seq
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    overrides = [f"recipe={recipe}", "parallel=single", f"model.lm.num_layers={args.layers}",
                 f"train.seq_length={seq}", "train.global_batch_size=1", "train.micro_batch_size=1",
                 "train.steps=100000", "train.warmup_steps=1", "train.wandb.enabled=false",
                 "train.checkpoint.async_save=true", f"run_dir={work / 'run'}"]
    cfg, layout = validate(compose_config(overrides))
    from train.trainer import Trainer

    tr = Trainer(cfg, layout)
    for m in tr.model:
        m.train()
    _steps(tr, 2)  # warm-up
    res = {"env": {"torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "layers": args.layers, "seq": seq, "disk": str(work),
                   "disk_free_GB": shutil.disk_usage(work.parent if not work.exists() else work).free / 1e9}}
    sync_ckpt = bench_saves(tr, args, res)
    Path(args.out).write_text(json.dumps(res, indent=1))
    try:
        if not args.skip_hf:
            bench_hf(tr, sync_ckpt, args, res)
    except Exception as e:  # keep the save numbers
        res["hf_error"] = f"{type(e).__name__}: {e}"[:500]
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
