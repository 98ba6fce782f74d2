"""CPU benchmark of the video data path; prints a table and writes JSON.

    python bench/bench_data.py --out bench_data.json [--work DIR] [--long-seconds 180]

Measures, in one run, on synthetic data the script makes itself:
1. decode throughput per CPU core: our loader (tar member -> spill -> guarded child -> patchify ->
   pack) vs the raw backend decoding the same frames of the same file at the same size, for decord
   and PyAV, on a long 360p H.264 video (target ratio >= 0.8);
2. loader samples/s with 2 DataLoader workers on synthetic shards;
3. time to resume at 90% of an epoch (vs a fresh start, and vs replaying to that point);
4. ingest throughput (videos/s, GB/s) on small videos and on the long one;
5. the per-sample cost of decoding in a guarded child process instead of inline;
6. image samples: our decode (shard member -> Pillow, a reduced DCT scale for a JPEG at least twice the
   plan, EXIF orientation, RGB, bicubic resize to the plan, planar) vs raw Pillow decoding and resizing the
   same bytes to the same size, per CPU core, on 1080p and 12 MP (4032x3024, a phone's photo) JPEGs planned
   at max_image_tokens (1280), and the loader's images/s with 2 workers;
7. slow and fast frames (`--parts scenes`): ingest's scene-change search (what it adds to the full decode,
   with and without it on the same files in the same run), and what fast_frame_ratio 0.3 changes in the plan
   and the loader's cost per sample on a 720p video of still scenes, against the same video at ratio 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data.video.config import VideoDataConfig  # noqa: E402
from data.video.ingest import IngestOptions, ingest  # noqa: E402
from data.video.loader import VideoPackedLoader  # noqa: E402
from data.video.shards import load_catalog, spill_member  # noqa: E402
from data.video.synthetic import (VideoSpec, counter_bits_for, make_synthetic_videos, read_counter,  # noqa: E402
                                  write_video)


_TICK = os.sysconf("SC_CLK_TCK")


def _live_descendants_cpu() -> float:
    """CPU seconds used so far by live descendant processes (read from /proc)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / _TICK
    me, total = os.getpid(), 0.0
    for pid in cpu:
        p = parent.get(pid)
        while p and p != me and p in parent:
            p = parent[p]
        if p == me:
            total += cpu[pid]
    return total


