"""`VideoDataConfig`: every knob of the video data path, validated in `__post_init__`.

The lead registers this dataclass in the Hydra ConfigStore; the loader, the sampling plan and the
packer read only this object. Values a user can set raise `ValueError` naming the field and value.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, fields
from typing import Optional

from .remote import clean_url, has_credentials, is_url, split_spec
from .tokenizer import hf_tokenizer_file

# Enumerated options are plain `str` fields (OmegaConf structured configs reject typing.Literal);
# the allowed values are listed here and checked in __post_init__.
DECODE_BACKENDS = ("decord", "pyav", "torchcodec")
DECODE_ISOLATIONS = ("process", "inline")
TOKENIZERS = ("bytes",)
TEXT_OVERFLOWS = ("continue", "cut")
CHAT_TEMPLATES = ("plain", "qwen", "qwen3")      # data/video/annotations.py writes them

REQUIRED = "REQUIRED"
"""The value a recipe gives a path the user must set (`shards: REQUIRED`): `DataConfig` refuses it when the
run reads video; a run that reads no video (the memory estimate, text-only data) carries it unread."""


class UnsetPathError(ValueError):
    """A path the recipe leaves to the user (`REQUIRED`) is still unset where the run would read it;
    `settings` names them (`data.video.shards`, ...)."""

    def __init__(self, message: str, settings: tuple[str, ...]) -> None:
        super().__init__(message)
        self.settings = settings


@dataclass
class VideoDataConfig:
    # ---- where the data is ------------------------------------------------------------------
    shards: str = ""
    """Directory holding `shard-*.tar` (+ `shard-*.idx.json`) from `launch/ingest.py`, or a glob
    of tar files, or several of either joined with ','. With `long_shards` set this is the short
    source of the long:short mixture."""
    long_shards: str = ""
    """The long source of a long:short mixture (the long-context curriculum's long videos), in the same
    forms as `shards`; "" = one source. Its shard files must not also be in `shards`."""
    eval_shards: str = ""
    """Held-out shards for train.eval (the same forms as `shards`; their files must not be in `shards` or
    `long_shards`), one pool, or several sets each scored on its own: "NAME=PATH,NAME=PATH" (data/held_out.py).
    "" with train.eval on: only a run on its own synthetic videos, which makes a held-out set."""
    long_fraction: float = 0.0
    """Share of packed sequences filled from `long_shards`, in [0, 1]; the rest come from `shards`
    (long:short 1:3 = 0.25). The ratio counts packed sequences: each sequence is filled from ONE
    source, chosen by a draw that is a pure function of (seed, the sequence's position in the global
    stream), and each source is packed on its own. Why sequences and not samples: Keye-VL-2.0 states
    its mix as shares of training data; every sequence is `seq_len` tokens of compute, so a share of
    sequences is a share of tokens (up to each source's padding), whereas a share of samples is not
    (one hour-long video is ~100x the tokens of a short clip, so 1:1 by samples would be ~99% long
    tokens). Packing per source also leaves each source's packs, order and exact-resume state as they
    would be on their own (0 and 1 reproduce the one-source streams exactly), keeps long videos from
    being packed around with short clips, and needs no RNG state to resume. The realized shares of
    sequences and of real tokens are in `VideoPackedLoader.stats["sources"]` (and logged)."""
    text_tokens: str = ""
    """Token files (megatron indexed datasets from launch/tokenize_text.py, data/token_files.py: prefixes,
    directories or globs, comma-separated) mixed in as packs of text alone: a pretraining-scale text corpus beside
    the videos, memory-mapped where text-only samples in shards are held in memory. Tokenized with this config's
    tokenizer (their sidecar is checked). "" = none."""
    text_tokens_fraction: float = 0.0
    """Share of packed sequences filled from `text_tokens`, in [0, 1); the rest are split between `shards` and
    `long_shards` by `long_fraction`. Drawn like the long:short mixture, so a resume is exact."""
    text_tokens_index_dir: str = ""
    """Where the token rows' epoch orders are kept as files that every rank and worker maps (data.tokens.index_dir
    says more); the trainer sets <run_dir>/token_index when empty. "" outside the trainer: held in memory."""
    index_dir: str = ""
    """Where the catalogs (every sample's record, columnar) and the epoch plans (each document's size, the packs) are
    kept as files: read and planned by the first process of the node that needs them, mapped by every rank and
    worker (docs/data.md "Catalog and plans on disk"). The trainer sets <run_dir>/data_index when empty; a node-local
    disk is the fastest place. "" outside the trainer: each process holds and plans its own."""

    remote_timeout_s: float = 60.0
    """Shards on object storage (`https://...`, `s3://...`; docs/data.md "Shards on object storage"): the longest
    wait of one request for its connection or for its next bytes, and the most it may take for each MiB it asks
    for (at least one); past it the request is tried again."""
    remote_retries: int = 4
    """Tries after the first of a request that failed for a reason that may pass (HTTP 5xx or 429, a connection
    error or reset, a timeout, a short read); then the sample is quarantined (its read at training time), or the
    launch stops (a shard index or list file, read before training)."""
    remote_backoff_s: float = 1.0
    """Wait before the first retry, doubled before each later one (each drawn from 0.5x to 1.5x of it)."""

    # ---- sequence packing -------------------------------------------------------------------
    seq_len: int = 8192
    """Tokens per packed sequence (up to 262,144)."""
    pad_to_seq_len: bool = True
    """Pad every pack to exactly `seq_len` (the padding is one extra, loss-free segment)."""
    pack_lookahead: int = 32
    """Open bins of the best-fit packer; 1 = plain greedy in sample order."""
    max_text_tokens: int = 4096
    """Annotation text per sample is cut (at a segment boundary when possible) to this many tokens."""
    chat_template: str = "plain"
    """How a record's conversation turns are written (docs/data.md "Conversations"): "plain" = "User: ..." /
    "Assistant: ..." lines; "qwen" = Qwen's chat template (<|im_start|>role ... <|im_end|>); "qwen3" = Qwen3's, which
    adds its thinking blocks (<think> ... </think>, from an assistant turn's reasoning_content or its text), for a
    run that starts from Qwen3 / Keye-VL-2.0 weights with their tokenizer (data.video.tokenizer), which holds those
    tokens. Tool use (a record's `tools`, an assistant's calls, tool results) is written in Qwen's tool layout
    under "qwen" and "qwen3"."""
    text_overflow: str = "continue"
    """A text-only sample longer than a sequence: "continue" = cut into pieces of a sequence each, every piece
    trained (docs/data.md "Text-only samples"); "cut" = keep its first sequence's worth, count what was cut."""

    # ---- frame sampling (Keye/Qwen style) -------------------------------------------------------
    sample_fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 4096
    min_frame_tokens: int = 64
    """Merged (LM) tokens per frame, lower bound."""
    max_frame_tokens: int = 256
    """Merged (LM) tokens per frame, upper bound."""
    video_tokens_per_second: float = 256.0
    """Per-video visual budget grows linearly with duration at this rate ..."""
    min_video_tokens: int = 1024
    max_video_tokens: int = 184_320
    """... between these bounds (184,320 = 180 Ki tokens, Keye-VL-2.0's ~184K)."""
    fast_frame_ratio: float = 0.0
    """Slow/fast frame encoding (Keye-VL-1.5; docs/data.md "Slow and fast frames"): > 0 gives a sampled frame
    that barely differs from the last slow one (the scene changes ingest found) this fraction of a slow frame's
    tokens, so the budget buys more or larger slow frames; Keye-VL-1.5 uses 0.3. 0 = every frame slow."""
    frame_jitter: float = 0.0
    """0 = frames at interval mid-points; >0 = uniform jitter of this fraction of the interval,
    seeded by (seed, epoch, sample key)."""
    patch_size: int = 14
    merge_size: int = 2
    max_aspect_ratio: float = 200.0

    # ---- image samples (docs/data.md "Image samples") -------------------------------------------
    min_image_tokens: int = 4
    """Merged (LM) tokens of an image, lower bound (Qwen2-VL's min_pixels = 4 x 28 x 28)."""
    max_image_tokens: int = 1280
    """Merged (LM) tokens of an image, upper bound (Qwen2.5-VL's default max_pixels = 1280 x 28 x 28); an
    image is resized, aspect kept, to sides that are multiples of 28 with its token count in
    [min_image_tokens, max_image_tokens] (its native size when that already fits)."""

    # ---- ordering -----------------------------------------------------------------------------
    shuffle: bool = True
    shuffle_buffer: int = 1000
    """Samples in the (simulated, deterministic) shuffle buffer after the shard-order shuffle."""
    num_epochs: Optional[int] = None
    """None = endless stream of epochs; otherwise the stream ends after this many epochs."""

    # ---- decoding -----------------------------------------------------------------------------
    decode_backend: str = "pyav"
    """One of DECODE_BACKENDS. PyAV is the default because it measured faster than decord here
    (1.3x on 2 fps sampling, 1.9x on 64 frames spread over a 3-minute 360p H.264 video, CPU-s per
    frame, one thread) and is frame-exact by pts; see docs/data.md."""
    decode_isolation: str = "process"
    """'process': decode in a guarded child process per DataLoader worker (a crash or hang costs one
    sample); 'inline': decode in the worker itself (no protection, slightly faster)."""
    decode_threads: int = 1
    num_workers: int = 2
    prefetch_factor: int = 2
    spill_dir: str = "/dev/shm"
    """Where a tar member is written as a file for the decoder (tmpfs preferred)."""

    # ---- bad samples --------------------------------------------------------------------------
    quarantine_path: str = "quarantine.jsonl"
    """JSONL of (shard, key, reason) for every sample that failed; '{rank}' is substituted."""
    max_consecutive_failures: int = 100
    sample_timeout_s: float = 300.0
    """Watchdog for one sample's decode; a hung decoder is killed and the sample quarantined."""
    batch_timeout_s: float = 0.0
    """Watchdog for one pack from the DataLoader workers (0 = wait forever)."""

    # ---- tokenizer ----------------------------------------------------------------------------
    tokenizer: str = "bytes"
    """"bytes" (ids 0..255 and specials at special_token_offset), or the directory of a Hugging Face tokenizer
    (its tokenizer.json; e.g. the Qwen3-30B-A3B checkpoint the LM starts from), with Qwen-VL's special tokens."""
    vocab_size: int = 512
    special_token_offset: int = 256
    """Special ids are offset, offset+1, ... (pad, bos, eos, vision_start, vision_end, image_pad,
    video_pad, frame_ts); byte ids are 0..255."""
    label_ignore_index: int = -100

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"VideoDataConfig.{name} = {getattr(self, name)!r}: {why}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int",) and (not isinstance(v, int) or isinstance(v, bool)):
                bad(f.name, "must be an int")
            if f.type in ("float",) and not isinstance(v, (int, float)):
                bad(f.name, "must be a number")
            if f.type in ("float",) and math.isnan(v):   # passes every comparison below: nan > 0 and nan < 0 are False
                bad(f.name, "must be a number, not nan")
        # first: every later message shows the value
        for name in ("shards", "long_shards", "eval_shards"):
            for part in split_spec(getattr(self, name)) if isinstance(getattr(self, name), str) else ():
                url = part.partition("=")[2] if re.match(r"^[A-Za-z][A-Za-z0-9_.-]*=", part) else part
                if is_url(url) and has_credentials(url):    # the message shows the URL without them
                    raise ValueError(f"VideoDataConfig.{name}: {clean_url(url)!r} carries credentials (a query "
                                     f"string, user:password@ or a fragment): the config is saved with the run (its "
                                     f"snapshot, checkpoints, wandb), so name such URLs in a list file (a .txt of one "
                                     f"shard URL a line) and give its path here")
        if not isinstance(self.shards, str):
            bad("shards", "must be a string (dir, glob, or comma-separated list)")
        if not isinstance(self.long_shards, str):
            bad("long_shards", "must be a string (dir, glob, or comma-separated list; '' = no long source)")
        if isinstance(self.long_fraction, bool) or not (math.isfinite(self.long_fraction)
                                                          and 0.0 <= self.long_fraction <= 1.0):
            bad("long_fraction", "must be a number in [0, 1] (the share of packed sequences from long_shards)")
        if self.long_fraction > 0 and not self.long_shards.strip():
            bad("long_fraction", "is > 0 but there is no long source: set long_shards (data.video.long_shards="
                                 "DIR) or long_fraction=0")
        if self.long_shards.strip() and self.long_shards.strip() == self.shards.strip() != REQUIRED:
            bad("long_shards", "names the same shards as `shards`: the long and short sources must differ")
        for other in ("shards", "long_shards"):
            if self.eval_shards.strip() and self.eval_shards.strip() == getattr(self, other).strip():
                bad("eval_shards", f"names the same shards as `{other}`: held-out data must not be trained on")
        if not (math.isfinite(self.remote_timeout_s) and self.remote_timeout_s > 0):
            bad("remote_timeout_s", "must be a finite number of seconds > 0 (each request to object storage)")
        if self.remote_retries < 0:
            bad("remote_retries", "must be >= 0 (tries after the first of a request to object storage)")
        if not (math.isfinite(self.remote_backoff_s) and self.remote_backoff_s >= 0):
            bad("remote_backoff_s", "must be a finite number of seconds >= 0")
        if not isinstance(self.text_tokens, str):
            bad("text_tokens", "must be a string (token-file prefixes, directories or globs, comma-separated)")
        if isinstance(self.text_tokens_fraction, bool) or not (math.isfinite(self.text_tokens_fraction)
                                                               and 0.0 <= self.text_tokens_fraction < 1.0):
            bad("text_tokens_fraction", "must be a number in [0, 1) (the share of packed sequences from text_tokens)")
        if self.text_tokens_fraction > 0 and not self.text_tokens.strip():
            bad("text_tokens_fraction", "is > 0 but there are no token files: set text_tokens "
                                        "(data.video.text_tokens=PREFIX) or text_tokens_fraction=0")
        if self.text_tokens.strip() and self.text_tokens_fraction == 0:
            warnings.warn(f"VideoDataConfig.text_tokens = {self.text_tokens!r} is ignored: text_tokens_fraction = 0, "
                          f"so no packed sequence is drawn from it")
        if self.long_shards.strip() and self.long_fraction == 0:
            warnings.warn(f"VideoDataConfig.long_shards = {self.long_shards!r} is ignored: long_fraction = 0, so "
                          f"no packed sequence is drawn from it")
        if not 16 <= self.seq_len <= 1 << 20:
            bad("seq_len", self.seq_len_error(self.seq_len))
        if self.pack_lookahead < 1:
            bad("pack_lookahead", "must be >= 1")
        if self.max_text_tokens < 1:   # 0 trained recipe=keye_tiny at loss 0.0000
            bad("max_text_tokens", "must be >= 1: a video or image sample's text is nearly all of its loss, and 0 cuts "
                                   "it all")
        if self.chat_template not in CHAT_TEMPLATES:
            bad("chat_template", f"must be one of {CHAT_TEMPLATES}")
        if self.text_overflow not in TEXT_OVERFLOWS:
            bad("text_overflow", f"must be one of {TEXT_OVERFLOWS}")
        if not (math.isfinite(self.sample_fps) and self.sample_fps > 0):
            bad("sample_fps", "must be > 0")
        if self.min_frames < 1:
            bad("min_frames", "must be >= 1")
        if self.max_frames < self.min_frames:
            bad("max_frames", f"must be >= min_frames ({self.min_frames})")
        if self.min_frame_tokens < 1:
            bad("min_frame_tokens", "must be >= 1")
        if self.max_frame_tokens < self.min_frame_tokens:
            bad("max_frame_tokens", f"must be >= min_frame_tokens ({self.min_frame_tokens})")
        if self.video_tokens_per_second <= 0:
            bad("video_tokens_per_second", "must be > 0")
        if self.min_video_tokens < self.min_frame_tokens:
            bad("min_video_tokens", f"must be >= min_frame_tokens ({self.min_frame_tokens})")
        if self.max_video_tokens < self.min_video_tokens:
            bad("max_video_tokens", f"must be >= min_video_tokens ({self.min_video_tokens})")
        if not 0.0 <= self.fast_frame_ratio < 1.0:
            bad("fast_frame_ratio", "must be in [0, 1) (0 = every frame slow; Keye-VL-1.5 uses 0.3)")
        if not 0.0 <= self.frame_jitter <= 1.0:
            bad("frame_jitter", "must be in [0, 1]")
        if self.patch_size < 1:
            bad("patch_size", "must be >= 1")
        if self.merge_size < 1:
            bad("merge_size", "must be >= 1")
        if self.max_aspect_ratio < 1:
            bad("max_aspect_ratio", "must be >= 1")
        if self.min_image_tokens < 1:
            bad("min_image_tokens", "must be >= 1")
        if self.max_image_tokens < self.min_image_tokens:
            bad("max_image_tokens", f"must be >= min_image_tokens ({self.min_image_tokens})")
        if self.shuffle_buffer < 0:
            bad("shuffle_buffer", "must be >= 0")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs < 1):
            bad("num_epochs", "must be None or an int >= 1")
        if self.decode_backend not in DECODE_BACKENDS:
            bad("decode_backend", f"must be one of {DECODE_BACKENDS}")
        if self.decode_isolation not in DECODE_ISOLATIONS:
            bad("decode_isolation", f"must be one of {DECODE_ISOLATIONS}")
        if self.decode_threads < 1:
            bad("decode_threads", "must be >= 1")
        if self.num_workers < 0:
            bad("num_workers", "must be >= 0")
        if self.prefetch_factor < 1:
            bad("prefetch_factor", "must be >= 1")
        if self.max_consecutive_failures < 1:
            bad("max_consecutive_failures", "must be >= 1")
        if not (math.isfinite(self.sample_timeout_s) and self.sample_timeout_s > 0):
            bad("sample_timeout_s", "must be a finite number of seconds > 0 (the watchdog of a hung decoder)")
        if not (math.isfinite(self.batch_timeout_s) and self.batch_timeout_s >= 0):
            bad("batch_timeout_s", "must be a finite number of seconds >= 0 (0 = no timeout)")
        if self.tokenizer not in TOKENIZERS:
            hf_tokenizer_file(self.tokenizer)  # a Hugging Face tokenizer directory, or a ValueError naming it
        if self.label_ignore_index >= 0:   # data/video_stream.py sets such labels to 0 and keeps them in the loss
            bad("label_ignore_index", "must be < 0: ids >= 0 are tokens, whose targets would be trained as token 0")
        if self.special_token_offset < 256:
            bad("special_token_offset", "must be >= 256 (ids 0..255 are the bytes)")
        if self.tokenizer == "bytes" and self.vocab_size < self.special_token_offset + 8:
            bad("vocab_size", f"must be >= special_token_offset + 8 = {self.special_token_offset + 8}")
        if (why := self.seq_len_error(self.seq_len)) is not None:
            bad("seq_len", why)

    def seq_len_error(self, seq_len: int) -> str | None:
        """Why packs of `seq_len` tokens cannot be made with these settings, or None. The trainer packs to
        train.seq_length, whatever `seq_len` says (data/video_stream.py), so the launcher asks this of that too."""
        if not 16 <= seq_len <= 1 << 20:
            return "must be in [16, 1048576]"
        # the smallest sample (min_frames frames at min tokens each, no text) must fit a sequence
        smallest = self.min_frames * (self.min_frame_tokens + 12) + 2
        if smallest > seq_len:
            return (f"cannot hold even the smallest video sample ({smallest} tokens = "
                    f"min_frames x (min_frame_tokens + ~12 text/marker tokens) + 2)")
        return None

    def sources(self) -> list[tuple[str, str, str, float]]:
        """(name, spec, config field, share of packed sequences) of each data source: one ("short", shards)
        without `long_shards`, else ("short", shards) and ("long", long_shards); then ("tokens", text_tokens) with
        `text_tokens_fraction` > 0, the shards' shares scaled to the rest."""
        if not self.long_shards.strip():
            out = [("short", self.shards, "shards", 1.0)]
        else:
            f = float(self.long_fraction)
            out = [("short", self.shards, "shards", 1.0 - f), ("long", self.long_shards, "long_shards", f)]
        t = float(self.text_tokens_fraction)
        if t > 0:
            out = [(n, spec, fld, w * (1.0 - t)) for n, spec, fld, w in out] + [("tokens", self.text_tokens,
                                                                                 "text_tokens", t)]
        return out

    @property
    def frame_factor(self) -> int:
        """Frame sides are snapped to multiples of this (patch_size * merge_size, 28 by default)."""
        return self.patch_size * self.merge_size
