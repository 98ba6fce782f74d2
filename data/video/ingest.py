"""Ingest: a folder of videos + an annotation JSONL -> verified webdataset shards.

    python launch/ingest.py --videos DIR --annotations FILE.jsonl --out DIR --shard-size-mb 1024 \
        [--proxy] [--workers N]

An annotation record with an `image` field (a path relative to --videos), or `images` (several, placed at
the "<image>" markers of its text), is an image sample: each file decoded whole in the guarded child once
(Pillow), stored as is beside its `<key>.json` (docs/data.md "Image samples").
An annotation record with no `video` field and some text (`text`, or `qa` pairs) is a text-only sample:
it is stored as its `<key>.json` alone (key `text-<sha1 of the record>`), spread evenly among the videos
in the shards, so that a run mixes text-only documents with the videos (docs/data.md "Text-only samples").
A video with several records (several conversations: LLaVA-Video's instruction data) makes a sample of each: the
first is keyed as the video, record i (in file order) `<key>-r<i>`; their `<key>.json` share the one stored video.

Every video is decoded end to end in a guarded child process (`isolation.GuardedWorker`, one per
worker thread), so a decoder segfault or hang costs that one file. What training relies on is
measured and written into `<key>.json` beside the video in the shard (see `probe.py`); with
`--proxy` the stored video is a training proxy (2 fps, short side <= 448, a keyframe every second,
H.264) and the original's metadata is kept under "source". Files that fail go to `rejects.jsonl`
with a reason; ingest never stops on one file.

Resumable: `ingest_settings.json` records the options before anything else is written, `ingest_manifest.jsonl`
gets one line per *completed* shard (written after the tar and its index are in place) and `rejects.jsonl` one
line per rejected file. A rerun skips both, deletes shard files that no completed line accounts for (an interrupted
shard), and continues numbering. An --out that holds other files and none of these is refused.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .animated import looks_animated
from .annotations import (VIDEO_MARKER, Verbatim, annotation_segments, conversation_turns, field_problem, has_text,
                          image_marker_count, video_marker_problem)
from .images import IMAGE_MARKER
from .isolation import GuardedWorker, WorkerFailure
from .scenes import SceneSpec
from .shards import (SCHEMA, VIDEO_EXTS, ShardWriter, index_path, make_key, read_jsonl, record_key,
                     write_json_atomic)

MANIFEST = "ingest_manifest.jsonl"
REJECTS = "rejects.jsonl"
SUMMARY = "dataset.json"
SETTINGS = "ingest_settings.json"
RECORDS = (SETTINGS, MANIFEST, REJECTS, SUMMARY)    # an --out holding one of them is an ingest's
LISTED_EXTS = VIDEO_EXTS + ("gif", "webp", "apng", "png", "avif")
"""What ingest takes as videos: the containers stored as they are, and animated GIF, WebP, PNG (APNG) and AVIF, stored
as the MP4 they are converted to (animated.py; a still one is rejected as `still_image`)."""
MOSTLY_STILL_EXTS = ("png", "avif")
"""Image formats whose files are mostly still images (thumbnails, extracted frames): the folder listing takes one only
when it is an animation (`animated.looks_animated`), or when a video record names it."""


@dataclass
class IngestOptions:
    videos: str | None
    out: str
    annotations: str | None = None
    shard_size_mb: float = 1024.0
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2)))
    proxy: bool = False
    proxy_fps: float = 2.0
    proxy_short_side: int = 448
    proxy_keyframe_s: float = 1.0
    timeout_s: float = 3600.0
    """Per-file deadline for probing (+ transcoding); a file over it is rejected as 'timeout'."""
    threads_per_file: int = 1
    check_decord: bool = True
    scene_fps: float = 4.0
    """Frames per second examined for scene changes (slow/fast frame encoding, `scenes.py`); 0 = none found."""
    scene_similarity: float = 0.95
    """A frame is a scene change when less than this share of its thumbnail cells match the reference's."""
    retry_rejects: bool = False
    progress: bool = True
    extensions: tuple[str, ...] = LISTED_EXTS
    tmp_dir: str | None = None

    def __post_init__(self) -> None:
        if self.videos is None and self.annotations is None:
            raise ValueError("IngestOptions: give videos (a folder), annotations (a JSONL file), or both")
        if self.videos is not None and not os.path.isdir(self.videos):
            raise ValueError(f"IngestOptions.videos = {self.videos!r}: not a directory")
        if self.annotations is not None and not os.path.isfile(self.annotations):
            raise ValueError(f"IngestOptions.annotations = {self.annotations!r}: no such file")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"IngestOptions.out = {self.out!r}: exists and is not a directory")
        held = sorted(os.listdir(self.out)) if os.path.isdir(self.out) else []
        shards = [name for name in held if name.startswith("shard-")]
        if shards and not any(name.removesuffix(".tmp") in RECORDS for name in held):
            # a resume deletes the shard-* files no manifest line accounts for, and numbers its own from 0; other
            # files (the source videos, notes) are left where they are
            raise ValueError(f"IngestOptions.out = {self.out!r}: holds {len(shards)} shard-* file(s) (e.g. "
                             f"{', '.join(shards[:3])}) and none of an ingest's records ({', '.join(RECORDS)}): an "
                             "ingest there would delete them and write its own shards in their place. Give a new "
                             "folder, one without shard-* files, or the --out of an earlier ingest to resume it")
        if self.shard_size_mb <= 0:
            raise ValueError(f"IngestOptions.shard_size_mb = {self.shard_size_mb}: must be > 0")
        if self.workers < 1:
            raise ValueError(f"IngestOptions.workers = {self.workers}: must be >= 1")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"IngestOptions.timeout_s = {self.timeout_s}: must be a finite number of seconds > 0")
        if not 0 < self.proxy_fps <= 60:
            raise ValueError(f"IngestOptions.proxy_fps = {self.proxy_fps}: must be in (0, 60]")
        if self.proxy_short_side < 28:
            raise ValueError(f"IngestOptions.proxy_short_side = {self.proxy_short_side}: must be >= 28")
        if self.scene_fps < 0:
            raise ValueError(f"IngestOptions.scene_fps = {self.scene_fps}: must be >= 0 (0 = no scene changes)")
        if not 0 < self.scene_similarity <= 1:
            raise ValueError(f"IngestOptions.scene_similarity = {self.scene_similarity}: must be in (0, 1]")

    def scene_spec(self) -> SceneSpec | None:
        return SceneSpec(fps=self.scene_fps, similarity=self.scene_similarity) if self.scene_fps else None


