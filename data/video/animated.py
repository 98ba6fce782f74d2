"""Animated GIF and WebP (TGIF-style data sets, web clips) as videos: converted once at ingest to an MP4 the decoders
all read.

None of the decoders reads them as they are: decord cannot open a GIF ("Failed to measure duration/frame-count"),
the FFmpeg of PyAV 18 and of decord has no decoder for animated WebP ("image data not found"), and FFmpeg's GIF
decoder paints a frame disposed to the background with the file's background colour, opaque, where browsers and
Pillow leave it transparent (up to 126 levels off in a test GIF). Pillow decodes both (disposal, palettes,
transparency), so ingest (`probe.inspect_video`, in its guarded child) writes each frame as Pillow shows it,
composited onto white (as `images.py` does for a still image, and as transformers' image processors do), into an
H.264 4:4:4 MP4 coded losslessly (qp 0: only the RGB -> YUV rounding, a level or two), at the GIF's or WebP's own
frame times: frame i starts at the sum of the durations before it, in milliseconds, and the last one lasts its own
duration. A frame of 10 ms or less (0 in most such files: "as fast as possible") is shown for 100 ms, as browsers
do (FFmpeg's GIF reader too). The loop count is ignored: the video is one pass. A file of one frame is a still
image, not a video: it is rejected (`still_image`); name it in a record's `image` field to train on it as an image.
"""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

MIN_FRAME_MS = 11           # a frame shorter than this is shown DEFAULT_FRAME_MS, as browsers do
DEFAULT_FRAME_MS = 100
BACKGROUND = (255, 255, 255)


def animated_kind(path: str) -> str | None:
    """"gif" or "webp" when the file is one (by its first bytes, whatever its name), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


class AnimatedError(Exception):
    """A file this module cannot convert, by ingest's reject reason (`still_image`, `too_large`, `decode_error`);
    `probe.inspect_video` reports it as a ProbeError of that reason (this module imports nothing of probe's)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def frame_ms(duration) -> int:
    """A frame's display time in ms from the duration the file gives (None, 0 or up to 10 ms: 100 ms)."""
    d = int(round(float(duration or 0)))
    return d if d >= MIN_FRAME_MS else DEFAULT_FRAME_MS


def convert_animated(path: str, dst: str) -> dict:
    """Write the animation in `path` to `dst` (MP4, see the module docstring); returns {"format", "num_frames",
    "duration_ms", "loop"}. Raises AnimatedError: `still_image` (one frame), `too_large`, `decode_error`."""
    from PIL import Image

    from .images import MAX_PIXELS

    name = os.path.basename(path)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise AnimatedError("too_large", f"{name}: {e}") from None
    except Exception as e:
        raise AnimatedError("decode_error", f"{name}: {type(e).__name__}: {str(e)[:300]}") from None
    with img:
        return _convert(img, name, dst)


def _convert(img, name: str, dst: str) -> dict:
    import av
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
        raise AnimatedError("still_image", f"{name}: a {fmt} of one frame is a still image, not a video: name it in "
                                           f"a record's 'image' field to train on it as an image")
    white = Image.new("RGBA", (w, h), BACKGROUND + (255,))
    container = av.open(dst, "w")
    try:
        st = container.add_stream("libx264", rate=Fraction(10))
        st.width, st.height, st.pix_fmt = w, h, "yuv444p"
        st.codec_context.time_base = st.time_base = Fraction(1, 1000)
        st.codec_context.thread_count = 1
        st.options = {"qp": "0", "preset": "veryfast", "g": "30", "bf": "0"}
        t, ms_at = 0, {}

        def mux(packets) -> None:
            for p in packets:
                p.duration = ms_at[p.pts]          # the last frame keeps its own duration in the MP4
                container.mux(p)

        for i in range(n):
            try:
                img.seek(i)
                img.load()
                rgb = Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
            except Exception as e:
                raise AnimatedError("decode_error", f"{name}: frame {i} of {n}: {type(e).__name__}: "
                                                    f"{str(e)[:300]}") from None
            d = frame_ms(img.info.get("duration"))
            fr = av.VideoFrame.from_ndarray(np.asarray(rgb, dtype=np.uint8), format="rgb24")
            fr.pts, fr.time_base = t, Fraction(1, 1000)
            ms_at[t] = d
            mux(st.encode(fr))
            t += d
        mux(st.encode())
    except BaseException:
        container.close()
        if os.path.exists(dst):
            os.unlink(dst)
        raise
    container.close()
    return {"format": fmt.lower(), "num_frames": n, "duration_ms": t, "loop": img.info.get("loop")}
