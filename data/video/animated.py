"""Animated GIF, WebP, PNG (APNG) and AVIF (TGIF-style data sets, web clips, stickers) as videos: converted once at
ingest to an MP4 the decoders all read.

None of the decoders reads them as training needs: decord cannot open a GIF ("Failed to measure duration/frame-count"),
the FFmpeg of PyAV 18 and of decord has no decoder for animated WebP ("image data not found"), FFmpeg's GIF decoder
paints a frame disposed to the background with the file's background colour, opaque, where browsers and Pillow leave
it transparent (up to 126 levels off in a test GIF), FFmpeg gives APNG and AVIF frames with an alpha channel that the
backends' RGB conversion drops (the colour stored under transparent pixels shows), and decord has no AV1 decoder for
AVIF. So ingest (`probe.inspect_video`, in its guarded child) writes each frame composited onto white (as `images.py`
does for a still image, and as transformers' image processors do) into an H.264 4:4:4 MP4 coded losslessly (qp 0:
only the RGB -> YUV rounding, a level or two), at the file's own frame times: frame i starts at the sum of the
durations before it (each start rounded to the millisecond, so fractional APNG or AVIF delays do not drift), and the
last one lasts its own duration. A frame of 10 ms or less (0 in most such files: "as fast as possible") is shown for
100 ms, as browsers do (FFmpeg's GIF reader too). The loop count is ignored: the video is one pass. A file of one
frame is a still image, not a video: it is rejected (`still_image`); name it in a record's `image` field to train on
it as an image.

Who decodes the frames: Pillow for GIF, WebP and AVIF (disposal, palettes, transparency; AVIF through its AVIF plugin,
Pillow >= 11.3); FFmpeg's APNG decoder (PyAV) for APNG, with the delays read from the file's fcTL chunks. Pillow 13
composites APNG frames wrongly: a frame blended over (APNG_BLEND_OP_OVER) with partly transparent pixels leaves the
result partly transparent where the frame under it was opaque, a frame disposed to the previous one
(APNG_DISPOSE_OP_PREVIOUS) after an OVER frame restores the blended frame instead of the one before it (up to 253
levels off), and a default image that is not part of the animation (a still for viewers without APNG) comes out as
frame 0, where browsers and FFmpeg start with the first fcTL frame.
"""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

MIN_FRAME_MS = 11           # a frame shorter than this is shown DEFAULT_FRAME_MS, as browsers do
DEFAULT_FRAME_MS = 100
BACKGROUND = (255, 255, 255)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AVIF_BRANDS = (b"avif", b"avis")    # ftyp brands of an AVIF still ("avif") and image sequence ("avis")
_MAX_HEAD_CHUNKS = 4096             # chunks looked at before a PNG's image data for its acTL (`looks_animated`)


def _ftyp_brands(head: bytes) -> list[bytes]:
    """The major and compatible brands of the ftyp box that an ISO-BMFF file (MP4, AVIF) starts with, else []."""
    if len(head) < 16 or head[4:8] != b"ftyp":
        return []
    end = min(len(head), max(16, int.from_bytes(head[:4], "big")))
    return [head[8:12]] + [head[i:i + 4] for i in range(16, end - 3, 4)]


def animated_kind(path: str) -> str | None:
    """"gif", "webp", "png" or "avif" when the file is one (by its first bytes, whatever its name), else None. Each
    may hold one frame (a PNG mostly does): `convert_animated` rejects that as `still_image`."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:8] == PNG_SIGNATURE:
        return "png"
    if any(b in AVIF_BRANDS for b in _ftyp_brands(head)):
        return "avif"
    return None


def _png_chunks(f):
    """(type, data length, offset of the data) of each chunk of the open PNG file `f`, in order, to the file's end."""
    f.seek(len(PNG_SIGNATURE))
    while True:
        head = f.read(8)
        if len(head) < 8:
            return
        pos = f.tell()
        yield head[4:], int.from_bytes(head[:4], "big"), pos
        f.seek(pos + int.from_bytes(head[:4], "big") + 4)      # the data and its CRC