def list_videos(root: str, extensions=LISTED_EXTS, bad_names: list[str] | None = None) -> list[str]:
    """The files under `root` (relative paths, sorted) of `extensions`; a .png or .avif only when it is an animation
    (MOSTLY_STILL_EXTS: its header is read). A linked folder is followed where it leads out of `root` (a folder that
    gathers data sets by links; one leading inside is listed under its own path already), each real folder once.
    A file whose name is not UTF-8 (its key and the shard index are text) is left out, its relative path (with the
    undecodable bytes as os.fsdecode gives them) added to `bad_names` where given."""
    exts = {e.lower().lstrip(".") for e in extensions}
    out = []
    top = os.path.realpath(root)
    seen = {top}
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(dirpath, d))
            linked = os.path.islink(os.path.join(dirpath, d))
            if real in seen or (linked and _inside(real, top)):
                continue
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        for name in files:
            ext = name.rsplit(".", 1)[-1].lower()
            if ext in exts and "." in name:
                path = os.path.join(dirpath, name)
                if not _is_utf8(name):
                    if bad_names is not None:
                        bad_names.append(os.path.relpath(path, root))
                    continue
                if ext not in MOSTLY_STILL_EXTS or looks_animated(path):
                    out.append(os.path.relpath(path, root))
    if bad_names is not None:
        bad_names.sort()
    return sorted(out)


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:      # os.fsdecode's surrogates for bytes that are not UTF-8
        return False


def shown_name(name: str) -> str:
    """A file name for a message: undecodable bytes as \\xNN escapes (a name that is not UTF-8 cannot be printed
    or written as UTF-8 text as it is)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def record_digest(record: dict) -> str:
    """A digest of a record's content (stable when lines move in the file): equal records, equal digests."""
    payload = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha1(payload).hexdigest()[:16]


def text_sample_id(record: dict) -> str:
    """The key of a text-only record: its content's digest."""
    return "text-" + record_digest(record)


@dataclass
class Annotations:
    videos: dict[str, dict] = field(default_factory=dict)   # relative video path -> its first record
    more: dict[str, list[dict]] = field(default_factory=dict)
    """relative video path -> its further records, in file order: a sample each, sharing the video's stored bytes"""
    images: dict[str, tuple[dict, list[str]]] = field(default_factory=dict)
    """image sample id (its one relative path, or its paths joined by '+') -> (record, relative paths)"""
    texts: list[tuple[str, dict, int]] = field(default_factory=list)  # (key, record, line) of text-only records
    problems: list[str] = field(default_factory=list)
    extra_records: int = 0
    """records reported and ignored because their sample had one: the same record again for a video, a further
    record for an image set (an image sample keeps its first), a record for a video that an image record named"""
    bad_videos: dict[str, str] = field(default_factory=dict)
    """relative video path -> what is wrong with its record ("file:line: ..."), for a video with no well-formed
    record but a malformed one: rejected as 'bad_annotation' rather than ingested without its text"""


class AnnotationsError(ValueError):
    """An annotation file that cannot be read as records at all (a JSON array that is not valid JSON)."""


class NothingToIngest(ValueError):
    """Neither --videos nor --annotations names a single sample (an empty folder, a folder of other files)."""


class SettingsDiffer(ValueError):
    """An --out that an earlier ingest wrote with other settings for what a stored sample is (proxy, scene search)."""


def _shaping_settings(options: dict) -> dict:
    """The settings that decide what a stored sample holds, among an ingest's options (dataset.json's `options`):
    the proxy's (when there is one) and the scene search's (when it runs)."""
    keys = ["proxy", "scene_fps"]
    if options.get("proxy"):
        keys += ["proxy_fps", "proxy_short_side", "proxy_keyframe_s"]
    if options.get("scene_fps"):
        keys += ["scene_similarity"]
    return {k: options.get(k) for k in keys}


def _options(opts: IngestOptions) -> dict:
    """An ingest's options as its records keep them (dataset.json's and ingest_settings.json's `options`)."""
    return {k: v for k, v in asdict(opts).items() if k not in ("progress",)}


def check_same_settings(out: Path, opts: IngestOptions) -> None:
    """SettingsDiffer when `out` holds an ingest (its ingest_settings.json, written before its first shard, or the
    dataset.json of one made before that file existed) made with other settings for what a sample holds: a rerun
    resumes, it skips every sample already stored, so those would keep the earlier settings while dataset.json
    recorded the new ones (and the samples still to do would be stored the new way)."""
    for name in (SETTINGS, SUMMARY):
        try:
            before = json.loads((out / name).read_text()).get("options", {})
            break
        except FileNotFoundError:
            continue
    else:
        return
    old, new = _shaping_settings(before), _shaping_settings(asdict(opts))
    if old != new:
        flags = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} there, {new.get(k)} here"
                          for k in sorted(set(old) & set(new)) if old[k] != new[k])
        raise SettingsDiffer(f"{out} holds an ingest made with other settings ({flags}); a rerun resumes it, keeping "
                             f"the samples already stored as they are: give the same settings, or another --out")


