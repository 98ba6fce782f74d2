"""Synthetic videos with frame-accurate burned-in counters, matching annotations, and bad files.

Every frame carries its own index as a row of black/white cells across the top sixth of the picture
(MSB first, `counter_bits` cells); cells are several pixels wide with full contrast, so the index
survives H.264/MPEG-4 compression and rescaling. `read_counter` reads it back from a decoded frame of
any size, which is how the tests check that "frame i" really is frame i.

`make_synthetic_shards(out_dir, n_videos, seed)` writes videos + annotations and ingests them, so the
tiny recipe and the tests need no downloaded data. `make_bad_videos` writes the broken files the
ingest and decode paths must survive.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from fractions import Fraction
from pathlib import Path

import numpy as np

COUNTER_BAND = 1.0 / 6.0      # fraction of the (displayed) height used by the counter band
log = logging.getLogger(__name__)

SYNTHETIC_SCENE_SIMILARITY = 0.8   # ingest's scene similarity for these clips (make_synthetic_shards says why)
WHITE, BLACK = 235, 16


def counter_bits_for(n_frames: int) -> int:
    return max(8, int(n_frames - 1).bit_length())


@lru_cache(maxsize=16)
def _background(height: int, width: int) -> np.ndarray:
    img = np.empty((height, width, 3), np.uint8)
    yy = np.arange(height)[:, None]
    img[..., 1] = ((yy * 255) // max(1, height - 1)) // 2 + 60
    img[..., 2] = 120
    img[..., 0] = 0
    img.setflags(write=False)
    return img


def draw_frame(index: int, height: int, width: int, *, bits: int, seed: int = 0, scene: tuple[int, int] | None = None
               ) -> np.ndarray:
    """One RGB uint8 frame (display orientation): moving shapes + the binary counter band. `scene` = (j, first
    frame of scene j): the picture is frozen at the scene's first frame, its green raised by 30 * (j % 3) so
    that consecutive scenes differ everywhere; only the counter moves (`VideoSpec.scenes`)."""
    counter = index
    if scene is not None:
        index = scene[1]
    rng_phase = (seed * 2654435761) % 997
    img = _background(height, width).copy()
    if scene is not None:
        img[..., 1] += np.uint8(30 * (scene[0] % 3))
    xg = (np.arange(width) * 255) // max(1, width - 1)
    img[..., 0] = (((xg + index * 3 + rng_phase) % 256) // 2 + 40).astype(np.uint8)[None, :]
    band = max(2, int(round(height * COUNTER_BAND)))
    # a square moving right, a disc moving along a sine
    s = max(2, (height - band) // 3)
    x0 = (index * 2 + rng_phase) % max(1, width - s)
    y0 = band + (height - band - s) // 2
    img[y0:y0 + s, x0:x0 + s] = (220, 40, 40)
    r = max(1, s // 2)
    cx = (width - 1) - (index * 3 + rng_phase) % max(1, width)
    cy = band + r + int((height - band - 2 * r) * (0.5 + 0.5 * math.sin(index / 5.0)))
    ya, yb, xa, xb = max(0, cy - r), min(height, cy + r + 1), max(0, cx - r), min(width, cx + r + 1)
    if ya < yb and xa < xb:
        yy, xx = np.ogrid[ya:yb, xa:xb]
        img[ya:yb, xa:xb][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (40, 60, 220)
    # the counter band
    img[:band] = BLACK
    for b in range(bits):
        if (counter >> (bits - 1 - b)) & 1:
            xa = int(round(b * width / bits))
            xb = int(round((b + 1) * width / bits))
            img[:band, xa:xb] = WHITE
    return img


def read_counter(frame: np.ndarray, bits: int) -> int:
    """Frame index burned into a decoded RGB frame [H, W, 3] (any size, display orientation)."""
    h, w = frame.shape[:2]
    band = h * COUNTER_BAND
    ya, yb = int(band * 0.2), max(int(band * 0.2) + 1, int(band * 0.8))
    luma = frame[ya:yb].astype(np.float32).mean(axis=(0, 2))   # [W]
    value = 0
    for b in range(bits):
        xa = (b + 0.3) * w / bits
        xb = (b + 0.7) * w / bits
        seg = luma[int(xa):max(int(xa) + 1, int(math.ceil(xb)))]
        value = (value << 1) | int(seg.mean() > (WHITE + BLACK) / 2)
    return value


@dataclass
class VideoSpec:
    n_frames: int = 48
    width: int = 96            # display width
    height: int = 64           # display height
    fps: float = 12.0
    codec: str = "libx264"     # or "mpeg4"
    pix_fmt: str = "yuv420p"
    gop: int | None = None     # keyframe interval in frames (None: one second)
    bframes: bool = True
    rotation: int = 0          # display rotation, counter-clockwise degrees (0/90/180/270)
    vfr: bool = False          # variable frame rate: random per-frame durations
    faststart: bool = True     # moov box before the media data
    crf: int = 18
    seed: int = 0
    encoder_threads: int = 1   # 0: the codec's choice (not reproducible under load, see write_video)
    scenes: int = 0            # > 0: that many still scenes of equal length (only the counter moves in one)

    def scene_starts(self) -> list[int]:
        """First frame of each still scene (empty when the picture moves on every frame)."""
        return sorted({j * self.n_frames // self.scenes for j in range(self.scenes)}) if self.scenes else []


def write_video(path: str | os.PathLike, spec: VideoSpec) -> dict:
    """Encode a synthetic video with PyAV; returns the ground truth (frame times, size, bits)."""
    import av

    path = str(path)
    bits = counter_bits_for(spec.n_frames)
    rot = spec.rotation % 360
    if rot not in (0, 90, 180, 270):
        raise ValueError(f"rotation = {spec.rotation}: must be a multiple of 90")
    stored_w, stored_h = (spec.height, spec.width) if rot in (90, 270) else (spec.width, spec.height)
    options = {"movflags": "faststart"} if spec.faststart else {}
    rng = np.random.default_rng(spec.seed)
    container = av.open(path, "w", options=options)
    try:
        rate = Fraction(spec.fps).limit_denominator(1001)
        stream = container.add_stream(spec.codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = stored_w, stored_h, spec.pix_fmt
        gop = spec.gop or max(1, int(round(spec.fps)))
        opts = {"g": str(gop)}
        if spec.codec == "libx264":
            # asm=0: with x264's SIMD routines (the build the PyAV 17 / 18 wheels bundle, FFmpeg 8)
            # the same frames encoded to different bytes, and decoded to different pixels, from run
            # to run (one encoder thread: the same; zeroing the rows' padding bytes: rarer, not
            # gone). With its C routines, and several encoder threads, a run still wrote a different
            # file now and then under load (below). The clips are tiny, so the speed does not matter.
            opts.update({"crf": str(spec.crf), "preset": "veryfast",
                         "bf": "2" if spec.bframes else "0", "keyint_min": str(gop), "sc_threshold": "0",
                         "x264-params": "asm=0"})
        else:
            opts.update({"qscale": "3", "bf": "2" if spec.bframes else "0"})
            stream.codec_context.qscale = 3
        stream.options = opts
        # one encoder thread: with x264's frame threads a run now and then wrote other bytes under load
        # (bench/probe_synthetic_video.py: 6 of 6,300 encodings of one clip in three runs, 0 of 7,800 with one)
        stream.codec_context.thread_count = spec.encoder_threads
        if spec.vfr:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if rot:
            if not hasattr(stream, "set_display_rotation"):
                raise RuntimeError(f"{path}: writing a video rotated {rot} degrees needs PyAV >= 18 "
                                   f"(Stream.set_display_rotation); this is PyAV {av.__version__}")
            stream.set_display_rotation(rot)
        times: list[float] = []
        t_ms = 0
        starts = spec.scene_starts()
        for i in range(spec.n_frames):
            j = int(np.searchsorted(starts, i, side="right")) - 1
            disp = draw_frame(i, spec.height, spec.width, bits=bits, seed=spec.seed,
                              scene=(j, starts[j]) if starts else None)
            stored = np.ascontiguousarray(np.rot90(disp, k=-(rot // 90))) if rot else disp
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            if spec.vfr:
                frame.pts = t_ms
                frame.time_base = Fraction(1, 1000)
                times.append(t_ms / 1000.0)
                t_ms += int(rng.integers(int(500 / spec.fps), int(1500 / spec.fps) + 1))
            else:
                frame.pts = i
                frame.time_base = Fraction(1) / rate
                times.append(i / float(rate))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return {"path": path, "n_frames": spec.n_frames, "width": spec.width, "height": spec.height,
            "fps": spec.fps, "times": times, "counter_bits": bits, "rotation": rot, "scene_starts": spec.scene_starts(),
            "duration": (t_ms / 1000.0) if spec.vfr else spec.n_frames / float(rate)}


def annotation_for(rel_path: str, truth: dict) -> dict:
    """A caption, timestamped events and one QA pair that match a synthetic video."""
    d = truth["duration"]
    events = []
    step = max(0.5, d / 3)
    t = 0.0
    k = 0
    while t < d - 1e-6:
        events.append({"start": round(t, 2), "end": round(min(d, t + step), 2),
                       "text": f"segment {k}: the red square moves right, the blue disc swings"})
        t += step
        k += 1
    return {
        "video": rel_path,
        "caption": (f"A synthetic clip of {truth['n_frames']} frames ({d:.1f} s, "
                    f"{truth['width']}x{truth['height']}) with a frame counter at the top."),
        "events": events,
        "qa": [{"question": "How many frames does the clip have?", "answer": str(truth["n_frames"])}],
        "counter_bits": truth["counter_bits"],
    }


IMAGE_SIZES = ((120, 90), (200, 140), (64, 160), (300, 220))   # (width, height) as displayed
IMAGE_BITS = 10


def image_number(i: int, seed: int = 0) -> int:
    """The number burned into synthetic image i's counter band (distinct per image of one seed)."""
    return (seed * 37 + 101 + 7 * i) % (1 << IMAGE_BITS)


