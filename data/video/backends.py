"""Frame decoders behind one small interface: `decode_frames(backend, request) -> uint8 [k, H, W, 3]`.

All backends decode from a file path (decord crashes on truncated in-memory mp4s), with
`threads` decoder threads (1 per DataLoader worker by default), straight to the reduced display size
(`height` x `width`, after the rotation matrix), and always return exactly the frames asked for or
raise `DecodeError` — the number of frames actually decoded is checked, never trusted.

- pyav (default; measured faster than decord here): seeks to the keyframe before each wanted frame
  using the verified pts/keyframe tables from the ingest metadata and identifies decoded frames by
  pts (frame-accurate on VFR and B-frames).
- decord: `VideoReader(width=, height=)` scales inside the decoder and applies rotation (a mirror in the display
  matrix is applied here, `decord_mirror_axis`); files whose decord seeking was found wrong at ingest
  (`decord_seek_ok: false`), and output widths decord fails at (`DECORD_BAD_WIDTHS`), go to PyAV.
- torchcodec (optional, 0.13 with CPU torch): exact-seek mode, frames asked by index; mirrored files go to PyAV.

Every backend shows the frames as the ffmpeg CLI does: turned and mirrored by the stream's display matrix
(`display_transform`: `rotation`, `hflip` in the metadata).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .timeline import decode_runs, frame_pts

BACKENDS = ("decord", "pyav", "torchcodec")
DECORD_BAD_WIDTHS = frozenset({1, 2, 3, 4, 6, 8, 12, 16, 24, 48, 72})
"""Output widths at which decord 0.6.0's `get_batch` fails on every file, at any height, turned or not ("Check failed:
from_size == to_size (6144 vs. 4608) DECORDArrayCopyFromTo: The size must exactly match" at 48 x 32): all such widths
among 1 to 2048 asked of H.264 files of 96 x 64 and 640 x 360 (with more than one decoder thread only 16, 24, 48 and
72 fail). Frame sides are multiples of data.video.patch_size x merge_size: 28 (14 x 2) and 32 never meet them, but 24
(12 x 2) or 48 (16 x 3, 24 x 2) do, and a portrait video's narrow frames did. The decord backend gives such a request
to PyAV rather than fail the sample."""


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodeRequest:
    path: str
    indices: list[int]            # sorted, unique frame indices (presentation order)
    height: int                   # output size, display orientation
    width: int
    meta: dict = field(default_factory=dict)   # the verified "video" metadata from ingest
    threads: int = 1
    layout: str = "hwc"           # "hwc": [k, H, W, 3]; "chw": [k, 3, H, W] (planar, cheaper to patchify)
    fast: list[bool] | None = None
    """Slow and fast frames: per index, True = this frame at (fast_height, fast_width). Any True: the result is
    one flat uint8 array of the frames in index order, each at its own size (`frame_views` reads it)."""
    fast_height: int = 0
    fast_width: int = 0


def frame_sizes(req: DecodeRequest) -> list[tuple[int, int]]:
    """(height, width) of each requested frame."""
    if not req.fast or not any(req.fast):
        return [(req.height, req.width)] * len(req.indices)
    return [(req.fast_height, req.fast_width) if f else (req.height, req.width) for f in req.fast]


def frame_views(buf: np.ndarray, sizes: list[tuple[int, int]], layout: str) -> list[np.ndarray]:
    """Views of each frame ([3, h, w] for "chw", [h, w, 3] for "hwc") in a flat buffer of frames of their own
    sizes, in order."""
    views, off = [], 0
    for h, w in sizes:
        n = 3 * h * w
        views.append(buf[off:off + n].reshape((3, h, w) if layout == "chw" else (h, w, 3)))
        off += n
    return views


def shrink_planar(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [k, 3, H, W] -> uint8 [k, 3, height, width] by area averaging: output pixel (i, j) is the mean of
    input rows floor(i H / height) .. ceil((i + 1) H / height) and the columns likewise (torch's "area" mode, from
    an integral image), so shrinking does not alias. How a fast frame is made from a slow-size one."""
    k, c, H, W = frames.shape
    s = np.zeros((k, c, H + 1, W + 1), np.float64)
    s[:, :, 1:, 1:] = frames.astype(np.float64).cumsum(2).cumsum(3)
    i, j = np.arange(height), np.arange(width)
    r0, r1 = (i * H) // height, -((-(i + 1) * H) // height)
    c0, c1 = (j * W) // width, -((-(j + 1) * W) // width)
    box = (s[:, :, r1][:, :, :, c1] - s[:, :, r0][:, :, :, c1] - s[:, :, r1][:, :, :, c0] + s[:, :, r0][:, :, :, c0])
    mean = box / ((r1 - r0)[:, None] * (c1 - c0)[None, :])
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def _shrink_fast(req: DecodeRequest, full: np.ndarray) -> np.ndarray:
    """Frames decoded at the slow size [k, ...] -> the flat buffer of a request with fast frames, each fast
    frame shrunk to its size (`shrink_planar`): for the backends that decode at one size only."""
    sizes = frame_sizes(req)
    buf = np.empty(sum(3 * h * w for h, w in sizes), np.uint8)
    for j, (v, (h, w)) in enumerate(zip(frame_views(buf, sizes, req.layout), sizes)):
        if (h, w) == (req.height, req.width):
            v[...] = full[j]
            continue
        planar = full[j:j + 1] if req.layout == "chw" else full[j:j + 1].transpose(0, 3, 1, 2)
        small = shrink_planar(planar, h, w)[0]
        v[...] = small if req.layout == "chw" else small.transpose(1, 2, 0)
    return buf