_SPACE = re.compile(r"[ \t\n\r]*")


class _NotJSONNumber(ValueError):
    """NaN, Infinity or -Infinity in an annotation file: Python's json reads them, JSON has no such numbers, and a
    record holding one was stored as read, making the shards' <key>.json and index files that other readers refuse."""


def _no_constant(name: str):
    raise _NotJSONNumber(f"{name} is not a JSON number: write null, or leave the field out")


def _array_records(path: str, raw: bytes) -> list[tuple[int, object]]:
    """(line, item) of each item of a file holding one JSON array of records (LLaVA's .json files), the line being
    where the item starts; AnnotationsError naming the file and line where it is not valid UTF-8 JSON."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise AnnotationsError(f"{path}:{line}: a JSON array of records, but not UTF-8 ({e})") from None
    dec = json.JSONDecoder(parse_constant=_no_constant)
    out, line, at = [], 1, 0
    try:
        i = _SPACE.match(text, text.index("[") + 1).end()
        while i < len(text) and text[i] != "]":
            line += text.count("\n", at, i)
            at = i
            item, i = dec.raw_decode(text, i)
            out.append((line, item))
            i = _SPACE.match(text, i).end()
            if i < len(text) and text[i] == ",":
                i = _SPACE.match(text, i + 1).end()
            elif i >= len(text) or text[i] != "]":
                raise json.JSONDecodeError("expected ',' or ']' after an item", text, i)
        end = _SPACE.match(text, i + 1).end() if i < len(text) else i
        if i >= len(text) or end < len(text):
            raise json.JSONDecodeError("expected the array's ']' and nothing after it", text, end)
    except json.JSONDecodeError as e:
        raise AnnotationsError(f"{path}:{e.lineno}: a JSON array of records (the file starts with '[') but not valid "
                               f"JSON: {e.msg} (column {e.colno})") from None
    except _NotJSONNumber as e:
        raise AnnotationsError(f"{path}:{line}: a JSON array of records (the file starts with '['), its item from this "
                               f"line not valid JSON: {e}") from None
    return out


def _records(path: str, problems: list[str]):
    """(line, parsed JSON) of each record of an annotation file: JSONL (one JSON value a line; a line that is not
    UTF-8 or not JSON is a problem naming it), or a file holding one JSON array of records (its first character
    '['; AnnotationsError where it is not valid JSON). A UTF-8 byte order mark is skipped."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip()
        f.seek(0)
        if head[:1] == b"[":
            yield from _array_records(path, f.read())
            return
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{n}: not UTF-8 ({e}); record left out")
                continue
            if not line:
                continue
            try:
                yield n, json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: not JSON ({e})")
            except _NotJSONNumber as e:
                problems.append(f"{path}:{n}: not JSON ({e}); record left out")


def marker_segments(record: dict) -> list[tuple[str, bool]]:
    """The segments of a record where a "<video>" or "<image>" it does not hold the picture for is reported: its
    prompt, QA questions and user turns (text, or image / video parts), where the user asks about what is shown. Not
    its free `text` (a web page may spell an HTML tag; an image sample's `<image>` there is counted against its images
    apart), nor the segments where they are words (`Verbatim`: a caption, answers, the other turns)."""
    return [(t, s) for t, s in annotation_segments({k: x for k, x in record.items() if k != "text"})
            if not isinstance(t, Verbatim)]


def annotation_path(x: str, root: str | None) -> tuple[str, str | None]:
    """A record's file path as ingest names it (relative to --videos `root`, normalised), and what is wrong with it
    (None): empty, or outside `root` (a path with `..` out of it, or an absolute one elsewhere; an absolute path in
    `root` is taken as the relative one)."""
    if not x.strip():
        return x, "an empty path"
    rel = os.path.normpath(x)
    if os.path.isabs(rel):
        if root is None:
            return rel, "an absolute path, and no --videos folder to find it in"
        for top, there in ((root, rel), (os.path.realpath(root), os.path.realpath(rel))):
            if _inside(there, top) and there != top:
                return os.path.relpath(there, top), None
        return rel, f"not under --videos {root} (a record names its file by its path relative to that folder)"
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return rel, "a path out of --videos (a record names its file by its path relative to that folder)"
    return rel, None