def write_image(path: str | os.PathLike, i: int, seed: int = 0) -> dict:
    """Synthetic image i: `draw_frame` of its number at one of IMAGE_SIZES. Every third is a PNG with an
    alpha channel, every third + 1 a JPEG stored rotated with EXIF orientation 6 (a viewer turns it upright,
    as a phone photo is), the rest plain PNG. Returns its annotation record (relative to `path`'s folder)."""
    from PIL import Image

    w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
    n = image_number(i, seed)
    arr = draw_frame(n, h, w, bits=IMAGE_BITS, seed=seed + i)
    path = Path(path)
    kind = i % 3
    if kind == 1:
        path = path.with_suffix(".jpg")
        exif = Image.Exif()
        exif[0x0112] = 6                       # display = stored turned 90 degrees clockwise
        Image.fromarray(np.ascontiguousarray(np.rot90(arr, 1))).save(path, quality=95, exif=exif)
    else:
        path = path.with_suffix(".png")
        img = Image.fromarray(arr)
        if kind == 2:
            img.putalpha(200)
        img.save(path)
    return {"image": path.name, "caption": f"A synthetic picture numbered {n} ({w}x{h}).",
            "qa": [{"question": "Which number does the picture show?", "answer": str(n)}],
            "counter_bits": IMAGE_BITS, "image_number": n}