def looks_animated(path: str) -> bool:
    """Whether a PNG or AVIF file is an animation, by its header alone (the folder listing asks this of every .png
    and .avif, which are mostly still images): a PNG whose acTL chunk, before its image data, announces 2 or more
    frames (APNG), or an AVIF whose ftyp box names an image sequence ("avis"). False for any other file."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
            if b"avis" in _ftyp_brands(head):
                return True
            if head[:8] != PNG_SIGNATURE:
                return False
            for i, (ctype, _, pos) in enumerate(_png_chunks(f)):
                if ctype == b"acTL":
                    f.seek(pos)
                    return int.from_bytes(f.read(4), "big") >= 2
                if ctype in (b"IDAT", b"IEND") or i >= _MAX_HEAD_CHUNKS:
                    return False
    except OSError:
        return False
    return False


class AnimatedError(Exception):
    """A file this module cannot convert, by ingest's reject reason (`still_image`, `too_large`, `decode_error`,
    `truncated`); `probe.inspect_video` reports it as a ProbeError of that reason (this module imports nothing of
    probe's)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def frame_ms(duration) -> Fraction:
    """A frame's display time in ms from the duration the file gives (None, 0 or under 11 ms: 100 ms)."""
    d = Fraction(duration or 0)
    return d if d >= MIN_FRAME_MS else Fraction(DEFAULT_FRAME_MS)


def convert_animated(path: str, dst: str) -> dict:
    """Write the animation in `path` to `dst` (MP4, see the module docstring); returns {"format", "num_frames",
    "duration_ms", "loop"}. Raises AnimatedError: `still_image` (one frame), `too_large`, `decode_error`,
    `truncated` (an APNG whose frames end before its fcTL chunks do)."""
    from PIL import Image, features

    from .images import MAX_PIXELS

    name = os.path.basename(path)
    kind = animated_kind(path)
    if kind == "png":
        return _convert_apng(path, name, dst)
    if kind == "avif" and not features.check("avif"):
        raise AnimatedError("decode_error", f"{name}: an AVIF, and this Pillow ({features.version('pil')}) has no AVIF "
                                            f"support: install Pillow >= 11.3 (its wheels read AVIF)")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise AnimatedError("too_large", f"{name}: {e}") from None
    except Exception as e:
        raise AnimatedError("decode_error", f"{name}: {type(e).__name__}: {str(e)[:300]}") from None
    with img:
        return _convert(img, name, dst)


def _still(name: str, fmt: str) -> AnimatedError:
    article = "an" if fmt[:1] in "AEIOU" else "a"
    return AnimatedError("still_image", f"{name}: {article} {fmt} of one frame is a still image, not a video: name it "
                                        f"in a record's 'image' field to train on it as an image")


def _convert(img, name: str, dst: str) -> dict:
    """A GIF, WebP or AVIF that Pillow opened: its frames as Pillow shows them."""
    from PIL import Image

    from .images import MAX_PIXELS

    try:
        fmt = img.format
        n = int(getattr(img, "n_frames", 1))
        w, h = img.size
    except Exception as e:
        raise AnimatedError("decode_error", f"{name}: {type(e).__name__}: {str(e)[:300]}") from None
    if w * h > MAX_PIXELS:
        raise AnimatedError("too_large", f"{name}: {w}x{h} pixels, over {MAX_PIXELS}")
    if n < 2:
        raise _still(name, fmt)
    white = Image.new("RGBA", (w, h), BACKGROUND + (255,))

    def frames():
        before = None       # an AVIF's frame before, with its start (ms): it lasts until this frame's start
        for i in range(n):
            try:
                img.seek(i)
                img.load()
                rgb = np.asarray(Image.alpha_composite(white, img.convert("RGBA")).convert("RGB"), dtype=np.uint8)
            except Exception as e:
                raise AnimatedError("decode_error", f"{name}: frame {i} of {n}: {type(e).__name__}: "
                                                    f"{str(e)[:300]}") from None
            start = img.info.get("timestamp") if fmt == "AVIF" else None
            if start is None:
                yield rgb, img.info.get("duration")
                continue
            # AVIF: Pillow rounds each frame's start and duration to the millisecond; the durations taken from the
            # starts add up to the file's times (30 fps: 33, 33, 34, ...), where the rounded durations drift 1%
            if before is not None:
                yield before[0], start - before[1]
            before = (rgb, start, img.info.get("duration"))
        if before is not None:
            yield before[0], before[2]

    num, ms = _write_mp4(frames(), w, h, dst)
    return {"format": fmt.lower(), "num_frames": num, "duration_ms": ms, "loop": img.info.get("loop")}


def _apng_header(path: str, name: str) -> tuple[int, int, list[Fraction], int, int | None]:
    """(width, height, each animation frame's delay in ms, the number of frames announced, loop count) of a PNG from
    its chunks: IHDR, acTL (the frames and loop count; none: a still PNG, no frames) and each frame's fcTL
    (delay_num / delay_den s; a denominator of 0 means 100, as the APNG specification says). A default image that is
    not part of the animation has no fcTL of its own."""
    w = h = announced = 0
    delays: list[Fraction] = []
    loop = None
    try:
        with open(path, "rb") as f:
            for ctype, length, pos in _png_chunks(f):
                if ctype in (b"IHDR", b"acTL", b"fcTL"):
                    f.seek(pos)
                    data = f.read(length)
                    if ctype == b"IHDR" and len(data) >= 8:
                        w, h = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big")
                    elif ctype == b"acTL" and len(data) >= 8:
                        announced, loop = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big")
                    elif ctype == b"fcTL" and len(data) >= 26 and loop is not None:
                        num, den = int.from_bytes(data[20:22], "big"), int.from_bytes(data[22:24], "big")
                        delays.append(Fraction(1000 * num, den or 100))
                elif ctype == b"IEND":
                    break
    except OSError as e:
        raise AnimatedError("decode_error", f"{name}: {type(e).__name__}: {str(e)[:300]}") from None
    return w, h, delays, announced, loop


def _convert_apng(path: str, name: str, dst: str) -> dict:
    """A PNG: its animation frames as FFmpeg's APNG decoder composes them (dispose and blend operations), at the
    delays of its fcTL chunks (module docstring: Pillow 13 composes them wrongly)."""
    import av
    from PIL import Image

    from .images import MAX_PIXELS

    w, h, delays, announced, loop = _apng_header(path, name)
    if w * h > MAX_PIXELS:
        raise AnimatedError("too_large", f"{name}: {w}x{h} pixels, over {MAX_PIXELS}")
    if len(delays) < announced:
        raise AnimatedError("truncated", f"{name}: holds {len(delays)} of the {announced} frames its acTL chunk "
                                         f"announces")
    if len(delays) < 2:
        raise _still(name, "PNG")
    white = Image.new("RGBA", (w, h), BACKGROUND + (255,))

    def frames():
        i = 0
        try:
            with av.open(path, format="apng") as c:
                st = c.streams.video[0]
                st.codec_context.thread_count = 1
                for fr in c.decode(st):
                    if i == len(delays) or (fr.width, fr.height) != (w, h):
                        raise AnimatedError("decode_error", f"{name}: frame {i} ({fr.width}x{fr.height}) is not one "
                                                            f"of the {len(delays)} {w}x{h} frames its chunks announce")
                    rgba = Image.fromarray(fr.to_ndarray(format="rgba"), "RGBA")
                    yield np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8), delays[i]
                    i += 1
        except av.error.PatchWelcomeError:
            # FFmpeg 8 blends 8-bit pictures and 16-bit ones without alpha only
            raise AnimatedError("decode_error", f"{name}: frame {i} of {len(delays)} is blended over the one before "
                                                f"it, which FFmpeg's APNG decoder cannot do with 16-bit samples and "
                                                f"alpha: store the APNG with 8 bits per sample") from None
        except (av.error.FFmpegError, IndexError, ValueError) as e:
            raise AnimatedError("decode_error", f"{name}: frame {i} of {len(delays)}: {type(e).__name__}: "
                                                f"{str(e)[:300]}") from None
        if i < len(delays):
            raise AnimatedError("truncated", f"{name}: decoded {i} of the {len(delays)} frames its fcTL chunks "
                                             f"announce")

    num, ms = _write_mp4(frames(), w, h, dst)
    return {"format": "apng", "num_frames": num, "duration_ms": ms, "loop": loop}


