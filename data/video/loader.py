"""`VideoPackedLoader`: resumable, DP-aware iterator of packed video batches.

Global order (independent of the number of data-parallel ranks and workers)
--------------------------------------------------------------------------
For epoch e, the sample order is a pure function of (catalog, seed, e): shards are permuted, their
samples read in tar order through a shuffle buffer that is *simulated over sample ids* with a seeded
RNG (so shard reads stay local, and the buffer's contents at any point are a function of the
position, not state to save). Every sample is planned from its metadata (frames, sizes, text), so
its token count is known, and the ordered samples are packed (best-fit, `pack_lookahead` open
bins) into that epoch's list of packs. Concatenating the epochs gives one global stream of packs
`(epoch, pack)`. With `index_dir` the catalog and these plans are files that the first process of the node
makes and every rank and worker maps (`Planner`, `shards.Catalog`).

Who gets what
-------------
A loader holds a position in that stream: `base` (the first pack not known to be consumed), a
small `skip` set (packs after base already consumed, only after merging uneven rank states), and
`consumed` (packs this rank has yielded since base). Let `remaining` be the stream from `base` minus
`skip`. Rank r of W yields remaining[r], remaining[r + W], remaining[r + 2W], ...; inside a rank,
DataLoader worker w of K builds the rank's items w, w + K, ... and torch's in-order round robin
returns them in rank order. A pack is decoded only by the worker that yields it. A loader made with pixels=False
builds the same packs without decoding (a rank whose replica decodes once, parallel.vit.decode_once: docs/data.md
"Decoding once per replica"); `rebuild` then leaves out the samples the decoding rank failed to decode.

Resume
------
Ranks step in lockstep (one pack each per micro-step), so after c steps exactly remaining[:W*c] is
consumed, whatever W was. `load_state_dict` advances `base` by W_saved * c_saved packs of
`remaining` — by index, nothing is replayed or decoded — and continues with the new W. Hence the
same W resumes bit-exactly, and W=2 -> 1 or 1 -> 2 neither repeats nor skips a pack (so a sample)
for the rest of the epoch. `merge_rank_states` combines per-rank states of ranks that are not in
lockstep. With `num_epochs` set, the stream ends at the last epoch, trimmed to a multiple of W so
that ranks end together.

Two sources (the long-context curriculum's long:short mixture)
-------------------------------------------------------------
With `long_shards` set, each source (`shards` = "short", `long_shards` = "long") has its own catalog,
planner and epochs, and mixed position g of the stream takes the next pack of the source drawn for g
by a seeded hash (`streams.MixedStream`): a share `long_fraction` of the packed sequences comes from
the long source. Everything above holds with "pack" read as "mixed position": ranks split the mixed
stream, so each rank gets a disjoint part of each source; the state holds g and each source's
(epoch, pack); resume never replays. `stats["sources"]` counts packs, samples and tokens per source.

Bad samples
-----------
A sample whose decode fails (error, short decode, crash, hang) is left out of its pack (the pack is
padded instead), written to the quarantine JSONL with (shard, key, reason) and counted by reason;
the run raises only after `max_consecutive_failures` failures in a row.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.exclude import ExcludeList
from data.node_files import array_json, json_array, prune, shaped, shared_arrays, shared_chunks
from data.sample_position import DataStateMismatch
from data.token_files import TokenPacks

from .annotations import conversation_turns, markers_moved, spells_special, vision_moved
from .backends import DecodeError, DecodeRequest, decode_frames
from .config import VideoDataConfig
from .isolation import GuardedWorker, WorkerFailure
from .packing import (DocPlan, PackedSample, assemble_pack, build_document, encode_text_document, pack_greedy,
                      patchify, plan_document, split_runs)
from .sampling import PlanError
from .images import ImageError, decode_member
from .remote import RemoteOptions, is_url
from .shards import (Catalog, MemberChecksumError, SampleRecord, check_member, load_catalog, shard_identity,
                     spill_member)
from .shards import shard_names as shard_names_of
from .streams import MixedStream, SourceStream, advance, iter_stream, remaining_count  # noqa: F401 (re-exported)
from .tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)
STATE_VERSION = 1
PLAN_FORMAT = "keye-plan/2"      # the epoch plans' files under VideoDataConfig.index_dir (Planner)
_PLAN_FIELDS = ("seq_len", "pack_lookahead", "max_text_tokens", "sample_fps", "min_frames", "max_frames",
                "min_frame_tokens", "max_frame_tokens", "video_tokens_per_second", "min_video_tokens",
                "max_video_tokens", "frame_jitter", "patch_size", "merge_size", "max_aspect_ratio",
                "shuffle", "shuffle_buffer", "tokenizer", "vocab_size", "special_token_offset")
_IMAGE_PLAN_FIELDS = ("min_image_tokens", "max_image_tokens")
# under a Qwen chat template a video's frames, and an image sample's images without markers, stand in the user turn
# (annotations.video_segments, image_chunks); a state from before, whose frames and such images came before all text,
# has no "vision_at" field: taken only where no document moved (VideoPackedLoader._same_plan_before)
VISION_AT = "marker"
# "<video>" / "<image>" are markers only where a record places its pictures (a prompt, a QA question, a user turn, a
# free text) and text elsewhere (annotations.Verbatim); a state from before, when they were markers in any text, has no
# "markers" field: taken only where no document moved
MARKERS = "user"
# plan fields added since states were saved without them, each with what it says of the documents: a state without
# one continues where no document moved by it (VideoPackedLoader._same_plan_before), else it is refused naming it
LATER_FIELDS = {
    "vision_at": (
        "a video's frames now stand where its marker is in the conversation, inside the user turn, and an image "
        "sample's images without markers at the start of its first user turn, where they stood before all of its "
        "text when this state was saved"),
    "markers": (
        "a '<video>' or '<image>' spelled in a caption, an event, an answer, or a system, assistant or tool turn is "
        "now its text, where it was a marker (the frames or an image stood there; under chat_template plain it was "
        "dropped) when this state was saved"),
    "turn_tokens": (
        "under the byte tokenizer a chat template's '<|im_start|>' and '<|im_end|>' are now one id each, where they "
        "were written as their bytes (the bytes a text that spells them gives) when this state was saved"),
    "specials_in_text": (
        "a record's text that spells one of the tokenizer's special tokens (such as '<|im_end|>' or "
        "'<|vision_start|>') is now read as its characters, where it gave that token's id when this state was "
        "saved (and one that spells a visual placeholder was quarantined)"),
}


class NothingPlanned(RuntimeError):
    """Every sample of a source is rejected at plan time: its every epoch is empty. Names the setting of the source
    (data.video.shards, or the held-out set's), the reasons and the first sample."""


class LoaderStateMismatch(DataStateMismatch):
    """A loader state saved for other data, planning settings or seed than this loader's (`load_state_dict`, strict):
    `detail` says what changed, `changed` holds the planning fields that differ as (saved, now), `catalog_changed`
    whether the samples differ. Its message names what a caller of the loader can do (strict=False); a run's
    trainer names what its user can (train/data_streams.restore_data_state)."""

    def __init__(self, detail: str, changed: dict, catalog_changed: bool) -> None:
        super().__init__(detail, changed, catalog_changed)
        self.args = (f"{detail}; load_state_dict(state, strict=False) restarts at the saved epoch's beginning",)


class SampleFailure(Exception):
    """gone: the sample's shard is not there any more (a shard on object storage answering 404 or 410); refused: its
    store refuses every read of it (401 / 403, or a 200 to a Range request): not this sample's fault (build_pack)."""

    def __init__(self, reason: str, detail: str = "", *, gone: bool = False, refused: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.gone = gone
        self.refused = refused


# ---------------------------------------------------------------------------------------------
# planning: global order and packs of an epoch (pure functions of catalog, config, seed, epoch)
# ---------------------------------------------------------------------------------------------

def epoch_order(shard_of: np.ndarray, *, seed: int, epoch: int, shuffle: bool, buffer: int) -> np.ndarray:
    """Sample ids (uids) of one epoch in training order. `shard_of[uid]` = shard number; uids of a
    shard are contiguous and in tar order."""
    n = shard_of.shape[0]
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED])
    n_shards = int(shard_of.max()) + 1 if n else 0
    starts = np.searchsorted(shard_of, np.arange(n_shards + 1))
    perm = rng.permutation(n_shards)
    stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in perm]) if n else shard_of
    if buffer <= 1:
        return stream.astype(np.int64)
    draws = rng.random(stream.shape[0])
    out: list[int] = []
    buf: list[int] = []
    for x, u in zip(stream.tolist(), draws.tolist()):
        if len(buf) < buffer:
            buf.append(x)
            continue
        j = int(u * len(buf))
        out.append(buf[j])
        buf[j] = x
    tail = np.array(buf, dtype=np.int64)
    rng.shuffle(tail)
    return np.concatenate([np.array(out, dtype=np.int64), tail])


@dataclass
class EpochPlan:
    epoch: int
    order: np.ndarray                    # uids in training order (planned-out samples included)
    packs: "_Packs"                      # items per pack, pack order = stream order (Planner.uid_of)
    sizes: tuple                         # Planner.sizes: the dicts below are made from it where they are asked for

    @property
    def rejects(self) -> dict[int, tuple[str, str]]:
        """uid -> (reason, detail) for the samples that cannot be planned."""
        return {int(u): (reason, detail) for u, reason, detail in array_json(self.sizes[5])}

    @property
    def truncated(self) -> dict[int, int]:
        """uid -> text tokens cut (text-only samples longer than a sequence, text_overflow "cut"; a video's or an image
        sample's text longer than max_text_tokens or the room its frames leave)."""
        _, cut, pieces = self.sizes[:3]
        return {int(u): int(cut[u]) for u in np.flatnonzero((cut > 0) & (pieces > 0))}

    @property
    def pieces(self) -> dict[int, int]:
        """uid -> pieces of a text continued over sequences (text_overflow "continue")."""
        return {int(u): int(self.sizes[2][u]) for u in np.flatnonzero(self.sizes[2] > 1)}


