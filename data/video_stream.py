"""Packed video samples as the trainer's micro-batches.

`VideoBatchStream` wraps one data-parallel rank's `VideoPackedLoader` (docs/data.md) in the interface
the trainer's token stream has: `num_microbatches` (set between steps by `set_global_batch_size`, train.batch_rampup),
`next()` -> a dict of tensors, and a small `state_dict()` that resumes exactly. Every micro-batch is one packed
sequence (micro batch size 1):

    tokens       [1, S] int64   text ids, the video pad id where a merged visual token goes
    labels       [1, S] int64   next-token targets (0 where unsupervised: the loss mask drops them)
    loss_mask    [1, S] float32
    position_ids [3, 1, S]      3D multimodal RoPE positions (time, height, width)
    cu_seqlens   [D + 1] int32  document bounds inside the pack
    pixel_values [P, 3 p^2]     uint8 patches in merge-group order; grid_thw [F, 3]; visual_pos [V]

With `data.video.long_shards` and `long_fraction` set, the packs come from a seeded long:short mixture
(docs/data.md, "Mixture"); `stats["sources"]` reports what each source has supplied on this rank.

Decoding once per replica (parallel.vit.decode_once, docs/data.md "Decoding once per replica"): every rank of a
data-parallel replica draws the same packs, but only the replica's decoding rank (`DecodeOnce.src`) decodes their
pixels; the other ranks build them without pixels. Under the replicated ViT layout the LM-input ranks decode each,
and the later pipeline stages, which encode no frame, build them without pixels the same way; under spread without
decode_once every rank decodes (those that decode must fail on the same samples, or all stop). `take(n)` draws a
round's packs and `settle(packs)` makes them the trainer's micro-batches: one all_gather over the replica of each
rank's error (any rank's stops every rank) and packs' samples, and of the decoding rank's failed samples, after which
the other ranks leave out the same samples, and every rank accounts the packs alike. The pixels reach the ranks whose
ViT share needs them in the vision phase (parallel/vit_layout.py scatter_pixels, whose ranks meet before its
all_to_all: an error of one rank after settle stops them all there; the replicated layout's ranks meet so at the end
of its vision phase).

`ensure_synthetic_shards` makes the small synthetic video set the tiny recipe trains on (rank 0,
once per directory; other ranks wait for its marker file), so the demo needs no downloads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any
from pathlib import Path

import torch

from data.sample_position import format_runs
from data.video.config import VideoDataConfig
from data.video.loader import LoaderStateMismatch, VideoPackedLoader
from data.video.packing import DOC_KINDS

log = logging.getLogger(__name__)

READY = "READY"
SHOWN_KEYS = 8  # of a pack's samples, named in a message about its step


def ensure_synthetic_shards(directory: str | os.PathLike, n_videos: int, seed: int, *, rank: int,
                            timeout_s: float = 1800.0, n_text: int = 0, n_images: int = 0, scenes: int = 0,
                            text_held_out_from: tuple[int, int] | None = None) -> Path:
    """Shard directory of `n_videos` synthetic videos under `directory`, made by rank 0 if missing. With
    `n_images` images (and a quarter as many interleaved records of 2-3 images) and `n_text` text-only samples
    among them (a held-out set's: none of those of the training set text_held_out_from=(seed, count) names), and
    videos of `scenes` still scenes each (slow and fast frames), in a directory of their own named by all of these
    (`<directory>_<n_videos>_seed<seed>_text<n>_images<m>_scenes<k>_heldout<seed>-<count>`, the last four only where
    given): a run whose settings ask for other data makes it, where one directory for every count and seed gave a run
    asking for 4 videos the 24 an earlier launch had made."""
    from data.video.synthetic import make_synthetic_shards

    held = f"_heldout{text_held_out_from[0]}-{text_held_out_from[1]}" if text_held_out_from else ""
    d = Path(f"{directory}_{n_videos}_seed{seed}{f'_text{n_text}' if n_text else ''}"
             f"{f'_images{n_images}' if n_images else ''}{f'_scenes{scenes}' if scenes else ''}{held}")
    marker = d / READY
    if rank == 0 and not marker.exists():
        extra = [f"{n} {what}" for n, what in ((n_images, "images"), (n_text, "text-only samples"),
                                               (scenes, "still scenes per video")) if n]
        log.info("making %d synthetic videos%s and their shards in %s (once)", n_videos,
                 "".join(f", {x}" for x in extra), d)
        d.mkdir(parents=True, exist_ok=True)
        # one ingest worker: shards list the videos in a fixed order, so the same seed gives the same data
        # (up to the encoder's rare run-to-run differences, data/video/synthetic.py write_video)
        make_synthetic_shards(d, n_videos=n_videos, seed=seed, shard_size_mb=0.05, workers=1, n_text=n_text,
                              n_images=n_images, n_image_sets=n_images // 4, scenes=scenes,
                              text_held_out_from=text_held_out_from)
        marker.write_text(f"{n_videos} videos ({scenes} scenes each), {n_images} images, {n_text} text-only samples, "
                          f"seed {seed}\n")
    deadline = time.time() + timeout_s
    while not marker.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank}: synthetic video shards in {d} not ready after {timeout_s:.0f} s")
        time.sleep(0.5)
    return d / "shards"


@dataclass(frozen=True)
class DecodeOnce:
    """The ranks of one data-parallel replica that read the same packs (`group`), the one of them whose failed samples
    every rank follows (`src`, a global rank: it decodes the packs and writes the replica's quarantine records), this
    rank (`rank`) and whether its loader decodes pixels too (`pixels`: under decode_once only src's does; under the
    replicated ViT layout each LM-input rank's, as it encodes every frame itself, and no later pipeline stage's)."""
    group: Any
    src: int
    rank: int
    pixels: bool


def _plan_digest(p) -> tuple:
    """What settle compares of a pack across a replica: its place in the stream and the samples planned into it."""
    keys = hashlib.sha1("\n".join(p.planned_keys).encode()).hexdigest()[:16]
    return p.epoch, p.pack_index, p.source, keys


def _decodes_differ(src: int, ref: dict, m: dict, packs: list) -> str:
    """settle's error where a rank that decodes its packs itself failed on other samples than the decoding rank."""
    i = next(i for i, (a, b) in enumerate(zip(m["failed"], ref["failed"])) if a != b)
    p = packs[i]

    def named(slots) -> str:
        return ", ".join(p.planned_keys[s] for s in slots) or "none"

    return (f"video loader: rank {m['rank']} and the replica's decoding rank {src} decode their packs each, and "
            f"failed on other samples of epoch {p.epoch} pack {p.pack_index}{' of ' + p.source if p.source else ''}: "
            f"{named(m['failed'][i])} against {named(ref['failed'][i])}, so their sequences would differ (a decode "
            f"that failed on one rank alone: data.video.sample_timeout_s, memory)")


def _plan_mismatch(src: int, ref: dict, other: list[dict]) -> str:
    """settle's error where ranks of a replica drew other packs than its decoding rank `src`."""
    def pack(digest) -> str:
        epoch, index, source, _ = digest
        return f"epoch {epoch} pack {index}{' of ' + source if source else ''}"

    m = other[0]
    mine, theirs = m["packs"], ref["packs"]
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    what = (f"{len(mine)} packs against its {len(theirs)}" if at >= min(len(mine), len(theirs)) else
            f"{pack(mine[at])}{' with other samples' if mine[at][:3] == theirs[at][:3] else ''} where it drew "
            f"{pack(theirs[at])}")
    ranks = ", ".join(str(o["rank"]) for o in other)
    return (f"video loader: the ranks of a data-parallel replica read the same packs (docs/data.md \"Decoding once "
            f"per replica\"), but rank{'s' if len(other) > 1 else ''} {ranks} drew other packs than its decoding rank "
            f"{src}: rank {m['rank']} drew {what}. Their data differ: every rank must see the same shard files and "
            f"indexes (data.video.shards and its other sources) and the same data settings")


class VideoBatchStream:
    def __init__(self, cfg: VideoDataConfig, *, seq_length: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, one_epoch: bool = False, exclude=None, held_out: str = "",
                 decode_once: DecodeOnce | None = None):
        """one_epoch (a held-out set scored whole, once): packs after the first epoch's come with a zero loss mask,
        and `padding` records, per micro-batch handed out, whether it is such filler. exclude: the samples data.exclude
        names (data/exclude.py ExcludeList), left out of the packs. held_out: the setting that named cfg.shards, a
        held-out set (VideoPackedLoader). decode_once: this rank's replica decodes each pack once (see above); `settle`
        is then collective over its group."""
        if micro_batch_size != 1:
            raise ValueError(f"video data packs one sequence per micro-batch: train.micro_batch_size must be 1, "
                             f"got {micro_batch_size}")
        if global_batch_size % dp_size:
            raise ValueError(f"train.global_batch_size ({global_batch_size}) must be divisible by the "
                             f"data-parallel size ({dp_size})")
        if cfg.seq_len != seq_length:
            cfg = replace(cfg, seq_len=seq_length)  # the trainer's sequence length is the packing length
        self.cfg = cfg
        self.num_microbatches, self.dp_size = global_batch_size // dp_size, dp_size
        self.decode_once = decode_once
        self.loader = VideoPackedLoader(cfg, dp_rank=dp_rank, dp_world=dp_size, seed=seed, exclude=exclude,
                                        held_out=held_out, pixels=decode_once is None or decode_once.pixels)
        # a rank consumes its packs of a step in lockstep with the others: no rank reads a pack of the global stream
        # more than a step's (and a round's) behind another's; twice that for margin
        self.loader.lag_packs = 2 * (global_batch_size + dp_size)
        self._error: BaseException | None = None   # this rank's error in take(), raised by settle()
        self._it = None
        self._wait = 0.0  # seconds spent waiting in next() since the last step_metrics()
        self.label_ignore_index = cfg.label_ignore_index
        self.one_epoch = one_epoch
        if one_epoch and self.loader.mixed:
            raise ValueError("a mixture of video sources (data.video.long_shards, text_tokens) has no one first epoch "
                             "to score whole")
        self.padding: list[bool] = []
        self._drawn: deque[tuple] = deque(maxlen=self.num_microbatches)  # the packs of the current step

    def set_global_batch_size(self, global_batch_size: int) -> None:
        """The next steps draw global_batch_size / dp_size packs each on this rank (train.batch_rampup); call between
        steps. The loader counts packs, so the next step takes the next ones whatever their number."""
        if global_batch_size % self.dp_size:
            raise ValueError(f"global batch {global_batch_size} must be divisible by the data-parallel size "
                             f"({self.dp_size})")
        self.num_microbatches = global_batch_size // self.dp_size
        if self._drawn.maxlen != self.num_microbatches:
            self._drawn = deque(maxlen=self.num_microbatches)

    @property
    def unmatched_exclusions(self) -> list[str]:
        """What data.exclude names that this stream's sources do not hold (VideoPackedLoader._leave_out)."""
        return self.loader.unmatched

    @property
    def samples_per_epoch(self) -> int:
        """Packed sequences in the first epoch of the (one) source: the whole set, once."""
        return self.loader.planner.num_packs(0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.settle(self.take(1))[0]

    def take(self, n: int) -> list:
        """A round's n packs (StopIteration where the data ended), for `settle`. Under decode_once they are not yet
        accounted, and an error of the loader is kept for settle to raise after its exchange, on every rank of the
        replica (the others would wait for this one in their next collective)."""
        packs = []
        if self._it is None:
            self._it = iter(self.loader)
        t0 = time.perf_counter()
        try:
            for _ in range(n):
                packs.append(self.loader.draw() if self.decode_once is not None else next(self._it))
        except StopIteration:
            raise
        except Exception as e:
            if self.decode_once is None:
                raise
            self._error = e
        finally:
            self._wait += time.perf_counter() - t0
        return packs

    def settle(self, packs: list) -> list[dict]:
        """The micro-batches of packs `take` gave. Under decode_once (collective over the replica): one all_gather
        of a small message per rank, its error in take and its packs' place and planned samples, and the decoding
        rank's failed samples of each pack. A rank whose loader failed raises its own error and every other rank of
        the replica an error naming it (the decoding rank's first); packs that are not the decoding rank's (other data
        on a rank's node), or another rank that decodes (DecodeOnce.pixels) failing on other samples, stop every rank
        alike; else the ranks without pixels build the packs again without the failed samples (so every tensor but the
        pixels is the decoding rank's), and every rank accounts the packs (the decoding rank before the exchange: its
        quarantine records' write failing is its error in the exchange)."""
        d = self.decode_once
        if d is not None:
            import torch.distributed as dist

            err, self._error = self._error, None
            src = d.rank == d.src
            if err is None and src:
                # the decoding rank accounts its packs (and writes the replica's quarantine records) before the
                # exchange: an error there (a full disk) stops every rank here, not this one alone after it, while
                # the others wait in the vision phase for the pixels it sends
                try:
                    for p in packs:
                        self.loader.account(p)
                except Exception as e:  # noqa: BLE001 - raised below, after the exchange, on every rank
                    err = e
            ok = err is None
            mine = {"rank": d.rank, "error": "" if ok else f"{type(err).__name__}: {err}",
                    "packs": [_plan_digest(p) for p in packs] if ok else None,
                    "failures": [p.failures for p in packs] if ok and src else None,
                    "failed": [[f["slot"] for f in p.failures] for p in packs] if ok and d.pixels else None}
            got = [None] * dist.get_world_size(d.group)
            dist.all_gather_object(got, mine, group=d.group)
            if err is not None:             # this rank's own (the same on every rank where it is the data's)
                raise err
            failed = sorted((m for m in got if m["error"]), key=lambda m: (m["rank"] != d.src, m["rank"]))
            if failed:
                m = failed[0]
                who = f"decoding rank {d.src}" if m["rank"] == d.src else f"rank {m['rank']}"
                more = f" (and {len(failed) - 1} more of its ranks)" if len(failed) > 1 else ""
                raise RuntimeError(f"video loader: the replica's {who}{more} failed (its ranks settle each round's "
                                   f"packs together: docs/data.md \"Decoding once per replica\"): {m['error']}")
            ref = next(m for m in got if m["rank"] == d.src)
            other = [m for m in got if m["packs"] != ref["packs"]]
            if other:
                raise RuntimeError(_plan_mismatch(d.src, ref, other))
            other = [m for m in got if m["failed"] is not None and m["failed"] != ref["failed"]]
            if other:       # another rank that decodes (replicated layout) would train on other packs
                raise RuntimeError(_decodes_differ(d.src, ref, other[0], packs))
            if not d.pixels:
                packs = [self.loader.rebuild(p, f) for p, f in zip(packs, ref["failures"])]
            for p in packs if not src else ():
                self.loader.account(p)
        return [self._batch(s) for s in packs]

    def _batch(self, s) -> dict:
        self._drawn.append((s.epoch, s.pack_index, s.source, s.sample_keys))  # worded only when a message asks
        labels = s.labels.clone()
        labels[labels == self.label_ignore_index] = 0  # masked out by loss_mask; must be a valid class id
        mask = s.loss_mask.float().view(1, -1)
        if self.one_epoch:
            self.padding.append(s.epoch > 0)
            if s.epoch > 0:
                mask = torch.zeros_like(mask)
        return {
            "tokens": s.tokens.view(1, -1),
            "labels": labels.view(1, -1),
            "loss_mask": mask,
            "position_ids": s.position_ids.view(3, 1, -1),
            "cu_seqlens": s.cu_seqlens.to(torch.int32),
            "pixel_values": s.pixel_values,
            "grid_thw": s.grid_thw,
            "visual_pos": s.visual_pos,
            "doc_groups": self._doc_groups(s),
        }

    def _doc_groups(self, s) -> torch.Tensor:
        """Per segment of the pack's row, the group of its document whose loss the step reports apart
        (train/loss_groups.py): its source's index among the loader's sources * 3 + its kind's in DOC_KINDS; -1 for
        the padding segment and for a document data.exclude leaves out in place (a token file's, whose tokens are
        padding without loss: the routers' balancing per document counts it as padding)."""
        if not len(s.doc_kinds) == len(s.sample_keys) == s.num_docs:
            raise AssertionError(f"a pack of {s.num_docs} documents with {len(s.doc_kinds)} kinds and "
                                 f"{len(s.sample_keys)} keys")
        src = self.loader.source_names.index(s.source) if s.source else 0
        left_out = set(s.excluded)
        groups = [-1 if key in left_out else src * len(DOC_KINDS) + DOC_KINDS.index(k)
                  for k, key in zip(s.doc_kinds, s.sample_keys)]
        return torch.tensor(groups + [-1] * (s.cu_seqlens.numel() - 1 - len(groups)), dtype=torch.int64)

    def _step_packs(self, micro_batches: list[int] | None, parts: dict[int, list[int]] | None) -> list[tuple]:
        """The packs this rank drew in the current step (or those of its micro-batches, by their indices in the
        step), each as (epoch, index, source, its sample keys, the documents `parts` names of it: some micro-batches'
        (by index) documents whose tokens' loss was not finite, or [] for the whole pack)."""
        drawn = list(enumerate(self._drawn))
        if micro_batches is not None:
            drawn = [drawn[i] for i in micro_batches if i < len(drawn)]
        # a part past the pack's documents is its padding segment (or a KSA row's): it names no sample
        return [(epoch, index, source, keys, [d for d in (parts or {}).get(i, []) if d < len(keys)])
                for i, (epoch, index, source, keys) in drawn]

    def describe_step(self, micro_batches: list[int] | None = None, parts: dict[int, list[int]] | None = None) -> str:
        """The packs (their epoch, index and samples; of some, the documents `parts` names) this rank drew in the
        current step, for a message about it (see _step_packs)."""
        def pack(epoch, index, source, keys, docs) -> str:
            named = [keys[d] for d in docs] or keys
            shown = ", ".join(named[:SHOWN_KEYS]) + (f", +{len(named) - SHOWN_KEYS} more" if len(named) > SHOWN_KEYS
                                                      else "")
            narrowed = (f" (its document{'s' if len(docs) > 1 else ''} {format_runs(docs)} of {len(keys)}, whose "
                        "tokens' loss was not finite)" if docs else "")
            return f"epoch {epoch} pack {index}{' of ' + source if source else ''}: {shown}{narrowed}"

        return "video packs " + "; ".join(pack(*p) for p in self._step_packs(micro_batches, parts))

    def step_record(self, micro_batches: list[int] | None = None, parts: dict[int, list[int]] | None = None) -> dict:
        """describe_step's data as fields (train/nonfinite.py's record): per pack its epoch, index, source and the
        sample keys named (every one, or those of the documents `parts` names)."""
        return {"stream": "video", "packs": [
            {"epoch": epoch, "pack": index, "source": source, "samples": [keys[d] for d in docs] or list(keys)}
            for epoch, index, source, keys, docs in self._step_packs(micro_batches, parts)]}

    @property
    def stats(self) -> dict:
        """The loader's counters (packs, samples, failures by reason); with a long:short mixture also
        `stats["sources"]`: packs, samples and tokens per source and their realized shares."""
        return self.loader.stats

    def step_metrics(self) -> dict:
        """Scalars for the training log and wandb, from this rank's loader: the seconds the training loop waited
        for data since the last call (the trainer calls it once per step), and since the run began the samples
        skipped as unreadable and, with a mixture, each source's realized share of the packed sequences and of
        the real tokens (the long:short ratio the curriculum asked for, as served); the samples data.exclude named
        that its packs left out, once there are any; the video frames and images this rank decoded since it started,
        and the seconds it spent reading and decoding them, once it has decoded any."""
        st = self.loader.stats
        # the time this rank's training loop waited for its packed sequences since the last call (once per step):
        # ~0 while the loader's workers keep ahead, the step's input-bound share when they do not
        wait, self._wait = self._wait, 0.0
        out = {"data_wait_s": wait, "data_samples_failed": int(st.get("samples_failed", 0))}
        for kind in ("image", "text"):   # only once this rank has served any (a video-only run's log is unchanged)
            if st.get(f"samples_{kind}"):
                out[f"data_samples_{kind}"] = int(st[f"samples_{kind}"])
        # slow and fast frames, and texts continued over several sequences: likewise only once served
        for key, stat in (("data_frames_video", "frames_video"), ("data_frames_fast", "frames_fast"),
                          ("data_texts_continued", "samples_text_continued"),
                          ("data_samples_excluded", "samples_excluded")):
            if st.get(stat):
                out[key] = int(st[stat])
        dec = self.loader.decode_stats    # this rank's own decoding since it started (none without pixels)
        if dec["frames"] or dec["images"]:
            out["data_frames_decoded"] = dec["frames"] + dec["images"]
            out["data_decode_s"] = dec["seconds"]
        for name, c in st.get("sources", {}).items():
            out[f"data_{name}_seq_share"] = c["pack_share"]
            out[f"data_{name}_token_share"] = c["token_share"]
        return out

    def close(self) -> None:
        """Stops the loader's workers now (the trainer's held-out streams are dropped after each evaluation)."""
        self.loader.close()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.loader.load_state_dict(state)
        except LoaderStateMismatch as e:
            if "seq_len" in e.changed:   # set from train.seq_length (__init__): the setting its user gave
                e.detail += (f" (seq_len is train.seq_length: {e.changed['seq_len'][0]} when the state was saved, "
                             f"{e.changed['seq_len'][1]} now)")
                e.settings = "train.seq_length and the data and data.video settings"
            raise
        self._it = None

    def counters(self) -> dict:
        return self.loader.counters()

    def load_counters(self, entries: list[dict]) -> None:
        self.loader.load_counters(entries)