def _write_mp4(frames, w: int, h: int, dst: str) -> tuple[int, int]:
    """Encode `frames`, (RGB uint8 [h, w, 3], the duration the file gives it), into the MP4 `dst` (module docstring);
    returns (frames written, total ms). `dst` is removed when anything fails."""
    import av

    container = av.open(dst, "w")
    try:
        st = container.add_stream("libx264", rate=Fraction(10))
        st.width, st.height, st.pix_fmt = w, h, "yuv444p"
        st.codec_context.time_base = st.time_base = Fraction(1, 1000)
        st.codec_context.thread_count = 1
        st.options = {"qp": "0", "preset": "veryfast", "g": "30", "bf": "0"}
        t, n, ms_at = Fraction(0), 0, {}

        def mux(packets) -> None:
            for p in packets:
                p.duration = ms_at[p.pts]          # the last frame keeps its own duration in the MP4
                container.mux(p)

        for rgb, duration in frames:
            d = frame_ms(duration)
            pts = round(t)
            ms_at[pts] = round(t + d) - pts
            fr = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            fr.pts, fr.time_base = pts, Fraction(1, 1000)
            mux(st.encode(fr))
            t += d
            n += 1
        mux(st.encode())
    except BaseException:
        container.close()
        if os.path.exists(dst):
            os.unlink(dst)
        raise
    container.close()
    return n, round(t)