class _Packs:
    """An epoch's packs as two arrays: the items of every pack back to back (`items`) and where each pack begins
    (`bounds`, one more than the packs). `packs[j]` is pack j's items as a list."""

    def __init__(self, items: np.ndarray, bounds: np.ndarray) -> None:
        self.items, self.bounds = items, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, j: int) -> list[int]:
        if not -len(self) <= j < len(self):
            raise IndexError(f"pack {j} of {len(self)}")
        j %= len(self)
        return self.items[self.bounds[j]:self.bounds[j + 1]].tolist()

    def __iter__(self):
        return (self[j] for j in range(len(self)))


class Planner:
    """Plans documents and epochs; identical in every process that builds one. What an epoch's plan needs of each
    document is held as arrays over the catalog: its length, text cut and pieces (0 where it cannot be planned), and
    the lengths of a continued text's later pieces; an epoch's packs are two arrays. With `plan_dir` (the loader's,
    under VideoDataConfig.index_dir) these are files that every process of the node maps: the documents are planned
    in chunks that the node's processes share out (data/node_files.shared_chunks), and one process packs the epoch,
    instead of every rank and worker planning everything. The whole plan of a document (token ids, frames) is made
    again where its pack is built and kept only for the last few."""

    RECENT = 64       # whole document plans kept (a pack's documents, and the texts continued in the next packs)
    TEXTS = 4         # encoded texts kept for their next pieces
    SIZES = ("length", "cut", "pieces", "extra_start", "extra_length", "rejects")
    CHUNK = 1 << 14   # documents planned per chunk (the unit the node's processes share out)

    def __init__(self, catalog: Catalog, cfg: VideoDataConfig, tokenizer: Tokenizer, seed: int, *,
                 plan_dir: str | os.PathLike | None = None, name: str = "shards", held_out: str = "",
                 shard_names: list[str] | None = None) -> None:
        """held_out: the setting that names this source when it is a held-out set (its shards are in cfg's
        `shards`, but the user gave them as, e.g., data.video.eval_shards): what its errors name. shard_names: what
        names each shard of the catalog in sample keys and records (the loader's, over all of its sources;
        shards.shard_names of the catalog's own shards unless given)."""
        self.catalog, self.cfg, self.tokenizer, self.seed = catalog, cfg, tokenizer, int(seed)
        self.shard_of = catalog.shard_of      # int32, mapped with the catalog (no copy per process)
        self.shard_names = list(shard_names) if shard_names is not None else shard_names_of(catalog.shards)
        assert len(self.shard_names) == len(catalog.shards), (len(self.shard_names), len(catalog.shards))
        self.plan_dir = Path(plan_dir) if plan_dir else None
        self.name = name
        self.setting = held_out or f"data.video.{name}"
        self.held_out = bool(held_out)
        self.index_note = ""     # why the plans are held in memory though plan_dir was given (logged once)
        self._released = 0       # plan_dir's files of epochs before this one are removed (release)
        self._sizes: dict[int, tuple] = {}
        self._recent: OrderedDict[tuple[int, int], DocPlan | PlanError] = OrderedDict()
        self._epochs: dict[int, EpochPlan] = {}
        self._texts: OrderedDict[int, tuple[list[int], list[bool]]] = OrderedDict()

    @property
    def fingerprint(self) -> str:
        """What the loader's state fingerprint holds of this source: its catalog's."""
        return self.catalog.fingerprint

    def summary(self) -> str:
        """What the loader's mixture line says of this source."""
        return f"{len(self.catalog)} samples"

    def uid_of(self, item: int) -> int:
        """The catalog uid of a planned item: a sample's uid, or for piece p > 0 of a text-only sample longer
        than a sequence (text_overflow "continue") uid + p * len(catalog)."""
        return item % len(self.catalog)

    def _encoded(self, r: SampleRecord) -> tuple[list[int], list[bool]]:
        """A text-only sample's tokens, kept for its next pieces (planned one after another, and built in
        neighbouring packs): the last few texts."""
        got = self._texts.get(r.uid)
        if got is None:
            got = self._texts[r.uid] = encode_text_document(r.annotation, self.tokenizer, self.cfg.chat_template)
            if len(self._texts) > self.TEXTS:
                self._texts.popitem(last=False)
        return got

    def _plan(self, item: int, epoch: int) -> DocPlan | PlanError:
        piece, uid = divmod(item, len(self.catalog))
        r = self.catalog[uid]
        try:
            # frames jittered by the shard's file name and key, as before two folders' shards were told apart: the
            # plans, so a saved loader state, stay those of a run whose shard names were ambiguous
            return plan_document(uid=uid, key=self.sample_name(uid), video=r.video,
                                 annotation=r.annotation, cfg=self.cfg, tokenizer=self.tokenizer, seed=self.seed,
                                 epoch=epoch, images=r.images, piece=piece,
                                 encoded=self._encoded(r) if r.is_text else None,
                                 rng_key=f"{self.catalog.shard_name(uid)}/{r.key}")
        except PlanError as e:
            return e
        except (KeyError, TypeError, ValueError) as e:
            return PlanError("bad_metadata", f"{type(e).__name__}: {e}")

    def _key(self, item: int, epoch: int) -> tuple[int, int]:
        """What a document's plan is a function of beside the catalog, config and seed: the item, and the epoch
        where frames are jittered."""
        return item, self._sizes_epoch(epoch)

    def _sizes_epoch(self, epoch: int) -> int:
        return epoch if self.cfg.frame_jitter > 0 else 0

    def doc(self, item: int, epoch: int) -> DocPlan:
        """The whole plan of a document (PlanError where it has none): a pure function of `_key`, so making it again
        gives the plan its epoch was packed by."""
        k = self._key(item, epoch)
        d = self._recent.get(k)
        if d is None:
            d = self._recent[k] = self._plan(item, epoch)
            if len(self._recent) > self.RECENT:
                self._recent.popitem(last=False)
        if isinstance(d, PlanError):
            raise d
        return d

    def _build_sizes(self, epoch: int, lo: int, hi: int) -> tuple:
        """The documents lo..hi-1's (length, text cut, pieces: 0 where it cannot be planned), where the later pieces'
        lengths of each continued text begin in `extra_length`, and the rejected documents' [uid, reason, detail]
        (JSON)."""
        n = len(self.catalog)
        length, cut = np.zeros(hi - lo, np.int32), np.zeros(hi - lo, np.int32)
        pieces, start = np.zeros(hi - lo, np.int32), np.zeros(hi - lo, np.int64)
        extra, rejects = [], []
        for uid in range(lo, hi):
            plan, i = self._plan(uid, epoch), uid - lo
            if isinstance(plan, PlanError):
                rejects.append([uid, plan.reason, plan.detail])
                continue
            length[i], cut[i], pieces[i], start[i] = plan.length, plan.truncated, plan.pieces, len(extra)
            for p in range(1, plan.pieces):      # the rest of a long text
                later = self._plan(uid + p * n, epoch)
                if isinstance(later, PlanError):
                    raise later
                extra.append(later.length)
        return length, cut, pieces, start, np.asarray(extra, np.int32), json_array(rejects)

    @staticmethod
    def _merge_sizes(chunks: list[tuple]) -> tuple:
        """The chunks' sizes as one: `extra_start` moved by the later pieces of the chunks before."""
        moved = np.cumsum([0] + [len(c[4]) for c in chunks[:-1]], dtype=np.int64)
        cat = lambda k: np.concatenate([c[k] for c in chunks])  # noqa: E731
        return (cat(0), cat(1), cat(2), np.concatenate([c[3] + m for c, m in zip(chunks, moved)]), cat(4),
                json_array([r for c in chunks for r in array_json(c[5])]))

    def _chunk(self, i: int) -> tuple[int, int]:
        return i * self.CHUNK, min(len(self.catalog), (i + 1) * self.CHUNK)

    def _check_sizes(self, got: tuple, n: int | None = None) -> bool:
        n = len(self.catalog) if n is None else n
        return shaped(got, [(n, np.int32), (n, np.int32), (n, np.int32), (n, np.int64), (None, np.int32),
                            (None, np.uint8)])

    def _note(self, note: str) -> None:
        if note and not self.index_note:
            self.index_note = note
            log.warning("video loader: %s: the epoch plans cannot be kept in %s (%s); each process plans "
                        "its own", self.setting, self.plan_dir, note)

    def sizes(self, epoch: int) -> tuple:
        """The arrays of `_build_sizes` over the catalog for `epoch` (the same for every epoch unless frames are
        jittered). Planned in chunks of CHUNK documents, which the node's processes plan side by side with
        `plan_dir` (data/node_files.shared_chunks): tokenizing every text is most of the planning."""
        k = self._sizes_epoch(epoch)
        got = self._sizes.get(k)
        if got is None:
            count = max(1, -(-len(self.catalog) // self.CHUNK))
            got, note = shared_chunks(self.plan_dir, f"sizes{k}", self.SIZES, count,
                                      lambda i: self._build_sizes(k, *self._chunk(i)),
                                      lambda i, a: self._check_sizes(a, self._chunk(i)[1] - self._chunk(i)[0]),
                                      self._merge_sizes, self._check_sizes)
            self._note(note)
            if self.cfg.frame_jitter > 0:          # per-epoch sizes of old epochs are dead
                self._sizes = {e: v for e, v in self._sizes.items() if e >= k - 1}
            self._sizes[k] = got
        return got

    def _build_packs(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Epoch e's (order of the samples, the packs' items back to back, where each pack begins)."""
        n = len(self.catalog)
        order = epoch_order(self.shard_of, seed=self.seed, epoch=e, shuffle=self.cfg.shuffle,
                            buffer=self.cfg.shuffle_buffer)
        length, _, pieces, start, extra, _ = self.sizes(e)
        kept = order[pieces[order] > 0]
        count = pieces[kept].astype(np.int64)
        uid = np.repeat(kept, count)                             # each kept sample, then its later pieces
        piece = np.arange(len(uid), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        items = uid + piece * n
        lengths = length[uid].astype(np.int64)
        later = piece > 0
        if later.any():
            lengths[later] = extra[start[uid[later]] + piece[later] - 1]
        bins = pack_greedy(lengths.tolist(), self.cfg.seq_len, self.cfg.pack_lookahead)
        flat = items[np.concatenate(bins).astype(np.int64)] if bins else items[:0]
        bounds = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)
        return order.astype(np.int64), flat.astype(np.int64), bounds

    def _check_packs(self, got: tuple) -> bool:
        order, items, bounds = got
        return (shaped(got, [(len(self.catalog), np.int64), (None, np.int64), (None, np.int64)]) and len(bounds) >= 1
                and int(bounds[-1]) == len(items))

    def epoch(self, e: int) -> EpochPlan:
        p = self._epochs.get(e)
        if p is None:
            sizes = self.sizes(e)       # before the epoch's lock: the node's processes plan the documents together
            (order, items, bounds), note = shared_arrays(self.plan_dir, f"epoch{e}", ("order", "items", "bounds"),
                                                         lambda: self._build_packs(e), self._check_packs)
            self._note(note)
            p = EpochPlan(epoch=e, order=order, packs=_Packs(items, bounds), sizes=sizes)
            if not len(p.packs):   # every sample rejected at plan time: every epoch would be empty, read forever
                reasons = Counter(reason for reason, _ in p.rejects.values())
                uid, (reason, detail) = min(p.rejects.items()) if p.rejects else (0, ("", ""))
                raise NothingPlanned(
                    f"video loader: {self.setting}: none of the {len(self.catalog)} samples can be planned "
                    f"(epoch {e}), so there is nothing to {'score' if self.held_out else 'train on'}; by reason: "
                    f"{dict(reasons)}; first: {self.key(uid)}: {reason}: {detail[:200]}. Check the shards "
                    f"({getattr(self.cfg, self.name)}) against data.video.seq_len ({self.cfg.seq_len}) and the "
                    f"annotations (docs/data.md)")
            if len(self._epochs) >= 3:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = p
        return p

    def num_packs(self, e: int) -> int:
        return len(self.epoch(e).packs)

    @property
    def on_disk(self) -> bool:
        """Whether the plans are files in plan_dir (else each process holds its own: nothing to release)."""
        return self.plan_dir is not None and not self.index_note

    def release(self, keep_from: int) -> None:
        """Removes plan_dir's plans of the epochs before `keep_from` (and their sizes, which jittered frames make per
        epoch): the caller knows that no process of the run reads them again (VideoPackedLoader._release). Planning
        ahead (counting the packs of later epochs) removes nothing: on a shared filesystem another node may map
        them, and a file removed under its map there is ESTALE, or SIGBUS in the reader, on NFS."""
        if self.on_disk and keep_from > self._released:
            prune(self.plan_dir, "epoch", keep_from)
            if self.cfg.frame_jitter > 0:
                prune(self.plan_dir, "sizes", keep_from)
            self._released = keep_from

    def shard_name(self, uid: int) -> str:
        """What names the shard of `uid` (`shard_names`): its file name, with its folder where that is ambiguous."""
        return self.shard_names[int(self.shard_of[uid])]

    def sample_name(self, uid: int) -> str:
        """The key that names sample `uid` in packs, records and messages: "<shard_name>/<key>"."""
        return f"{self.shard_name(uid)}/{self.catalog[uid].key}"

    def key(self, item: int) -> str:
        piece, uid = divmod(item, len(self.catalog))
        return self.sample_name(uid) + (f"#{piece}" if piece else "")


# ---------------------------------------------------------------------------------------------
# decoding one sample in a worker
# ---------------------------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def _remove_stale_spills(spill_dir: str) -> None:
    """Delete spill files left by processes that no longer exist (a worker killed mid-sample)."""
    try:
        names = os.listdir(spill_dir)
    except OSError:
        return
    host = _HOST
    for name in names:
        m = re.match(r"keye-(.+)-(\d+)-\d+-\d+\.", name)
        if not m or m.group(1) != host:          # only this host's files (spill_dir may be shared)
            continue
        pid = int(m.group(2))
        try:
            os.kill(pid, 0)
            continue                      # owner alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(spill_dir, name))
        except OSError:
            pass


def _out_of_memory(what: str, e: MemoryError) -> SampleFailure:
    """An inline decode that ran out of memory: not the file's fault, so its own reason (as the guarded child
    reports it, data/video/isolation.py)."""
    return SampleFailure("out_of_memory", f"{what}: MemoryError {str(e)[:200]}".strip())


class FrameSource:
    """Reads a sample's video member, spills it to tmpfs, decodes the planned frames (guarded)."""

    def __init__(self, cfg: VideoDataConfig) -> None:
        self.cfg = cfg
        self.remote = RemoteOptions.of(cfg)
        self.guard: GuardedWorker | None = None
        d = cfg.spill_dir
        self.spill_dir = d if d and os.path.isdir(d) and os.access(d, os.W_OK) else tempfile.gettempdir()
        self._n = 0
        self._spill_full_noted = False
        _remove_stale_spills(self.spill_dir)

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
            self.guard = None

    def _guarded(self, op: str, out_path: str, **kwargs) -> np.ndarray:
        """Run decode op `op` in this worker's guarded child (started on first use); it writes the pixels raw
        to `out_path` and returns their shape. A crash, hang or error becomes SampleFailure."""
        if self.guard is None:
            self.guard = GuardedWorker(name="decode", log_dir=self.spill_dir)
        try:
            shape = self.guard.call(op, timeout_s=self.cfg.sample_timeout_s, out_path=out_path, **kwargs)
        except WorkerFailure as e:
            raise SampleFailure(e.reason, e.detail) from None
        size = os.path.getsize(out_path)
        if size != int(np.prod(shape)):
            raise SampleFailure("short_decode", f"frame file has {size} bytes, expected {shape}")
        return np.memmap(out_path, dtype=np.uint8, mode="r", shape=tuple(shape))   # valid after unlink

    def _stem(self, rec: SampleRecord, where: str) -> str:
        self._n += 1
        return os.path.join(where, f"keye-{_HOST}-{os.getpid()}-{self._n}-{rec.uid}")

    def _in_spill(self, rec: SampleRecord, nbytes: int, work):
        """work(directory): the sample's files (its member's copy, the decoded pixels) written in the spill
        directory, or in the temporary directory's where the spill directory has no room for `nbytes` now, or ran out
        while they were written (a tmpfs: a container's /dev/shm is often 64 MB), said once. An OSError that escapes
        `work` (the copy's read or write) is the sample's read_error."""
        tmp = tempfile.gettempdir()
        where = self.spill_dir
        if where != tmp and nbytes and not _has_room(where, nbytes):
            self._note_full(rec, nbytes)
            where = tmp
        try:
            try:
                return work(where)
            except (OSError, SampleFailure) as e:
                if where == tmp or not _out_of_room(e):
                    raise
                self._note_full(rec, nbytes)
                where = tmp
                return work(where)
        except OSError as e:
            after = f" (in {tmp}, after data.video.spill_dir={self.spill_dir} had no room)" if where != self.spill_dir \
                else ""
            raise SampleFailure("read_error", f"{str(e)[:300]}{after}", gone=getattr(e, "gone", False),
                                refused=getattr(e, "refused", False)) from None

    def _copy_member(self, shard: str, offset: int, size: int, path: str, what: str = "",
                     crc32: int | None = None) -> None:
        """spill_member: a full filesystem's OSError is raised as it is (_in_spill tries the temporary directory),
        any other failure to read or write is the sample's read_error; bytes other than ingest's (`crc32`, the
        index's) its corrupt_member."""
        try:
            spill_member(shard, offset, size, path, remote=self.remote, crc32=crc32)
        except MemberChecksumError as e:
            raise SampleFailure("corrupt_member", f"{what}{e}") from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            raise SampleFailure("read_error", f"{what}{str(e)[:300]}", gone=getattr(e, "gone", False),
                                refused=getattr(e, "refused", False)) from None

    def _note_full(self, rec: SampleRecord, nbytes: int) -> None:
        if not self._spill_full_noted:
            self._spill_full_noted = True
            log.warning("video loader: data.video.spill_dir=%s has no room for %s/%s (%.1f MB with its decoded "
                        "pixels): samples that do not fit there are written to %s", self.spill_dir, rec.shard,
                        rec.key, nbytes / 1e6, tempfile.gettempdir())

    def images(self, rec: SampleRecord, doc: DocPlan) -> list[np.ndarray]:
        """uint8 [1, 3, H, W] (planar) of each planned image of an image sample, or SampleFailure. Decoded
        (Pillow) in the guarded child with decode_isolation "process", as a video is: a crash or hang costs
        this sample; "inline": in this worker."""
        out = []
        for i, ((offset, size), fp) in enumerate(zip(rec.image_members, doc.images)):
            nbytes = ((size if is_url(rec.shard) else 0)
                      + (3 * fp.height * fp.width if self.cfg.decode_isolation == "process" else 0))
            out.append(self._in_spill(rec, nbytes, functools.partial(self._image, rec, i, offset, size, fp)))
        return out

    def _image(self, rec: SampleRecord, i: int, offset: int, size: int, fp, where: str) -> np.ndarray:
        """Image `i` of an image sample (its member at `offset`, `size` bytes; its plan `fp`), its files in `where`."""
        what = f"{rec.key} image {i}"
        req = dict(shard=rec.shard, offset=offset, size=size, height=fp.height, width=fp.width, what=what)
        stem = self._stem(rec, where)
        local, raw = (f"{stem}.img{i}" if is_url(rec.shard) else None), f"{stem}.rgb"
        crc = rec.image_crc32[i] if rec.image_crc32 else None
        try:
            if local is not None:       # read here (timeout, retries), decoded from a local copy
                self._copy_member(rec.shard, offset, size, local, f"{what}: ", crc32=crc)
                req.update(shard=local, offset=0)
            else:                       # decoded in place: its bytes checked first (a few MB at most)
                try:
                    check_member(rec.shard, offset, size, crc)
                except MemberChecksumError as e:
                    raise SampleFailure("corrupt_member", f"{what}: {e}") from None
            if self.cfg.decode_isolation == "process":
                return self._guarded("decode_image", raw, **req)
            try:
                return decode_member(**req)
            except ImageError as e:
                raise SampleFailure(e.reason, e.detail) from None
            except MemoryError as e:
                raise _out_of_memory(what, e) from None
        finally:
            _unlink(raw)
            if local is not None:
                _unlink(local)

    def frames(self, rec: SampleRecord, doc: DocPlan) -> list[np.ndarray]:
        """The planned frames, uint8 planar, as runs of frames of one size: [n, 3, H, W] alone, or with slow and
        fast frames each run [m, 3, h, w] (`FramePlan.runs`; the decoder scales each frame to its own size).
        Or SampleFailure."""
        fp = doc.frames
        want = (fp.patches(1) * 3,) if fp.num_fast else (fp.num_frames, 3, fp.height, fp.width)
        req = dict(indices=list(fp.indices), height=fp.height, width=fp.width, meta=rec.video,
                   threads=self.cfg.decode_threads, layout="chw")
        if fp.num_fast:
            req.update(fast=list(fp.fast), fast_height=fp.fast_height, fast_width=fp.fast_width)

        def work(where: str) -> np.ndarray:
            stem = self._stem(rec, where)
            video, raw = f"{stem}.{rec.video_ext}", f"{stem}.rgb"
            try:
                self._copy_member(rec.shard, rec.video_offset, rec.video_size, video, crc32=rec.video_crc32)
                if self.cfg.decode_isolation == "process":
                    return self._guarded("decode", raw, backend=self.cfg.decode_backend, fault_tag=rec.key,
                                         path=video, **req)
                return self._inline(dict(req, path=video))
            finally:
                _unlink(video)
                _unlink(raw)

        raw_bytes = int(np.prod(want)) if self.cfg.decode_isolation == "process" else 0
        arr = self._in_spill(rec, rec.video_size + raw_bytes, work)
        if arr.shape != want:
            raise SampleFailure("short_decode", f"got {arr.shape}, planned {want}")
        return split_runs(arr, fp) if fp.num_fast else [arr]

    def _inline(self, req: dict) -> np.ndarray:
        use_alarm = threading.current_thread() is threading.main_thread()

        def on_alarm(signum, frame):
            raise TimeoutError

        old = None
        if use_alarm:
            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.cfg.sample_timeout_s)
        try:
            return decode_frames(self.cfg.decode_backend, DecodeRequest(**req))
        except DecodeError as e:
            raise SampleFailure(e.reason, e.detail) from None
        except MemoryError as e:
            raise _out_of_memory("decode", e) from None
        except TimeoutError:
            raise SampleFailure("timeout", f"decode took longer than {self.cfg.sample_timeout_s} s") from None
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)


