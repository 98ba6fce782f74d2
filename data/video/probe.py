"""Verify a video by decoding every frame (PyAV), optionally writing a training proxy.

This is what ingest runs, in a guarded child process, for every file. Headers lie, so everything
the training path relies on is measured: the real number of decodable frames and their pts, the
keyframe positions, the displayed size and orientation (the display matrix's turn and mirror, as the ffmpeg CLI
applies them), fps and duration from the pts,
and whether decord's seeking returns the frame it was asked for on this very file (it does not on
some MPEG-4 Part 2 files with B-frames; such files are then decoded with PyAV at training time).

The stream measured is FFmpeg's best video stream (the one decord, torchcodec and the ffmpeg CLI read), never an
attached picture (cover art); its index is recorded for the decoders.

A file is rejected (`ProbeError(reason, detail)`) when it cannot be opened, has no video stream (attached pictures
alone are none), raises a decode error, has corrupt frames, decodes to no frames, decodes clearly fewer frames than
its header promises and spans clearly less than its duration (truncated), or changes resolution mid-stream.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .backends import decord_mirror_axis, display_transform, frame_display_matrix, is_attached_picture, orient, \
    video_stream
from .scenes import SceneDetector, SceneSpec
from .timeline import encode_pts, encode_runs

THUMB = 8            # side of the grey thumbnails used to check decord's seeking
SEEK_CHECKS = 12     # frames asked from decord at ingest


class ProbeError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ProxySpec:
    fps: float = 2.0
    short_side: int = 448
    keyframe_s: float = 1.0
    codec: str = "libx264"
    crf: int = 23


def _quiet_av() -> None:
    try:
        import av.logging
        av.logging.set_level(av.logging.PANIC)
    except Exception:
        pass


def _span_s(pts: list, last_duration: int | None, tb: Fraction) -> float:
    """Seconds the decoded frames span by their pts: first to last, plus the last one's duration (else the mean
    interval); 0.0 without two pts."""
    known = [p for p in pts if p is not None]
    if len(known) < 2:
        return 0.0
    lo, hi = min(known), max(known)
    return float((hi - lo + (last_duration or (hi - lo) / (len(known) - 1))) * tb)


def _display_size(w: int, h: int, rotation: int) -> tuple[int, int]:
    return (h, w) if rotation % 180 == 90 else (w, h)


class _ProxyWriter:
    """Re-encodes a stream at a fixed low fps / size while the probe decodes it."""

    def __init__(self, dst: str, spec: ProxySpec) -> None:
        self.dst, self.spec = dst, spec
        self.container = None
        self.k = 0                       # next proxy frame index
        self.prev = None                 # (time, VideoFrame) last source frame seen

    def _open(self, frame, rotation: int, hflip: bool) -> None:
        import av

        dw, dh = _display_size(frame.width, frame.height, rotation)
        scale = min(1.0, self.spec.short_side / max(1, min(dw, dh)))
        self.out_w = max(2, int(dw * scale) // 2 * 2)
        self.out_h = max(2, int(dh * scale) // 2 * 2)
        self.rotation, self.hflip = rotation, hflip
        # decode size in stored orientation
        self.dec_w, self.dec_h = _display_size(self.out_w, self.out_h, rotation)
        self.container = av.open(self.dst, "w", options={"movflags": "faststart"})
        rate = Fraction(self.spec.fps).limit_denominator(1000)
        self.stream = self.container.add_stream(self.spec.codec, rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.out_w, self.out_h, "yuv420p"
        gop = max(1, int(round(self.spec.keyframe_s * self.spec.fps)))
        opts = {"g": str(gop), "keyint_min": str(gop)}
        if self.spec.codec == "libx264":
            opts.update({"crf": str(self.spec.crf), "preset": "veryfast", "sc_threshold": "0", "bf": "0",
                         "threads": "1"})
        self.stream.options = opts
        self.rate = rate

    def _emit(self, frame) -> None:
        import av

        arr = frame.to_ndarray(width=self.dec_w, height=self.dec_h, format="rgb24")
        arr = np.ascontiguousarray(orient(arr, self.rotation, self.hflip))
        out = av.VideoFrame.from_ndarray(arr, format="rgb24")
        out.pts = self.k
        out.time_base = 1 / self.rate
        for p in self.stream.encode(out):
            self.container.mux(p)
        self.k += 1

    def add(self, t: float, frame, rotation: int, hflip: bool = False) -> None:
        if self.container is None:
            self._open(frame, rotation, hflip)
        if self.prev is not None:
            # proxy frames whose time falls before this frame show the previous source frame
            while self.k / self.spec.fps < t - 1e-9:
                self._emit(self.prev[1])
        self.prev = (t, frame)

    def close(self, duration: float) -> None:
        if self.container is None:
            return
        while self.prev is not None and self.k / self.spec.fps < duration - 1e-9:
            self._emit(self.prev[1])
        if self.k == 0 and self.prev is not None:
            self._emit(self.prev[1])
        for p in self.stream.encode():
            self.container.mux(p)
        self.container.close()
        self.container = None

    def abort(self) -> None:
        try:
            if self.container is not None:
                self.container.close()
        except Exception:
            pass
        self.container = None


def probe_video(path: str, *, proxy: ProxySpec | None = None, proxy_path: str | None = None,
                threads: int = 1, keep_thumbs: bool = False,
                truncation_tolerance: float = 0.05, scenes: SceneSpec | None = None) -> dict:
    """Decode every frame of `path`; return the verified metadata dict (see docs/data.md).

    With `proxy`, also writes the training proxy to `proxy_path` in the same pass. With `scenes`, also
    finds the scene changes slow/fast frame encoding needs (`scenes.py`), as `meta["scene_changes"]`.
    Raises ProbeError(reason, detail) for files training must not see.
    """
    import av

    _quiet_av()
    size = os.path.getsize(path)
    if size == 0:
        raise ProbeError("empty_file", "0 bytes")
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, EOFError, OSError, UnicodeDecodeError) as e:
        raise ProbeError("open_failed", str(e)[:300]) from None
    writer = _ProxyWriter(proxy_path, proxy) if proxy is not None else None
    try:
        st = video_stream(container)
        if st is None and not len(container.streams):
            raise ProbeError("open_failed", "no stream at all: the container's index of its media is cut short (an "
                             "MP4 cut off within its moov atom, e.g. a copy or download that stopped)")
        if st is None:
            kinds = [s.type for s in container.streams]
            pictures = sum(map(is_attached_picture, container.streams.video))
            raise ProbeError("no_video_stream", f"streams: {kinds}" + (
                f" ({pictures} attached picture(s): cover art, a still image, not a video)" if pictures else ""))
        try:
            best = container.streams.best("video")
        except Exception:
            best = None
        st.thread_type = "AUTO" if threads > 1 else "SLICE"
        st.codec_context.thread_count = threads
        tb = st.time_base or Fraction(1, 90000)
        header_frames = int(st.frames or 0)
        header_rate = float(st.average_rate) if st.average_rate else None
        header_duration = float(st.duration * tb) if st.duration else (
            container.duration / 1e6 if container.duration else None)

        detector = SceneDetector(scenes, header_rate) if scenes is not None else None
        pts: list[int | None] = []
        keys: list[int] = []
        thumbs: list[np.ndarray] = []
        corrupt = 0
        size_changes = 0
        first = None
        last_duration = None
        error = None
        for packet in container.demux(st):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                error = f"{type(e).__name__}: {e} (after {len(pts)} frames, header says {header_frames})"
                break
            for fr in frames:
                if first is None:
                    first = (fr.width, fr.height, *display_transform(frame_display_matrix(fr)), fr.format.name)
                elif (fr.width, fr.height) != first[:2]:
                    size_changes += 1
                if fr.is_corrupt:
                    corrupt += 1
                if fr.key_frame:
                    keys.append(len(pts))
                pts.append(fr.pts)
                if fr.duration:
                    last_duration = int(fr.duration)
                if detector is not None:
                    detector.add(len(pts) - 1, fr)
                if keep_thumbs:
                    thumbs.append(fr.to_ndarray(width=THUMB, height=THUMB, format="gray").astype(np.float32))
                if writer is not None and fr.pts is not None:
                    writer.add(float((fr.pts - (pts[0] or 0)) * tb), fr, first[2], first[3])
        n = len(pts)
        if error is not None:
            raise ProbeError("decode_error", error)
        if n == 0:
            raise ProbeError("no_frames", f"decoded 0 frames (header says {header_frames})")
        if corrupt:
            raise ProbeError("corrupt_frames", f"{corrupt} of {n} decoded frames flagged corrupt")
        if header_frames and n < header_frames * (1 - truncation_tolerance) - 1 and not (
                header_duration and _span_s(pts, last_duration, tb) >= header_duration * (1 - truncation_tolerance)):
            # the header counts every sample of the track; an edit list (a clip cut without re-encoding starts at
            # the keyframe before the cut) leaves samples that are never shown, which its duration does not count:
            # a file whose frames span that duration is whole
            raise ProbeError("truncated", f"decoded {n} frames spanning {_span_s(pts, last_duration, tb):.3f} s, "
                                          f"header says {header_frames} frames, {header_duration} s")
        if size_changes:
            raise ProbeError("resolution_change", f"{size_changes} frames differ from {first[:2]}")
        width, height, rotation, hflip, pix_fmt = first
        if rotation % 90:
            raise ProbeError("unsupported_rotation", f"{rotation} degrees")

        # ---- pts sanity: strictly increasing, else synthesize from the frame rate ----
        synthesized = False
        arr = np.array([p if p is not None else -1 for p in pts], dtype=np.int64)
        if any(p is None for p in pts) or (n > 1 and np.any(np.diff(arr) <= 0)):
            synthesized = True
            rate = Fraction(header_rate or 25.0).limit_denominator(1001)
            tb = 1 / rate
            arr = np.arange(n, dtype=np.int64)
            last_duration = 1
        steps = np.diff(arr)
        if last_duration is None or last_duration <= 0:
            last_duration = int(np.median(steps)) if n > 1 else max(1, int(round(1 / (float(tb) * (header_rate or 25.0)))))
        end_pts = int(arr[-1] + last_duration)
        duration = float((end_pts - arr[0]) * tb)
        vfr = bool(n > 2 and (steps.max() - steps.min()) > max(1, 0.02 * np.median(steps)))
        key_times = [float((arr[k] - arr[0]) * tb) for k in keys]
        gaps = np.diff(key_times + [duration]) if keys else np.array([duration])
        dw, dh = _display_size(width, height, rotation)
        meta = {
            "codec": st.codec_context.name,
            "stream_index": st.index,
            "container": container.format.name,
            "pix_fmt": pix_fmt,
            "coded_width": width, "coded_height": height, "rotation": rotation, "hflip": hflip,
            "width": dw, "height": dh,
            "num_frames": n,
            "header_frames": header_frames,
            "header_fps": header_rate,
            "header_duration_s": header_duration,
            "fps": n / duration if duration > 0 else 0.0,
            "duration_s": duration,
            "start_s": float(arr[0] * tb),
            "time_base": [tb.numerator, tb.denominator],
            **encode_pts(arr),
            "end_pts": end_pts,
            "pts_synthesized": synthesized,
            "vfr": vfr,
            "keyframe_runs": encode_runs(keys),
            "num_keyframes": len(keys),
            "keyframe_interval_s": {"mean": float(np.mean(gaps)), "max": float(np.max(gaps))},
            "bytes": size,
        }
        if detector is not None:
            meta["scene_changes"] = detector.result()
        if writer is not None and synthesized:
            # the proxy was written by the pts, which were not the frames' times (H.264 with B-frames in AVI gives
            # them out of order): write it again by the frames' count, frame i at i / rate, as training reads them
            writer.abort()
            writer = _ProxyWriter(proxy_path, proxy)
            with av.open(path, metadata_errors="ignore") as again:
                s2 = again.streams[st.index]
                s2.thread_type = "AUTO" if threads > 1 else "SLICE"
                s2.codec_context.thread_count = threads
                for i, fr in enumerate(again.decode(s2)):
                    if i >= n:
                        break
                    writer.add(float(arr[i] * tb), fr, rotation, hflip)
        if writer is not None:
            writer.close(duration)
        if keep_thumbs:
            meta["_thumbs"] = np.stack(thumbs)
        if best is None or best.index != st.index:
            meta["_decord_reads_another_stream"] = True     # FFmpeg's best stream is a cover picture
        return meta
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        container.close()


def check_decord_seeking(path: str, thumbs: np.ndarray, rotation: int, *, hflip: bool = False,
                         seed: int = 0) -> bool | None:
    """Ask decord for a few frames (sorted, one fresh reader, as training does) and check each is
    the frame PyAV decoded at that index, in the orientation the display matrix gives (`rotation`, `hflip`; the
    decord backend's mirror applied). None when decord is not importable; False when it cannot open or
    read the file (AV1: decord's FFmpeg has no decoder for it), so that the decord backend decodes such a
    file, which PyAV has just decoded whole, with PyAV."""
    try:
        import decord
    except Exception:
        return None
    n = thumbs.shape[0]
    rng = np.random.default_rng(seed + n)
    idx = sorted({n - 1, n // 2, *rng.integers(0, n, SEEK_CHECKS - 2).tolist()})
    try:
        # decord cannot scale below ~20 px wide (row alignment): read 4x larger, block-average
        side = THUMB * 4
        vr = decord.VideoReader(path, num_threads=1, width=side, height=side)
        if len(vr) < n:
            return False
        got = vr.get_batch(idx).asnumpy().astype(np.float32).mean(-1)      # [k, 32, 32]
        got = got.reshape(len(idx), THUMB, 4, THUMB, 4).mean(axis=(2, 4))  # [k, 8, 8]
    except MemoryError:          # not the file's fault: the child's (isolation.py, out_of_memory)
        raise
    except Exception:
        return False
    ref = orient(thumbs, rotation, hflip, axes=(1, 2))           # as displayed, from PyAV's frames
    axis = decord_mirror_axis(rotation, hflip)
    if axis is not None:                                          # as the decord backend shows them ([k, h, w])
        got = np.flip(got, axis=axis + 1)
    for j, i in enumerate(idx):
        lo, hi = max(0, i - 4), min(n, i + 5)
        err = ((ref[lo:hi] - got[j][None]) ** 2).mean(axis=(1, 2))
        if err[i - lo] > 1.5 * err.min() + 4.0:    # another frame fits clearly better
            return False
    # and in the orientation shown: the same frames turned or mirrored (the thumbnails are square) must not fit
    # clearly better; the frame test above cannot tell, every neighbour being as wrongly oriented (decord turns MP4
    # and MOV by their display matrix, but not Matroska or WebM)
    want = ref[idx]
    fit = ((want - got) ** 2).mean()
    others = [np.rot90(got, k=k, axes=(1, 2)) for k in (1, 2, 3)]
    others += [np.flip(a, axis=2) for a in [got] + others]
    if any(((want - a) ** 2).mean() * 1.5 + 4.0 < fit for a in others):
        return False
    return True


def inspect_video(path: str, *, proxy: ProxySpec | None = None, proxy_path: str | None = None,
                  threads: int = 1, check_decord: bool = True, scenes: SceneSpec | None = None,
                  convert_path: str | None = None) -> dict:
    """Ingest's per-file job. Returns {"video": meta of the file to store, "source": meta of the
    original when a proxy was written (else None), "stored_path": ...}. Raises ProbeError. The scene
    changes (`scenes`) are found in the stored file: its frames are the ones training samples.

    An animated GIF, WebP, PNG (APNG) or AVIF is first converted to an MP4 at `convert_path` (`animated.py`; by default
    a file in the temporary folder that the caller then owns), which is then what is measured and stored (or proxied),
    with `meta["converted_from"]` = {"format", "num_frames", "duration_ms", "loop"} of the original."""
    from .animated import AnimatedError, animated_kind, convert_animated

    converted = None
    animated = animated_kind(path) is not None
    if animated and convert_path is None:
        fd, convert_path = tempfile.mkstemp(suffix=".mp4", prefix="keye-animated-")
        os.close(fd)
    try:
        if animated:
            try:
                converted = convert_animated(path, convert_path)
            except AnimatedError as e:
                raise ProbeError(e.reason, e.detail) from None
            path = convert_path
        r = _inspect(path, proxy, proxy_path, threads, check_decord, scenes)
    except BaseException:
        if animated and os.path.exists(convert_path):
            os.unlink(convert_path)
        raise
    if converted is not None:
        r["video"]["converted_from"] = converted
        if proxy is not None:
            os.unlink(path)                 # the proxy made from it is stored
    return r


def _inspect(path: str, proxy: ProxySpec | None, proxy_path: str | None, threads: int, check_decord: bool,
             scenes: SceneSpec | None) -> dict:
    if proxy is None:
        meta = probe_video(path, threads=threads, keep_thumbs=check_decord, scenes=scenes)
        source = None
        stored = path
    else:
        source = probe_video(path, proxy=proxy, proxy_path=proxy_path, threads=threads)
        source.pop("_decord_reads_another_stream", None)      # the proxy is what training decodes
        try:
            meta = probe_video(proxy_path, threads=threads, keep_thumbs=check_decord, scenes=scenes)
        except ProbeError as e:
            raise ProbeError("proxy_failed", str(e)) from None
        stored = proxy_path
    thumbs = meta.pop("_thumbs", None)
    if meta.pop("_decord_reads_another_stream", False):
        meta["decord_seek_ok"] = False      # decord reads FFmpeg's best stream, not this one: PyAV decodes the file
    elif meta["container"] == "mpeg":
        # an MPEG program stream (.mpg, .vob): decord gave a wrong frame among 4 asked in 20 of 20 reads of 60-frame
        # MPEG-1 and MPEG-2 files, and in 1 to 12 of 20 reads of 12-frame ones, which the check below passed
        meta["decord_seek_ok"] = False
    elif check_decord and thumbs is not None:
        meta["decord_seek_ok"] = check_decord_seeking(stored, thumbs, meta["rotation"], hflip=meta["hflip"])
    else:
        meta["decord_seek_ok"] = None
    return {"video": meta, "source": source, "stored_path": stored}


