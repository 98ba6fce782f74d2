"""Shard files: writing webdataset-style tars with a byte-offset index, and reading them back.

A shard `shard-000012.tar` is a plain (webdataset-compatible) tar: for each sample `<key>.json`
(metadata + annotation) then `<key>.<ext>` (the video, stored uncompressed). A further sample of the same video
(another annotation record for it, docs/data.md "Annotation JSONL schema") is its `<key>.json` alone, after the
video's members in the same tar, naming the member it shares under `"video_member"`. A text-only sample (an
annotation record with no video, docs/data.md "Text-only samples") is its `<key>.json` alone, with
`"kind": "text"` and `"video": null`; an image sample is `<key>.json` + `<key>.<image ext>` (one image) or
`<key>.<i>.<image ext>` for i = 0, 1, ... (several, in the order its text uses them), with `"kind": "image"`,
`"video": null` and the verified metadata of each under `"images"`. Beside it,
`shard-000012.idx.json` lists every sample with the byte offsets of its members and the verified
metadata, so the loader can plan a whole epoch and seek straight to any sample without scanning
tars. Shards without an index (written by other tools in the same layout) are scanned once.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import marshal
import os
import re
import sys
import tarfile
import tempfile
import urllib.parse
import zlib
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data.node_files import array_json, json_array, shaped, shared_arrays

from . import remote as remote_mod
from .remote import RemoteOptions, RemoteShard

log = logging.getLogger(__name__)


SCHEMA = "keye-video-meta/4"
"""/4: a video's pts may be `pts_packed` instead of `pts_runs` (timeline.frame_pts reads both), and it carries `hflip`
(a mirroring display matrix) and, converted from an animated GIF or WebP, `converted_from`; /3: a video may carry
scene_changes (slow/fast frames); /2: text-only and image samples may appear; /1 to /3 shards read as before"""
VIDEO_EXTS = ("mp4", "mkv", "webm", "mov", "avi", "m4v", "ts", "mpg", "mpeg", "flv", "3gp", "3g2", "mts", "m2ts", "wmv",
              "asf", "vob", "mxf")
"""Containers stored as they are: also older phones' 3GP, camcorders' AVCHD (.mts/.m2ts: MPEG-TS), Windows Media,
DVD VOB (MPEG-PS) and broadcast MXF, which PyAV and decord read as they do the others"""
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_path(tar_path: str | os.PathLike) -> str:
    p = str(tar_path)
    return (p[:-4] if p.endswith(".tar") else p) + ".idx.json"


def make_key(rel_path: str) -> str:
    """A webdataset key (no dots, no slashes) that is unique per relative path."""
    stem = rel_path.rsplit(".", 1)[0] if "." in os.path.basename(rel_path) else rel_path
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[-80:] or "video"
    digest = hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:8]
    return f"{clean}-{digest}"


def record_key(rel_path: str, i: int) -> str:
    """The key of the sample of record `i` (1, 2, ... in file order; 0 is the first record, keyed `make_key`) of a
    video with several annotation records: `<make_key>-r<i>`. Unique: a make_key ends in 8 hex digits, never in
    `-r<i>`, and a text-only key is `text-<hex>`."""
    return make_key(rel_path) if i == 0 else f"{make_key(rel_path)}-r{i}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uname = ti.gname = ""
    return ti


def image_member_ext(path: str, fmt: str | None) -> str:
    """The extension of an image's tar member: its file name's (lower case) when it is one of IMAGE_EXTS, else the
    one of its decoded format (Pillow's, e.g. "PNG") when that is, else the file name's when it is letters and
    digits, else "img". Only the basename counts: a dot in a folder's name is no extension."""
    ext = os.path.splitext(os.path.basename(path))[1][1:].lower()
    if ext in IMAGE_EXTS:
        return ext
    by_format = {"jpeg": "jpg"}.get((fmt or "").lower(), (fmt or "").lower())
    if by_format in IMAGE_EXTS:
        return by_format
    return ext if re.fullmatch(r"[a-z0-9]+", ext) else "img"


class _Crc32Reader:
    """A file read through: the CRC32 of the bytes read so far (`crc`)."""

    def __init__(self, f) -> None:
        self.f, self.crc = f, 0

    def read(self, n: int = -1) -> bytes:
        buf = self.f.read(n)
        self.crc = zlib.crc32(buf, self.crc)
        return buf


class ShardWriter:
    """Writes one shard to `<name>.tmp`; `close()` renames it and writes its index."""

    def __init__(self, out_dir: str | os.PathLike, index: int) -> None:
        self.path = os.path.join(str(out_dir), shard_name(index))
        self.tmp = self.path + ".tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.entries: list[dict] = []

    @property
    def size(self) -> int:
        return self.tar.offset

    def _add(self, name: str, size: int, fileobj) -> tuple[int, int]:
        self.tar.addfile(_tarinfo(name, size), fileobj)
        end = self.tar.offset                               # end of the padded data block
        data_start = end - ((size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return data_start, size

    def _add_file(self, name: str, path: str) -> tuple[int, int, int]:
        """A file as member `name`: (data offset, size, CRC32 of its bytes as read while they were written)."""
        with open(path, "rb") as f:
            reader = _Crc32Reader(f)
            off, size = self._add(name, os.path.getsize(path), reader)
        return off, size, reader.crc

    def add_sample(self, key: str, video_path: str, video_ext: str, record: dict) -> dict:
        payload = json.dumps(record, sort_keys=True).encode("utf-8")
        j_off, j_size = self._add(f"{key}.json", len(payload), io.BytesIO(payload))
        v_off, v_size, v_crc = self._add_file(f"{key}.{video_ext}", video_path)
        entry = {"key": key, "json_offset": j_off, "json_size": j_size,
                 "video_member": f"{key}.{video_ext}", "video_offset": v_off, "video_size": v_size,
                 "video_crc32": v_crc, "source_path": record.get("source_path"), "video": record["video"],
                 "annotation": record.get("annotation", {})}
        self.entries.append(entry)
        return entry

    def add_shared_sample(self, key: str, video_member: str, record: dict) -> dict:
        """A further sample of a video written in this shard (`add_sample`): its `<key>.json` alone, whose index entry
        points at the same member, offset and size as the video's first sample, with the same verified `video`
        metadata. The json names the member (`"video_member"`), so that `scan_shard` can resolve it."""
        # the video's first sample (or one sharing it: the same fields); written last, its further records follow it
        owner = next((e for e in reversed(self.entries) if e.get("video_member") == video_member), None)
        if owner is None:
            raise ValueError(f"{self.tmp}: no video member {video_member!r} in this shard for sample {key!r}")
        rec = dict(record, key=key, video_member=video_member, video=owner["video"])
        payload = json.dumps(rec, sort_keys=True).encode("utf-8")
        j_off, j_size = self._add(f"{key}.json", len(payload), io.BytesIO(payload))
        entry = {"key": key, "json_offset": j_off, "json_size": j_size, "video_member": video_member,
                 "video_offset": owner["video_offset"], "video_size": owner["video_size"],
                 "video_crc32": owner.get("video_crc32"), "source_path": rec.get("source_path"),
                 "video": owner["video"], "annotation": rec.get("annotation", {})}
        self.entries.append(entry)
        return entry

    def add_image_sample(self, key: str, image_paths: list[str], record: dict) -> dict:
        """An image sample: `<key>.json`, then each image file as stored: `<key>.<ext>` when there is one,
        `<key>.<i>.<ext>` when there are several (`record["images"]`: their metadata, in the same order)."""
        assert record.get("kind") == "image" and record.get("video") is None, record
        assert len(record.get("images") or ()) == len(image_paths) >= 1, record
        payload = json.dumps(record, sort_keys=True).encode("utf-8")
        j_off, j_size = self._add(f"{key}.json", len(payload), io.BytesIO(payload))
        members = []
        for i, path in enumerate(image_paths):
            ext = image_member_ext(path, record["images"][i].get("format"))
            name = f"{key}.{ext}" if len(image_paths) == 1 else f"{key}.{i}.{ext}"
            off, size, crc = self._add_file(name, path)
            members.append({"member": name, "offset": off, "size": size, "crc32": crc})
        entry = {"key": key, "kind": "image", "json_offset": j_off, "json_size": j_size, "video_member": None,
                 "video_offset": -1, "video_size": 0, "image_members": members,
                 "source_path": record.get("source_path"), "video": None, "images": record["images"],
                 "annotation": record.get("annotation", {})}
        self.entries.append(entry)
        return entry

    def add_text_sample(self, key: str, record: dict) -> dict:
        """A text-only sample: its `<key>.json` member alone (`record["video"]` is None)."""
        assert record.get("kind") == "text" and record.get("video") is None, record
        payload = json.dumps(record, sort_keys=True).encode("utf-8")
        j_off, j_size = self._add(f"{key}.json", len(payload), io.BytesIO(payload))
        entry = {"key": key, "kind": "text", "json_offset": j_off, "json_size": j_size, "video_member": None,
                 "video_offset": -1, "video_size": 0, "source_path": None, "video": None,
                 "annotation": record.get("annotation", {})}
        self.entries.append(entry)
        return entry

    def close(self) -> tuple[str, list[dict]]:
        self.tar.close()
        os.replace(self.tmp, self.path)
        idx = {"schema": SCHEMA, "shard": os.path.basename(self.path),
               "bytes": os.path.getsize(self.path), "samples": self.entries}
        tmp = index_path(self.path) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(idx, f)
        os.replace(tmp, index_path(self.path))
        return self.path, self.entries

    def abort(self) -> None:
        try:
            self.tar.close()
        except Exception:
            pass
        for p in (self.tmp,):
            try:
                os.unlink(p)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

@dataclass
class SampleRecord:
    uid: int                 # position in the catalog (shards sorted by path, samples in tar order)
    shard: str               # tar path
    key: str
    video_offset: int
    video_size: int
    video_ext: str
    video: dict | None       # verified metadata of the stored video; None for a text-only or image sample
    annotation: dict
    images: list[dict] | None = None                    # an image sample: each image's verified metadata
    image_members: list[tuple[int, int]] | None = None  # ... and its member's (byte offset, size) in the tar
    # the CRC32 of the video member's bytes, and of each image member's, as ingest wrote them (checked where a member is
    # read: MemberChecksumError); None where the index records none (written before they were, or by scan_shard)
    video_crc32: int | None = None
    image_crc32: list[int | None] | None = None

    @property
    def is_text(self) -> bool:
        return self.video is None and self.images is None

    @property
    def is_image(self) -> bool:
        return self.images is not None

    @property
    def kind(self) -> str:
        return "image" if self.images is not None else "text" if self.video is None else "video"


def resolve_shards(spec: str, remote: RemoteOptions | None = None, *, field: str = "shards") -> list[str]:
    """Tar paths named by a dir, a glob, or a comma-separated list of either; sorted, unique. Shards on object
    storage (docs/data.md "Shards on object storage") are named by URLs: `https://host/d/shard-{000000..000099}.tar`
    (a brace list), a list file (`*.txt`, local or a URL: a shard a line, `TAR [INDEX]`), and for other schemes
    (`s3://`, `gs://`, ... through fsspec) also a folder or a glob; each comes back as a `RemoteShard` (its clean
    URL). `remote`: how a list file on object storage is read (its timeout and retries)."""
    opts = remote or RemoteOptions()
    local: list[str] = []
    urls: dict[str, RemoteShard] = {}
    for part in remote_mod.split_spec(spec):
        if remote_mod.is_list_file(part):
            for tar, index in _read_list(part, opts, field):
                if remote_mod.is_url(tar):
                    urls.setdefault(remote_mod.clean_url(tar), RemoteShard(tar, index))
                else:
                    local += _local_tars(tar)
            continue
        if not remote_mod.is_url(part):
            local += _local_tars(part)
            continue
        for url in remote_mod.expand_braces(part):
            if remote_mod.scheme(url) in remote_mod.HTTP_SCHEMES:
                path = urllib.parse.urlsplit(url).path
                if url.endswith("/") or any(c in path for c in "*?["):
                    raise ValueError(f"VideoDataConfig.{field} = {spec!r}: {remote_mod.clean_url(url)!r}: an HTTP "
                                     f"server's folder cannot be listed: name its shards with a brace list "
                                     f"(https://host/d/shard-{{000000..000099}}.tar) or a list file (*.txt)")
                if not path.endswith(".tar"):
                    raise ValueError(f"VideoDataConfig.{field} = {spec!r}: {remote_mod.clean_url(url)!r} is not a "
                                     f".tar shard nor a list file (*.txt)")
                found = [url]
            else:
                found = remote_mod.fs_glob(url)
            for u in found:
                urls.setdefault(remote_mod.clean_url(u), RemoteShard(u))
    out = sorted(set(os.path.abspath(p) for p in local)) + [urls[k] for k in sorted(urls)]
    return sorted(out)


def _local_tars(part: str) -> list[str]:
    if os.path.isdir(part):
        return glob.glob(os.path.join(part, "*.tar"))
    hits = glob.glob(part)
    if not hits and os.path.exists(part):
        hits = [part]
    return [h for h in hits if h.endswith(".tar")]


def _read_list(part: str, opts: RemoteOptions, field: str) -> list[tuple[str, str | None]]:
    """(tar, index or None) per line of the list file `part` (a local path or a URL)."""
    if remote_mod.is_url(part):
        try:
            text = remote_mod.get(part, opts).decode("utf-8")
        except (remote_mod.RemoteError, UnicodeDecodeError) as e:
            raise ValueError(f"VideoDataConfig.{field}: list file {e if isinstance(e, OSError) else part}") from None
        return remote_mod.parse_list(text, remote_mod.clean_url(part), part)
    try:
        with open(part, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"VideoDataConfig.{field}: list file {part!r} cannot be read ({e})") from None
    folder = os.path.dirname(os.path.abspath(part))
    return [(t if remote_mod.is_url(t) else os.path.join(folder, t),
             i if i is None or remote_mod.is_url(i) else os.path.join(folder, i))
            for t, i in remote_mod.parse_list(text, part, None)]


def probe_remote(shards: list[str], remote: RemoteOptions | None = None) -> None:
    """Read the index of the first and the last shard on object storage of `shards`, and the first one's first tar
    block with a Range request (a launch's check: a wrong host, path or brace range, a server that ignores Range
    requests or credentials that do not hold for the tars stop it before the model is built, in three requests; the
    loader reads every index). ValueError naming the URL."""
    urls = [p for p in shards if remote_mod.is_url(p)]
    for p in dict.fromkeys(urls[:1] + urls[-1:]):
        load_shard_index(p, remote)
    if urls:
        try:
            read_member(urls[0], 0, 512, remote)
        except remote_mod.RemoteError as e:
            raise ValueError(f"shard {urls[0]}: {e} (the launch reads its first 512 bytes as the loader reads "
                             f"every sample: by a Range request)") from None


def shard_identity(path: str) -> str:
    """What makes two shard names one shard: a local file's real path (through links), a URL's clean URL."""
    return str(path) if remote_mod.is_url(path) else os.path.realpath(path)


def same_files(paths: list[str]) -> list[tuple[str, str]]:
    """Pairs of `paths` that are one file (through a link: a folder named by two of its paths, or a glob that
    matches a folder and a link to it): its samples would be read twice."""
    first: dict[str, str] = {}
    out = []
    for p in paths:
        real = shard_identity(p)
        if real in first:
            out.append((first[real], p))
        else:
            first[real] = p
    return out


def unique_tails(paths: list[str]) -> list[str]:
    """Each path's shortest trailing part (of its folders and name) that no other of `paths` ends with."""
    parts = [p.replace(os.sep, "/").rstrip("/").split("/") for p in paths]
    names: list[str | None] = [None] * len(paths)     # "" is a name: the root folder's ("/")
    todo, depth = list(range(len(paths))), 1
    while todo:
        tail = {i: "/".join(parts[i][-depth:]) for i in todo}
        count = Counter(tail.values())
        for i in todo:
            if count[tail[i]] == 1 or depth >= len(parts[i]):
                names[i] = tail[i]
        todo, depth = [i for i in todo if names[i] is None], depth + 1
    return names


def shard_names(paths: list[str]) -> list[str]:
    """What names each of `paths` (shard files, all of a loader's sources) in sample keys, records and messages: its
    file name, unless a shard of another folder has that name too (launch/ingest.py numbers every folder's shards
    from shard-000000.tar): then every shard of such a folder is named with the folder's shortest trailing part that
    tells it from the others, `webvid/shard-000000.tar` beside `howto/shard-000000.tar`."""
    folders = [os.path.dirname(p) for p in paths]
    where: dict[str, set] = {}
    for f, p in zip(folders, paths):
        where.setdefault(os.path.basename(p), set()).add(f)
    clash = sorted({f for fs in where.values() if len(fs) > 1 for f in fs})
    tails = dict(zip(clash, unique_tails(clash)))
    return [f"{tails[f]}/{os.path.basename(p)}" if f in tails else os.path.basename(p)
            for f, p in zip(folders, paths)]


def scan_shard(tar_path: str) -> dict:
    """Build an index for a tar without one (members `<key>.json` + `<key>.<video ext>`, or a text-only
    sample's `<key>.json` alone, or a further sample of a video: its `<key>.json` naming the `video_member` it
    shares)."""
    by_key: dict[str, dict] = {}
    order: list[str] = []
    videos: dict[str, tuple[int, int]] = {}      # video member name -> (offset, size)
    with tarfile.open(tar_path, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key, _, ext = base.partition(".")
            ext = ext.lower()
            d = by_key.setdefault(key, {})
            if key not in order:
                order.append(key)
            img = re.fullmatch(r"(?:(\d+)\.)?([a-z0-9]+)", ext)
            if ext == "json":
                d["record"] = json.loads(tar.extractfile(m).read())
            elif ext in VIDEO_EXTS:
                d["video_member"] = m.name
                d["video_offset"] = m.offset_data
                d["video_size"] = m.size
                videos[m.name] = (m.offset_data, m.size)
            elif img:   # <key>.<ext> or <key>.<i>.<ext>: an image of an image sample (any format Pillow read at ingest)
                d.setdefault("images", {})[int(img.group(1) or 0)] = {"member": m.name, "offset": m.offset_data,
                                                                      "size": m.size}
    samples = []
    for key in order:
        d = by_key[key]
        rec = d.get("record") or {}
        if rec.get("kind") == "image" and isinstance(rec.get("images"), list):
            got = d.get("images", {})
            if sorted(got) != list(range(len(rec["images"]))):
                continue        # an image member missing: not a sample our tool wrote whole; skipped
            samples.append({"key": key, "kind": "image", "video_member": None, "video_offset": -1, "video_size": 0,
                            "image_members": [got[i] for i in range(len(got))], "video": None,
                            "images": rec["images"], "annotation": rec.get("annotation", {}),
                            "source_path": rec.get("source_path")})
            continue
        if rec.get("kind") == "text" and rec.get("video") is None and "video_offset" not in d:
            samples.append({"key": key, "kind": "text", "video_member": None, "video_offset": -1,
                            "video_size": 0, "video": None, "annotation": rec.get("annotation", {}),
                            "source_path": None})
            continue
        shared = rec.get("video_member")
        if "video_offset" not in d and isinstance(shared, str) and shared in videos:
            d.update(video_member=shared, video_offset=videos[shared][0], video_size=videos[shared][1])
        if "video_offset" not in d or not isinstance(rec.get("video"), dict):
            continue            # no verified metadata (or the video it shares is not here): skipped
        samples.append({"key": key, "video_member": d["video_member"], "video_offset": d["video_offset"],
                        "video_size": d["video_size"], "video": rec["video"],
                        "annotation": rec.get("annotation", {}), "source_path": rec.get("source_path")})
    return {"schema": SCHEMA, "shard": os.path.basename(tar_path), "samples": samples}


def load_shard_index(tar_path: str, remote: RemoteOptions | None = None) -> dict:
    """The index of a shard: its `.idx.json`, or a local tar without one scanned. A shard on object storage must
    have its index (ValueError naming its URL: scanning would read the whole tar over the network)."""
    if remote_mod.is_url(tar_path):
        data, version = remote_mod.load_index(tar_path, remote or RemoteOptions())
        idx = _parsed_index(data, f"{remote_mod.clean_url(remote_mod.full_index_url(tar_path))} of {tar_path}",
                            "write it again (launch/ingest.py) and upload it")
        idx["object_version"] = version
        return idx
    p = index_path(tar_path)
    if os.path.exists(p):
        with open(p, "rb") as f:
            return _parsed_index(f.read(), p)
    return scan_shard(tar_path)


_INDEX_FIX = "write it again (launch/ingest.py), or delete it: a local shard without its index is scanned"


class ShardIndexError(ValueError):
    """A shard's index that cannot be read as one (not there on object storage, not JSON, not an index, a sample
    without what the catalog reads), named with what is wrong: the same on every rank, a stop before training."""


def _parsed_index(data: bytes, where: str, fix: str = _INDEX_FIX) -> dict:
    """A shard index's bytes (read from `where`, its path or URL) as the index, checked (check_shard_index)."""
    try:
        idx = json.loads(data)
    except ValueError as e:       # JSONDecodeError, UnicodeDecodeError: an index cut short or overwritten
        raise ShardIndexError(f"shard index {where}: not JSON ({e}); {fix}") from None
    return check_shard_index(idx, where, fix)


def check_shard_index(idx, where: str, fix: str = _INDEX_FIX) -> dict:
    """`idx` when it is a shard index whose samples hold what the catalog reads of them; else ValueError naming
    `where` (the index's path or URL), the first sample that is wrong, what is wrong with it and `fix`."""
    if not isinstance(idx, dict) or not isinstance(idx.get("samples"), list):
        raise ShardIndexError(f"shard index {where}: not a shard index (a JSON object with a 'samples' list); {fix}")
    for i, s in enumerate(idx["samples"]):
        if not isinstance(s, dict):
            why = f"not an object (a JSON {type(s).__name__})"
        elif not isinstance(s.get("key"), str) or not s["key"]:
            why = "no string 'key'"
        elif s.get("video") is not None and (wrong := [f for f in ("video_offset", "video_size")
                                                       if not _count(s.get(f))]):
            why = f"{' and '.join(repr(f) for f in wrong)} not a byte count (an integer >= 0)"
        elif s.get("image_members") is not None and not (
                isinstance(s["image_members"], list)
                and all(isinstance(m, dict) and _count(m.get("offset")) and _count(m.get("size"))
                        for m in s["image_members"])):
            why = "'image_members' not a list of {'offset', 'size'} byte counts"
        elif not _crc(s.get("video_crc32")) or (isinstance(s.get("image_members"), list)
                                                and not all(_crc(m.get("crc32")) for m in s["image_members"])):
            why = "a member's CRC32 ('video_crc32', an image member's 'crc32') not an integer in [0, 2^32)"
        else:
            continue
        name = f" ({s['key']})" if isinstance(s, dict) and isinstance(s.get("key"), str) else ""
        raise ShardIndexError(f"shard index {where}: sample {i}{name}: {why}; {fix}")
    return idx


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _crc(x) -> bool:
    """A member's CRC32 as an index records it, or None (an index written before they were recorded, or by scan)."""
    return x is None or (_count(x) and x < 2**32)


# the catalog's files in an index directory (Catalog, load_catalog); a record is marshal's bytes, whose format may
# change between Python versions: the version is part of the format
CATALOG_FORMAT = f"keye-catalog/3-py{sys.version_info[0]}.{sys.version_info[1]}-marshal{marshal.version}"
KINDS = ("video", "text", "image")      # Catalog.kind codes


def _record_bytes(s: dict) -> bytes:
    """What the catalog keeps of one shard-index sample: the fields of its SampleRecord (marshal: 0.9 us to write and
    1.6 us to read a short text's record here, against JSON's 9.6 and 4.7)."""
    ext = s["video_member"].rsplit(".", 1)[-1] if s.get("video_member") else ""
    rec = {"key": s["key"], "video_offset": int(s["video_offset"]), "video_size": int(s["video_size"]),
           "video_ext": ext, "video": s["video"], "annotation": s.get("annotation") or {}, "images": s.get("images"),
           "image_members": [[int(m["offset"]), int(m["size"])] for m in s["image_members"]]
           if s.get("image_members") else None, "video_crc32": s.get("video_crc32"),
           "image_crc32": [m.get("crc32") for m in s["image_members"]] if s.get("image_members") else None}
    return marshal.dumps(rec)


def _kind_code(s: dict) -> int:
    return KINDS.index("image" if s.get("images") is not None else "text" if s.get("video") is None else "video")


class Catalog:
    """Every sample of a set of shards, as a sequence of SampleRecord (uid = position), held in columns: each record's
    fields as bytes (marshal), back to back (`blob`), with their `offsets`, the shard of each (`shard_of`, into
    `shards`) and its kind (`kind`, into KINDS). A record is decoded where it is read (the last few are kept).

    A list of SampleRecord held every annotation, frame-time table and image list as Python objects: ~1.4 KB for a
    short text sample, in every rank and every loader worker. Here a sample costs its record's bytes plus 17 bytes, and
    with an index directory (load_catalog) the columns are files that every process of the node maps: page cache,
    shared and reclaimable, instead of a copy per process."""

    KEEP = 64   # decoded records kept (a pack's documents are read again where it is built)

    def __init__(self, shards: list[str], blob: np.ndarray, offsets: np.ndarray, shard_of: np.ndarray,
                 kind: np.ndarray, fingerprint: str, key: str) -> None:
        self.shards, self.blob, self.offsets, self.shard_of, self.kind = shards, blob, offsets, shard_of, kind
        self.fingerprint = fingerprint   # of the sample names, in order (the loader's resume check)
        self.key = key                   # of the contents: what a plan made from this catalog is a function of
        self._decoded: OrderedDict[int, SampleRecord] = OrderedDict()
        self._names = [os.path.basename(p) for p in shards]

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getitem__(self, uid):
        """The record of `uid` (a slice: a list of them)."""
        if isinstance(uid, slice):
            return [self[i] for i in range(*uid.indices(len(self)))]
        r = self._decoded.get(uid)
        if r is not None:
            return r
        uid = int(uid)
        if not 0 <= uid < len(self):
            raise IndexError(f"catalog uid {uid} out of range [0, {len(self)})")
        lo, hi = self.offsets[uid:uid + 2].tolist()
        d = marshal.loads(self.blob[lo:hi].tobytes())
        members = d["image_members"]
        r = self._decoded[uid] = SampleRecord(
            uid=uid, shard=self.shards[int(self.shard_of[uid])], key=d["key"], video_offset=d["video_offset"],
            video_size=d["video_size"], video_ext=d["video_ext"], video=d["video"], annotation=d["annotation"],
            images=d["images"], image_members=[tuple(m) for m in members] if members is not None else None,
            video_crc32=d["video_crc32"], image_crc32=d["image_crc32"])
        if len(self._decoded) > self.KEEP:
            self._decoded.popitem(last=False)
        return r

    def shard_name(self, uid: int) -> str:
        """The file name of `uid`'s shard (without reading its record)."""
        return self._names[int(self.shard_of[uid])]

    def __iter__(self) -> Iterator[SampleRecord]:
        return (self[i] for i in range(len(self)))

    def count(self, kind: str) -> int:
        return int(np.count_nonzero(self.kind == KINDS.index(kind)))

    def uids(self, kind: str) -> np.ndarray:
        return np.flatnonzero(self.kind == KINDS.index(kind))

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.blob, self.offsets, self.shard_of, self.kind))

    @classmethod
    def from_records(cls, records: list[SampleRecord]) -> "Catalog":
        """A catalog of records held elsewhere (tests, benchmarks), in their order; uids renumbered."""
        shards = sorted({r.shard for r in records})
        sid = {s: i for i, s in enumerate(shards)}
        samples = [{"key": r.key, "video_offset": r.video_offset, "video_size": r.video_size,
                    "video_member": f"{r.key}.{r.video_ext}" if r.video_ext else None, "video": r.video,
                    "annotation": r.annotation, "images": r.images,
                    "image_members": [{"offset": o, "size": n, "crc32": c} for (o, n), c in
                                      zip(r.image_members, r.image_crc32 or [None] * len(r.image_members))]
                    if r.image_members else None, "video_crc32": r.video_crc32} for r in records]
        blob, offsets, shard_of, kind, meta = _columns(shards, [(sid[r.shard], s) for r, s in zip(records, samples)])
        return cls(shards, blob, offsets, shard_of, kind, meta["fingerprint"],
                   hashlib.sha1(blob.tobytes() + json.dumps(shards).encode()).hexdigest()[:16])


def _columns(shards: list[str], samples: Iterable[tuple[int, dict]]):
    """(blob, offsets, shard_of, kind, meta) of (shard number, shard-index sample) pairs, in order."""
    blob, ends, shard_of, kind = bytearray(), array("q", [0]), array("i"), array("B")
    names = hashlib.sha1()
    for sid, s in samples:
        blob += _record_bytes(s)
        ends.append(len(blob))
        shard_of.append(sid)
        kind.append(_kind_code(s))
        names.update(f"{os.path.basename(shards[sid])}/{s['key']}\n".encode())
    meta = {"format": CATALOG_FORMAT, "shards": shards, "fingerprint": names.hexdigest()[:16]}
    _release_freed_memory()      # the shard indexes' objects, read and dropped one shard at a time
    return (np.frombuffer(blob, dtype=np.uint8), np.frombuffer(ends, dtype=np.int64),
            np.frombuffer(shard_of, dtype=np.int32), np.frombuffer(kind, dtype=np.uint8), meta)


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): the shard indexes' objects are freed
    after their records are copied into the columns, but without this their pages stay resident in the process (the
    catalog of 200K short texts took 640 MB resident for a 200 MB blob; measured in bench/RESULTS.md)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: the pages are reused by the process later
        pass


def _catalog_key(shards: list[str]) -> str:
    """What the catalog of `shards` is a function of: each tar's and its index's path, size and modification time; a
    shard on object storage by its clean URL alone (objects are taken as immutable: a shard rewritten under the same
    URL needs a new index_dir; asking every object's date would be a request per shard and process)."""
    files = []
    for tar_path in shards:
        if remote_mod.is_url(tar_path):
            files.append([str(tar_path)])
            continue
        for p in (tar_path, index_path(tar_path)):
            if os.path.exists(p):
                st = os.stat(p)
                files.append([os.path.realpath(p), st.st_size, st.st_mtime_ns])
    return hashlib.sha1(json.dumps({"format": CATALOG_FORMAT, "files": files}).encode()).hexdigest()[:16]


def load_catalog(spec: str, *, field: str = "shards", index_dir: str | os.PathLike | None = None,
                 remote: RemoteOptions | None = None) -> Catalog:
    """Every sample of the shards named by `spec` (`field` names the config key in errors), as a Catalog. With
    `index_dir`, its columns are files under `<index_dir>/catalog-<field>-<key>` (data/node_files.shared_arrays: read
    from the shard indexes once per node, then mapped; where that directory cannot be written, held in memory with a
    warning). `remote`: timeout and retries for shards on object storage."""
    shards = resolve_shards(spec, remote, field=field)
    if not shards:
        raise ValueError(f"VideoDataConfig.{field} = {spec!r}: no .tar shards found")
    twice = same_files(shards)
    if twice:
        raise ValueError(f"VideoDataConfig.{field} = {spec!r}: {len(twice)} shard file(s) are named twice, through a "
                         f"link ({twice[0][0]} and {twice[0][1]}, ...): their samples would be read twice. Name each "
                         f"folder once")
    key = _catalog_key(shards)

    sizes: list = [None] * len(shards)       # each URL shard's tar size, as its index says (RemoteShard.size)
    versions: list = [None] * len(shards)    # ... and what its reads check the tar against (RemoteShard.version)

    def samples():
        for i, idx in enumerate(_indexes(shards, remote, field)):
            if remote_mod.is_url(shards[i]) and isinstance(idx.get("bytes"), int):
                sizes[i] = idx["bytes"]
            if remote_mod.is_url(shards[i]):
                versions[i] = idx.get("object_version")
            yield from ((i, s) for s in idx["samples"])

    def build():
        blob, offsets, shard_of, kind, meta = _columns(shards, samples())
        if any(map(remote_mod.is_url, shards)):      # a local catalog's files stay as they were
            meta["bytes"] = sizes
            meta["versions"] = versions
        return blob, offsets, shard_of, kind, json_array(meta)

    def check(got) -> bool:
        blob, offsets, shard_of, kind, meta = got
        m = array_json(meta)
        n = len(shard_of)
        return (m.get("format") == CATALOG_FORMAT and m.get("shards") == shards
                and shaped(got[:4], [(None, np.uint8), (n + 1, np.int64), (n, np.int32), (n, np.uint8)])
                and int(offsets[-1]) == blob.shape[0])

    where = Path(index_dir, f"catalog-{field}-{key}") if index_dir else None
    parts = ("blob", "offsets", "shard", "kind", "meta")
    urls = any(map(remote_mod.is_url, shards))
    if urls and where is None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:     # one process alone: no cost
        log.warning("data.video.%s: shards on object storage without an index_dir: each process reads every shard "
                    "index (%d GETs); with data.video.index_dir (the trainer's default: under the run directory) one "
                    "process per node reads them and the others map its catalog", field, len(shards))
    try:
        got, note = shared_arrays(where, "catalog", parts, build, check, strict=urls)
    except OSError as err:
        # index_dir cannot be locked (a shared filesystem without flock): each process would read every shard index
        # from the store. A node-local directory keeps them to one process per node; named by index_dir too, so that
        # a fresh index_dir (a shard rewritten under its URL) is a fresh catalog there as well
        node = Path(tempfile.gettempdir(), f"keye-catalogs-{os.getuid()}",
                    f"{where.name}-{hashlib.sha1(str(Path(index_dir).resolve()).encode()).hexdigest()[:8]}")
        got, note = shared_arrays(node, "catalog", parts, build, check)
        log.warning("data.video.%s: the catalog cannot be kept in %s (%s): the catalog of these shards on object "
                    "storage is kept in %s%s, so that one process per node reads their indexes", field, where, err,
                    node, f" ({note}: each process holds its own)" if note else "")
        note = ""
    blob, offsets, shard_of, kind, meta = got
    m = array_json(meta)
    for p, n, v in zip(shards, m.get("bytes") or (), m.get("versions") or [None] * len(shards)):
        if isinstance(p, RemoteShard):
            p.size, p.version = n, v
    cat = Catalog(shards, blob, offsets, shard_of, kind, m["fingerprint"], key)
    if note:
        log.warning("data.video.%s: the catalog cannot be kept in %s (%s); each process holds its own (%.1f MB)",
                    field, where, note, cat.nbytes / 2**20)
    return cat


REMOTE_INDEX_READERS = 16
"""Shard indexes on object storage read at once: one after the other, 4096 indexes at 50 ms a request took minutes
before the first step; the window keeps few of them in memory at a time."""


def _indexes(shards: list[str], remote: RemoteOptions | None, field: str) -> Iterator[dict]:
    """The index of each of `shards`, in order: local ones read where they are needed, as before; those on object
    storage fetched by REMOTE_INDEX_READERS threads, at most twice that many ahead of the one given."""
    if not any(remote_mod.is_url(p) for p in shards):
        yield from (_index_of(p, remote, field) for p in shards)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(REMOTE_INDEX_READERS, thread_name_prefix="shard-index") as pool:
        ahead: list = []
        todo = iter(shards)
        try:
            for p in todo:
                ahead.append(pool.submit(_index_of, p, remote, field))
                if len(ahead) >= 2 * REMOTE_INDEX_READERS:
                    yield ahead.pop(0).result()
            while ahead:
                yield ahead.pop(0).result()
        finally:
            for f in ahead:
                f.cancel()
    # the readers' connections (16 a host) would stay open for the run in this process, which reads no more indexes
    # (DataLoader workers read the members, over connections of their own)
    remote_mod.close_idle()


def _index_of(tar_path: str, remote: RemoteOptions | None, field: str) -> dict:
    try:
        return load_shard_index(tar_path, remote)
    except ValueError as e:      # an index that is not there (object storage) or not an index
        raise ShardIndexError(f"VideoDataConfig.{field}: {e}") from None


def read_member(shard: str, offset: int, size: int, remote: RemoteOptions | None = None) -> bytes:
    """The bytes of a tar member; on object storage one Range request (remote.RemoteError, an OSError, when it
    fails after the retries)."""
    if remote_mod.is_url(shard):
        parts: list[bytes] = []
        remote_mod.read_range(remote_mod.full_url(shard), offset, size, remote or RemoteOptions(), parts.append,
                              total=getattr(shard, "size", None), version=getattr(shard, "version", None))
        return b"".join(parts)
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: short read at {offset} ({len(data)} of {size} bytes)")
    return data


class MemberChecksumError(ValueError):
    """A tar member's bytes are not those ingest wrote (their CRC32 differs from the index's)."""


def _check_crc(shard: str, offset: int, size: int, got: int, want: int | None) -> None:
    if want is not None and got != want:
        raise MemberChecksumError(f"{shard} bytes {offset}-{offset + size - 1}: CRC32 {got:08x}, the index says "
                                  f"{want:08x}: the member changed since ingest wrote it (a damaged disk, copy or "
                                  f"upload); write the shard again (launch/ingest.py)")


def spill_member(shard: str, offset: int, size: int, dst: str, chunk: int = 8 << 20,
                 remote: RemoteOptions | None = None, crc32: int | None = None) -> None:
    """Copy a tar member to its own file (decoders want a path), without holding it in memory; on object storage
    by one Range request, streamed (remote.RemoteError, an OSError, when it fails after the retries). `crc32`: the
    member's as its index records it, checked on the bytes copied (MemberChecksumError)."""
    crc = 0
    if remote_mod.is_url(shard):
        with open(dst, "wb") as out:
            def write(buf) -> None:
                nonlocal crc
                crc = zlib.crc32(buf, crc)
                out.write(buf)

            remote_mod.read_range(remote_mod.full_url(shard), offset, size, remote or RemoteOptions(), write,
                                  total=getattr(shard, "size", None), version=getattr(shard, "version", None))
        _check_crc(shard, offset, size, crc, crc32)
        return
    with open(dst, "wb") as out:
        for buf in _member_pieces(shard, offset, size, chunk):
            crc = zlib.crc32(buf, crc)
            out.write(buf)
    _check_crc(shard, offset, size, crc, crc32)


def check_member(shard: str, offset: int, size: int, crc32: int | None, chunk: int = 8 << 20) -> None:
    """The CRC32 of a local shard's member (read in place) is `crc32` (MemberChecksumError), where there is one."""
    if crc32 is None:
        return
    crc = 0
    for buf in _member_pieces(shard, offset, size, chunk):
        crc = zlib.crc32(buf, crc)
    _check_crc(shard, offset, size, crc, crc32)


def _member_pieces(shard: str, offset: int, size: int, chunk: int) -> Iterator[bytes]:
    """A local shard's member, `chunk` bytes at a time (OSError where the tar ends before it does)."""
    with open(shard, "rb") as src:
        src.seek(offset)
        left = size
        while left > 0:
            buf = src.read(min(chunk, left))
            if not buf:
                raise OSError(f"{shard}: member truncated at {offset + size - left}")
            yield buf
            left -= len(buf)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Lines of a JSONL file; a torn last line (interrupted write) is ignored."""
    out = []
    if not Path(path).exists():
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
