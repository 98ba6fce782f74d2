"""Shard files: writing webdataset-style tars with a byte-offset index, and reading them back.

A shard `shard-000012.tar` is a plain (webdataset-compatible) tar: for each sample `<key>.json`
(metadata + annotation) then `<key>.<ext>` (the video, stored uncompressed). A text-only sample (an
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
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path


SCHEMA = "keye-video-meta/3"   # /3: a video may carry scene_changes (slow/fast frames); /2: text-only and image samples may appear; /1 and /2 shards read as before
VIDEO_EXTS = ("mp4", "mkv", "webm", "mov", "avi", "m4v", "ts", "mpg", "mpeg", "flv")
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


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uname = ti.gname = ""
    return ti


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

    def add_sample(self, key: str, video_path: str, video_ext: str, record: dict) -> dict:
        payload = json.dumps(record, sort_keys=True).encode("utf-8")
        j_off, j_size = self._add(f"{key}.json", len(payload), io.BytesIO(payload))
        vsize = os.path.getsize(video_path)
        with open(video_path, "rb") as f:
            v_off, v_size = self._add(f"{key}.{video_ext}", vsize, f)
        entry = {"key": key, "json_offset": j_off, "json_size": j_size,
                 "video_member": f"{key}.{video_ext}", "video_offset": v_off, "video_size": v_size,
                 "source_path": record.get("source_path"), "video": record["video"],
                 "annotation": record.get("annotation", {})}
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
            ext = path.rsplit(".", 1)[-1].lower()
            name = f"{key}.{ext}" if len(image_paths) == 1 else f"{key}.{i}.{ext}"
            with open(path, "rb") as f:
                off, size = self._add(name, os.path.getsize(path), f)
            members.append({"member": name, "offset": off, "size": size})
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

    @property
    def is_text(self) -> bool:
        return self.video is None and self.images is None

    @property
    def is_image(self) -> bool:
        return self.images is not None

    @property
    def kind(self) -> str:
        return "image" if self.images is not None else "text" if self.video is None else "video"


def resolve_shards(spec: str) -> list[str]:
    """Tar paths named by a dir, a glob, or a comma-separated list of either; sorted, unique."""
    out: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if os.path.isdir(part):
            out += glob.glob(os.path.join(part, "*.tar"))
        else:
            hits = glob.glob(part)
            if not hits and os.path.exists(part):
                hits = [part]
            out += [h for h in hits if h.endswith(".tar")]
    return sorted(set(os.path.abspath(p) for p in out))


def scan_shard(tar_path: str) -> dict:
    """Build an index for a tar without one (members `<key>.json` + `<key>.<video ext>`, or a text-only
    sample's `<key>.json` alone)."""
    by_key: dict[str, dict] = {}
    order: list[str] = []
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
            img = re.fullmatch(r"(?:(\d+)\.)?([a-z]+)", ext)
            if ext == "json":
                d["record"] = json.loads(tar.extractfile(m).read())
            elif img and img.group(2) in IMAGE_EXTS:      # <key>.<ext> or <key>.<i>.<ext>
                d.setdefault("images", {})[int(img.group(1) or 0)] = {"member": m.name, "offset": m.offset_data,
                                                                      "size": m.size}
            elif ext in VIDEO_EXTS:
                d["video_member"] = m.name
                d["video_offset"] = m.offset_data
                d["video_size"] = m.size
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
        if "video_offset" not in d or not isinstance(rec.get("video"), dict):
            continue            # no verified metadata: not ingested by our tool; skipped
        samples.append({"key": key, "video_member": d["video_member"], "video_offset": d["video_offset"],
                        "video_size": d["video_size"], "video": rec["video"],
                        "annotation": rec.get("annotation", {}), "source_path": rec.get("source_path")})
    return {"schema": SCHEMA, "shard": os.path.basename(tar_path), "samples": samples}


def load_shard_index(tar_path: str) -> dict:
    p = index_path(tar_path)
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return scan_shard(tar_path)


def load_catalog(spec: str, *, field: str = "shards") -> list[SampleRecord]:
    """Every sample of the shards named by `spec` (`field` names the config key in errors)."""
    shards = resolve_shards(spec)
    if not shards:
        raise ValueError(f"VideoDataConfig.{field} = {spec!r}: no .tar shards found")
    out: list[SampleRecord] = []
    for tar_path in shards:
        idx = load_shard_index(tar_path)
        for s in idx["samples"]:
            ext = s["video_member"].rsplit(".", 1)[-1] if s.get("video_member") else ""
            out.append(SampleRecord(uid=len(out), shard=tar_path, key=s["key"],
                                    video_offset=int(s["video_offset"]), video_size=int(s["video_size"]),
                                    video_ext=ext, video=s["video"], annotation=s.get("annotation") or {},
                                    images=s.get("images"),
                                    image_members=[(int(m["offset"]), int(m["size"])) for m in s["image_members"]]
                                    if s.get("image_members") else None))
    return out


def catalog_fingerprint(catalog: list[SampleRecord]) -> str:
    h = hashlib.sha1()
    for r in catalog:
        h.update(f"{os.path.basename(r.shard)}/{r.key}\n".encode())
    return h.hexdigest()[:16]


def read_member(shard: str, offset: int, size: int) -> bytes:
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: short read at {offset} ({len(data)} of {size} bytes)")
    return data


def spill_member(shard: str, offset: int, size: int, dst: str, chunk: int = 8 << 20) -> None:
    """Copy a tar member to its own file (decoders want a path), without holding it in memory."""
    with open(shard, "rb") as src, open(dst, "wb") as out:
        src.seek(offset)
        left = size
        while left > 0:
            buf = src.read(min(chunk, left))
            if not buf:
                raise OSError(f"{shard}: member truncated at {offset + size - left}")
            out.write(buf)
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