def cpu_now() -> float:
    """CPU seconds of this process, its finished (waited-for) children and its live descendants."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime + _live_descendants_cpu()


class Meter:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), cpu_now()
        return self

    def __exit__(self, *a):
        self.wall = time.perf_counter() - self.w0
        self.cpu = cpu_now() - self.c0


def best_of(fn, n: int) -> dict:
    runs = [fn() for _ in range(n)]
    return min(runs, key=lambda r: r["cpu_s"])


# ---------------------------------------------------------------------------------------------
def make_long_video(work: Path, seconds: float) -> Path:
    vdir = work / "long_videos"
    path = vdir / "long_360p.mp4"
    if path.exists():
        return vdir
    vdir.mkdir(parents=True, exist_ok=True)
    fps = 24
    n = int(seconds * fps)
    print(f"[bench] writing a {seconds:.0f} s 640x360 {fps} fps H.264 video ({n} frames) ...", flush=True)
    write_video(path, VideoSpec(n_frames=n, width=640, height=360, fps=fps, gop=2 * fps, crf=23, seed=1))
    (vdir / "ann.jsonl").write_text(json.dumps({"video": "long_360p.mp4", "caption": "a long synthetic clip"}) + "\n")
    return vdir


def bench_decode(work: Path, shards: Path, backend: str, repeats: int) -> dict:
    cfg = VideoDataConfig(shards=str(shards), seq_len=200_000, num_workers=0, decode_backend=backend,
                          decode_isolation="process", max_text_tokens=256, quarantine_path="")
    probe = VideoPackedLoader(cfg, seed=0)
    rec = probe.catalog[0]
    doc = probe.planner.doc(0, 0)
    fp = doc.frames
    raw_path = work / f"raw_{backend}.mp4"
    spill_member(rec.shard, rec.video_offset, rec.video_size, str(raw_path))

    def raw() -> dict:
        with Meter() as m:
            if backend == "decord":
                import decord
                vr = decord.VideoReader(str(raw_path), ctx=decord.cpu(0), width=fp.width, height=fp.height,
                                        num_threads=1)
                arr = vr.get_batch(list(fp.indices)).asnumpy()
                del vr
            else:
                from data.video.backends import DecodeRequest, decode_pyav
                arr = decode_pyav(DecodeRequest(path=str(raw_path), indices=list(fp.indices), height=fp.height,
                                                width=fp.width, meta=rec.video))
        assert arr.shape[0] == fp.num_frames
        return {"wall_s": m.wall, "cpu_s": m.cpu, "frames": int(arr.shape[0])}

    loader = VideoPackedLoader(cfg, seed=0, catalog=probe.catalog)
    next(loader)                       # starts the guarded child once, as a training run does

    def ours() -> dict:
        # the shard holds this one video, so every further pack decodes the same planned frames
        with Meter() as m:
            pack = next(loader)
        n = int(pack.grid_thw.shape[0])
        assert n == fp.num_frames and not pack.failures
        return {"wall_s": m.wall, "cpu_s": m.cpu, "frames": n}

    runs_raw, runs_ours = [], []
    for _ in range(repeats):                 # interleaved, best of each: the machine is shared
        runs_raw.append(raw())
        runs_ours.append(ours())
    loader.close()
    r_raw = min(runs_raw, key=lambda r: r["cpu_s"])
    r_ours = min(runs_ours, key=lambda r: r["cpu_s"])
    # spot-check frame accuracy through the counters
    bits = counter_bits_for(rec.video["num_frames"])
    frames = VideoPackedLoader(cfg, seed=0, catalog=probe.catalog)
    pk = next(frames)
    frames.close()
    from data.video.packing import unpatchify
    imgs = unpatchify(pk.pixel_values, pk.grid_thw, 14, 2)
    ok = sum(read_counter(imgs[i], bits) == fp.indices[i] for i in range(0, len(imgs), max(1, len(imgs) // 20)))
    checked = len(range(0, len(imgs), max(1, len(imgs) // 20)))
    return {
        "backend": backend, "video_frames": rec.video["num_frames"], "video_duration_s": rec.video["duration_s"],
        "decoded_frames": fp.num_frames, "size": f"{fp.width}x{fp.height}", "tokens_per_frame": fp.tokens_per_frame,
        "raw_frames_per_cpu_s": r_raw["frames"] / r_raw["cpu_s"], "raw_wall_s": r_raw["wall_s"], "raw_cpu_s": r_raw["cpu_s"],
        "loader_frames_per_cpu_s": r_ours["frames"] / r_ours["cpu_s"], "loader_wall_s": r_ours["wall_s"],
        "loader_cpu_s": r_ours["cpu_s"],
        "ratio_per_core": (r_ours["frames"] / r_ours["cpu_s"]) / (r_raw["frames"] / r_raw["cpu_s"]),
        "ratio_wall": r_raw["wall_s"] / r_ours["wall_s"],
        "counter_check": f"{ok}/{checked}",
    }


def bench_backends_raw(work: Path, shards: Path, repeats: int) -> list[dict]:
    """The raw backends on the long video: the 2 fps plan, and 64 frames spread over the video."""
    from data.video.backends import DecodeRequest, decode_frames, torchcodec_available
    from data.video.packing import plan_document
    from data.video.tokenizer import ByteTokenizer

    rec = load_catalog(str(shards))[0]
    cfg = VideoDataConfig(seq_len=200_000)
    fp = plan_document(uid=0, key="k", video=rec.video, annotation={}, cfg=cfg, tokenizer=ByteTokenizer(),
                       seed=0, epoch=0).frames
    path = work / "raw_backends.mp4"
    spill_member(rec.shard, rec.video_offset, rec.video_size, str(path))
    n = rec.video["num_frames"]
    sets = {"plan_2fps": list(fp.indices),
            "spread_64": sorted(set(np.linspace(0, n - 1, 64).round().astype(int).tolist()))}
    out = []
    backends = ["decord", "pyav"] + (["torchcodec"] if torchcodec_available() else [])
    for name, idx in sets.items():
        for be in backends:
            def run():
                with Meter() as m:
                    arr = decode_frames(be, DecodeRequest(path=str(path), indices=idx, height=fp.height,
                                                          width=fp.width, meta=rec.video))
                assert arr.shape[0] == len(idx)
                return {"wall_s": m.wall, "cpu_s": m.cpu}
            r = best_of(run, repeats)
            out.append({"frames": name, "backend": be, "n": len(idx), "cpu_s": r["cpu_s"], "wall_s": r["wall_s"],
                        "frames_per_cpu_s": len(idx) / r["cpu_s"]})
    return out


def bench_loader(shards: Path, workers: int, tmp: Path) -> dict:
    cfg = VideoDataConfig(shards=str(shards), seq_len=16384, num_workers=workers, quarantine_path="",
                          num_epochs=1)
    loader = VideoPackedLoader(cfg, seed=0)
    n_packs = loader.planner.num_packs(0)
    t0 = time.perf_counter()
    first = None
    samples = tokens = frames = 0
    for p in loader:
        if first is None:
            first = time.perf_counter() - t0
        samples += p.num_docs
        tokens += int(p.cu_seqlens[p.num_docs])
        frames += int(p.grid_thw.shape[0])
    total = time.perf_counter() - t0
    steady = total - first
    return {"workers": workers, "packs": n_packs, "samples": samples, "frames": frames,
            "seconds": total, "first_batch_s": first,
            "samples_per_s": samples / total, "samples_per_s_after_first": (samples - 1) / steady if steady > 0 else None,
            "tokens_per_s": tokens / total, "frames_per_s": frames / total}


def bench_images(work: Path, n: int, repeats: int, workers: int, size: tuple[int, int] = (1920, 1080)) -> dict:
    """JPEGs of `size` (synthetic pictures with a noise texture, so that they weigh as photos do): our decode
    against raw Pillow (open, RGB, bicubic resize, array) on the same bytes at the planned size, then the
    loader over their shards."""
    import io
    from PIL import Image

    from data.video.images import decode_image
    from data.video.sampling import plan_image
    from data.video.synthetic import draw_frame

    W, H = size
    idir = work / f"images_{W}x{H}"
    idir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ann = work / f"images_{W}x{H}.jsonl"
    with open(ann, "w") as f:
        for i in range(n):
            arr = draw_frame(300 + i, H, W, bits=10, seed=i).astype(np.int16)
            arr = np.clip(arr + rng.integers(-24, 25, arr.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(idir / f"photo_{i:03d}.jpg", quality=90)
            f.write(json.dumps({"image": f"photo_{i:03d}.jpg", "caption": f"picture {i}"}) + "\n")
    shards = work / f"image_shards_{W}x{H}"
    if not (shards / "dataset.json").exists():
        ingest(IngestOptions(videos=str(idir), annotations=str(ann), out=str(shards), workers=workers,
                             shard_size_mb=64, progress=False))
    cfg = VideoDataConfig(shards=str(shards), seq_len=16384, num_workers=workers, quarantine_path="", num_epochs=1)
    cat = load_catalog(str(shards))
    fp = plan_image(cat[0].images[0], cfg)
    blobs = [(idir / f"photo_{i:03d}.jpg").read_bytes() for i in range(n)]

    def raw():
        with Meter() as m:
            for b in blobs:
                img = Image.open(io.BytesIO(b)).convert("RGB").resize((fp.width, fp.height), Image.BICUBIC)
                np.asarray(img)
        return {"cpu_s": m.cpu, "wall_s": m.wall}

    def ours():
        with Meter() as m:
            for b in blobs:
                decode_image(b, fp.height, fp.width)
        return {"cpu_s": m.cpu, "wall_s": m.wall}

    r, o = best_of(raw, repeats), best_of(ours, repeats)
    counters = [read_counter(decode_image(b, fp.height, fp.width)[0].transpose(1, 2, 0), 10) == 300 + i
                for i, b in enumerate(blobs)]
    def through_loader(isolation: str) -> dict:
        loader = VideoPackedLoader(dataclasses.replace(cfg, decode_isolation=isolation), seed=0)
        t0 = time.perf_counter()
        first, images = None, 0
        for p in loader:
            first = first if first is not None else time.perf_counter() - t0
            images += p.image_docs
        return {"images": images, "images_per_s": images / (time.perf_counter() - t0), "first_batch_s": first}

    guarded, inline = through_loader("process"), through_loader("inline")   # the default, and the cost of its guard
    return {"n": n, "source": f"{W}x{H} JPEG q90", "planned": f"{fp.width}x{fp.height}",
            "tokens_per_image": fp.tokens_per_frame, "mean_bytes": int(np.mean([len(b) for b in blobs])),
            "raw_images_per_cpu_s": n / r["cpu_s"], "ours_images_per_cpu_s": n / o["cpu_s"],
            "ratio_per_core": r["cpu_s"] / o["cpu_s"], "counters_ok": f"{sum(counters)}/{n}",
            "loader_workers": workers, "loader_images": guarded["images"],
            "loader_images_per_s": guarded["images_per_s"], "loader_first_batch_s": guarded["first_batch_s"],
            "loader_inline_images_per_s": inline["images_per_s"],
            "guard_ratio": guarded["images_per_s"] / inline["images_per_s"]}


def bench_resume(shards: Path) -> dict:
    cfg = VideoDataConfig(shards=str(shards), seq_len=16384, num_workers=2, quarantine_path="")
    a = VideoPackedLoader(cfg, seed=0)
    n = a.planner.num_packs(0)
    k = int(0.9 * n)
    state = dict(a.state_dict(), consumed=k)
    t0 = time.perf_counter()
    fresh = VideoPackedLoader(cfg, seed=0)
    next(fresh)
    t_fresh = time.perf_counter() - t0
    fresh.close()
    t0 = time.perf_counter()
    b = VideoPackedLoader(cfg, seed=0)
    b.load_state_dict(state)
    t_state = time.perf_counter() - t0
    p = next(b)
    t_resume = time.perf_counter() - t0
    b.close()
    assert (p.epoch, p.pack_index) == (0, k)
    # replaying to the same point would cost ~k packs of loading
    cfg1 = VideoDataConfig(shards=str(shards), seq_len=16384, num_workers=2, quarantine_path="", num_epochs=1)
    t0 = time.perf_counter()
    c = VideoPackedLoader(cfg1, seed=0)
    for i, _ in enumerate(c):
        if i + 1 == k:
            break
    t_replay = time.perf_counter() - t0
    c.close()
    return {"packs_in_epoch": n, "resume_at_pack": k, "load_state_dict_s": t_state,
            "resume_to_first_batch_s": t_resume, "fresh_start_to_first_batch_s": t_fresh,
            "replay_to_same_point_s": t_replay}


def bench_ingest(videos: Path, ann: Path | None, out: Path, workers: int, proxy: bool = False) -> dict:
    if out.exists():
        shutil.rmtree(out)
    s = ingest(IngestOptions(videos=str(videos), annotations=str(ann) if ann else None, out=str(out),
                             shard_size_mb=64, workers=workers, progress=False, proxy=proxy))
    r = s["this_run"]
    return {"videos": r["processed"], "accepted": r["accepted"], "workers": workers, "proxy": proxy,
            "seconds": r["seconds"], "videos_per_s": r["videos_per_s"], "gb_per_s": r["gb_per_s"],
            "bytes_in": r["bytes_in"], "seconds_of_video": r["seconds_of_video"],
            "video_seconds_per_wall_s": r["seconds_of_video"] / r["seconds"]}


def bench_scenes(work: Path, long_dir: Path, repeats: int) -> dict:
    """Scene-change search at ingest (CPU per file with and without it, alternated, best of `repeats`) and slow
    and fast frames on a 720p video of 8 still scenes (48 s, 24 fps): plan and loader cost at ratio 0 and 0.3."""
    from data.video.probe import probe_video
    from data.video.scenes import SceneSpec
    from data.video.synthetic import SYNTHETIC_SCENE_SIMILARITY

    vdir = work / "scene_videos"
    path = vdir / "scenes_720p.mp4"
    if not path.exists():
        vdir.mkdir(parents=True, exist_ok=True)
        print("[bench] writing a 48 s 1280x720 24 fps video of 8 still scenes ...", flush=True)
        write_video(path, VideoSpec(n_frames=48 * 24, width=1280, height=720, fps=24, gop=48, crf=23, seed=2, scenes=8))
        (vdir / "ann.jsonl").write_text(json.dumps({"video": path.name, "caption": "eight still scenes"}) + "\n")
    out: dict = {"probe": []}
    for name, f in (("640x360, moving", long_dir / "long_360p.mp4"), ("1280x720, 8 still scenes", path)):
        cpu = {"without": [], "with": []}
        for _ in range(repeats):                    # alternate, so that both share the machine's noise
            for k, spec in (("without", None), ("with", SceneSpec(similarity=SYNTHETIC_SCENE_SIMILARITY))):
                with Meter() as m:
                    meta = probe_video(str(f), scenes=spec)
                cpu[k].append(m.cpu)
        sc = meta["scene_changes"]
        name = f"{meta['duration_s']:.0f} s {name}"
        out["probe"].append({"video": name, "frames": meta["num_frames"], "examined": sc["examined"],
                             "changes": sc["count"], "cpu_s_without": min(cpu["without"]),
                             "cpu_s_with": min(cpu["with"]), "ratio": min(cpu["with"]) / min(cpu["without"])})
    shards = work / "scene_shards"
    if not (shards / "dataset.json").exists():
        ingest(IngestOptions(videos=str(vdir), annotations=str(vdir / "ann.jsonl"), out=str(shards), workers=1,
                             progress=False, scene_similarity=SYNTHETIC_SCENE_SIMILARITY))
    out["loader"] = []
    for ratio in (0.0, 0.3):
        cfg = VideoDataConfig(shards=str(shards), seq_len=32768, num_workers=0, quarantine_path="",
                              fast_frame_ratio=ratio)
        L = VideoPackedLoader(cfg, seed=0)
        fp = L.planner.doc(0, 0).frames
        next(L)                                     # warm: imports, the guarded child
        runs = []
        for _ in range(repeats):
            with Meter() as m:
                p = next(L)
            runs.append(m.cpu)
        L.close()
        out["loader"].append({"fast_frame_ratio": ratio, "frames": fp.num_frames, "fast": fp.num_fast,
                              "slow_size": f"{fp.width}x{fp.height}", "slow_tokens": fp.tokens_per_frame,
                              "fast_size": f"{fp.fast_width}x{fp.fast_height}", "fast_tokens": fp.fast_tokens_per_frame,
                              "visual_tokens": fp.visual_tokens, "budget": fp.budget,
                              "patches": int(p.pixel_values.shape[0]), "cpu_s_per_sample": min(runs)})
    return out


def bench_isolation(shards: Path, rounds: int = 2) -> dict:
    """Steady-state cost per sample of decoding in the guarded child vs inline (child already up)."""
    loaders = {}
    for iso in ("inline", "process"):
        cfg = VideoDataConfig(shards=str(shards), seq_len=16384, num_workers=0, decode_isolation=iso,
                              quarantine_path="")
        loaders[iso] = VideoPackedLoader(cfg, seed=0)
        next(loaders[iso])                                  # warm: imports, child start
    n_packs = loaders["inline"].planner.num_packs(0)
    acc = {iso: {"samples": 0, "wall_s": 0.0, "cpu_s": 0.0} for iso in loaders}
    for _ in range(rounds):                                 # alternate to share the machine's noise
        for iso, L in loaders.items():
            with Meter() as m:
                n = sum(next(L).num_docs for _ in range(n_packs))
            acc[iso]["samples"] += n
            acc[iso]["wall_s"] += m.wall
            acc[iso]["cpu_s"] += m.cpu
    for iso, L in loaders.items():
        L.close()
        a = acc[iso]
        a["ms_per_sample"] = 1000 * a["wall_s"] / a["samples"]
        a["cpu_ms_per_sample"] = 1000 * a["cpu_s"] / a["samples"]
    out = dict(acc)
    out["overhead_ms_per_sample"] = acc["process"]["ms_per_sample"] - acc["inline"]["ms_per_sample"]
    out["overhead_cpu_ms_per_sample"] = acc["process"]["cpu_ms_per_sample"] - acc["inline"]["cpu_ms_per_sample"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_data.json")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir, kept with --keep)")
    ap.add_argument("--long-seconds", type=float, default=180.0)
    ap.add_argument("--n-small", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--parts", default="ingest,decode,backends,loader,resume,isolation,images,scenes",
                    help="comma-separated subset to run")
    a = ap.parse_args(argv)
    import tempfile
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "machine": platform.machine()},
                 "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    t_all = time.perf_counter()

    parts = set(a.parts.split(","))
    long_dir = make_long_video(work, a.long_seconds)
    if "ingest" in parts or not (work / "long_shards" / "dataset.json").exists():
        res["ingest_long"] = bench_ingest(long_dir, long_dir / "ann.jsonl", work / "long_shards", workers=1)
    small = work / "small" / "annotations.jsonl"
    if not small.exists():
        make_synthetic_videos(work / "small", a.n_small, seed=3, min_seconds=2, max_seconds=8,
                              sizes=((320, 240), (426, 240), (240, 320), (640, 360)), fps_choices=(24.0, 30.0))
    if "ingest" in parts or not (work / "small_shards" / "dataset.json").exists():
        res["ingest_small"] = bench_ingest(work / "small" / "videos", small, work / "small_shards", workers=a.workers)
    if "ingest" in parts:
        res["ingest_small_proxy"] = bench_ingest(work / "small" / "videos", small, work / "small_proxy_shards",
                                                 workers=a.workers, proxy=True)
    if "decode" in parts:
        res["decode"] = [bench_decode(work, work / "long_shards", b, a.repeats) for b in ("pyav", "decord")]
    if "backends" in parts:
        res["backends_raw"] = bench_backends_raw(work, work / "long_shards", a.repeats)
    if "loader" in parts:
        res["loader"] = bench_loader(work / "small_shards", a.workers, work)
    if "resume" in parts:
        res["resume"] = bench_resume(work / "small_shards")
    if "isolation" in parts:
        res["isolation"] = bench_isolation(work / "small_shards")
    if "images" in parts:
        res["images"] = [bench_images(work, 24, a.repeats, a.workers, size) for size in ((1920, 1080), (4032, 3024))]
    if "scenes" in parts:
        res["scenes"] = bench_scenes(work, long_dir, a.repeats)
    res["total_seconds"] = time.perf_counter() - t_all

    # ---- table ----
    rows = []
    for d in res.get("decode", []):
        rows += [(f"decode {d['backend']}: raw backend", f"{d['raw_frames_per_cpu_s']:.1f} frames/CPU-s",
                  f"{d['decoded_frames']} frames {d['size']} of a {d['video_duration_s']:.0f} s 360p video"),
                 (f"decode {d['backend']}: our loader", f"{d['loader_frames_per_cpu_s']:.1f} frames/CPU-s",
                  f"ratio per core {d['ratio_per_core']:.2f} (wall {d['ratio_wall']:.2f}); counters ok {d['counter_check']}")]
    for r in res.get("backends_raw", []):
        rows.append((f"raw {r['backend']}, {r['frames']}", f"{r['frames_per_cpu_s']:.1f} frames/CPU-s",
                     f"{r['n']} frames in {r['cpu_s']:.2f} CPU-s"))
    if "loader" in res:
        lo = res["loader"]
        rows.append((f"loader, {lo['workers']} workers", f"{lo['samples_per_s']:.2f} samples/s",
                     f"{lo['frames_per_s']:.0f} frames/s, {lo['tokens_per_s']:.0f} tokens/s, "
                     f"first batch {lo['first_batch_s']:.2f} s"))
    if "resume" in res:
        rs = res["resume"]
        rows.append(("resume at 90% of an epoch", f"{rs['resume_to_first_batch_s']:.2f} s to first batch",
                     f"fresh start {rs['fresh_start_to_first_batch_s']:.2f} s; replay would take "
                     f"{rs['replay_to_same_point_s']:.1f} s"))
    for k in ("ingest_small", "ingest_small_proxy", "ingest_long"):
        if k not in res:
            continue
        r = res[k]
        rows.append((k.replace("_", " "), f"{r['videos_per_s']:.2f} videos/s",
                     f"{r['gb_per_s'] * 1000:.2f} MB/s, {r['video_seconds_per_wall_s']:.1f} s of video per s, {r['workers']} workers"))
    iso = res.get("isolation")
    if iso:
        rows.append(("guarded child vs inline decode", f"{iso['overhead_cpu_ms_per_sample']:+.1f} CPU-ms/sample",
                     f"inline {iso['inline']['cpu_ms_per_sample']:.1f}, guarded "
                     f"{iso['process']['cpu_ms_per_sample']:.1f} CPU-ms per small sample "
                     f"(wall {iso['overhead_ms_per_sample']:+.1f} ms)"))
    for im in res.get("images", []):
        rows += [(f"images {im['source'].split()[0]}: raw Pillow", f"{im['raw_images_per_cpu_s']:.1f} images/CPU-s",
                  f"{im['n']} {im['source']} ({im['mean_bytes'] / 1e6:.2f} MB) -> {im['planned']}, {im['tokens_per_image']} tokens"),
                 (f"images {im['source'].split()[0]}: our decode", f"{im['ours_images_per_cpu_s']:.1f} images/CPU-s",
                  f"ratio per core {im['ratio_per_core']:.2f}; counters ok {im['counters_ok']}"),
                 (f"images {im['source'].split()[0]}: loader, {im['loader_workers']} workers", f"{im['loader_images_per_s']:.1f} images/s",
                  f"guarded child; first batch {im['loader_first_batch_s']:.2f} s; decoding in the worker "
                  f"{im['loader_inline_images_per_s']:.1f} images/s (ratio {im['guard_ratio']:.2f})")]
    sc = res.get("scenes")
    if sc:
        for pr in sc["probe"]:
            rows.append((f"ingest probe, scene search, {pr['video']}", f"{pr['ratio']:.3f}x CPU",
                         f"{pr['cpu_s_with']:.2f} vs {pr['cpu_s_without']:.2f} CPU-s, {pr['frames']} frames, "
                         f"{pr['examined']} examined, {pr['changes']} changes"))
        for lo in sc["loader"]:
            rows.append((f"slow/fast, 720p still scenes, ratio {lo['fast_frame_ratio']}",
                         f"{lo['cpu_s_per_sample']:.2f} CPU-s/sample",
                         f"{lo['frames']} frames ({lo['fast']} fast), slow {lo['slow_size']} {lo['slow_tokens']} tok, "
                         f"fast {lo['fast_size']} {lo['fast_tokens']} tok; {lo['visual_tokens']} of {lo['budget']} tokens"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"\n{'measurement':<{w0}}  {'result':<{w1}}  notes")
    print("-" * (w0 + w1 + 60))
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {a.out} ({res['total_seconds']:.0f} s)")
    if not a.keep and a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
