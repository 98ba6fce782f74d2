"""What decoding once per replica (parallel.vit.decode_once) saves and costs, on CPU: the CPU seconds one rank's
video loader spends building N packs with pixels (every rank of a replica before; the decoding rank now) and without
(the replica's other ranks now), and the pixel bytes the vision phase's scatter moves per step at a replica of W ranks
(the LPT plan's shares of the frames that are not the decoding rank's).

    python bench/bench_decode_once.py [--packs 24] [--shards DIR] [--out decode_once.json] [overrides ...]

The loader runs in the process (num_workers 0, decode_isolation inline), so its CPU seconds are its own
(time.process_time); the tiny recipe's data settings and synthetic videos unless --shards / overrides say otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packs", type=int, default=24)
    ap.add_argument("--shards", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from data.video.loader import VideoPackedLoader
    from data.video_stream import ensure_synthetic_shards
    from models.vision import VisionModel
    from parallel.vit_layout import make_plan, pixel_rows
    from train.launch import compose_config, validate

    shards = a.shards or str(ensure_synthetic_shards(Path(tempfile.mkdtemp()) / "videos", 24, 1234, rank=0))
    cfg, _ = validate(compose_config(["recipe=keye_tiny", "parallel=single", f"data.video.shards={shards}"]
                                     + a.overrides))
    v = replace(cfg.data.video, seq_len=cfg.train.seq_length, num_workers=0, decode_isolation="inline",
                quarantine_path="", index_dir="")
    cpu, packs = {}, {}
    for pixels in (True, False):
        loader = VideoPackedLoader(v, seed=cfg.data.seed, pixels=pixels)
        next(loader)                         # the epoch's plan, made once per process in either mode
        t0, w0 = time.process_time(), time.perf_counter()
        packs[pixels] = [next(loader) for _ in range(a.packs)]
        cpu[pixels] = (time.process_time() - t0, time.perf_counter() - w0)
        loader.close()
    frames = sum(p.video_frames for p in packs[True])
    patch_bytes = packs[True][0].pixel_values.shape[1]
    model = VisionModel(cfg.model.vision.build(cfg.model.lm.hidden_size))
    mb = cfg.train.global_batch_size         # one data-parallel replica's micro-batches per step
    steps = [packs[True][i:i + mb] for i in range(0, a.packs - mb + 1, mb)]
    total = sum(int(p.grid_thw.prod(-1).sum()) for s in steps for p in s) * patch_bytes
    moved = {}
    for W in (2, 4, 8):
        sent = 0
        for s in steps:
            plan = make_plan([p.grid_thw for p in s], model.frame_cost, W, model.cfg.merge_tokens)
            sent += sum(pixel_rows(plan)[1:]) * patch_bytes
        moved[W] = sent
    out = {"packs": a.packs, "frames": frames, "cpu_s_with_pixels": cpu[True][0], "cpu_s_without": cpu[False][0],
           "wall_s_with_pixels": cpu[True][1], "wall_s_without": cpu[False][1], "steps": len(steps),
           "pixel_bytes_per_step": total / max(len(steps), 1),
           "scattered_bytes_per_step": {W: b / max(len(steps), 1) for W, b in moved.items()}}
    print(f"{a.packs} packs, {frames} frames ({v.decode_backend}); one rank's loader CPU-s: with pixels "
          f"{cpu[True][0]:.2f} (wall {cpu[True][1]:.2f}), without {cpu[False][0]:.3f} (wall {cpu[False][1]:.3f})")
    print("| replica ranks W | loader CPU-s per replica before (W x with) | after (with + (W-1) x without) | "
          "pixel bytes per step | scattered off the decoding rank per step |")
    print("|---|---|---|---|---|")
    for W in (2, 4, 8):
        print(f"| {W} | {W * cpu[True][0]:.2f} | {cpu[True][0] + (W - 1) * cpu[False][0]:.2f} | "
              f"{out['pixel_bytes_per_step']:.0f} | {out['scattered_bytes_per_step'][W]:.0f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