def image_set_record(folder: str | os.PathLike, j: int, seed: int = 0) -> dict:
    """Interleaved image-text record j: 2 or 3 synthetic images (numbers of their own, `write_image` of index
    1000 + 3j + k) placed at "<image>" markers of its text, every other one in its QA question instead."""
    n = 2 + j % 2
    recs = [write_image(Path(folder) / f"set_{j:05d}_{k}", 1000 + 3 * j + k, seed) for k in range(n)]
    nums = [r["image_number"] for r in recs]
    out = {"images": [r["image"] for r in recs], "counter_bits": IMAGE_BITS, "image_numbers": nums}
    if j % 2 == 0:
        out["text"] = " ".join(f"Picture {k + 1}: <image> shows {x}." for k, x in enumerate(nums))
    else:
        out["prompt"] = "Look at " + ", ".join("<image>" for _ in nums) + "."
        out["qa"] = [{"question": "Which number is the largest?", "answer": str(max(nums))}]
    return out


def text_record(i: int, seed: int = 0) -> dict:
    """A text-only annotation record (no video) whose content follows from (seed, i): a counting
    passage (`text`), every third one a question with its answer (`qa`) instead."""
    rng = np.random.default_rng([seed, 7919, i])
    a, b = (int(x) for x in rng.integers(1, 50, 2))
    if i % 3 == 2:
        return {"prompt": "Answer with a number.", "qa": [{"question": f"What is {a} plus {b}?",
                                                          "answer": str(a + b)}]}
    start = int(rng.integers(0, 90))
    return {"text": f"Note {i}: {a} plus {b} makes {a + b}. Counting on from {start}: "
                    + ", ".join(str(start + k) for k in range(int(rng.integers(4, 12)))) + "."}