def read_annotations(path: str | None, root: str | None = None) -> Annotations:
    """JSONL (or one JSON array of records) -> records by kind, and the problems found. A record names its `video`,
    its `image` or its `images` (paths relative to --videos `root`, or absolute ones in it: annotation_path; several
    images are placed at the "<image>" markers of its text, one per image, or first when it has none); one with none
    of them is a text-only sample when it has text. A video record whose path is empty or outside `root` is a
    problem and its path one of `bad_videos`."""
    out = Annotations()
    if path is None:
        return out
    text_line: dict[str, int] = {}
    video_line: dict[str, dict[str, int]] = {}       # relative video path -> {its records' digests: line}
    bad: dict[str, str] = {}
    problems = out.problems
    for n, r in _records(path, problems):
        if not isinstance(r, dict):
            problems.append(f"{path}:{n}: not a JSON object")
            continue
        v, im, ims = r.get("video"), r.get("image"), r.get("images")
        named = [k for k, x in (("video", v), ("image", im), ("images", ims)) if x is not None]
        if len(named) > 1:
            problems.append(f"{path}:{n}: {' and '.join(repr(k) for k in named)}: a sample is a video, an "
                            f"image or a list of images")
            continue
        turns = conversation_turns(r)
        wrong = turns if isinstance(turns, str) else field_problem(r)
        if wrong is None and isinstance(v, str):
            wrong = video_marker_problem(r)
        if wrong is not None:
            problems.append(f"{path}:{n}: {wrong}; record left out")
            if isinstance(v, str):          # its video is rejected, not ingested without its text
                bad.setdefault(annotation_path(v, root)[0], f"{path}:{n}: {wrong}")
            continue
        if ims is not None:
            if not (isinstance(ims, list) and ims and all(isinstance(x, str) for x in ims)):
                problems.append(f"{path}:{n}: field 'images' must be a non-empty list of paths")
                continue
            im = ims
        if im is not None and not isinstance(im, list):
            if not isinstance(im, str):
                problems.append(f"{path}:{n}: field 'image' is {type(im).__name__}, not a string")
                continue
            im = [im]
        if im is not None:
            named_at = [annotation_path(x, root) for x in im]
            if wrong := next((f"{x!r}: {why}" for x, (_, why) in zip(im, named_at) if why), None):
                problems.append(f"{path}:{n}: field {'images' if ims is not None else 'image'} {wrong}; "
                                f"record left out")
                continue
            rels = [rel for rel, _ in named_at]
            if any(os.path.isabs(x) for x in im):
                r = dict(r, **({"images": rels} if ims is not None else
                               {"image": rels if isinstance(r["image"], list) else rels[0]}))
            marks = image_marker_count(r)
            if len(set(rels)) != len(rels):
                problems.append(f"{path}:{n}: an image is listed twice in {rels}")
            elif marks and marks != len(rels):
                problems.append(f"{path}:{n}: {len(rels)} image(s) but {marks} '<image>' markers in the text "
                                f"(one per image, or none to place the images first)")
            elif video_marks := sum(t.count(VIDEO_MARKER) for t, _ in marker_segments(r)):   # no video shown there
                problems.append(f"{path}:{n}: {video_marks} '<video>' marker(s) (or video parts) in the prompt, "
                                f"questions or user turns of an image sample (its record names images, no video)")
            else:
                sid = "+".join(rels)
                if sid in out.images or sid in out.videos:
                    problems.append(f"{path}:{n}: second record for {sid!r} ignored (a sample keeps its first)")
                    out.extra_records += 1
                else:
                    out.images[sid] = (r, rels)
            continue
        if v is None and has_text(r):
            # markers where a record places its pictures (LLaVA's "<image>" in a user turn, OpenAI's image and video
            # parts, a prompt's or a question's) in a text-only sample would stay strings: answers trained on pictures
            # never shown (a free 'text' may spell them as text, and so may a caption, an answer and the turns that
            # are not the user's: annotations.Verbatim)
            segs = marker_segments(r)
            marks = [f"{c} {m!r}" for m in (IMAGE_MARKER, VIDEO_MARKER) if (c := sum(t.count(m) for t, _ in segs))]
            if marks:
                problems.append(f"{path}:{n}: {' and '.join(marks)} marker(s) or part(s) in its prompt, questions or "
                                f"user turns, but no 'image', 'images' or 'video' field: name the file they stand for, "
                                f"or remove them")
                continue
            tid = text_sample_id(r)
            if tid in text_line:
                problems.append(f"{path}:{n}: the same text-only record as line {text_line[tid]}, ignored")
                continue
            text_line[tid] = n
            out.texts.append((tid, r, n))
            continue
        if not isinstance(v, str):
            problems.append(f"{path}:{n}: no string field 'video' or 'image', and no text for a text-only "
                            f"sample (a non-empty 'text', a 'qa' answer, or an assistant turn in 'conversations' "
                            f"or 'messages')" if v is None else
                            f"{path}:{n}: field 'video' is {type(v).__name__}, not a string")
            continue
        rel, why = annotation_path(v, root)
        if why is not None:
            problems.append(f"{path}:{n}: field 'video' {v!r}: {why}; record left out")
            bad.setdefault(rel, f"{path}:{n}: field 'video' {v!r}: {why}")
            continue
        if os.path.isabs(v):        # stored as the path it is known by, as a relative one is
            r = dict(r, video=rel)
        if rel in out.images:
            problems.append(f"{path}:{n}: record for {rel!r} ignored (an image record named it first)")
            out.extra_records += 1
            continue
        seen = video_line.setdefault(rel, {})
        content = record_digest(dict(r, video=rel))
        if content in seen:
            problems.append(f"{path}:{n}: the same record for {rel!r} as line {seen[content]}, ignored")
            out.extra_records += 1
            continue
        seen[content] = n
        if rel in out.videos:       # a further conversation of the video: a sample of its own, sharing the video
            out.more.setdefault(rel, []).append(r)
        else:
            out.videos[rel] = r
    out.bad_videos = {rel: why for rel, why in bad.items() if rel not in out.videos}
    return out


def interleave(a: list, b: list) -> list:
    """`a` and `b` merged with each spread evenly over the result, each in its own order (item i of a list
    of n sits at fraction (i + 0.5) / n; ties go to `a`)."""
    ka = [((i + 0.5) / len(a), 0, i) for i in range(len(a))]
    kb = [((j + 0.5) / len(b), 1, j) for j in range(len(b))]
    return [(a if s == 0 else b)[i] for _, s, i in sorted(ka + kb)]


