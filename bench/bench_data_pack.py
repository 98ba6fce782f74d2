"""CPU cost per pack of each stage of the video data path, at long-context pack sizes; prints a table, writes JSON.

    python bench/bench_data_pack.py --work /tmp/pack_bench --out pack.json [--seq-lens 32768,131072,262144] \
        [--sources 720p:180,1080p:120] [--backends pyav,decord] [--repeats 3] [--profile]

Makes its own sources with PyAV (H.264, 24 fps, a keyframe every 2 s, moving gradient + noise, a new picture every
20 s), ingests each as 6 samples of one stored video (6 records), then for each source, pack size and backend builds
pack 0 of epoch 0 stage by stage in this process (`decode_isolation` "inline", one decoder thread, the recipes'
budgets: 2 fps, 64-256 tokens a frame, `fast_frame_ratio` 0.3) and reports each stage's CPU seconds (median of the
repeats, each stage timed with `time.process_time`):

    plan      the pack's document plans made afresh (sampling plan, timestamps' tokens, text)
    spill     the video member copied from the shard to the spill file
    decode    decoding the planned frames, scaled to the plan's sizes (swscale in PyAV, decord's own scaling)
    patchify  frames -> ViT patches in merge order, into the pack's buffer
    document  tokens, labels, loss mask and 3D positions of each document
    assemble  the pack's tensors (concatenation, padding, cu_seqlens, visual_pos)
    handoff   what a DataLoader worker's queue does with the pack: ForkingPickler dumps + loads (shared memory)

and the whole `build_pack` as a DataLoader worker runs it (guarded child decoding, the default), wall and CPU.
Measure on an otherwise idle machine; on a shared one compare CPU times, not wall times.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pickle
import pstats
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data.video.config import VideoDataConfig  # noqa: E402
from data.video.ingest import IngestOptions, ingest  # noqa: E402
from data.video.loader import FrameSource, Planner, VideoPackedLoader, _alloc_uint8, build_pack  # noqa: E402
from data.video.packing import assemble_pack, build_document, patchify, split_runs  # noqa: E402
from data.video.shards import spill_member  # noqa: E402

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080), "360p": (640, 360)}


def make_source(path: Path, width: int, height: int, seconds: float, fps: int = 24) -> None:
    import av
    c = av.open(str(path), "w")
    st = c.add_stream("libx264", rate=fps)
    st.width, st.height, st.pix_fmt = width, height, "yuv420p"
    st.options = {"crf": "23", "preset": "veryfast", "g": str(2 * fps)}
    st.codec_context.thread_count = 1
    yy, xx = np.mgrid[0:height, 0:width]
    base = ((xx * 255 // width)[..., None] * [1, 0, 0] + (yy * 255 // height)[..., None] * [0, 1, 0]).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 6, (height, width, 3), dtype=np.uint8)
    for i in range(int(seconds * fps)):
        scene = i // (fps * 20)
        img = np.roll(base, i * 3, axis=1) + np.roll(noise, i * 5 + scene * 97, axis=0)
        img[(i * 7) % height:(i * 7) % height + 40, :, 2] = 255
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        f.pts, f.time_base = i, Fraction(1, fps)
        for p in st.encode(f):
            c.mux(p)
    for p in st.encode():
        c.mux(p)
    c.close()


def shards_for(work: Path, name: str, seconds: float, copies: int, proxy: bool = False) -> Path:
    """Shards of `copies` samples of one `name` source (ingested with --proxy: its 2 fps, short side 448 proxy)."""
    vdir, out = work / f"videos_{name}", work / f"shards_{name}{'_proxy' if proxy else ''}"
    if (out / "dataset.json").exists():
        return out
    vdir.mkdir(parents=True, exist_ok=True)
    src = vdir / f"{name}.mp4"
    if not src.exists():
        print(f"[bench] encoding a {seconds:.0f} s {name} H.264 source ...", flush=True)
        make_source(src, *SIZES[name], seconds)
    ann = work / f"ann_{name}.jsonl"
    ann.write_text("".join(json.dumps({"video": src.name, "caption": f"a synthetic {name} clip, record {i}. " * 8})
                           + "\n" for i in range(copies)))
    print(f"[bench] ingesting {src} as {copies} samples{' (proxy)' if proxy else ''} ...", flush=True)
    ingest(IngestOptions(videos=str(vdir), annotations=str(ann), out=str(out), shard_size_mb=4096, workers=1,
                         progress=False, proxy=proxy))
    return out


def _cpu(fn):
    t = time.process_time()
    r = fn()
    return time.process_time() - t, r


def stages(cfg: VideoDataConfig, catalog) -> dict:
    """One pass over pack 0's stages; CPU seconds each, and the pack's size."""
    loader = VideoPackedLoader(cfg, seed=0, catalog=catalog)
    tok = loader.planner.tokenizer
    planner = Planner(catalog, cfg, tok, 0)
    items = planner.epoch(0).packs[0]
    out = {}
    out["plan"], plans = _cpu(lambda: [planner._plan(i, 0) for i in items])
    source = FrameSource(cfg)
    p, m = cfg.patch_size, cfg.merge_size
    rows = sum(d.patch_rows(p) for d in plans)
    pixels = _alloc_uint8(rows, 3 * p * p, shared=True)     # as build_pack allocates it in a DataLoader worker
    pv = pixels.numpy()
    out.update(spill=0.0, decode=0.0, patchify=0.0, document=0.0)
    docs, at, frames = [], 0, 0
    for d in plans:
        rec = catalog[d.uid]
        path = os.path.join(source.spill_dir, f"bench-{os.getpid()}.mp4")
        t, _ = _cpu(lambda: spill_member(rec.shard, rec.video_offset, rec.video_size, path))
        out["spill"] += t
        fp = d.frames
        req = dict(path=path, indices=list(fp.indices), height=fp.height, width=fp.width, meta=rec.video,
                   threads=cfg.decode_threads, layout="chw")
        if fp.num_fast:
            req.update(fast=list(fp.fast), fast_height=fp.fast_height, fast_width=fp.fast_width)
        t, arr = _cpu(lambda: source._inline(req))
        out["decode"] += t
        os.unlink(path)
        runs = split_runs(arr, fp) if fp.num_fast else [arr]

        def patch(runs=runs, at=at):
            for run in runs:
                k = run.shape[0] * (run.shape[2] // p) * (run.shape[3] // p)
                patchify(run, p, m, out=pv[at:at + k], layout="chw")
                at += k
            return at
        t, at = _cpu(patch)
        out["patchify"] += t
        t, doc = _cpu(lambda: build_document(d, None, cfg, tok))
        out["document"] += t
        docs.append(doc)
        frames += fp.num_frames
    out["assemble"], pack = _cpu(lambda: assemble_pack(docs, [d.key for d in plans], cfg, tok, epoch=0, pack_index=0,
                                                         failures=[], planned_keys=[], pixel_values=pixels))
    from multiprocessing.reduction import ForkingPickler
    from torch.multiprocessing.reductions import init_reductions
    init_reductions()                      # tensors pickle as shared-memory handles, as in a DataLoader worker

    def handoff():
        buf = io.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(pack)
        return pickle.loads(buf.getvalue())
    out["handoff"], got = _cpu(handoff)
    assert bool((got.tokens == pack.tokens).all())
    loader.close()
    source.close()
    out["frames"] = frames
    out["docs"] = len(plans)
    out["tokens"] = int(pack.cu_seqlens[pack.num_docs])
    out["patches"] = int(rows)
    out["frame_size"] = sorted({f"{d.frames.width}x{d.frames.height}" for d in plans})
    return out


def whole(cfg: VideoDataConfig, catalog, repeats: int) -> dict:
    """build_pack as a worker runs it (guarded child decoding): wall, and CPU of this process + its children."""
    from bench.bench_data import Meter
    loader = VideoPackedLoader(cfg, seed=0, catalog=catalog)
    source = FrameSource(cfg)
    build_pack(loader.planner, source, 0, 0)          # starts the guarded child, as a worker's first pack does
    walls, cpus = [], []
    for _ in range(repeats):
        loader.planner._recent.clear()
        with Meter() as mt:
            build_pack(loader.planner, source, 0, 0)
        walls.append(mt.wall)
        cpus.append(mt.cpu)
    source.close()
    loader.close()
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/keye_pack_bench")
    ap.add_argument("--out", default="")
    ap.add_argument("--seq-lens", default="32768,131072,262144")
    ap.add_argument("--sources", default="720p:180,1080p:120",
                    help="NAME:SECONDS[:proxy],... (NAME in 360p, 720p, 1080p; proxy: ingested with --proxy)")
    ap.add_argument("--backends", default="pyav,decord")
    ap.add_argument("--copies", type=int, default=6, help="samples (records) of each source video")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--whole", action="store_true", help="also time build_pack with the guarded child")
    ap.add_argument("--profile", action="store_true", help="cProfile one pass of each case (top 15 by own time)")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    keys = ["plan", "spill", "decode", "patchify", "document", "assemble", "handoff"]
    print("| source | seq_len | backend | docs | frames | tokens | frame size | " + " | ".join(keys)
          + " | total CPU s | ms per 1K tokens |")
    for spec in a.sources.split(","):
        name, seconds, *how = spec.split(":")
        shards = shards_for(work, name, float(seconds), a.copies, proxy=how == ["proxy"])
        name += "-proxy" if how == ["proxy"] else ""
        from data.video.shards import load_catalog
        catalog = load_catalog(str(shards))
        for seq_len in [int(s) for s in a.seq_lens.split(",")]:
            for backend in a.backends.split(","):
                cfg = VideoDataConfig(shards=str(shards), seq_len=seq_len, num_workers=0, decode_backend=backend,
                                      decode_isolation="inline", fast_frame_ratio=0.3, quarantine_path="",
                                      max_video_tokens=min(184_320, seq_len - 2048), max_text_tokens=4096,
                                      shuffle=False)
                runs = [stages(cfg, catalog) for _ in range(a.repeats)]
                med = {k: statistics.median(r[k] for r in runs) for k in keys}
                r0 = runs[0]
                total = sum(med.values())
                row = {"source": name, "seconds": float(seconds), "seq_len": seq_len, "backend": backend,
                       **{k: r0[k] for k in ("docs", "frames", "tokens", "patches", "frame_size")},
                       "cpu_s": med, "total_cpu_s": total, "repeats": a.repeats,
                       "all_runs": [{k: r[k] for k in keys} for r in runs]}
                if a.whole:
                    row["build_pack"] = whole(VideoDataConfig(**{**cfg.__dict__, "decode_isolation": "process"}),
                                              catalog, a.repeats)
                if a.profile:
                    pr = cProfile.Profile()
                    pr.enable()
                    stages(cfg, catalog)
                    pr.disable()
                    s = io.StringIO()
                    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15)
                    print(s.getvalue())
                results.append(row)
                print(f"| {name} {float(seconds):.0f} s | {seq_len} | {backend} | {r0['docs']} | {r0['frames']} | "
                      f"{r0['tokens']} | {','.join(r0['frame_size'])} | "
                      + " | ".join(f"{med[k]:.3f}" for k in keys)
                      + f" | {total:.2f} | {1000 * total / (r0['tokens'] / 1000):.1f} |"
                      + (f" build_pack {row['build_pack']}" if a.whole else ""), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"cpu": os.cpu_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