def apart_from(make, n: int, seed: int, held_out_from: tuple[int, int] | None, *, key=lambda item: item,
               unique: bool = False) -> Iterator:
    """`n` items make(i, seed) for i = 0, 1, ..., skipping (the next i taken) those whose key(item) equals that of
    one of a training set's items, make(i, s) for i < count with held_out_from=(s, count), and with `unique` also
    those equal to one taken before: a held-out set that shares nothing with its training set (the synthetic
    questions of two seeds coincide now and then)."""
    avoid = {key(make(i, held_out_from[0])) for i in range(held_out_from[1])} if held_out_from else set()
    i = made = 0
    while made < n:
        item = make(i, seed)
        i += 1
        k = key(item)
        if k in avoid:
            continue
        if unique and held_out_from:
            avoid.add(k)
        made += 1
        yield item


def text_records(n: int, seed: int = 0, *, held_out_from: tuple[int, int] | None = None) -> list[dict]:
    """`n` text-only records: text_record(i, seed) for i = 0, 1, ...; with held_out_from=(seed, count) of a
    training set's records, those equal to one of them or to one taken before are skipped (apart_from), so
    that a held-out set holds `n` samples, none a training sample (one in 100 held-out records of the tiny text
    recipe's was also trained on, and ingest drops a repeat)."""
    return list(apart_from(text_record, n, seed, held_out_from, key=lambda r: json.dumps(r, sort_keys=True),
                           unique=True))