class _Pool:
    """Worker threads, each driving its own guarded child process."""

    def __init__(self, n: int) -> None:
        self.local = threading.local()
        self.workers: list[GuardedWorker] = []
        self.lock = threading.Lock()
        self.ex = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ingest")

    def worker(self) -> GuardedWorker:
        w = getattr(self.local, "w", None)
        if w is None:
            w = GuardedWorker(name="ingest")
            self.local.w = w
            with self.lock:
                self.workers.append(w)
        return w

    def close(self) -> None:
        self.ex.shutdown(wait=True)
        for w in self.workers:
            w.close()


def _why_unlisted(rel: str, root: str | None, extensions, image_files: set[str], listed_as) -> tuple[str, str]:
    """(reason, detail) of a file a video record names that is not among the videos to ingest: not there, an
    extension ingest does not read, an image record's file, or reached through a linked folder that leads into
    --videos, whose files the listing names by their own paths (`listed_as()`: real path -> listed path)."""
    if root is None:
        return "missing_file", "listed in annotations; no --videos folder given"
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        return "missing_file", "listed in annotations, not found under --videos"
    exts = [e.lower().lstrip(".") for e in extensions]
    if rel.rsplit(".", 1)[-1].lower() not in exts:
        return "unsupported_extension", (f"listed in annotations and found under --videos, but its extension "
                                         f"{os.path.splitext(rel)[1] or '(none)'!r} is not one ingest reads "
                                         f"({' '.join(exts)})")
    if rel in image_files:
        return "bad_annotation", "an image record names this file too: it is ingested as that image"
    real = listed_as().get(os.path.realpath(path))
    return "bad_annotation", ("listed in annotations by a path through a linked folder, whose files ingest lists by "
                              "their own paths" + (f": name it {real!r}" if real else ""))


def _job(pool: _Pool, opts: IngestOptions, root: str, rel: str, tmp: str) -> dict:
    path = os.path.join(root, rel)
    key = make_key(rel)
    if not os.path.exists(path):     # the listing names a link as the file it leads to
        return {"rel": rel, "key": key, "ok": False, "reason": "missing_file", "bytes_in": 0, "seconds": 0.0,
                "detail": (f"a link to {os.readlink(path)!r}, which does not exist" if os.path.islink(path)
                           else "removed since the folder was listed")}
    spec = opts.scene_spec()
    kwargs = {"path": path, "threads": opts.threads_per_file, "check_decord": opts.check_decord,
              "scenes": asdict(spec) if spec is not None else None}
    proxy_path = None
    kwargs["convert_path"] = os.path.join(tmp, key + ".converted.mp4")     # an animated GIF, WebP, ...: converted
    if opts.proxy:
        proxy_path = os.path.join(tmp, key + ".mp4")
        kwargs.update(proxy={"fps": opts.proxy_fps, "short_side": opts.proxy_short_side,
                             "keyframe_s": opts.proxy_keyframe_s}, proxy_path=proxy_path)
    t0 = time.monotonic()
    try:
        res = pool.worker().call("inspect", timeout_s=opts.timeout_s, **kwargs)
    except WorkerFailure as e:
        for p in (proxy_path, kwargs["convert_path"]):      # a crash or timeout may leave them
            if p and os.path.exists(p):
                os.unlink(p)
        return {"rel": rel, "key": key, "ok": False, "reason": e.reason, "detail": e.detail[:500],
                "bytes_in": _size(path), "seconds": time.monotonic() - t0}
    return {"rel": rel, "key": key, "ok": True, "result": res, "bytes_in": _size(path),
            "seconds": time.monotonic() - t0}


def _image_job(pool: _Pool, opts: IngestOptions, root: str, sid: str, rels: list[str]) -> dict:
    """Decode each image of a sample whole in the guarded child (a crash or hang costs that sample) and
    return their metadata; the first that fails rejects the sample, named in the detail."""
    key = make_key(sid)
    t0 = time.monotonic()
    metas, size = [], 0
    for rel in rels:
        path = os.path.join(root, rel)
        size += _size(path)
        try:
            metas.append(pool.worker().call("inspect_image", timeout_s=opts.timeout_s, path=path))
        except WorkerFailure as e:
            detail = e.detail if len(rels) == 1 else f"{rel}: {e.detail}"
            return {"kind": "image", "rel": sid, "key": key, "ok": False, "reason": e.reason, "detail": detail[:500],
                    "bytes_in": size, "seconds": time.monotonic() - t0}
    return {"kind": "image", "rel": sid, "key": key, "ok": True, "result": metas, "bytes_in": size,
            "seconds": time.monotonic() - t0}


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _append_jsonl(path: str, rec: dict) -> None:
    line = json.dumps(rec, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _compact_rejects(rejects_path: str, shards_done: list[dict]) -> list[dict]:
    """The files rejected now: one line per file, its latest reject, none for a file a shard holds since. A run with
    `--retry-rejects` appends the retried files' new rejects after their old ones; without this the old lines stay,
    and the totals count a file rejected again twice, and one accepted on retry as rejected still."""
    lines = read_jsonl(rejects_path)
    stored = {v for s in shards_done for v in s["videos"] + s.get("images", [])}
    latest: dict = {}
    for r in lines:
        kind = "video" if "video" in r else "image"
        latest.pop((kind, r.get(kind)), None)          # the latest reject goes last, as it was written
        latest[(kind, r.get(kind))] = r
    current = [r for (_, sid), r in latest.items() if sid not in stored]
    if current != lines:
        tmp = rejects_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in current)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, rejects_path)
    return current


def _cleanup_incomplete(out: Path, complete: set[str]) -> None:
    for p in out.glob("shard-*"):
        name = p.name
        base = re.sub(r"(\.idx\.json|\.tar)(\.tmp)?$", "", name)
        if base + ".tar" not in complete:
            p.unlink()


