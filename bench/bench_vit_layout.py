"""The ViT on its own layout vs the usual replicated ViT: one multimodal training step on two GPUs.

Model: SigLIP-so400m ViT (27 layers, hidden 1152) + 2x2 projector + the Keye-30B-A3B language model at
full width cut to `--layers` layers, TP=2 over the two GPUs (both GPUs share one LM sequence), bf16.
Batch: `--microbatches` packed sequences of `--seq` tokens, each holding the frames of long videos
(hour-long video at Keye's budgets: hundreds of frames of 64-256 merged tokens, i.e. 256-1024 patches,
sizes drawn per video, fixed per video); random pixels (the cost does not depend on them).

Cases, same processes, same batch, one after the other:
  spread      parallel.vit.layout=spread: frames split over both ranks by per-frame FLOPs (LPT), one
              all_to_all of the merged embeddings to the LM-input ranks, one back for the gradients.
  replicated  parallel.vit.layout=replicated: each TP rank encodes every frame itself (Megatron-LM,
              torchtitan and ms-swift run the ViT this way under TP).
Per case: median step time, ViT time per rank (forward phase + backward phase, CUDA-synchronised),
the plan's cost imbalance (max/mean over ranks), peak memory per rank.

    torchrun --nproc_per_node 2 bench/bench_vit_layout.py --out $OUT/vit.json          # 2 GPUs
    torchrun --nproc_per_node 2 bench/bench_vit_layout.py --smoke --out /tmp/vit.json  # CPU check

The recompute's chunks (parallel/vit_layout.py CHUNK_PATCHES), one GPU: a case `layout:recompute:chunk` encodes
at most `chunk` patches at a time (0: the whole step's frames in one call, as before chunking), e.g.

    torchrun --nproc_per_node 1 bench/bench_vit_layout.py --tp 1 --seq 8192 --microbatches 16 \
        --cases spread:1:32768,spread:1:0,spread:0 --out $OUT/vit_chunks.json

A fourth field sets parallel.vit.group (the vision phase in rounds of that many micro-batches; 0: all at once):

    torchrun --nproc_per_node 1 bench/bench_vit_layout.py --tp 1 --seq 8192 --microbatches 16 \
        --cases spread:1:32768:0,spread:1:32768:4,spread:1:32768:1 --out $OUT/vit_group.json

Each case also records parallel/memory.py's predicted peak (`estimate_gb`, 10^9 bytes like the measurement,
which takes every token as visual) and its vision rows. A finished case's model is freed (the trainer drops the
stale autograd graphs that kept about 35 GB per case at 2 layers alive before; `Trainer.close()` does it for a
failed case), and `held_gb` records what is still allocated when a case starts. `phase_peak_gb`: the peak of each
phase of the step (ViT forward, LM schedule, ViT backward, the two optimizers, the rest), each since the phase
before ended.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
import torch.distributed as dist  # noqa: E402

from train.launch import compose_config, validate  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batch(seq: int, *, patch: int, merge: int, vocab: int, pad_id: int, seed: int, tokens_per_frame) -> dict:
    """One packed sequence: videos of frames (size fixed per video), with ~10% text between them."""
    g = torch.Generator().manual_seed(seed)
    grids, pos, t = [], [], 0
    while True:
        per = int(tokens_per_frame[torch.randint(len(tokens_per_frame), (1,), generator=g)])
        rows = cols = int(per ** 0.5)
        n_frames = int(torch.randint(40, 160, (1,), generator=g))
        text = int(torch.randint(16, 64, (1,), generator=g))
        if t + text + rows * cols >= seq:
            break
        t += text
        for _ in range(n_frames):
            if t + text + rows * cols >= seq:
                break
            grids.append([1, rows * merge, cols * merge])
            pos.extend(range(t, t + rows * cols))
            t += rows * cols + 1  # one timestamp token per frame
    grid = torch.tensor(grids, dtype=torch.int64)
    patches = int((grid[:, 1] * grid[:, 2]).sum())
    tokens = torch.randint(0, 256, (seq,), generator=g)
    visual_pos = torch.tensor(pos, dtype=torch.int64)
    tokens[visual_pos] = pad_id
    labels = torch.roll(tokens, -1)
    mask = torch.ones(seq)
    mask[visual_pos] = 0
    return {"tokens": tokens.view(1, -1), "labels": labels.view(1, -1), "loss_mask": mask.view(1, -1),
            "position_ids": torch.arange(seq).view(1, 1, -1).expand(3, 1, -1).clone(),
            "cu_seqlens": torch.tensor([0, seq], dtype=torch.int32),
            "pixel_values": torch.randint(0, 256, (patches, 3 * patch * patch), dtype=torch.uint8, generator=g),
            "grid_thw": grid, "visual_pos": visual_pos}


class Fixed:
    def __init__(self, batches):
        self.batches, self.i, self.num_microbatches = batches, 0, len(batches)

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {}

    def step_metrics(self):  # the trainer logs the loader's per-step data metrics (none here)
        return {}


def run_case(layout_name: str, args, batches, recompute: bool, chunk: int | None = None, group: int = 0) -> dict:
    from parallel.memory import estimate, inputs_from_config
    from train.trainer import Trainer

    recipe = "keye_tiny" if args.smoke else "keye_30b_a3b"
    overrides = [f"recipe={recipe}", "parallel=single", f"parallel.tp={args.tp}", f"parallel.vit.layout={layout_name}",
                 f"model.lm.num_layers={args.layers}", f"train.seq_length={args.seq}",
                 f"train.global_batch_size={args.microbatches}", "train.micro_batch_size=1",
                 "train.steps=1000", "train.warmup_steps=1", "train.checkpoint.enabled=false",
                 "train.wandb.enabled=false", "data.video.shards=/nonexistent", f"run_dir=/tmp/bench_vit/{layout_name}",
                 f"parallel.vit.recompute={'true' if recompute else 'false'}", f"parallel.vit.group={group}"]
    if not args.smoke:
        overrides += ["model.vision.enabled=true", "data.kind=video", "data.video.vocab_size=512",
                      f"model.lm.max_position_embeddings={max(args.seq, 262144)}"]
    cfg, layout = validate(compose_config(overrides))
    Trainer._video_stream = lambda self, cfg, r, n: Fixed(batches)  # the pre-built batch, no loader
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
    tr = Trainer(cfg, layout)
    try:  # a case that fails (out of memory) is closed too, so the next case starts clean
        vt = tr.vision
        if chunk is not None:
            vt.phase.chunk_patches = chunk or 1 << 62  # 0: one call over the whole step's frames
        est = estimate(inputs_from_config(cfg, layout))
        vit_times, peaks = [], {}  # ViT seconds per step (all its rounds); GB peak per phase of the step

        def mark(phase: str) -> None:
            """The peak since the last mark belongs to `phase`; the phases partition the run, so their maximum
            is the run's peak."""
            if torch.cuda.is_available():
                peaks[phase] = max(peaks.get(phase, 0.0), torch.cuda.max_memory_allocated() / 1e9)
                torch.cuda.reset_peak_memory_stats()

        def timed(fn, before: str, after: str, clock: bool):
            def call(*a, **k):
                _sync()
                mark(before)
                t0 = time.perf_counter()
                out = fn(*a, **k)
                _sync()
                if clock:
                    vit_times[-1] += time.perf_counter() - t0
                mark(after)
                return out
            return call

        # a step: rounds of (ViT forward, the LM's schedule, ViT backward), then the ViT's and the LM's optimizers
        vt.forward = timed(vt.forward, "other", "vit forward", True)
        vt.backward = timed(vt.backward, "LM schedule (forward + backward)", "vit backward", True)
        vt.step = timed(vt.step, "other", "vit optimizer step", False)
        tr.optimizer.step = timed(tr.optimizer.step, "other", "LM optimizer step", False)
        for m in tr.model:
            m.train()
        steps, losses = [], []
        for i in range(args.steps + args.warmup):
            _sync()
            vit_times.append(0.0)
            s = tr.train_step()
            mark("other")
            losses.append(s.loss)
            if i >= args.warmup:
                steps.append(s.seconds)
        vit = statistics.median(vit_times[args.warmup:])
        plan = vt.phase.last_plan
        loads = plan.loads() if plan is not None and hasattr(plan, "loads") else None
        rec = {"layout": layout_name, "recompute": recompute, "chunk_case": chunk, "chunk_patches": vt.phase.chunk_patches,
               "group": group, "held_gb": held,
               "estimate_gb": est.total / 1e9,
               "estimate_vision_gb": {k: v / 1e9 for k, v in est.rows.items() if "vision" in k or "ViT" in k
                                      or "visual" in k},
               "step_s": statistics.median(steps), "vit_s": vit,
               "imbalance": plan.imbalance() if plan is not None and hasattr(plan, "imbalance") else 1.0,
               "peak_gb": max(peaks.values(), default=0.0), "phase_peak_gb": peaks,
               "loss": s.loss, "losses": losses}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"vit_s": vit, "peak_gb": rec["peak_gb"]})
        rec["vit_s_per_rank"] = [g["vit_s"] for g in gathered]
        rec["peak_gb_per_rank"] = [g["peak_gb"] for g in gathered]
        rec["plan_loads"] = [str(x) for x in loads] if loads is not None else None
    finally:
        tr.close()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--recompute", type=int, default=1, help="parallel.vit.recompute for both layouts")
    ap.add_argument("--cases", default="", help="layout:recompute[:chunk[:group]] list, e.g. spread:1,spread:0 "
                                                 "(default: spread and replicated at --recompute)")
    ap.add_argument("--tp", type=int, default=2, help="parallel.tp: the GPUs that share one LM sequence")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not args.smoke:
        require_gpus(__file__, hint=SMOKE)
    os.environ["WANDB_MODE"] = "disabled"
    if args.smoke:
        args.seq, args.layers = 512, 2
        per_frame, patch, merge = [4, 9, 16], 14, 2
    else:
        per_frame, patch, merge = [64, 100, 144, 196, 256], 14, 2  # Keye: 64-256 merged tokens per frame
    pad = 300  # any id: the placeholders are overwritten by the visual embeddings
    batches = [make_batch(args.seq, patch=patch, merge=merge, vocab=512, pad_id=pad, seed=i, tokens_per_frame=per_frame)
               for i in range(args.microbatches)]
    frames = sum(int(b["grid_thw"].shape[0]) for b in batches)
    patches = sum(int((b["grid_thw"][:, 1] * b["grid_thw"][:, 2]).sum()) for b in batches)
    results = {"env": {"torch": torch.__version__, "world": int(os.environ.get("WORLD_SIZE", 1)),
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "layers": args.layers, "seq": args.seq, "microbatches": args.microbatches,
                       "frames_per_step": frames, "patches_per_step": patches}, "runs": []}
    def case(c: str):
        f = c.split(":")
        return (f[0], f[1] == "1", int(f[2]) if len(f) > 2 and f[2] != "" else None, int(f[3]) if len(f) > 3 else 0)

    cases = ([case(c) for c in args.cases.split(",")] if args.cases
             else [("spread", bool(args.recompute), None, 0), ("replicated", bool(args.recompute), None, 0)])
    for name, rc, chunk, group in cases:
        try:
            results["runs"].append(run_case(name, args, batches, rc, chunk, group))
        except Exception as e:  # keep the other case
            results["runs"].append({"layout": name, "recompute": rc, "chunk_case": chunk, "group": group,
                                    "error": f"{type(e).__name__}: {e}"[:400]})
        if int(os.environ.get("RANK", "0")) == 0:  # what is done so far survives a run stopped by its time limit
            Path(args.out).write_text(json.dumps(results, indent=1))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if dist.is_initialized():
            dist.barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        runs = {r["layout"]: r for r in results["runs"]
                if "error" not in r and r["chunk_case"] is None and not r["group"]}
        if {"spread", "replicated"} <= set(runs):
            results["step_speedup_spread_vs_replicated"] = runs["replicated"]["step_s"] / runs["spread"]["step_s"]
            results["vit_speedup_spread_vs_replicated"] = (max(runs["replicated"]["vit_s_per_rank"])
                                                           / max(runs["spread"]["vit_s_per_rank"]))
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    from parallel.groups import teardown

    teardown()


if __name__ == "__main__":
    main()