def make_synthetic_videos(out_dir: str | os.PathLike, n_videos: int, seed: int = 0, *,
                          min_seconds: float = 1.5, max_seconds: float = 4.0,
                          sizes=((64, 48), (96, 64), (128, 96), (160, 120), (80, 112)),
                          fps_choices=(8.0, 10.0, 12.0, 15.0), codec: str = "libx264",
                          n_text: int = 0, n_images: int = 0, n_image_sets: int = 0,
                          scenes: int = 0, text_held_out_from: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """Write `n_videos` small videos under out_dir/videos and out_dir/annotations.jsonl, with `n_images`
    images beside them (`write_image`), `n_image_sets` interleaved records of 2-3 images (`image_set_record`)
    and `n_text` text-only records (`text_records`; none equal to one of the training set's that
    text_held_out_from=(seed, count) names) after the videos' records. `scenes` > 0: each video is that
    many still scenes (`VideoSpec.scenes`: slow and fast frames to plan), capped at one per 4 frames."""
    out = Path(out_dir)
    vdir = out / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records, capped = [], []
    for i in range(n_videos):
        w, h = sizes[int(rng.integers(len(sizes)))]
        fps = float(fps_choices[int(rng.integers(len(fps_choices)))])
        seconds = float(rng.uniform(min_seconds, max_seconds))
        n_frames = max(2, int(round(seconds * fps)))
        spec = VideoSpec(n_frames=n_frames, width=w, height=h, fps=fps, codec=codec, seed=seed * 100003 + i,
                         scenes=min(scenes, n_frames // 4))
        rel = f"clip_{i:05d}.mp4"
        if spec.scenes < scenes:
            capped.append((rel, n_frames, spec.scenes))
        truth = write_video(vdir / rel, spec)
        records.append(annotation_for(rel, truth))
    if capped:
        rel, frames, got = capped[0]
        log.warning("synthetic videos: %d still scenes asked (--scenes, data.synthetic_scenes), but a scene takes at "
                    "least 4 frames: %d of %d clips are too short and have fewer (%s: %d frames, %d scenes%s); clips "
                    "of at least %d frames (min_seconds, --min-seconds) hold them all", scenes, len(capped), n_videos,
                    rel, frames, got, f"; fewest {min(c[2] for c in capped)}" if len(capped) > 1 else "", 4 * scenes)
    records += [write_image(vdir / f"img_{i:05d}", i, seed) for i in range(n_images)]
    records += [image_set_record(vdir, j, seed) for j in range(n_image_sets)]
    records += text_records(n_text, seed, held_out_from=text_held_out_from)
    ann = out / "annotations.jsonl"
    with open(ann, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return vdir, ann


def make_synthetic_hf_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 400) -> Path:
    """A small byte-level BPE tokenizer in Hugging Face's format (out_dir/tokenizer.json), trained with the
    `tokenizers` library on the synthetic annotations' text, with Qwen-VL's special tokens added after the
    vocabulary as Qwen's tokenizers hold them. For trying `data.video.tokenizer=<dir>` on the tiny recipes
    (whose vocabulary has 512 ids) without a real checkpoint's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .tokenizer import QWEN_VL_SPECIAL_TOKENS
    truth = {"duration": 3.5, "n_frames": 42, "width": 96, "height": 64, "counter_bits": 6}
    ann = annotation_for("clip.mp4", truth)
    corpus = [ann["caption"], *(e["text"] for e in ann["events"]), ann["qa"][0]["question"],
              "Caption: Events: Q: A: Describe the video.", *(f"<{t / 2:.1f}s>" for t in range(200))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    tok.add_special_tokens(sorted(set(QWEN_VL_SPECIAL_TOKENS.values()) | {"<|im_start|>", "<|im_end|>"}))
    tok.add_tokens(["<think>", "</think>"])   # Qwen3's thinking block: added, not special, as Qwen3's tokenizer has them
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def make_synthetic_shards(out_dir: str | os.PathLike, n_videos: int, seed: int = 0, *,
                          shard_size_mb: float = 0.05, workers: int = 2, proxy: bool = False,
                          **video_kwargs) -> Path:
    """Videos + annotations + ingest in one call; returns the shard directory (out_dir/shards)."""
    from .ingest import IngestOptions, ingest

    out = Path(out_dir)
    vdir, ann = make_synthetic_videos(out, n_videos, seed, **video_kwargs)
    shard_dir = out / "shards"
    # scene similarity 0.8, not the real-video default 0.95: the counter band (the top sixth of the picture,
    # `COUNTER_BAND`) changes on every frame and covers up to 3 of a 16-cell thumbnail's 16 rows (18.75% of the
    # cells), so at 0.95 the counter alone would make every examined frame a scene change
    summary = ingest(IngestOptions(videos=str(vdir), annotations=str(ann), out=str(shard_dir),
                                   shard_size_mb=shard_size_mb, workers=workers, proxy=proxy, progress=False,
                                   scene_similarity=SYNTHETIC_SCENE_SIMILARITY))
    if n_videos and not summary["shards"]:
        # nothing ingested: the run went on to the loader's "no .tar shards found", which named no cause (seen on a
        # GPU machine with PyAV 17, whose stream disposition int() refused: backends.is_attached_picture)
        from .ingest import REJECTS
        first = ""
        with contextlib.suppress(OSError, ValueError, StopIteration):
            first = "; the first: " + next(iter(open(shard_dir / REJECTS, encoding="utf-8"))).strip()[:400]
        raise RuntimeError(f"synthetic videos in {vdir}: ingest accepted none of them (rejected by reason: "
                           f"{summary['rejects_by_reason']}, in {shard_dir / REJECTS}{first})")
    return shard_dir


# ----------------------------------------------------------------------------------------------
# bad files
# ----------------------------------------------------------------------------------------------

def mp4_boxes(data: bytes) -> list[tuple[str, int, int]]:
    """Top-level ISO-BMFF boxes as (type, offset, size)."""
    out, off = [], 0
    while off + 8 <= len(data):
        size = int.from_bytes(data[off:off + 4], "big")
        kind = data[off + 4:off + 8].decode("latin-1")
        if size == 1 and off + 16 <= len(data):
            size = int.from_bytes(data[off + 8:off + 16], "big")
        elif size == 0:
            size = len(data) - off
        if size < 8:
            break
        out.append((kind, off, size))
        off += size
    return out


def make_bad_videos(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, dict]:
    """Broken and unusual files. Returns name -> {path, expect: 'reject'|'accept', ...truth}."""
    import av

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases: dict[str, dict] = {}

    base = out / "_good_base.mp4"
    write_video(base, VideoSpec(n_frames=60, width=96, height=64, fps=12, seed=seed))
    data = base.read_bytes()
    boxes = {k: (o, s) for k, o, s in mp4_boxes(data)}
    moov_off, moov_size = boxes["moov"]
    mdat_off, mdat_size = boxes["mdat"]
    assert moov_off < mdat_off, "faststart layout expected"
    base.unlink()

    def put(name: str, payload: bytes, expect: str, **extra) -> None:
        p = out / name
        p.write_bytes(payload)
        cases[name] = {"path": str(p), "expect": expect, **extra}

    put("zero_byte.mp4", b"", "reject")
    put("truncated_in_header.mp4", data[:moov_off + moov_size // 2], "reject")
    put("truncated_after_header.mp4", data[:mdat_off + 16], "reject")
    put("truncated_in_middle.mp4", data[:mdat_off + mdat_size // 2], "reject")
    garbage = bytearray(data)
    a = mdat_off + mdat_size * 2 // 5
    b = mdat_off + mdat_size * 3 // 5
    garbage[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
    put("garbage_in_middle.mp4", bytes(garbage), "reject")
    put("not_a_video.mp4", b"this is a text file, not a video\n" * 40, "reject")

    # audio only
    p = out / "audio_only.mp4"
    c = av.open(str(p), "w")
    s = c.add_stream("aac", rate=16000)
    for i in range(20):
        fr = av.AudioFrame.from_ndarray(
            (0.1 * np.sin(np.arange(1024) / 10.0)).astype(np.float32)[None], format="fltp", layout="mono")
        fr.sample_rate = 16000
        fr.pts = i * 1024
        for pk in s.encode(fr):
            c.mux(pk)
    for pk in s.encode():
        c.mux(pk)
    c.close()
    cases["audio_only.mp4"] = {"path": str(p), "expect": "reject"}

    for name, spec in [
        ("odd_resolution.mp4", VideoSpec(n_frames=30, width=65, height=49, fps=10, codec="mpeg4", seed=seed + 1)),
        ("variable_frame_rate.mp4", VideoSpec(n_frames=40, width=96, height=64, fps=12, vfr=True, seed=seed + 2)),
        ("rotated_90.mp4", VideoSpec(n_frames=30, width=64, height=96, fps=10, rotation=90, seed=seed + 3)),
        ("no_bframes_mpeg4.mp4", VideoSpec(n_frames=30, width=96, height=64, fps=10, codec="mpeg4",
                                           bframes=False, seed=seed + 4)),
    ]:
        t = write_video(out / name, spec)
        cases[name] = {"path": str(out / name), "expect": "accept", **{k: t[k] for k in
                       ("n_frames", "width", "height", "counter_bits", "rotation", "duration", "times")}}
    return cases