def ingest(opts: IngestOptions) -> dict:
    """Run (or resume) an ingest; returns the summary also written to `<out>/dataset.json`."""
    t_start = time.monotonic()
    root = os.path.abspath(opts.videos) if opts.videos is not None else None
    bad_names: list[str] = []      # files whose names are not UTF-8: rejected, with what to do
    videos = list_videos(root, opts.extensions, bad_names) if root is not None else []
    annotations = read_annotations(opts.annotations, root)
    if root is not None:
        # a still .png or .avif (left out of the listing) that a video record names is taken, and rejected as
        # still_image with what to do, not as an unsupported extension
        exts = {e.lower().lstrip(".") for e in opts.extensions} & set(MOSTLY_STILL_EXTS)
        named = {rel for rel in annotations.videos if rel.rsplit(".", 1)[-1].lower() in exts
                 and not rel.startswith(os.pardir) and os.path.isfile(os.path.join(root, rel))}
        videos = sorted(set(videos) | named)
    # a GIF, WebP or PNG that an image record names is that image, not also a video of the listing
    image_files = {rel for _, rels in annotations.images.values() for rel in rels}
    videos = [v for v in videos if v not in image_files]
    for p in annotations.problems:
        print(f"[ingest] warning: {p}", file=sys.stderr)
    if not (videos or annotations.videos or annotations.images or annotations.texts or annotations.bad_videos
            or bad_names):
        supported = " ".join(e.lower().lstrip(".") for e in opts.extensions)
        where = (f"no video file under --videos {opts.videos} (searched recursively for {supported})"
                 if root is not None else "")
        if opts.annotations is not None:
            where += (" and " if where else "") + f"no usable record in --annotations {opts.annotations}"
        raise NothingToIngest(f"nothing to ingest: {where}; nothing written to {opts.out}")
    out = Path(opts.out)
    check_same_settings(out, opts)
    out.mkdir(parents=True, exist_ok=True)
    # before any shard or reject: what a rerun checks its settings against, should this one be cut off
    write_json_atomic(out / SETTINGS, {"schema": SCHEMA, "options": _options(opts)})
    manifest_path, rejects_path = str(out / MANIFEST), str(out / REJECTS)

    # ---- what is already done ----
    shards_done = read_jsonl(manifest_path)
    complete = {s["shard"] for s in shards_done if os.path.exists(out / s["shard"])
                and os.path.exists(index_path(out / s["shard"]))}
    shards_done = [s for s in shards_done if s["shard"] in complete]
    _cleanup_incomplete(out, complete)
    done = {v for s in shards_done for v in s["videos"] + s.get("images", []) + s.get("texts", [])}
    rejected_before = read_jsonl(rejects_path)
    if not opts.retry_rejects:
        done |= {r.get("video") or r.get("image") for r in rejected_before}
    next_index = 1 + max([int(s["shard"][6:12]) for s in shards_done], default=-1)

    ann, texts = annotations.videos, annotations.texts
    listed = set(videos)
    reasons: Counter = Counter()
    reasons_of: dict[str, Counter] = {"video": Counter(), "image": Counter()}   # the same, per kind of sample

    def reject(kind: str, sid: str, reason: str, detail: str) -> None:
        """Records a rejected video or image sample (`kind`) in rejects.jsonl and in this run's counts."""
        _append_jsonl(rejects_path, {kind: sid, "reason": reason, "detail": detail})
        reasons[reason] += 1
        reasons_of[kind][reason] += 1

    bad_listed = 0      # videos under --videos rejected for their record: listed, but neither done nor to do
    for rel, why in sorted(annotations.bad_videos.items()):
        if rel not in done:
            reject("video", rel, "bad_annotation", why[:500])
            done.add(rel)
            bad_listed += rel in listed
    for rel in bad_names:
        if rel not in done:
            reject("video", rel, "bad_file_name", f"{shown_name(rel)}: its name is not UTF-8 (a sample's key and "
                   f"the shard index are text): rename the file")
            done.add(rel)
    # a listed file's real path -> its path in the listing, made once a record names a file by another path
    listed_as = functools.cache(lambda: {os.path.realpath(os.path.join(root, v)): v for v in videos})
    for rel in sorted(set(ann) - listed):
        if rel not in done:
            reject("video", rel, *_why_unlisted(rel, root, opts.extensions, image_files, listed_as))
            done.add(rel)
    images = sorted(annotations.images)
    missing_images = 0
    for sid in images:
        lost = [rel for rel in annotations.images[sid][1]
                if root is None or not os.path.isfile(os.path.join(root, rel))]
        if sid not in done and lost:
            reject("image", sid, "missing_file", f"{lost[0]}: listed in annotations, not found under --videos"
                   if root is not None else "listed in annotations; no --videos folder given")
            done.add(sid)
            missing_images += 1
    text_of = {tid: (r, n) for tid, r, n in texts}
    # ("video" | "image", relative path) or ("text", key): images spread evenly among the videos, then the
    # text-only samples among both, so that the shards (and the shuffle) mix the kinds
    todo = interleave(interleave([("video", v) for v in videos if v not in done],
                                 [("image", v) for v in images if v not in done]),
                      [("text", tid) for tid, _, _ in texts if tid not in done])

    tmp = tempfile.mkdtemp(prefix="keye-ingest-", dir=opts.tmp_dir)
    pool = _Pool(opts.workers)
    stats = Counter()
    unannotated: list[str] = []    # videos --annotations names no record of (the first few, for the summary)
    writer: ShardWriter | None = None
    cur_videos: list[str] = []
    cur_images: list[str] = []
    cur_texts: list[str] = []
    target = int(opts.shard_size_mb * (1 << 20))
    bar = None
    if opts.progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="sample", desc="ingest", dynamic_ncols=True)
        except Exception:
            bar = None

    def close_shard() -> None:
        nonlocal writer, cur_videos, cur_images, cur_texts
        if writer is None:
            return
        path, entries = writer.close()
        rec = {"shard": os.path.basename(path), "videos": cur_videos, "images": cur_images, "texts": cur_texts,
               "num_samples": len(entries), "bytes": os.path.getsize(path)}
        _append_jsonl(manifest_path, rec)
        shards_done.append(rec)
        writer, cur_videos, cur_images, cur_texts = None, [], [], []

    def writer_now() -> ShardWriter:
        nonlocal writer, next_index
        if writer is None:
            writer = ShardWriter(out, next_index)
            next_index += 1
        return writer

    try:
        # Results are written in the listing's order, whatever order the workers finish in, so the same videos
        # always make the same shards (and a run on them sees the same samples in the same order). Finished
        # results wait in `ready` for the ones before them; they count against the in-flight bound.
        pending: dict = {}  # future -> its position in todo
        ready: dict[int, dict] = {}
        submitted = emitted = 0
        max_inflight = 4 * opts.workers
        while True:
            while submitted < len(todo) and len(pending) + len(ready) < max_inflight:
                kind, name = todo[submitted]
                if kind == "text":                   # nothing to inspect: ready at once, in its place
                    ready[submitted] = {"text": name}
                elif kind == "image":
                    pending[pool.ex.submit(_image_job, pool, opts, root, name, annotations.images[name][1])] = submitted
                else:
                    pending[pool.ex.submit(_job, pool, opts, root, name, tmp)] = submitted
                submitted += 1
            if not pending and not ready:
                break
            if emitted not in ready:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    ready[pending.pop(fut)] = fut.result()
            while emitted in ready:
                r = ready.pop(emitted)
                emitted += 1
                if "text" in r:
                    tid = r["text"]
                    rec, line = text_of[tid]
                    writer_now().add_text_sample(tid, {
                        "schema": SCHEMA, "key": tid, "kind": "text", "video": None, "annotation": rec,
                        "source": {"annotations": os.path.basename(opts.annotations), "line": line}})
                    cur_texts.append(tid)
                    stats["text_accepted"] += 1
                    stats["text_chars"] += len(rec.get("text") or "")
                    if writer.size >= target:
                        close_shard()
                    if bar is not None:
                        bar.update(1)
                    continue
                stats["bytes_in"] += r["bytes_in"]
                if r.get("kind") == "image":
                    sid = r["rel"]
                    if not r["ok"]:
                        reject("image", sid, r["reason"], r["detail"])
                    else:
                        rec, rels = annotations.images[sid]
                        writer_now().add_image_sample(r["key"], [os.path.join(root, x) for x in rels], {
                            "schema": SCHEMA, "key": r["key"], "kind": "image", "source_path": sid, "video": None,
                            "images": r["result"], "annotation": rec})
                        cur_images.append(sid)
                        stats["image_accepted"] += 1
                        stats["image_files"] += len(rels)
                        stats["bytes_stored"] += sum(m["bytes"] for m in r["result"])
                        if writer.size >= target:
                            close_shard()
                    if bar is not None:
                        bar.update(1)
                    continue
                if not r["ok"]:
                    reject("video", r["rel"], r["reason"], r["detail"])
                else:
                    res = r["result"]
                    rel = r["rel"]
                    annotation = ann.get(rel, {"video": rel})
                    if rel not in ann:
                        stats["unannotated"] += 1
                        if len(unannotated) < 3:
                            unannotated.append(rel)
                    stored = res["stored_path"]
                    converted = bool(res["video"].get("converted_from"))     # an animated GIF, WebP, PNG, AVIF
                    ext = rel.rsplit(".", 1)[-1].lower()
                    if opts.proxy or converted or ext not in VIDEO_EXTS:
                        # a '.gif' that holds an MP4 (as web sites serve them) is stored under a video's extension,
                        # which a shard's index rebuilt from the tar (scan_shard) recognises
                        ext = "mkv" if "matroska" in res["video"]["container"] and not (opts.proxy or converted) \
                            else "mp4"
                    record = {"schema": SCHEMA, "key": r["key"], "source_path": rel, "video": res["video"],
                              "source": res["source"], "annotation": annotation,
                              "proxy": ({"fps": opts.proxy_fps, "short_side": opts.proxy_short_side,
                                         "keyframe_s": opts.proxy_keyframe_s} if opts.proxy else None)}
                    member = writer_now().add_sample(r["key"], stored, ext, record)["video_member"]
                    # the video's further records: a sample each in this shard, sharing its stored bytes (the
                    # manifest's done-list is per video, so a resumed run writes them with their video or not at all)
                    for i, more in enumerate(annotations.more.get(rel, ()), 1):
                        key = record_key(rel, i)
                        writer.add_shared_sample(key, member, dict(record, key=key, annotation=more))
                        stats["extra_record_samples"] += 1
                    cur_videos.append(rel)
                    stats["accepted"] += 1
                    stats["bytes_stored"] += res["video"]["bytes"]
                    stats["frames"] += res["video"]["num_frames"]
                    stats["seconds_of_video"] += res["video"]["duration_s"]
                    if opts.proxy or converted:
                        os.unlink(stored)
                    if writer.size >= target:
                        close_shard()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(ok=stats["accepted"], rejected=sum(reasons.values()), refresh=False)
        close_shard()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        pool.close()
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.monotonic() - t_start
    all_rejects = _compact_rejects(rejects_path, shards_done)
    summary = {
        "schema": SCHEMA,
        "shards": [s["shard"] for s in sorted(shards_done, key=lambda s: s["shard"])],
        "num_samples": sum(s["num_samples"] for s in shards_done),
        "num_rejected": len(all_rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in all_rejects)),
        "this_run": {"processed": len(todo), "accepted": stats["accepted"],
                     "rejected": sum(reasons.values()), "rejected_by_reason": dict(reasons),
                     "videos_rejected": sum(reasons_of["video"].values()),
                     "videos_rejected_by_reason": dict(reasons_of["video"]),
                     "images_rejected": sum(reasons_of["image"].values()),
                     "images_rejected_by_reason": dict(reasons_of["image"]),
                     "skipped_already_done": (len(videos) + len(images) + len(texts) - len(todo)
                                              - missing_images - bad_listed),
                     "unannotated": stats["unannotated"], "unannotated_first": sorted(unannotated),
                     "text_samples": stats["text_accepted"],
                     "annotation_problems": len(annotations.problems),
                     "records_ignored_extra": annotations.extra_records,
                     "extra_record_samples": stats["extra_record_samples"],
                     "image_samples": stats["image_accepted"], "image_files": stats["image_files"],
                     "text_chars": stats["text_chars"],
                     "bytes_in": stats["bytes_in"], "bytes_stored": stats["bytes_stored"],
                     "frames": stats["frames"], "seconds_of_video": round(stats["seconds_of_video"], 3),
                     "seconds": round(elapsed, 3),
                     "videos_per_s": round(sum(k == "video" for k, _ in todo) / elapsed, 3) if elapsed > 0 else None,
                     "samples_per_s": round(len(todo) / elapsed, 3) if elapsed > 0 else None,
                     "gb_per_s": round(stats["bytes_in"] / elapsed / 1e9, 6) if elapsed > 0 else None},
        "options": _options(opts),
    }
    write_json_atomic(out / SUMMARY, summary)
    return summary


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Verify videos and write webdataset shards with metadata.")
    p.add_argument("--videos", default=None, help="folder of videos (searched recursively)")
    p.add_argument("--annotations", default=None,
                   help="JSONL: records of videos (a sample per record; several for one video share its bytes), "
                        "images, or text-only samples (no 'video'), or a JSON array of such records, see docs/data.md")
    p.add_argument("--out", required=True, help="output folder for shards, index, rejects")
    p.add_argument("--shard-size-mb", type=float, default=1024.0)
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--proxy", action="store_true", help="store a 2 fps, <=448 px training proxy")
    p.add_argument("--proxy-fps", type=float, default=2.0)
    p.add_argument("--proxy-short-side", type=int, default=448)
    p.add_argument("--proxy-keyframe-s", type=float, default=1.0)
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per-file deadline")
    p.add_argument("--retry-rejects", action="store_true", help="try files rejected by an earlier run again")
    p.add_argument("--no-decord-check", action="store_true", help="skip the decord seek-accuracy check")
    p.add_argument("--scene-fps", type=float, default=4.0,
                   help="frames per second examined for scene changes, which slow/fast frame encoding needs (0: none)")
    p.add_argument("--scene-similarity", type=float, default=0.95,
                   help="a frame with less than this share of thumbnail cells like the reference's is a scene change")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_arg_parser().parse_args(argv)
    try:
        opts = IngestOptions(videos=a.videos, out=a.out, annotations=a.annotations,
                             shard_size_mb=a.shard_size_mb, workers=a.workers, proxy=a.proxy,
                             proxy_fps=a.proxy_fps, proxy_short_side=a.proxy_short_side,
                             proxy_keyframe_s=a.proxy_keyframe_s, timeout_s=a.timeout_s,
                             retry_rejects=a.retry_rejects, check_decord=not a.no_decord_check,
                             scene_fps=a.scene_fps, scene_similarity=a.scene_similarity,
                             progress=not a.no_progress)
    except ValueError as e:
        print(f"ingest: {e}", file=sys.stderr)
        return 2
    try:
        s = ingest(opts)
    except (AnnotationsError, NothingToIngest, SettingsDiffer) as e:
        print(f"ingest: {e}", file=sys.stderr)
        return 2
    r = s["this_run"]
    more = (f" (+{r['extra_record_samples']} samples of their further annotation records)"
            if r["extra_record_samples"] else "")
    images_rejected = (f", {r['images_rejected']} rejected {r['images_rejected_by_reason']}" if r["images_rejected"]
                       else "")
    print(f"ingest: {r['accepted']} videos accepted{more}, {r['videos_rejected']} rejected "
          f"{r['videos_rejected_by_reason']}, {r['image_samples']} image samples ({r['image_files']} files)"
          f"{images_rejected}, {r['text_samples']} text-only samples, "
          f"{r['skipped_already_done']} already done; {s['num_samples']} samples in {len(s['shards'])} "
          f"shards under {opts.out}; {r['videos_per_s']} videos/s, {r['gb_per_s']} GB/s")
    if r["unannotated"] and opts.annotations is not None:
        # a held-out set's videos left in the same folder trained as videos without text, without a word
        print(f"ingest: {r['unannotated']} of the videos under {opts.videos} have no record in {opts.annotations} "
              f"(e.g. {', '.join(r['unannotated_first'])}): they are samples without text, on which nothing is "
              f"supervised; keep videos that are not to be trained on (a held-out set) out of --videos")
    if r["annotation_problems"]:
        extra = r["records_ignored_extra"]
        print(f"ingest: {r['annotation_problems']} annotation problems, warned above (their records left out)"
              + (f": {extra} of them records their sample had already (the same record again for a video, or a "
                 f"further record for an image set, which keeps its first)" if extra else ""))
    return 0