def _check(req: DecodeRequest, arr: np.ndarray, backend: str, layout: str = "hwc") -> np.ndarray:
    """Count and shape check; converts to the requested layout (backends return `layout`). A request with fast
    frames: `arr` is its flat buffer (from decode_pyav) or [k, ...] at the slow size (shrunk here)."""
    if req.fast and any(req.fast):
        if arr.ndim == 4:
            return _shrink_fast(req, _check(dataclasses.replace(req, fast=None), arr, backend, layout))
        want_n = sum(3 * h * w for h, w in frame_sizes(req))
        if arr.shape != (want_n,) or arr.dtype != np.uint8:
            raise DecodeError("bad_shape", f"{backend} returned {arr.shape} {arr.dtype}, expected ({want_n},) uint8")
        return arr
    if layout != req.layout and arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2) if req.layout == "chw" else arr.transpose(0, 2, 3, 1)
    want = ((len(req.indices), req.height, req.width, 3) if req.layout == "hwc"
            else (len(req.indices), 3, req.height, req.width))
    if arr.shape[0] != want[0]:
        raise DecodeError("short_decode", f"{backend} decoded {arr.shape[0]} of {want[0]} frames")
    if tuple(arr.shape) != want:
        raise DecodeError("bad_shape", f"{backend} returned {tuple(arr.shape)}, expected {want}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def display_transform(matrix) -> tuple[int, bool]:
    """(rotation, hflip) of a stream's display matrix (FFmpeg's 9 int32 of `AV_FRAME_DATA_DISPLAYMATRIX`, or None):
    the picture is shown turned `rotation` degrees counter-clockwise, then mirrored left-right when `hflip`. The
    cases are the ffmpeg CLI's autorotate (fftools: `transpose` clock / cclock / cclock_flip / clock_flip, `hflip`,
    `vflip` chosen from the matrix's angle and signs), written as a turn and a mirror; any of the 8 turns and flips of
    a picture is one of them. Another angle than a quarter turn is returned as it is, with hflip False (ffmpeg turns
    the picture by it; ingest rejects it as unsupported_rotation). A singular matrix, as ffmpeg, does nothing."""
    if matrix is None:
        return 0, False
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    s0, s1 = math.hypot(a, c), math.hypot(b, d)
    if s0 == 0.0 or s1 == 0.0:
        return 0, False
    theta = round(math.degrees(math.atan2(b / s1, a / s0)))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:             # transpose=cclock_flip (the transpose) when matrix[3] > 0, else clock
        return 270, c > 0
    if abs(theta - 270) < 1:            # transpose=clock_flip when matrix[3] < 0, else cclock
        return 90, c < 0
    if abs(theta - 180) < 1 or abs(theta) < 1:
        h, v = abs(theta - 180) < 1 and a < 0, d < 0        # hflip (180 only) and vflip filters
        return (180 if v else 0), h != v
    return int(theta) % 360, False


def frame_display_matrix(frame) -> list[int] | None:
    """The display matrix a decoded PyAV frame carries (its stream's), or None."""
    import av

    # a Mapping of side data by type: PyAV 18.1.1 iterates over its keys, 18.1.0 over its values
    sd = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    return None if sd is None else np.frombuffer(bytes(sd), np.int32)[:9].tolist()


def orient(a: np.ndarray, rotation: int, hflip: bool, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Pictures as displayed: `a`'s (row, column) `axes` turned `rotation` degrees counter-clockwise, then mirrored
    left-right when `hflip` (`display_transform`). A view."""
    if rotation % 360:
        a = np.rot90(a, k=(rotation % 360) // 90, axes=axes)
    return np.flip(a, axis=axes[1]) if hflip else a


def decord_mirror_axis(rotation: int, hflip: bool) -> int | None:
    """decord turns a picture by the display matrix's angle (`av_display_rotation_get`) and mirrors nothing: for a
    mirrored matrix its frames are the displayed ones mirrored once more, top-bottom (-3 of [k, h, w, 3]) when the
    display turn is 0 or 180 degrees (that angle reads 180 degrees off), left-right (-2) when it is 90 or 270; None
    when the matrix mirrors nothing. Checked against PyAV on each file at ingest (`check_decord_seeking`)."""
    if not hflip:
        return None
    return -3 if rotation % 180 == 0 else -2


def video_stream(container, index: int | None = None):
    """The video stream of an open PyAV container that ingest measures and training decodes: stream `index` (the one
    ingest chose, `meta["stream_index"]`) when given, else FFmpeg's best video stream (`av_find_best_stream`, the one
    decord, torchcodec and the ffmpeg CLI read) unless that is an attached picture (cover art: one still image stored
    as a video stream), then the first video stream that is not one. None when the file has no video stream, or
    attached pictures only (an audio file with its cover)."""
    if index is not None:
        st = container.streams[index] if 0 <= index < len(container.streams) else None
        return st if st is not None and st.type == "video" else None
    videos = [s for s in container.streams.video if not is_attached_picture(s)]
    if not videos:
        return None
    try:
        best = container.streams.best("video")
    except Exception:
        best = None
    return best if best is not None and not is_attached_picture(best) else videos[0]


def is_attached_picture(stream) -> bool:
    import av

    flag = getattr(getattr(av.stream, "Disposition", None), "attached_pic", 1024)
    # PyAV 17 gives an enum.Flag (no int(): its bits are .value), PyAV 18 an IntFlag
    return bool(_bits(stream.disposition) & _bits(flag))


def _bits(flags) -> int:
    return int(getattr(flags, "value", flags))


def _validate(req: DecodeRequest) -> None:
    if req.layout not in ("hwc", "chw"):
        raise ValueError(f"DecodeRequest.layout = {req.layout!r}: must be 'hwc' or 'chw'")
    if not req.indices:
        raise DecodeError("no_frames_requested")
    if any(b <= a for a, b in zip(req.indices, req.indices[1:])):
        raise DecodeError("bad_request", "indices must be sorted and unique")
    n = req.meta.get("num_frames")
    if n is not None and req.indices[-1] >= n:
        raise DecodeError("bad_request", f"frame {req.indices[-1]} >= verified count {n}")
    if req.fast is not None and len(req.fast) != len(req.indices):
        raise DecodeError("bad_request", f"{len(req.fast)} fast flags for {len(req.indices)} frames")


# ------------------------------------------------------------------------------------------------
def decode_decord(req: DecodeRequest) -> np.ndarray:
    if req.meta.get("decord_seek_ok") is False or req.width in DECORD_BAD_WIDTHS:
        return decode_pyav(req)
    import decord

    try:
        vr = decord.VideoReader(req.path, ctx=decord.cpu(0), width=req.width, height=req.height,
                                num_threads=req.threads)
    except MemoryError:          # not the file's fault: the child's (isolation.py, out_of_memory)
        raise
    except Exception as e:      # decord raises its own DECORDError (a RuntimeError subclass)
        raise DecodeError("open_failed", f"decord: {str(e)[-300:]}") from None
    n = len(vr)
    if req.indices[-1] >= n:
        raise DecodeError("short_video", f"decord sees {n} frames, frame {req.indices[-1]} requested")
    try:
        arr = vr.get_batch(req.indices).asnumpy()
    except MemoryError:          # not the file's fault: the child's (isolation.py, out_of_memory)
        raise
    except Exception as e:
        raise DecodeError("decode_error", f"decord: {str(e)[-300:]}") from None
    finally:
        del vr
    axis = decord_mirror_axis(int(req.meta.get("rotation", 0)), bool(req.meta.get("hflip", False)))
    if axis is not None:
        arr = np.flip(arr, axis=axis)
    return _check(req, arr, "decord")


# ------------------------------------------------------------------------------------------------
def decode_pyav(req: DecodeRequest) -> np.ndarray:
    import av
    from av.video.reformatter import VideoReformatter

    try:
        import av.logging
        av.logging.set_level(av.logging.PANIC)
    except Exception:
        pass
    rot = int(req.meta.get("rotation", 0)) % 360
    hflip = bool(req.meta.get("hflip", False))
    k = len(req.indices)
    planar = req.layout == "chw"
    sizes = frame_sizes(req)
    if len(set(sizes)) == 1:
        out = np.empty((k, 3, req.height, req.width) if planar else (k, req.height, req.width, 3), np.uint8)
        views = out                     # out[j] is frame j's view
    else:                               # slow and fast frames: each scaled by swscale straight to its size
        out = np.empty(sum(3 * h * w for h, w in sizes), np.uint8)
        views = frame_views(out, sizes, req.layout)

    # one swscale context for the whole request: `frame.reformat` makes a new one for every frame, whose filter set-up
    # cost more than the scaling itself (720p -> 616x336: 2.0 vs 1.2 ms a frame); the context sets itself up again
    # where the size changes (slow and fast frames), and the pixels are the same
    scaler = VideoReformatter()

    def convert(fr, j: int) -> np.ndarray:
        h, w = sizes[j]
        dec_w, dec_h = (h, w) if rot in (90, 270) else (w, h)
        if not planar:
            return orient(scaler.reformat(fr, width=dec_w, height=dec_h, format="rgb24").to_ndarray(), rot, hflip)
        # planar RGB straight from swscale ("gbrp": planes G, B, R), rows padded to line_size
        g = scaler.reformat(fr, width=dec_w, height=dec_h, format="gbrp")
        pl = [np.frombuffer(p, np.uint8).reshape(dec_h, p.line_size)[:, :dec_w] for p in g.planes]
        a = np.stack((pl[2], pl[0], pl[1]))
        return orient(a, rot, hflip, axes=(1, 2))

    def open_stream():
        c = av.open(req.path)
        # the stream ingest measured; shards written before it was recorded measured the first video stream
        index = req.meta.get("stream_index")
        s = video_stream(c, index) if index is not None else (c.streams.video[0] if c.streams.video else None)
        if s is None:
            c.close()
            raise DecodeError("no_video_stream", "" if index is None else f"stream {index} is not a video stream")
        s.codec_context.thread_count = req.threads
        if req.threads > 1:
            s.thread_type = "AUTO"
        return c, s

    try:
        container, st = open_stream()
    except DecodeError:
        raise
    except MemoryError:          # not the file's fault: the child's (isolation.py, out_of_memory)
        raise
    except Exception as e:
        raise DecodeError("open_failed", f"pyav: {str(e)[:300]}") from None

    def from_start():
        """Frames from the true start of the stream: the file opened again and decoded without a seek (in MPEG-TS a
        seek to the first frame's pts lands on the next keyframe, past the first GOP)."""
        nonlocal container, st
        container.close()
        container, st = open_stream()
        return container.decode(st)

    try:
        pts = None
        if not req.meta.get("pts_synthesized"):
            pts = frame_pts(req.meta)
        if pts is None or pts.shape[0] < 2:
            _pyav_sequential(container, st, req.indices, views, convert)
            return _check(req, out, "pyav", req.layout)
        keys = decode_runs(req.meta.get("keyframe_runs") or [[0, 0, 1]])

        def index_of(p) -> int | None:
            if p is None:
                return None
            i = int(np.searchsorted(pts, p))
            return i if i < pts.shape[0] and pts[i] == p else None

        frames = None
        cur = -1
        seek_ok = True                           # False once a seek missed its frame: decode on without seeking
        for j, t in enumerate(req.indices):
            found = False
            for attempt in range(2):
                kpos = int(np.searchsorted(keys, t, side="right")) - 1
                kf = int(keys[kpos]) if kpos >= 0 else 0
                if attempt == 1 or not seek_ok:
                    if attempt == 1 or frames is None or t <= cur:
                        frames = from_start()    # fall back: from the true start of the stream
                        cur = -1
                elif frames is None or kf > cur or t <= cur:
                    container.seek(int(pts[kf]), stream=st, backward=True, any_frame=False)
                    frames = container.decode(st)
                    cur = -1
                for fr in frames:
                    i = index_of(fr.pts)
                    if i is None:
                        continue
                    cur = i
                    if i == t:
                        views[j][...] = convert(fr, j)
                        found = True
                        break
                    if i > t:
                        break
                if found:
                    break
                frames = None
                seek_ok = False                  # e.g. landed past frame t (MPEG-TS: on the next keyframe)
            if not found:
                raise DecodeError("missing_frame", f"pyav could not decode frame {t} (have {j} of {k})")
    except DecodeError:
        raise
    except av.error.FFmpegError as e:
        raise DecodeError("decode_error", f"pyav: {str(e)[:300]}") from None
    finally:
        container.close()
    return _check(req, out, "pyav", req.layout)


def _pyav_sequential(container, st, indices, views, convert) -> None:
    want = {t: j for j, t in enumerate(indices)}
    got = 0
    for i, fr in enumerate(container.decode(st)):
        j = want.get(i)
        if j is not None:
            views[j][...] = convert(fr, j)
            got += 1
            if got == len(indices):
                return
    raise DecodeError("short_decode", f"pyav decoded {got} of {len(indices)} wanted frames")


# ------------------------------------------------------------------------------------------------
def torchcodec_available() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401
        return True
    except Exception:
        return False


def decode_torchcodec(req: DecodeRequest) -> np.ndarray:
    if req.meta.get("hflip"):
        # a mirroring display matrix: whether torchcodec 0.13 applies the mirror was not checked (it needs Debian's
        # FFmpeg libraries, absent where this was written); PyAV applies it
        return decode_pyav(req)
    try:
        import torch
        from torchcodec.decoders import VideoDecoder
    except Exception as e:
        raise DecodeError("backend_unavailable", f"torchcodec: {e}") from None
    try:
        dec = VideoDecoder(req.path, stream_index=req.meta.get("stream_index"), seek_mode="exact",
                           num_ffmpeg_threads=req.threads, dimension_order="NHWC")
        n = dec.metadata.num_frames
        if n is not None and req.indices[-1] >= n:
            raise DecodeError("short_video", f"torchcodec sees {n} frames")
        data = dec.get_frames_at(indices=list(req.indices)).data          # [k, h, w, 3] uint8
    except DecodeError:
        raise
    except MemoryError:          # not the file's fault: the child's (isolation.py, out_of_memory)
        raise
    except Exception as e:
        raise DecodeError("decode_error", f"torchcodec: {str(e)[:300]}") from None
    rot = int(req.meta.get("rotation", 0)) % 360
    h, w = data.shape[1], data.shape[2]
    if rot in (90, 270) and (w, h) == (req.meta.get("coded_width"), req.meta.get("coded_height")) \
            and (w, h) != (req.meta.get("width"), req.meta.get("height")):
        data = torch.rot90(data, k=rot // 90, dims=(1, 2))
    x = data.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(req.height, req.width), mode="bilinear",
                                        antialias=True, align_corners=False)
    arr = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return _check(req, arr, "torchcodec")


_DECODERS = {"decord": decode_decord, "pyav": decode_pyav, "torchcodec": decode_torchcodec}


def decode_frames(backend: str, req: DecodeRequest) -> np.ndarray:
    """Decode `req.indices` of `req.path` at (height, width); uint8 [k, H, W, 3] or DecodeError."""
    if backend not in _DECODERS:
        raise ValueError(f"decode backend {backend!r}: must be one of {BACKENDS}")
    _validate(req)
    return _DECODERS[backend](req)