def _has_room(directory: str, nbytes: int) -> bool:
    """Whether `directory`'s filesystem has `nbytes` free now, with 1 MiB to spare (True where it cannot be asked)."""
    try:
        return shutil.disk_usage(directory).free >= nbytes + (1 << 20)
    except OSError:
        return True


def _out_of_room(e: Exception) -> bool:
    """A write that found its filesystem full: here (ENOSPC), or in the guarded child (its detail)."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    return f"[Errno {errno.ENOSPC}]" in (getattr(e, "detail", "") or "")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _alloc_uint8(rows: int, cols: int, *, shared: bool) -> torch.Tensor:
    """[rows, cols] uint8; in shared memory when built in a DataLoader worker, so that handing it to
    the main process costs no copy."""
    if shared and rows:
        try:
            st = torch.UntypedStorage._new_shared(rows * cols)
            return torch.empty(0, dtype=torch.uint8).set_(st).view(rows, cols)
        except Exception:          # private API moved: fall back to a plain tensor (one extra copy)
            pass
    return torch.empty((rows, cols), dtype=torch.uint8)


def _write_patches(source: FrameSource, rec, doc, out: np.ndarray, p: int, m: int) -> None:
    """Reads and decodes a planned video or image document (SampleFailure when it cannot) and writes its ViT patches
    into `out`, the document's rows of the pack: each image into its own rows, in document order, or each run of
    frames of one size."""
    at = 0
    if doc.is_image:
        for arr, fp in zip(source.images(rec, doc), doc.images):
            k = (fp.height // p) * (fp.width // p)
            patchify(arr, p, m, out=out[at:at + k], layout="chw")
            at += k
        return
    runs = source.frames(rec, doc)           # frames of one size each
    for run in runs:
        k = run.shape[0] * (run.shape[2] // p) * (run.shape[3] // p)
        patchify(run, p, m, out=out[at:at + k], layout="chw")
        at += k


def build_pack(planner: Planner, source: FrameSource | None, epoch: int, index: int,
               exclude: frozenset = frozenset(), *, pixels: bool = True,
               failed: dict[int, dict] | None = None) -> PackedSample:
    """Decode and assemble pack `index` of `epoch` (failed samples are left out and reported, as are, undecoded,
    those whose keys `exclude` holds: data.exclude).

    The patches of all planned frames go straight into one preallocated tensor (a failed sample's
    slot is closed up), so a frame is copied once after decoding: from the decoder's output into
    the pack, already in ViT patch order.

    A failure record names its sample's place among the pack's planned samples (`slot`, the index into planned_keys):
    two shard folders may hold the same file name and key, which the record's "shard/key" would confuse.

    pixels=False (a rank of a replica that decodes once, parallel.vit.decode_once): nothing is read or decoded,
    `source` is unused and the pack's pixel_values has no rows; every sample counts as decoded except those
    `failed` holds (the decoding rank's failure records by slot), which are left out as that rank's pack left them,
    so that every tensor but the pixels is the decoding rank's."""
    if isinstance(planner, TokenPacks):          # a row of token files (data.video.text_tokens): text alone
        return planner.build(epoch, index)
    cfg, tok = planner.cfg, planner.tokenizer
    p, m = cfg.patch_size, cfg.merge_size
    items = planner.epoch(epoch).packs[index]
    plans = [planner.doc(item, epoch) for item in items]
    rows = [d.patch_rows(p) for d in plans]
    pixel_rows = _alloc_uint8(sum(rows) if pixels else 0, 3 * p * p, shared=get_worker_info() is not None)
    pv = pixel_rows.numpy()
    docs, keys, failures, excluded, off = [], [], [], [], 0
    counts = {"video_frames": 0, "fast_frames": 0, "text_continued": 0}   # of the documents packed (the log's)
    decoded = {"decoded_frames": 0, "decoded_images": 0, "decode_s": 0.0}  # this process's own work (not state)
    for slot, (doc, n) in enumerate(zip(plans, rows)):
        if doc.key in exclude:                   # closed up as a failed sample is; every piece of a long text
            excluded.append(doc.key)
            continue
        if doc.kind == "text":                   # a text-only sample: nothing to read or decode
            docs.append(build_document(doc, None, cfg, tok))
            keys.append(doc.key)
            counts["text_continued"] += int(doc.piece > 0)
            continue
        if not pixels:                           # the decoding rank's outcome, its pixels elsewhere
            if failed and slot in failed:
                failures.append(dict(failed[slot]))
                continue
        else:
            rec = planner.catalog[doc.uid]
            t0 = time.perf_counter()
            try:
                _write_patches(source, rec, doc, pv[off:off + n], p, m)
            except SampleFailure as e:
                if e.reason == "read_error" and e.refused:
                    # as for a shard gone: every sample of it would fail alike, and the run train on padding
                    raise RuntimeError(
                        f"video loader: shard {rec.shard} refuses reads ({e.detail[:300]}), reading {rec.key} of "
                        f"epoch {epoch} pack {index}: every sample of it would fail alike. Give credentials that "
                        f"hold (a list file of freshly signed URLs) or a server that answers Range requests with "
                        f"206, then rerun the same command to resume from the last checkpoint") from None
                if e.reason == "read_error" and (e.gone or not is_url(rec.shard) and not os.path.exists(rec.shard)):
                    # not this sample's fault: no sample of the shard can be read any more. Left out one by one,
                    # the run would train on packs of padding until max_consecutive_failures, its checkpoints of
                    # those steps displacing the good ones
                    raise RuntimeError(
                        f"video loader: shard {rec.shard} is gone ({e.detail[:200]}), reading {rec.key} of epoch "
                        f"{epoch} pack {index}: the data "
                        f"{'objects were' if is_url(rec.shard) else 'directory was'} moved or deleted while the run "
                        f"read it. Put it back and rerun the same command to resume from the last checkpoint") from None
                failures.append({"shard": planner.shard_name(doc.uid), "key": rec.key, "reason": e.reason,
                                 "detail": e.detail[:500], "slot": slot})
                continue
            finally:
                decoded["decode_s"] += time.perf_counter() - t0
            off += n
            if doc.frames is not None:
                decoded["decoded_frames"] += doc.frames.num_frames
            else:
                decoded["decoded_images"] += len(doc.images)
        docs.append(build_document(doc, None, cfg, tok))
        keys.append(doc.key)
        if doc.frames is not None:
            counts["video_frames"] += doc.frames.num_frames
            counts["fast_frames"] += doc.frames.num_fast
    pack = assemble_pack(docs, keys, cfg, tok, epoch=epoch, pack_index=index, failures=failures,
                         planned_keys=[d.key for d in plans], pixel_values=pixel_rows[:off])
    pack.excluded = list(dict.fromkeys(excluded))
    for k, v in {**counts, **decoded}.items():
        setattr(pack, k, v)
    return pack


class _PackDataset(IterableDataset):
    def __init__(self, stream, planners: list[Planner], names: list[str], base, skip, rank: int, world: int,
                 stop: int | None, exclude: frozenset = frozenset(), pixels: bool = True) -> None:
        self.stream, self.planners, self.names, self.exclude = stream, planners, names, exclude
        self.base, self.skip = tuple(base), frozenset(skip)
        self.rank, self.world, self.stop, self.pixels = rank, world, stop, pixels

    def __iter__(self):
        info = get_worker_info()
        k, w = (info.num_workers, info.id) if info is not None else (1, 0)
        source = FrameSource(self.planners[0].cfg) if self.pixels else None
        try:
            for it in self.stream.iter(self.base, self.skip, start=self.rank + w * self.world,
                                       stride=k * self.world, stop=self.stop):
                pack = build_pack(self.planners[it.source], source, it.epoch, it.pack, self.exclude,
                                  pixels=self.pixels)
                pack.source = self.names[it.source]
                yield pack
        finally:
            if source is not None:
                source.close()


def _identity(x):
    return x


# A DataLoader worker's death that torch's SIGCHLD handler reported outside a loader's draw, for the next draw to raise
# (_defer_worker_deaths), and how many draws are under way in this process's main thread
_WORKER_DEATHS: list[BaseException] = []
_DRAWING = [0]


def _defer_worker_deaths() -> None:
    """torch's SIGCHLD handler, which a DataLoader with workers installs, raises a worker's death in the main thread
    wherever that thread is: mid-step, after a round's exchange (data/video_stream.py settle), where this rank then
    stopped alone while the others waited for it in their next collective until the job was killed. Wrapped once
    per process (in the main thread): outside a draw the error is kept, and the next draw raises it, where a replica's
    ranks learn of it together (VideoBatchStream.take, settle); inside a draw it is raised as before. torch's
    iterator would find the dead worker there anyway (its status check); this only keeps the error out of the
    other code."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGCHLD)
    if not callable(current) or getattr(current, "defers_worker_deaths", False):
        return

    def handler(signum, frame) -> None:
        try:
            current(signum, frame)
        except RuntimeError as e:
            if _DRAWING[0]:
                raise
            _WORKER_DEATHS.append(e)

    handler.defers_worker_deaths = True
    signal.signal(signal.SIGCHLD, handler)


def _check_backend(name: str) -> None:
    """Fail at construction, not after max_consecutive_failures samples, if the backend is missing."""
    mod = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec.decoders"}[name]
    try:
        importlib.import_module(mod)
    except Exception as e:
        raise ValueError(f"VideoDataConfig.decode_backend = {name!r}: cannot import {mod} ({e})") from None


# ---------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------

def _newest_epochs(logged: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Of (source, epoch) pairs, each source's newest epoch alone."""
    newest: dict[int, int] = {}
    for src, e in logged:
        newest[src] = max(e, newest.get(src, e))
    return set(newest.items())


def _quarantine_identity(rec: dict) -> tuple:
    """What makes a quarantine record the same sample met again: its shard, key and source, at the same stage, epoch
    and pack, for the same reason (not its time, nor its detail, which may name a process's spill file)."""
    return tuple(rec.get(k) for k in ("shard", "key", "source", "stage", "epoch", "pack", "reason"))


class VideoPackedLoader:
    """Iterator of `PackedSample` for one data-parallel rank, with exact `state_dict` resume."""

    def __init__(self, cfg: VideoDataConfig, *, dp_rank: int = 0, dp_world: int = 1, seed: int = 0,
                 tokenizer: Tokenizer | None = None, catalog: Catalog | list[SampleRecord] | None = None,
                 long_catalog: Catalog | list[SampleRecord] | None = None, exclude: ExcludeList | None = None,
                 held_out: str = "", pixels: bool = True) -> None:
        """exclude: the samples data.exclude names, left out of the packs where they were planned (data/exclude.py);
        `unmatched` lists those that no source holds. held_out: the setting that named `cfg.shards` when they are a
        held-out set (data.video.eval_shards), for the planner's errors to name it. pixels=False: the packs are built
        without reading or decoding any video or image (build_pack): a rank of a replica whose pixels another rank
        decodes (parallel.vit.decode_once); `rebuild` then leaves out the samples that rank failed to decode."""
        if not isinstance(dp_world, int) or dp_world < 1:
            raise ValueError(f"dp_world = {dp_world!r}: must be an int >= 1")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank = {dp_rank!r}: must be in [0, dp_world={dp_world})")
        _check_backend(cfg.decode_backend)
        if cfg.batch_timeout_s > 0 and cfg.num_workers == 0:
            warnings.warn("VideoDataConfig.batch_timeout_s is ignored with num_workers=0 "
                          "(sample_timeout_s still guards each decode)")
        self.tokenizer = tokenizer or build_tokenizer(cfg)
        log.info("video loader: rank %d/%d, decode backend %s (%s), %d workers, seq_len %d, tokenizer %r",
                 dp_rank, dp_world, cfg.decode_backend, cfg.decode_isolation, cfg.num_workers, cfg.seq_len,
                 self.tokenizer)
        self.cfg, self.dp_rank, self.dp_world, self.seed = cfg, dp_rank, dp_world, int(seed)
        self.pixels = bool(pixels)
        self._decoded = Counter()       # this process's decode work since it started (not state: per rank by design)
        specs = cfg.sources()                      # [(name, shard spec, config field, weight)]
        given = [Catalog.from_records(c) if isinstance(c, list) else c for c in (catalog, long_catalog)]
        # token files (text_tokens) are a source without a catalog: data/token_files.TokenPacks stands for its planner
        cats = [None if fld == "text_tokens" else given[i] if given[i] is not None
                else load_catalog(spec, field=fld, index_dir=cfg.index_dir or None, remote=RemoteOptions.of(cfg))
                for i, (_, spec, fld, _) in enumerate(specs)]
        if len(cats) > 1 and cats[0] is not None and cats[1] is not None:
            # by the files' real paths: a folder given through a link is the same folder
            shared = sorted(set(map(shard_identity, cats[0].shards)) & set(map(shard_identity, cats[1].shards)))
            if shared:
                raise ValueError(f"VideoDataConfig.long_shards = {cfg.long_shards!r}: {len(shared)} shard file(s) are "
                                 f"also in shards ({shared[0]}, ...): the long and short sources must not overlap")
        self.source_names = [name for name, *_ in specs]
        self.catalogs = [c if c is not None else Catalog.from_records([]) for c in cats]
        # a shard is named by its file name, and by its folder too where another source's or folder's shard has
        # that name (shards.shard_names): each sample's key is then its own, in records, messages and data.exclude
        every = [p for c in self.catalogs for p in c.shards]
        names = iter(shard_names_of(every))
        named = [[next(names) for _ in c.shards] for c in self.catalogs]
        self.has_images = any(c.count("image") for c in self.catalogs)
        self.has_text = any(c.count("text") for c in self.catalogs)
        self.has_videos = any(c.count("video") for c in self.catalogs)
        self.planners = [TokenPacks(spec, cfg, self.tokenizer, self.seed) if fld == "text_tokens"
                         else Planner(c, cfg, self.tokenizer, self.seed, plan_dir=self._plan_dir(c), name=fld,
                                      held_out=held_out if fld == "shards" else "", shard_names=n)
                         for c, n, (_, spec, fld, _) in zip(self.catalogs, named, specs)]
        if cfg.fast_frame_ratio > 0 and dp_rank == 0:
            videos = [(p, u) for p in self._catalog_planners() for u in p.catalog.uids("video")]
            blind = [(p, u) for p, u in videos if "scene_changes" not in p.catalog[u].video]
            if blind:
                log.warning("video loader: fast_frame_ratio %s, but %d of %d videos have no scene changes in their "
                            "shard index (first: %s; ingested before slow/fast frames existed, or with --scene-fps "
                            "0): every frame of those is slow. Ingest them again to encode their repeated frames "
                            "small.", cfg.fast_frame_ratio, len(blind), len(videos),
                            blind[0][0].sample_name(blind[0][1]))
        self.catalog, self.planner = self.catalogs[0], self.planners[0]
        fps = [p.fingerprint for p in self.planners]
        self.catalog_fp = fps[0] if len(self.catalogs) == 1 else hashlib.sha1(
            "|".join(f"{n}:{fp}" for n, fp in zip(self.source_names, fps)).encode()).hexdigest()[:16]
        streams = [SourceStream(p, cfg.num_epochs) for p in self.planners]
        self.weights = [w for *_, w in specs]
        self.stream = streams[0] if len(streams) == 1 else MixedStream(streams, self.weights, self.seed)
        self.mixed = len(streams) > 1
        if self.mixed:
            log.info("video loader: mixture of %s", ", ".join(
                f"{n} ({p.summary()} from {spec!r}, {w:.1%} of packed sequences)"
                for (n, spec, _, w), p in zip(specs, self.planners)))
        self._base = self.stream.start()
        self._skip: frozenset = frozenset()
        self._consumed = 0
        self._it = None
        self._consecutive = 0
        self._stats = Counter()
        self._reasons: Counter = Counter()
        self._by_source: dict[str, Counter] = {n: Counter() for n in self.source_names} if self.mixed else {}
        self._logged_plan_epochs: set[tuple[int, int]] = set()     # (source, epoch)
        # how many packs of the global stream a rank of the run may read behind this one: the ranks consume in
        # lockstep (VideoBatchStream sets it from its step: twice a step's packs, and a round); the plans of epochs
        # below go as this rank passes them (_release), with each source's epochs' pack counts this rank has read
        self.lag_packs = 2 * self.dp_world
        self._pack_counts: list[dict[int, int]] = [{} for _ in self.planners]
        qp = cfg.quarantine_path.replace("{rank}", str(dp_rank)) if cfg.quarantine_path else ""
        self.quarantine_path = qp
        self.exclude_keys: frozenset = frozenset()
        self._unmatched: list[str] | None = []    # None: the sample keys not yet looked up (unmatched)
        self.ambiguous: dict[str, list[str]] = {}  # of those, the keys that name samples of several shards
        if exclude:
            self._leave_out(exclude)
        self._quarantined: set[tuple] | None = None   # its records (_quarantine), read at the first write

    # ---- iteration ----------------------------------------------------------------------------
    def _stop(self) -> int | None:
        n = self.stream.remaining(self._base, self._skip)
        if n is None:
            return None
        return (n // self.dp_world) * self.dp_world

    def _make_iter(self):
        # start after the packs this rank already yielded since `base` (non-zero only after close())
        done = self._consumed * self.dp_world
        base, skip = self.stream.advance(self._base, self._skip, done)
        stop = self._stop()
        ds = _PackDataset(self.stream, self.planners, self.source_names if self.mixed else [""], base, skip,
                          self.dp_rank, self.dp_world, None if stop is None else max(0, stop - done), self.exclude_keys,
                          self.pixels)
        if self.cfg.num_workers == 0:
            return iter(ds)
        dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity,
                        prefetch_factor=self.cfg.prefetch_factor, timeout=self.cfg.batch_timeout_s,
                        persistent_workers=False)
        it = iter(dl)   # torch installs its SIGCHLD handler here, once per process
        _defer_worker_deaths()
        return it

    def __iter__(self):
        return self

    def __next__(self) -> PackedSample:
        pack = self.draw()
        self.account(pack)
        return pack

    def draw(self) -> PackedSample:
        """The next pack, counted as consumed but not yet accounted (its samples, failures and quarantine records):
        `account` follows, once the pack is final (a rank without pixels may `rebuild` it first)."""
        if _WORKER_DEATHS:   # reported by torch's SIGCHLD handler outside a draw (_defer_worker_deaths)
            raise _WORKER_DEATHS.pop(0)
        if self._it is None:
            self._it = self._make_iter()
        _DRAWING[0] += 1
        try:
            pack = next(self._it)
        except RuntimeError as e:
            # torch's own words name neither the setting nor the pack ("DataLoader timed out after 3.0 seconds")
            if not (self.cfg.batch_timeout_s > 0 and str(e).startswith("DataLoader timed out")):
                raise
            self.close()
            at = self.position()
            keys = at.get("keys", [])
            raise RuntimeError(
                f"video loader: rank {self.dp_rank}: no packed sequence from its DataLoader workers within "
                f"data.video.batch_timeout_s = {self.cfg.batch_timeout_s:g} s; the one awaited: epoch {at['epoch']} "
                f"pack {at['pack']}{' of ' + at['source'] if 'source' in at else ''} (its samples: "
                f"{', '.join(keys[:8])}{f', +{len(keys) - 8} more' if len(keys) > 8 else ''}). Each sample's "
                f"decode may take up to data.video.sample_timeout_s = {self.cfg.sample_timeout_s:g} s before it is left out: set "
                f"batch_timeout_s above a pack's decode time, or 0 to wait for the workers") from e
        finally:
            _DRAWING[0] -= 1
        self._consumed += 1
        self._decoded.update(frames=pack.decoded_frames, images=pack.decoded_images)
        self._decoded["seconds"] += pack.decode_s
        return pack

    def _release(self, src: int, e: int, j: int) -> None:
        """This rank consumed pack j of source `src`'s epoch e: the plans of that source's epochs wholly below the
        pack lag_packs before it, and below epoch e - 1, go (Planner.release). Each process's maps of them go with
        its planner's few recent epochs. An epoch whose pack count this rank has not read (before a resume) stops
        the walk back: nothing is removed until the floor is known."""
        if not self.planners[src].on_disk:      # nothing to remove: no epoch's plan made for it in this process
            return
        counts = self._pack_counts[src]
        if e not in counts:
            counts[e] = self.planners[src].num_packs(e)
        k, back = e, self.lag_packs - j
        while back > 0:
            k -= 1
            if k not in counts:
                return
            back -= counts[k]
        keep = min(k, e - 1)
        if keep > 0:
            self.planners[src].release(keep)
            for old in [x for x in counts if x < keep]:
                del counts[old]

    def rebuild(self, pack: PackedSample, failures: list[dict]) -> PackedSample:
        """`pack` (drawn by a loader with pixels=False) built again without its samples that the decoding rank of
        the replica failed to decode (`failures`: that rank's pack.failures records), each left out as that rank
        left it: tokens, labels, positions and the frames' grid then match that rank's pack."""
        if not failures:
            return pack
        src = self.source_names.index(pack.source) if self.mixed else 0
        out = build_pack(self.planners[src], None, pack.epoch, pack.pack_index, self.exclude_keys, pixels=False,
                         failed={f["slot"]: f for f in failures})
        out.source = pack.source
        return out

    @property
    def decode_stats(self) -> dict:
        """This process's own decoding since it started: video frames and images decoded and the wall seconds of
        reading and decoding them (in its DataLoader workers); zero where pixels=False. Not part of the state."""
        return {"frames": int(self._decoded["frames"]), "images": int(self._decoded["images"]),
                "seconds": float(self._decoded["seconds"])}

    def close(self) -> None:
        """Stop the DataLoader workers (a later `next` starts fresh ones at the same position)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        del it

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- samples left out ---------------------------------------------------------------------
    def _catalog_planners(self) -> list[Planner]:
        """The planners of the sources with a catalog of shards (not a mixture's token files)."""
        return [p for p in self.planners if isinstance(p, Planner)]

    def _leave_out(self, exclude: ExcludeList) -> None:
        """Keys of the catalogs' samples are left out where a pack is built; token files' documents where their rows
        are read (TokenSource.leave_out); `unmatched` says which of them the data does not hold. A key names its
        shard as this loader's keys do, by a longer part of its path, or by its file name alone where folders share
        it (as keys did before they were told apart): it names the sample of each shard it fits (`_named`)."""
        self._by_file: dict[str, list[tuple[Planner, int, list[str]]]] = {}
        for p in self._catalog_planners():
            for i, path in enumerate(p.catalog.shards):
                # a URL's "//" leaves an empty part, as a key's own shard part never has one
                self._by_file.setdefault(os.path.basename(path), []).append(
                    (p, i, [x for x in path.replace(os.sep, "/").split("/") if x]))
        self._entries, self._exclude = exclude.keys, exclude
        self.exclude_keys = frozenset(exclude.keys | {n for k in exclude.keys for n in self._named(k)})
        docs = {f"{f}#{n}" for f, ns in exclude.documents.items() for n in ns}
        missed = set(docs)                      # the token documents named that no token source holds
        for planner in self.planners:
            if isinstance(planner, TokenPacks):
                missed &= planner.source.leave_out(exclude)
        self._docs_held, self._docs_missed = docs - missed, missed - exclude.keys
        self._unmatched = None

    def _named(self, entry: str, *, held: bool = False) -> list[str]:
        """The sample keys of this loader that a data.exclude key "<shard>/<key>" names: "<name of the shard>/<key>"
        for each shard whose path ends with <shard> ([] for a key of another form). held: only those whose shard
        holds a sample of that key (reads the shard's records once)."""
        shard, sep, key = entry.rpartition("/")
        want = [x for x in shard.replace(os.sep, "/").split("/") if x not in ("", ".")]
        if not (sep and want and key):
            return []
        out = []
        for p, i, parts in self._by_file.get(want[-1], ()):
            if parts[-len(want):] != want:
                continue
            if held:
                keys = self._shard_keys.get((id(p), i))
                if keys is None:    # a shard's samples are a run of the catalog
                    lo, hi = np.searchsorted(p.shard_of, [i, i + 1]).tolist()
                    keys = self._shard_keys[(id(p), i)] = {p.catalog[u].key: u for u in range(lo, hi)}
                text, piece = re.fullmatch(r"(.*?)(?:#(\d+))?", key).groups()
                # a later piece of a text longer than a sequence, "<key>#<piece>": one its text has
                if key not in keys and not (text in keys and piece and int(piece) < p.sizes(0)[2][keys[text]]):
                    continue
            out.append(f"{p.shard_names[i]}/{key}")
        return out

    @property
    def unmatched(self) -> list[str]:
        """What data.exclude names that this loader's sources do not hold: a sample key whose shard no catalog holds,
        or whose shard holds no sample of that key (a typo after the shard's name), and a document no token file
        holds. Looked up at the first call (the trainer's rank 0 asks once): each shard named is read once, its
        records decoded (a shard's samples are a run of the catalog). A key that names samples of several shards
        (by a file name that folders of the data share) is a warning then: each of them is left out."""
        if self._unmatched is None:
            self._shard_keys: dict[tuple[int, int], dict[str, int]] = {}
            missing, self.ambiguous = set(), {}
            for k in sorted(self._entries - self._docs_held):
                found = self._named(k, held=True)
                if not found:
                    missing.add(k)
                elif len(found) > 1:
                    self.ambiguous[k] = found
            self._shard_keys = {}
            for p in self.planners:      # a mixture's token files of one base name (TokenPacks.names)
                if isinstance(p, TokenPacks):
                    for name, files in self._exclude.ambiguous_documents(p.source.prefixes).items():
                        for n in sorted(self._exclude.documents[name]):
                            self.ambiguous[f"{name}#{n}"] = [f"{p.names[p.source.prefixes.index(f)]}#{n}"
                                                             for f in files]
            self._unmatched = sorted(missing | self._docs_missed)
            if self.ambiguous:
                k, found = next(iter(self.ambiguous.items()))
                log.warning("data.exclude: %d of the samples named fit samples of several shards (or token files) "
                            "that share a file name, and each of those is left out (first: %s names %s). To leave out "
                            "one alone, name it as this run's messages and records do", len(self.ambiguous), k,
                            ", ".join(found))
        return self._unmatched

    # ---- bad samples --------------------------------------------------------------------------
    def _quarantine(self, rec: dict) -> None:
        """Appends a bad sample's record to quarantine_path, unless the file holds it already (the same sample at
        the same stage, epoch and pack, whatever its time): a resumed run meets again the samples of the packs it
        trains again and the plan's rejects of its epoch, and each evaluation of a held-out set the same ones."""
        if not self.quarantine_path:
            return
        if self._quarantined is None:      # what earlier launches (and this one) recorded
            self._quarantined = set()
            if os.path.isfile(self.quarantine_path):
                with open(self.quarantine_path) as f:
                    for line in f:
                        try:
                            self._quarantined.add(_quarantine_identity(json.loads(line)))
                        except ValueError:      # a line cut short by a kill
                            continue
        ident = _quarantine_identity(rec)
        if ident in self._quarantined:
            return
        self._quarantined.add(ident)
        d = os.path.dirname(self.quarantine_path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(self.quarantine_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")

    def account(self, pack: PackedSample) -> None:
        """Counts a pack `draw` gave (its samples, its failed samples, written to the quarantine file): the step
        `__next__` takes at once. Raises after max_consecutive_failures failed samples in a row."""
        self._stats["packs"] += 1
        src = self.source_names.index(pack.source) if self.mixed else 0
        self._release(src, pack.epoch, pack.pack_index)
        tag = {"source": pack.source} if self.mixed else {}
        if (src, pack.epoch) not in self._logged_plan_epochs:
            # a source's packs come epoch after epoch: its earlier epochs are not met again. Kept, they grew this set
            # and every checkpoint's loader state by an entry per epoch, without end
            self._logged_plan_epochs = _newest_epochs(self._logged_plan_epochs | {(src, pack.epoch)})
            if self.dp_rank == 0:
                planner = self.planners[src]
                for uid, (reason, detail) in sorted(planner.epoch(pack.epoch).rejects.items()):
                    r = planner.catalog[uid]
                    self._quarantine({"shard": planner.shard_name(uid), "key": r.key, "reason": reason,
                                      "detail": detail, "stage": "plan", "epoch": pack.epoch,
                                      "rank": self.dp_rank, **tag})
                    self._reasons[reason] += 1
                cont = planner.epoch(pack.epoch).pieces
                if cont:
                    self._stats["text_pieces"] += sum(cont.values())
                    log.info("video loader: epoch %d%s: %d text-only sample(s) longer than a sequence (seq_len %d) "
                             "continue over %d sequences (text_overflow continue)", pack.epoch,
                             f" of source {pack.source}" if self.mixed else "", len(cont), self.cfg.seq_len,
                             sum(cont.values()))
                cut = planner.epoch(pack.epoch).truncated
                if cut:
                    self._stats["text_tokens_cut"] += sum(cut.values())
                    texts = {u: c for u, c in cut.items() if planner.catalog[u].is_text}
                    annotations = {u: c for u, c in cut.items() if u not in texts}
                if cut and texts:
                    log.warning("video loader: epoch %d%s: %d text-only sample(s) longer than a sequence "
                                "(seq_len %d) were cut to fit, %d tokens cut in all (first: %s; text_overflow cut: 'continue' "
                                "trains every piece)", pack.epoch,
                                f" of source {pack.source}" if self.mixed else "", len(texts), self.cfg.seq_len,
                                sum(texts.values()), planner.key(min(texts)))
                if cut and annotations:     # a video's or an image sample's text: its tail (later turns) is not trained
                    log.warning("video loader: epoch %d%s: the text of %d video or image sample(s) was cut to fit, %d "
                                "tokens cut in all (first: %s; data.video.max_text_tokens %d, or the room the sequence "
                                "leaves beside the fewest frames or smallest images)", pack.epoch,
                                f" of source {pack.source}" if self.mixed else "", len(annotations),
                                sum(annotations.values()), planner.key(min(annotations)), self.cfg.max_text_tokens)
        failed = {f["slot"]: f for f in pack.failures}     # by place: two shard folders may hold the same "shard/key"
        if self.mixed:
            c = self._by_source[pack.source]
            c["packs"] += 1
            c["samples"] += len(pack.planned_keys) - len(failed)
            c["tokens"] += pack.seq_len - pack.num_pad
            c["visual_tokens"] += int(pack.visual_pos.numel())
            n = self._stats["packs"]
            if self.dp_rank == 0 and (n in (1, 10, 100) or n % 1000 == 0):
                log.info("video data mix on this rank after %d packed sequences (long_fraction %s, "
                         "text_tokens_fraction %s): %s", n, self.cfg.long_fraction, self.cfg.text_tokens_fraction,
                         "; ".join(
                             f"{k} {v['pack_share']:.1%} of sequences, {v['token_share']:.1%} of tokens, "
                             f"{v['samples']} samples" for k, v in self.source_stats().items()))
        self._stats["samples_text"] += pack.text_docs
        self._stats["samples_image"] += pack.image_docs
        self._stats["frames_video"] += pack.video_frames
        self._stats["frames_fast"] += pack.fast_frames
        self._stats["samples_text_continued"] += pack.text_continued
        left_out = set(pack.excluded)
        if left_out:
            self._stats["samples_excluded"] += len(left_out)
            log.info("data.exclude: %s left out of epoch %d pack %d%s", ", ".join(pack.excluded), pack.epoch,
                     pack.pack_index, f" of {pack.source}" if self.mixed else "")
        for slot, key in enumerate(pack.planned_keys):
            if key in left_out:
                continue
            f = failed.get(slot)
            if f is None:
                self._consecutive = 0
                self._stats["samples_ok"] += 1
                continue
            self._consecutive += 1
            self._stats["samples_failed"] += 1
            self._reasons[f["reason"]] += 1
            self._quarantine({**{k: v for k, v in f.items() if k != "slot"}, "stage": "decode", "epoch": pack.epoch,
                              "pack": pack.pack_index, "rank": self.dp_rank, "time": round(time.time(), 3), **tag})
            if self._consecutive >= self.cfg.max_consecutive_failures:
                self.close()
                raise RuntimeError(
                    f"video loader: {self._consecutive} consecutive samples failed to load "
                    f"(max_consecutive_failures={self.cfg.max_consecutive_failures}); failures so far by reason: "
                    f"{dict(self._reasons)}; last: {f['shard']}/{f['key']}: {f['reason']}: {f['detail'][:200]}. "
                    f"Check the shards ({self.cfg.shards}), the decode backend ({self.cfg.decode_backend}) "
                    f"and {self.quarantine_path or 'the quarantine log'}.")

    def source_stats(self) -> dict:
        """Per source of a mixture: packs (sequences), samples and real (non-padding) tokens this rank
        has yielded since the run began, and each source's share of the packs and of the tokens."""
        tot_p = sum(c["packs"] for c in self._by_source.values()) or 1
        tot_t = sum(c["tokens"] for c in self._by_source.values()) or 1
        return {name: {"packs": c["packs"], "samples": c["samples"], "tokens": c["tokens"],
                       "visual_tokens": c["visual_tokens"], "pack_share": c["packs"] / tot_p,
                       "token_share": c["tokens"] / tot_t}
                for name, c in self._by_source.items()}

    @property
    def stats(self) -> dict:
        out = {**dict(self._stats), "failures_by_reason": dict(self._reasons),
               "consecutive_failures": self._consecutive}
        if self.mixed:
            out["sources"] = self.source_stats()
        return out

    # ---- state --------------------------------------------------------------------------------
    def _plan_config(self) -> dict:
        c = asdict(self.cfg)
        # the image fields only where there are images: a run without them keeps the fingerprint (and so
        # the resumable state) it had before image samples existed
        # and slow/fast frames and a chat template only when on, how a long text is planned only where there
        # are texts, for the same reason
        out = {k: c[k] for k in _PLAN_FIELDS + (_IMAGE_PLAN_FIELDS if self.has_images else ())}
        if self.has_text:
            out["text_overflow"] = self.cfg.text_overflow
        if self.cfg.fast_frame_ratio > 0:
            out["fast_frame_ratio"] = self.cfg.fast_frame_ratio
        if self.cfg.chat_template != "plain":
            out["chat_template"] = self.cfg.chat_template
            if self.has_videos or self.has_images:    # frames and images stand at their marker or in the user turn
                out["vision_at"] = VISION_AT
        if self.has_videos or self.has_images:
            out["markers"] = MARKERS
        turns = getattr(self.tokenizer, "turn_tokens", None)   # the byte tokenizer's: "ids"
        if turns is not None and self.cfg.chat_template != "plain":
            out["turn_tokens"] = turns
        specials = getattr(self.tokenizer, "specials_in_text", None)   # a Hugging Face tokenizer's: "text"
        if specials is not None:
            out["specials_in_text"] = specials
        return out

    def _plan_dir(self, catalog: Catalog) -> Path | None:
        """Where a source's epoch plans are kept under VideoDataConfig.index_dir: named by what they are a function of
        (the catalog's contents, the planning fields, the seed, the tokenizer)."""
        if not self.cfg.index_dir:
            return None
        return Path(self.cfg.index_dir, f"plan-{self._plan_hash(format=PLAN_FORMAT, catalog=catalog.key)}")

    def _plan_hash(self, plan_config: dict | None = None, **catalog) -> str:
        """A hash of what plans are a function of: the seed, the planning fields (`plan_config`, by default this
        loader's), the tokenizer, and `catalog` (the resume check names the samples; the plans' directory the
        catalog's contents)."""
        blob = json.dumps({**catalog, "seed": self.seed, "cfg": self._plan_config() if plan_config is None
                           else plan_config, "tokenizer": repr(self.tokenizer)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def _same_plan_before(self, state: dict) -> bool:
        """Whether `state` was saved for this data and config before some of `LATER_FIELDS` existed, and no document
        of the data is written otherwise now by them (`_moved_by`): its plans are this loader's, and it continues
        exactly. Reads every record (on this path only)."""
        now = self._plan_config()
        new = [k for k in LATER_FIELDS if k in now and k not in state.get("plan_config", {})]
        if not new:
            return False
        before = {k: v for k, v in now.items() if k not in new}
        if state["plan_fingerprint"] != self._plan_hash(before, catalog=self.catalog_fp):
            return False
        return not any(self._moved_by(k) for k in new)

    def _moved_by(self, field: str) -> str | None:
        """The key of the first sample whose document `field` of LATER_FIELDS writes otherwise than before it was a
        plan field, None when none: for "vision_at", a video whose text has a marker or a user turn, or an image
        sample without markers that has a user turn (captions and QA pairs did not move); for "markers", a video or an
        image sample that spells a marker where it is now text (`annotations.markers_moved`); for "turn_tokens", a
        sample with a conversation; for "specials_in_text", a sample whose text spells one of the tokenizer's special
        tokens."""
        t = self.cfg.chat_template
        if field == "vision_at":
            moved = lambda r: vision_moved(r.annotation, t, len(r.images or ()))  # noqa: E731
            kinds = ("video", "image")
        elif field == "markers":
            moved = lambda r: markers_moved(r.annotation, t)  # noqa: E731
            kinds = ("video", "image")
        elif field == "turn_tokens":
            moved = lambda r: isinstance(conversation_turns(r.annotation), list)  # noqa: E731
            kinds = ("video", "image", "text")
        else:
            specials = getattr(self.tokenizer, "special_tokens", ())
            moved = lambda r: spells_special(r.annotation, t, specials)  # noqa: E731
            kinds = ("video", "image", "text")
        for planner in self._catalog_planners():
            cat = planner.catalog
            for kind in kinds:
                for r in map(cat.__getitem__, cat.uids(kind)):
                    if moved(r):
                        return planner.sample_name(r.uid)
        return None

    def plan_fingerprint(self) -> str:
        return self._plan_hash(catalog=self.catalog_fp)

    def position(self) -> dict:
        """Where this rank's next pack is (for logs): epoch, pack, and its first sample's place (and, in
        a mixture, its source)."""
        out = {"epoch": None, "pack": None}
        first = self.dp_rank + self._consumed * self.dp_world
        for it in self.stream.iter(self._base, self._skip, start=first, stride=1, stop=first + 1):
            planner = self.planners[it.source]
            e, j = it.epoch, it.pack
            ep = planner.epoch(e)
            out = {"epoch": e, "pack": j, "packs_in_epoch": len(ep.packs)}
            if self.mixed:
                out.update({"source": self.source_names[it.source], "mixed_index": it.key})
            items = ep.packs[j]
            if items:
                r = planner.catalog[planner.uid_of(items[0])]
                first = int(np.searchsorted(planner.shard_of, planner.shard_of[r.uid]))   # uids of a shard run on
                out.update({"order_index": int(np.nonzero(ep.order == r.uid)[0][0]),
                            "shard": planner.shard_name(r.uid), "in_shard_index": r.uid - first,
                            "keys": [planner.key(u) for u in items]})
        return out

    def state_dict(self) -> dict:
        base, skip = self.stream.encode(self._base, self._skip)
        logged = sorted(self._logged_plan_epochs)
        out = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "plan_fingerprint": self.plan_fingerprint(),
            "catalog_fingerprint": self.catalog_fp,
            "plan_config": self._plan_config(),
            "dp_world": self.dp_world,
            "dp_rank": self.dp_rank,
            "base": base,
            "skip": skip,
            "consumed": self._consumed,
            "consecutive_failures": self._consecutive,
            "stats": dict(self._stats),
            "failures_by_reason": dict(self._reasons),
            "logged_plan_epochs": [list(x) for x in logged] if self.mixed else [e for _, e in logged],
        }
        if self.mixed:
            out["mixture"] = {"sources": list(self.source_names), "weights": list(self.weights)}
            out["source_stats"] = {n: dict(c) for n, c in self._by_source.items()}
        return out

    def counters(self) -> dict:
        """This rank's own counts since the run began (its samples, failures by reason and, in a mixture, each
        source's packs, samples and tokens; the failures in a row), as JSON: what state_dict holds of one rank
        only. A checkpoint keeps every data-parallel rank's (the trainer gathers them), so that a resume gives each
        rank its own (load_counters) instead of the saving rank's."""
        return {"stats": dict(self._stats), "failures_by_reason": dict(self._reasons),
                "source_stats": {n: dict(c) for n, c in self._by_source.items()},
                "consecutive_failures": self._consecutive}

    def load_counters(self, entries: list[dict]) -> None:
        """Sets this rank's counters to the sums of `entries`, the saved `counters()` it takes (call after
        load_state_dict; data/sample_position.counters_of_rank says which); the failures in a row: the most of any."""
        stats, reasons, consecutive = Counter(), Counter(), 0
        by_source = {n: Counter() for n in self._by_source}
        for c in entries:
            stats.update(c.get("stats", {}))
            reasons.update(c.get("failures_by_reason", {}))
            for n, counts in c.get("source_stats", {}).items():
                if n in by_source:   # a source removed since: its counts go with it (as load_state_dict's)
                    by_source[n].update(counts)
            consecutive = max(consecutive, int(c.get("consecutive_failures", 0)))
        self._stats, self._reasons, self._consecutive = stats, reasons, consecutive
        if self.mixed:
            self._by_source = by_source

    def _describe_sources(self, state: dict) -> str:
        saved = state.get("mixture", {}).get("sources")
        now = self.source_names if self.mixed else None
        if saved == now:
            return ""
        one = ["short"]   # one source: data.video.shards
        gone, new = sorted(set(saved or one) - set(now or one)), sorted(set(now or one) - set(saved or one))
        what = {"long": "data.video.long_shards", "tokens": "data.video.text_tokens", "short": "data.video.shards"}
        return (f"; sources (saved, now): ({saved or one}, {now or one})"
                + "".join(f" — {what.get(n, n)} was added" for n in new)
                + "".join(f" — {what.get(n, n)} was removed" for n in gone))

    def load_state_dict(self, state: dict, *, strict: bool = True) -> None:
        """Continue from `state` (saved by any rank of a lockstep run, with any dp_world).

        In a mixture, `long_fraction` may differ from the saved one: every source continues where it
        stopped and the new ratio applies to the packs from here on (a warning says so)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}: expected {STATE_VERSION}")
        if int(state["seed"]) != self.seed:   # every epoch's order and plan is another
            raise LoaderStateMismatch(f"loader state was saved with data.seed {state['seed']}, this loader has "
                                      f"data.seed {self.seed}", {"seed": (int(state["seed"]), self.seed)}, False)
        consumed = int(state["consumed"]) * int(state["dp_world"])
        walker = self.stream          # the stream the saved position was consumed under
        if state["plan_fingerprint"] != self.plan_fingerprint() and self._same_plan_before(state):
            state = {**state, "plan_fingerprint": self.plan_fingerprint(), "plan_config": self._plan_config()}
        if state["plan_fingerprint"] != self.plan_fingerprint():
            now, saved = self._plan_config(), state["plan_config"]
            changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(now) | set(saved))   # a field on one side
                       if saved.get(k) != now.get(k)}                                         # only: (x, None)
            msg = (f"loader state does not match this data/config: catalog "
                   f"{state['catalog_fingerprint']} -> {self.catalog_fp}, changed fields (saved, now): {changed}"
                   f"{self._describe_sources(state)}")
            for k, why in LATER_FIELDS.items():
                if k in changed and changed[k][0] is None and not {"chat_template", "tokenizer"} & set(changed):
                    first = self._moved_by(k)
                    msg += (f" ({f'under chat_template={self.cfg.chat_template!r} ' if k == 'vision_at' else ''}{why}"
                            f": those documents hold other lengths{f', the first {first}' if first else ''}, and the "
                            f"packs cannot be continued exactly)")
            if strict:
                raise LoaderStateMismatch(msg, changed, state["catalog_fingerprint"] != self.catalog_fp)
            warnings.warn(msg + "; restarting at the beginning of the saved epoch")
            try:
                base = self.stream.restart(self.stream.decode(state["base"], [])[0])
            except (ValueError, TypeError, KeyError):
                base = self.stream.start()
            skip, consumed = frozenset(), 0
        else:
            base, skip = self.stream.decode(state["base"], state["skip"])
            saved_w = state.get("mixture", {}).get("weights")
            if self.mixed and saved_w is not None and not np.allclose(saved_w, self.weights, rtol=0, atol=1e-12):
                walker = self.stream.with_weights(saved_w)
            if state.get("_skip_ahead"):
                # merged state of non-lockstep ranks: remaining-indices consumed beyond the first gap
                ahead = set(int(i) for i in state["_skip_ahead"])
                extra = [it.key for i, it in enumerate(walker.iter(base, skip, start=0, stride=1,
                                                                   stop=max(ahead) + 1)) if i in ahead]
                skip = skip | frozenset(extra)
        base, skip = walker.advance(base, skip, consumed)
        if walker is not self.stream:
            if skip:
                raise ValueError(f"VideoDataConfig.long_fraction = {self.cfg.long_fraction}: cannot change the "
                                 f"mixture (saved weights {saved_w}) when resuming from merged out-of-step rank "
                                 f"states; resume once with the saved long_fraction")
            warnings.warn(f"VideoDataConfig.long_fraction changed on resume (source weights {saved_w} -> "
                          f"{self.weights}): each source continues where it stopped, the new ratio applies "
                          f"from here on")
        self.close()
        self._base, self._skip = base, skip
        self._consumed = 0
        self._consecutive = int(state.get("consecutive_failures", 0))
        self._stats = Counter(state.get("stats", {}))
        self._reasons = Counter(state.get("failures_by_reason", {}))
        self._logged_plan_epochs = _newest_epochs({(x[0], x[1]) if isinstance(x, (list, tuple)) else (0, int(x))
                                                   for x in state.get("logged_plan_epochs", [])})
        if self.mixed:
            saved = state.get("source_stats", {})
            self._by_source = {n: Counter(saved.get(n, {})) for n in self.source_names}


def merge_rank_states(states: list[dict]) -> dict:
    """One state from the states of all ranks of a run whose ranks were *not* in lockstep: base =
    the first pack no rank consumed, skip = packs after it that some rank did consume."""
    if not states:
        raise ValueError("merge_rank_states: no states")
    s0 = states[0]
    W = int(s0["dp_world"])
    if len(states) != W or sorted(int(s["dp_rank"]) for s in states) != list(range(W)):
        raise ValueError(f"merge_rank_states: need one state per rank 0..{W - 1}")
    for s in states:
        if (s["base"], s["skip"], s["plan_fingerprint"]) != (s0["base"], s0["skip"], s0["plan_fingerprint"]):
            raise ValueError("merge_rank_states: states come from different runs or positions")
    consumed = set()
    for s in states:
        r, c = int(s["dp_rank"]), int(s["consumed"])
        consumed |= {r + i * W for i in range(c)}
    first_gap = 0
    while first_gap in consumed:
        first_gap += 1
    ahead = sorted(i for i in consumed if i > first_gap)
    out = dict(s0)
    out["_merged"] = {"first_unconsumed": first_gap, "consumed_ahead": ahead}
    out["dp_world"], out["consumed"], out["dp_rank"] = 1, first_gap, 0
    out["_skip_ahead"] = ahead        # remaining-indices (relative to base) consumed past the gap
    return out
