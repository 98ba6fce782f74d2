"""Documents, packing and the batch dataclass.

Legend: S = packed sequence length, L = one document's length, F = frames in a pack,
P = ViT patches in a pack, V = merged visual tokens in a pack (= P / merge**2).

One sample (a video + its annotation) becomes one *document*:

    <bos>                                         (when the tokenizer has one; Qwen's has none)
    for each frame k:  "<12.5s>" (text)  <vision_start>  <video_pad> x (rows*cols)  <vision_end>
                       (a fast frame: "<12.5s fast>" and its own, smaller rows x cols; sampling.py item 5)
    annotation text: prompt / "Caption: ..." / "Events:" lines / "Q: ... A: ..." / "User: ... Assistant: ..." /
                     text (docs/data.md), without "<video>" / "<image>" placeholders
    <eos>
(under chat_template "qwen" / "qwen3" the frames stand inside the text: at the conversation's marker, or at the
start of its first user turn, as Keye-VL's and Qwen2.5-VL's templates write a video; `annotations.video_segments`)

A text-only sample (an annotation record with no video) is the same without frames: <bos>? text <eos>,
cut to one sequence (`plan_text_document`). An image sample holds one image or several, each one frame
with no timestamp text and `<image_pad>` placeholders, placed where the text's "<image>" markers are (else
first): <bos>? text_0 <vision_start> <image_pad> x (rows*cols) <vision_end> text_1 ... <eos>
(`plan_image_document`); an image's merged tokens take 3D positions as a video frame's do.

Labels are shifted inside the packer: labels[i] = tokens[i+1] where token i+1 is supervised (caption,
event and answer text, and <eos> when the document has any supervised text), else
`label_ignore_index`; loss_mask[i] = 1.0 exactly there. The last token of every document predicts
nothing, so no loss crosses a document boundary.

3D position ids (time, height, width), restarting at 0 in every document. Let p be the next free
position. A text token takes (p, p, p) and p += 1. For a video, let R = slot / interval (positions
per second), slot = max over its frames of (timestamp tokens + 2 + max(rows, cols)) and interval =
the planned frame spacing; at the first frame A = p - round(ts_0 * R). The merged tokens of frame k
(grid rows x cols, row-major) take t = max(p, A + round(ts_k * R)), h = t + row, w = t + col, and
then p = t + max(rows, cols). So the temporal axis is linear in the frame's timestamp (equal time
steps give equal position steps), positions never go backwards, and a frame spans
max(rows, cols) positions like a Qwen2-VL image.

Packing: best-fit over `pack_lookahead` open bins in the global sample order; a document is never
split across sequences; a bin that would overflow is never used; bins are emitted oldest first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .backends import shrink_planar
from .config import VideoDataConfig
from .annotations import (Control, annotation_segments, conversation_turns, image_chunks,  # noqa: F401
                          video_marker_problem, video_segments)
from .images import IMAGE_MARKER
from .sampling import FramePlan, PlanError, plan_frames, plan_image, timestamp_text
from .tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------
# the batch
# ---------------------------------------------------------------------------------------------

DOC_KINDS = ("video", "image", "text")   # the kinds of document a pack holds (PackedSample.doc_kinds)


@dataclass
class PackedSample:
    """One packed sequence of S tokens and the frames whose merged tokens sit in it."""

    tokens: torch.Tensor          # [S] int64, text ids with video_pad_id / image_pad_id where a visual token goes
    labels: torch.Tensor          # [S] int64, next-token targets, label_ignore_index where unsupervised
    loss_mask: torch.Tensor       # [S] float32, 1.0 where labels count
    position_ids: torch.Tensor    # [3, S] int64, (time, height, width) M-RoPE positions
    cu_seqlens: torch.Tensor      # [n_segments + 1] int32, document boundaries (padding = last segment)
    pixel_values: torch.Tensor    # [P, 3 * patch * patch] uint8, patches in merge-group order
    grid_thw: torch.Tensor        # [F, 3] int64, (1, rows, cols) in patches per frame
    visual_pos: torch.Tensor      # [V] int64, sequence index of each merged visual token, ViT-output order
    frame_timestamps: torch.Tensor  # [F] float32, seconds from the video start
    frame_doc: torch.Tensor       # [F] int32, which document each frame belongs to
    num_docs: int                 # real documents (the padding segment is not counted)
    num_pad: int                  # padding tokens at the end
    sample_keys: list[str] = field(default_factory=list)   # "shard.tar/key" of each document
    epoch: int = 0
    pack_index: int = 0           # position of this pack in its epoch's global pack list
    failures: list[dict] = field(default_factory=list)     # samples planned here that failed (slot: in planned_keys)
    planned_keys: list[str] = field(default_factory=list)  # every sample planned into this pack
    excluded: list[str] = field(default_factory=list)  # samples planned here that data.exclude leaves out
    source: str = ""              # which source of a mixture filled this pack ("short"/"long"); "" = one source
    text_docs: int = 0            # text-only documents among the num_docs (no frames)
    image_docs: int = 0           # image documents among the num_docs (one frame each)
    video_frames: int = 0         # frames of the video documents (set by loader.build_pack)
    fast_frames: int = 0          # ... of them fast (slow and fast frames: a fraction of a slow frame's tokens)
    text_continued: int = 0       # text-only documents that continue a longer text (its pieces after the first)
    doc_kinds: list[str] = field(default_factory=list)   # each document's kind (DOC_KINDS), in order
    # what this process decoded to build it (loader.build_pack; 0 on a rank that decodes no pixels): video frames,
    # images, and the wall seconds spent reading and decoding them
    decoded_frames: int = 0
    decoded_images: int = 0
    decode_s: float = 0.0

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[0])

    _TENSORS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values", "grid_thw",
                "visual_pos", "frame_timestamps", "frame_doc")

    def _map(self, fn) -> "PackedSample":
        kw = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for name in self._TENSORS:
            kw[name] = fn(kw[name])
        return PackedSample(**kw)

    def to(self, device, non_blocking: bool = False) -> "PackedSample":
        """A copy with every tensor on `device` (metadata lists shared)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedSample":
        """Used by DataLoader(pin_memory=True)."""
        return self._map(lambda t: t.pin_memory())

    def validate(self, cfg: VideoDataConfig, tokenizer: Tokenizer) -> None:
        """Internal invariants (used by tests and debug runs)."""
        S = self.seq_len
        assert self.labels.shape == (S,) and self.loss_mask.shape == (S,)
        assert self.position_ids.shape == (3, S)
        assert int(self.cu_seqlens[0]) == 0 and int(self.cu_seqlens[-1]) == S
        assert bool((self.cu_seqlens[1:] > self.cu_seqlens[:-1]).all())
        assert S <= cfg.seq_len
        is_vis = (self.tokens == tokenizer.video_pad_id) | (self.tokens == tokenizer.image_pad_id)
        assert torch.equal(torch.nonzero(is_vis).flatten(), self.visual_pos)
        m2 = cfg.merge_size ** 2
        assert self.pixel_values.shape[0] == int(self.grid_thw.prod(-1).sum())
        assert self.visual_pos.shape[0] * m2 == self.pixel_values.shape[0]
        assert self.pixel_values.shape[1] == 3 * cfg.patch_size ** 2
        assert bool((self.loss_mask[is_vis] == 0).all())


def frame_runs(frames: np.ndarray | None, fp: FramePlan, layout: str = "chw") -> list[np.ndarray]:
    """A video's frames decoded at the slow size ([n, 3, H, W] for layout "chw", [n, H, W, 3] for "hwc") as the
    runs of consecutive slow or fast frames (`FramePlan.runs`), each fast run shrunk to the fast size as the
    one-size decoders shrink it (`backends.shrink_planar`):
    what the patches are made of when one has the frames at one size (the loader's decoder scales each frame to
    its own size instead, `split_runs`). `frames` None: empty arrays of the runs' shapes (for shape checks)."""
    out = []
    for k0, k, h, w in fp.runs():
        if frames is None:
            out.append(np.empty((k - k0, 3, h, w) if layout == "chw" else (k - k0, h, w, 3), np.uint8))
        elif (h, w) == (fp.height, fp.width):
            out.append(frames[k0:k])
        elif layout == "chw":
            out.append(shrink_planar(frames[k0:k], h, w))
        else:
            out.append(shrink_planar(frames[k0:k].transpose(0, 3, 1, 2), h, w).transpose(0, 2, 3, 1))
    return out


def split_runs(buf: np.ndarray, fp: FramePlan) -> list[np.ndarray]:
    """A flat uint8 buffer of planar frames, each at its own size in frame order (what the decoder returns for
    slow and fast frames) -> views [m, 3, h, w] of its runs (`FramePlan.runs`)."""
    out, off = [], 0
    for k0, k, h, w in fp.runs():
        n = (k - k0) * 3 * h * w
        out.append(buf[off:off + n].reshape(k - k0, 3, h, w))
        off += n
    assert off == buf.shape[0], (off, buf.shape)
    return out


def patchify(frames: np.ndarray, patch: int, merge: int, out: np.ndarray | None = None,
             layout: str = "hwc") -> np.ndarray:
    """uint8 frames -> [n * (H/patch) * (W/patch), C * patch * patch], ordered frame, merge row,
    merge col, then the merge x merge patches of a group, each patch flattened (C, ph, pw) — the
    order a 2x2 patch merger consumes (Qwen2-VL, temporal patch 1).

    `frames` is [n, H, W, C] (layout "hwc") or [n, C, H, W] ("chw", what the PyAV backend can
    produce directly). With `out` (a contiguous array of the result's shape) the patches are written
    there. The copy moves whole `patch`-byte rows of a patch at a time (a void dtype), which is
    ~3.5x faster than an element-wise transpose; HWC input is first made planar (one cheap pass)."""
    if layout == "hwc":
        frames = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    elif layout != "chw":
        raise ValueError(f"layout {layout!r}: must be 'hwc' or 'chw'")
    n, C, H, W = frames.shape
    gh, gw = H // patch, W // patch
    assert gh * patch == H and gw * patch == W and gh % merge == 0 and gw % merge == 0, frames.shape
    rows = n * gh * gw
    if out is None:
        out = np.empty((rows, C * patch * patch), np.uint8)
    assert out.shape == (rows, C * patch * patch) and out.flags.c_contiguous, out.shape
    src = np.ascontiguousarray(frames)
    if src.dtype == np.uint8:
        row_t = np.dtype((np.void, patch))            # one row of one patch: `patch` contiguous bytes
        v = src.view(row_t).reshape(n, C, gh // merge, merge, patch, gw // merge, merge)
        x = v.transpose(0, 2, 5, 3, 6, 1, 4)          # n, bh, bw, mh, mw, C, ph
        np.copyto(out.view(row_t).reshape(x.shape), x)
    else:
        x = src.reshape(n, C, gh // merge, merge, patch, gw // merge, merge, patch).transpose(0, 2, 5, 3, 6, 1, 4, 7)
        np.copyto(out.reshape(x.shape), x)
    return out


# ---------------------------------------------------------------------------------------------
# documents
# ---------------------------------------------------------------------------------------------

@dataclass
class DocPlan:
    """A planned document: everything but the pixels."""
    uid: int
    key: str                       # "shard.tar/key"
    frames: FramePlan | None       # a video's frames; None for a text-only or an image sample
    ts_ids: list[list[int]]        # timestamp tokens per frame
    text_ids: list[int]            # all of the document's text (an image sample's: its chunks joined)
    text_loss: list[bool]
    length: int
    truncated: int = 0             # text tokens cut to fit (a text-only document longer than a sequence, "cut"; a
                                   # video's or an image sample's text over max_text_tokens or the room it leaves)
    piece: int = 0                 # a text-only document longer than a sequence ("continue"): this piece's index
    pieces: int = 1                # ... of this many, each planned, packed and trained as a document of its own
    images: tuple[FramePlan, ...] = ()   # an image sample's images (one frame each), in document order
    chunks: tuple = ()             # an image sample's text: (ids, loss) before image 0, between, after the last; a
                                   # video's whose frames stand inside its text: before them, after them

    @property
    def is_image(self) -> bool:
        return bool(self.images)

    @property
    def kind(self) -> str:
        return "image" if self.images else "text" if self.frames is None else "video"

    @property
    def num_frames(self) -> int:
        return len(self.images) if self.images else 0 if self.frames is None else self.frames.num_frames

    def patch_rows(self, patch_size: int) -> int:
        """ViT patches of this document's frames (rows of the pack's pixel_values)."""
        plans = self.images or ((self.frames,) if self.frames is not None else ())
        return sum(fp.patches(patch_size) for fp in plans)


def _control_id(text: str, tokenizer: Tokenizer) -> int | None:
    """The id of a chat template's own token (`annotations.Control`: "<|im_start|>"), None for any other text (or a
    tokenizer without that token: then it is read as text)."""
    token_id = getattr(tokenizer, "token_id", None)
    return token_id(text) if isinstance(text, Control) and token_id is not None else None


def _encode_joined(segs, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of `segs`' texts joined into one string, each supervised when any character of its span is (a token
    that spans a segment boundary, e.g. "\n\n\n" over "<|im_start|>assistant\n" and an answer starting "\n\n",
    holds answer text: transformers' assistant mask marks it so too). The template's own tokens (`Control` segments)
    are their ids, and the text between them is read as text: a record's "<|im_end|>" is its characters
    (`HFTokenizer.encode`), where transformers' apply_chat_template would end the turn there. The text between two
    template tokens is encoded whole, as a tokenizer splits a string at its special tokens first."""
    text = "".join(t for t, _ in segs)
    sup = np.zeros(len(text) + 1, np.int64)          # sup[c]: supervised characters before character c
    at = 0
    for t, s in segs:
        if s:
            sup[at + 1:at + len(t) + 1] = 1
        at += len(t)
    sup = np.cumsum(sup)
    ids, spans = [], []

    def read(a: int, b: int) -> None:        # text[a:b], as text
        if b > a:
            got, offs = tokenizer.encode_offsets(text[a:b])
            ids.extend(got)
            spans.extend((a + x, a + y) for x, y in offs)

    start = at = 0                           # start: where the text since the last template token begins
    for t, _ in segs:
        i = _control_id(t, tokenizer)
        if i is not None:
            read(start, at)
            ids.append(i)
            spans.append((at, at + len(t)))
            start = at + len(t)
        at += len(t)
    read(start, at)
    return ids, [bool(sup[min(max(b, a + 1), len(text))] > sup[a]) for a, b in spans]


def _encode_text(segs, tokenizer: Tokenizer, cap: int, joined: bool = False) -> tuple[list[int], list[bool], int]:
    """Token ids and supervision of `segs`, cut at `cap` tokens; also how many tokens were cut. `joined` (a Qwen chat
    template's document, with a tokenizer that gives offsets): the texts are tokenized as one string, as transformers
    tokenizes a rendered template, instead of each alone (`_encode_joined`)."""
    if joined and hasattr(tokenizer, "encode_offsets"):
        ids, loss = _encode_joined(segs, tokenizer)
        return ids[:max(0, cap)], loss[:max(0, cap)], max(0, len(ids) - max(0, cap))
    ids: list[int] = []
    loss: list[bool] = []
    cut = 0
    for text, sup in segs:
        i = _control_id(text, tokenizer)
        t = [i] if i is not None else tokenizer.encode(text)
        room = max(0, cap - len(ids))
        cut += max(0, len(t) - room)
        t = t[:room]
        ids += t
        loss += [sup] * len(t)
    return ids, loss, cut


def check_no_placeholder(ids: list[int], tokenizer: Tokenizer) -> None:
    """PlanError ("placeholder_in_text") where a sample's text ids hold the tokenizer's image or video placeholder (a
    text that spells "<|image_pad|>", which a Hugging Face tokenizer reads as that token): the pack's visual positions
    are its placeholder tokens, so that text would take a visual token's place, one more position than the ViT's
    embeddings fill, and stop the training step."""
    for name in ("image_pad", "video_pad"):
        i = getattr(tokenizer, f"{name}_id")
        if i in ids:
            raise PlanError("placeholder_in_text", f"its text holds {tokenizer.decode([i])!r} (the {name} token, "
                                                   f"which only the loader writes, one per visual token) at text token "
                                                   f"{ids.index(i)}")


def joined(template: str) -> bool:
    """Whether a document's text under chat template `template` is tokenized as one string (`_encode_text`): under
    Qwen's templates, whose ids are to equal transformers' apply_chat_template; "plain" tokenizes each segment alone."""
    return template in ("qwen", "qwen3")


def encode_text_document(annotation: dict, tokenizer: Tokenizer, template: str = "plain"
                         ) -> tuple[list[int], list[bool]]:
    """All of a text-only sample's token ids and their supervision, uncut (`template`: its conversation's)."""
    ids, loss, _ = _encode_text(annotation_segments(annotation, template), tokenizer, 1 << 62, joined(template))
    return ids, loss


def plan_text_document(*, uid: int, key: str, annotation: dict, cfg: VideoDataConfig,
                       tokenizer: Tokenizer, piece: int = 0,
                       encoded: tuple[list[int], list[bool]] | None = None) -> DocPlan:
    """A text-only sample: <bos>? text <eos>. `max_text_tokens` (the cap on a video's annotation) does not apply:
    the text is the whole document. One longer than a sequence (room for C = seq_len - 2 text tokens, one without
    <bos>) is, by `text_overflow`:
    - "continue": cut into pieces of C tokens, piece `piece` of them planned here: <bos> only on the first, <eos>
      only on the last, each a document of its own (a sequence never holds two of one text);
    - "cut": cut to its first C tokens (counted in `DocPlan.truncated`).
    `encoded`: the sample's `encode_text_document`, when the caller has it (the planner does, for the pieces)."""
    ends = 1 + (tokenizer.bos_id is not None)
    ids, loss = encoded if encoded is not None else encode_text_document(annotation, tokenizer, cfg.chat_template)
    check_no_placeholder(ids, tokenizer)
    if not any(loss):
        raise PlanError("no_text", "a text-only sample with no supervised text ('text' or a 'qa' answer)")
    room = cfg.seq_len - ends
    if len(ids) <= room or cfg.text_overflow == "cut":
        if piece:
            raise ValueError(f"{key}: piece {piece} of a text planned in one piece")
        return DocPlan(uid=uid, key=key, frames=None, ts_ids=[], text_ids=ids[:room], text_loss=loss[:room],
                       length=ends + min(len(ids), room), truncated=max(0, len(ids) - room))
    pieces = -(-len(ids) // room)
    if not 0 <= piece < pieces:
        raise ValueError(f"{key}: piece {piece} of a text in {pieces} pieces")
    a, b = piece * room, min(len(ids), (piece + 1) * room)
    first, last = piece == 0, piece == pieces - 1
    return DocPlan(uid=uid, key=key if first else f"{key}#{piece}", frames=None, ts_ids=[], text_ids=ids[a:b],
                   text_loss=loss[a:b], length=(b - a) + (first and tokenizer.bos_id is not None) + last,
                   piece=piece, pieces=pieces)


def plan_image_document(*, uid: int, key: str, images: list[dict], annotation: dict, cfg: VideoDataConfig,
                        tokenizer: Tokenizer) -> DocPlan:
    """An image sample of one image or several. Where its text holds IMAGE_MARKER ("<image>"), one per image,
    image i takes the place of marker i (interleaved image-text); without markers the images come first (under
    "qwen" / "qwen3": first in the first user turn, `annotations.image_chunks`). The
    text is cut as a video's annotation (`max_text_tokens`, leaving room for `min_image_tokens` per image),
    then each image's size comes from an even share of what the sequence leaves (`sampling.plan_image`)."""
    n = len(images)
    ends = 1 + (tokenizer.bos_id is not None)
    chunks = image_chunks(annotation, cfg.chat_template, n)
    if len(chunks) != n + 1:
        raise PlanError("bad_metadata", f"{n} image(s) but {len(chunks) - 1} {IMAGE_MARKER!r} markers in the text")
    text_cap = max(0, min(cfg.max_text_tokens, cfg.seq_len - ends - n * (2 + cfg.min_image_tokens)))
    enc, used, cut = [], 0, 0
    for ch in chunks:
        ids, loss, c = _encode_text(ch, tokenizer, text_cap - used, joined(cfg.chat_template))
        check_no_placeholder(ids, tokenizer)
        enc.append((ids, loss))
        used, cut = used + len(ids), cut + c
    fixed = ends + 2 * n + used
    plans = tuple(plan_image(im, cfg, token_cap=(cfg.seq_len - fixed) // n) for im in images)
    return DocPlan(uid=uid, key=key, frames=None, ts_ids=[], text_ids=[t for ids, _ in enc for t in ids],
                   text_loss=[b for _, loss in enc for b in loss],
                   length=fixed + sum(fp.visual_tokens for fp in plans), images=plans, chunks=tuple(enc),
                   truncated=cut)


def plan_document(*, uid: int, key: str, video: dict | None, annotation: dict, cfg: VideoDataConfig,
                  tokenizer: Tokenizer, seed: int, epoch: int, images: list[dict] | None = None, piece: int = 0,
                  encoded: tuple[list[int], list[bool]] | None = None, rng_key: str | None = None) -> DocPlan:
    """Sampling plan + text of one sample, sized to fit one sequence (raises PlanError). `images` given:
    an image sample (`plan_image_document`); else `video` None: a text-only sample (`plan_text_document`, which
    takes `piece` and `encoded`). rng_key: what seeds a video's frame jitter (sampling.sample_rng), `key` unless
    given (the loader's: "<shard file name>/<key>", the same whatever folder names the shard in `key`)."""
    if images or video is not None:
        turns = conversation_turns(annotation)     # shards written before ingest refused a picture part outside a
        if isinstance(turns, str):                 # user turn: its conversation would be left out without a word
            raise PlanError("bad_metadata", turns)
    if images:
        return plan_image_document(uid=uid, key=key, images=images, annotation=annotation, cfg=cfg,
                                   tokenizer=tokenizer)
    if video is None:
        return plan_text_document(uid=uid, key=key, annotation=annotation, cfg=cfg, tokenizer=tokenizer,
                                  piece=piece, encoded=encoded)
    n_min = min(cfg.min_frames, int(video.get("num_frames", cfg.min_frames)))
    ts_budget = n_min * (len(tokenizer.encode(timestamp_text(99999.9, fast=cfg.fast_frame_ratio > 0))) + 2)
    ends = 1 + (tokenizer.bos_id is not None)  # <bos> (if the tokenizer has one) and <eos>
    text_cap = min(cfg.max_text_tokens, cfg.seq_len - ends - ts_budget - n_min * cfg.min_frame_tokens)
    marked = video_marker_problem(annotation)   # shards written before ingest checked it
    if marked is not None:
        raise PlanError("bad_metadata", marked)
    before, after = video_segments(annotation, cfg.chat_template)   # the text before the frames, and after them
    text_ids, text_loss, cut, chunks = [], [], 0, []
    for segs in ([before] if before else []) + [after]:
        ids, loss, c = _encode_text(segs, tokenizer, max(0, text_cap) - len(text_ids), joined(cfg.chat_template))
        text_ids, text_loss, cut = text_ids + ids, text_loss + loss, cut + c
        chunks.append((ids, loss))
    chunks = tuple(chunks) if before else ()
    check_no_placeholder(text_ids, tokenizer)
    fixed = ends + len(text_ids)
    cap = cfg.seq_len - fixed
    for _ in range(12):
        if cap < cfg.min_frame_tokens:
            break
        fp = plan_frames(video, cfg, seed=seed, epoch=epoch, key=key if rng_key is None else rng_key, token_cap=cap)
        ts_ids = [tokenizer.encode(timestamp_text(t, fp.is_fast(k))) for k, t in enumerate(fp.timestamps)]
        length = fixed + fp.visual_tokens + sum(len(t) + 2 for t in ts_ids)
        if length <= cfg.seq_len:
            return DocPlan(uid=uid, key=key, frames=fp, ts_ids=ts_ids, text_ids=text_ids,
                           text_loss=text_loss, length=length, truncated=cut, chunks=chunks)
        cap -= max(1, length - cfg.seq_len)
    raise PlanError("does_not_fit", f"cannot fit seq_len {cfg.seq_len}")


@dataclass
class DocArrays:
    tokens: np.ndarray        # [L] int64
    labels: np.ndarray        # [L] int64
    loss_mask: np.ndarray     # [L] float32
    pos: np.ndarray           # [3, L] int64
    pixels: np.ndarray | None  # [n*gh*gw, 3*p*p] uint8 (None when written straight into the pack)
    grid: np.ndarray          # [n, 3]
    timestamps: np.ndarray    # [n] float32
    is_image: bool = False


class _DocWriter:
    """Fills one document's token ids, supervision and 3D positions left to right; `p` is the next free
    position (see the module docstring)."""

    def __init__(self, length: int) -> None:
        self.tok = np.empty(length, np.int64)
        self.sup = np.zeros(length, bool)
        self.pos = np.empty((3, length), np.int64)
        self.i = self.p = 0

    def text(self, ids, loss=False) -> None:
        """Text tokens at (p, p, p), p + 1, ...; `loss`: one bool for all, or one per token."""
        i, k = self.i, len(ids)
        self.tok[i:i + k] = ids
        self.sup[i:i + k] = loss
        self.pos[:, i:i + k] = np.arange(self.p, self.p + k, dtype=np.int64)[None]
        self.i += k
        self.p += k

    def visual(self, pad_id: int, t: int, rows: int, cols: int) -> None:
        """A frame's merged tokens (row-major) at (t, t + row, t + col); then p = t + max(rows, cols)."""
        i, k = self.i, rows * cols
        rr, cc = np.divmod(np.arange(k, dtype=np.int64), cols)
        self.tok[i:i + k] = pad_id
        self.pos[0, i:i + k] = t
        self.pos[1, i:i + k] = t + rr
        self.pos[2, i:i + k] = t + cc
        self.i += k
        self.p = t + max(rows, cols)

    def finish(self, cfg: VideoDataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, labels, loss mask, positions): labels[i] = tokens[i + 1] where token i + 1 is supervised."""
        assert self.i == self.tok.shape[0], (self.i, self.tok.shape[0])
        labels = np.full(self.i, cfg.label_ignore_index, np.int64)
        nxt = self.sup[1:]
        labels[:-1][nxt] = self.tok[1:][nxt]
        loss_mask = np.zeros(self.i, np.float32)
        loss_mask[:-1][nxt] = 1.0
        return self.tok, labels, loss_mask, self.pos


def _build_image_document(doc: DocPlan, images: list[np.ndarray] | None, cfg: VideoDataConfig,
                          tokenizer: Tokenizer) -> DocArrays:
    """<bos>? chunk_0 (<vision_start> <image_pad> x (rows*cols) <vision_end> chunk_i+1) per image <eos>; an
    image's merged tokens take t = p, h = p + row, w = p + col, then p += max(rows, cols), as a video frame's."""
    w = _DocWriter(doc.length)
    if tokenizer.bos_id is not None:
        w.text([tokenizer.bos_id])
    grid = []
    for k, fp in enumerate(doc.images):
        w.text(*doc.chunks[k])
        w.text([tokenizer.vision_start_id])
        rows, cols = fp.grid(cfg.patch_size, cfg.merge_size)
        w.visual(tokenizer.image_pad_id, w.p, rows, cols)
        w.text([tokenizer.vision_end_id])
        grid.append([1, rows * cfg.merge_size, cols * cfg.merge_size])
    w.text(*doc.chunks[-1])
    w.text([tokenizer.eos_id], loss=any(doc.text_loss))
    tok, labels, loss_mask, pos = w.finish(cfg)
    if images is None:
        pixels = None
    else:
        assert [a.shape for a in images] == [(1, fp.height, fp.width, 3) for fp in doc.images], [a.shape for a in images]
        pixels = np.concatenate([patchify(a, cfg.patch_size, cfg.merge_size) for a in images])
    return DocArrays(tokens=tok, labels=labels, loss_mask=loss_mask, pos=pos, pixels=pixels,
                     grid=np.array(grid, np.int64).reshape(-1, 3), timestamps=np.zeros(len(doc.images), np.float32),
                     is_image=True)


def build_document(doc: DocPlan, frames: np.ndarray | list[np.ndarray] | None, cfg: VideoDataConfig,
                   tokenizer: Tokenizer) -> DocArrays:
    """Token ids, labels, loss mask, 3D positions (and patches, if `frames` is given) of one document
    (a text-only document has no frames: `frames` None, an empty grid; an image document's `frames` is a
    list of [1, H, W, 3] arrays, one per image; a video's is one [n, H, W, 3] array, or with fast frames
    its `frame_runs`)."""
    if doc.is_image:
        return _build_image_document(doc, frames, cfg, tokenizer)
    fp = doc.frames
    n = doc.num_frames
    if fp is None:
        assert frames is None, "a text-only document has no frames"
        grids = []
    else:
        grids = [fp.grid(cfg.patch_size, cfg.merge_size, k) for k in range(n)]
        if frames is not None:
            got = [a.shape for a in frames] if fp.num_fast else [frames.shape]
            want = [r.shape for r in frame_runs(None, fp, "hwc")] if fp.num_fast else [(n, fp.height, fp.width, 3)]
            assert got == want, (got, want)
    if n:
        slot = max(len(t) + 2 + max(g) for t, g in zip(doc.ts_ids, grids))
        rate = slot / fp.interval_s
    w = _DocWriter(doc.length)
    if tokenizer.bos_id is not None and doc.piece == 0:
        w.text([tokenizer.bos_id])
    if doc.chunks:                           # a video's text before its frames (`annotations.video_segments`)
        w.text(*doc.chunks[0])
    anchor = None
    for k in range(n):
        w.text(doc.ts_ids[k])
        w.text([tokenizer.vision_start_id])
        if anchor is None:
            anchor = w.p - int(round(fp.timestamps[0] * rate))
        w.visual(tokenizer.video_pad_id, max(w.p, anchor + int(round(fp.timestamps[k] * rate))), *grids[k])
        w.text([tokenizer.vision_end_id])
    w.text(*(doc.chunks[-1] if doc.chunks else (doc.text_ids, doc.text_loss)))
    if doc.piece == doc.pieces - 1:          # a text's last piece (every other document is its own last)
        w.text([tokenizer.eos_id], loss=any(doc.text_loss) or doc.pieces > 1)
    tok, labels, loss_mask, pos = w.finish(cfg)
    if n == 0:
        pixels = np.zeros((0, 3 * cfg.patch_size ** 2), np.uint8)
    elif frames is None:
        pixels = None
    elif fp.num_fast:
        pixels = np.concatenate([patchify(a, cfg.patch_size, cfg.merge_size) for a in frames])   # its frame_runs
    else:
        pixels = patchify(frames, cfg.patch_size, cfg.merge_size)
    m = cfg.merge_size
    grid = np.array([[1, r * m, c * m] for r, c in grids], np.int64).reshape(-1, 3)
    return DocArrays(tokens=tok, labels=labels, loss_mask=loss_mask, pos=pos, pixels=pixels,
                     grid=grid, timestamps=np.asarray(fp.timestamps if n else (), np.float32))


def assemble_pack(docs: list[DocArrays], keys: list[str], cfg: VideoDataConfig, tokenizer: Tokenizer, *,
                  epoch: int, pack_index: int, failures: list[dict], planned_keys: list[str],
                  pixel_values: torch.Tensor | None = None) -> PackedSample:
    """Concatenate documents into one PackedSample (padded to seq_len when configured).
    `pixel_values`: the pack's patches already written (see `build_pack`); else taken from `docs`."""
    S_real = sum(d.tokens.shape[0] for d in docs)
    assert S_real <= cfg.seq_len, (S_real, cfg.seq_len)
    pad = cfg.seq_len - S_real if cfg.pad_to_seq_len else 0
    if S_real + pad == 0:
        pad = 1                                  # keep tensors non-empty even if every sample failed
    S = S_real + pad
    tokens = np.full(S, tokenizer.pad_id, np.int64)
    labels = np.full(S, cfg.label_ignore_index, np.int64)
    loss_mask = np.zeros(S, np.float32)
    pos = np.zeros((3, S), np.int64)
    cu = [0]
    frame_doc = []
    off = 0
    for d_i, d in enumerate(docs):
        L = d.tokens.shape[0]
        tokens[off:off + L] = d.tokens
        labels[off:off + L] = d.labels
        loss_mask[off:off + L] = d.loss_mask
        pos[:, off:off + L] = d.pos
        off += L
        cu.append(off)
        frame_doc += [d_i] * d.grid.shape[0]
    if pad:
        pos[:, off:] = np.arange(pad, dtype=np.int64)[None]
        cu.append(S)
    p2 = 3 * cfg.patch_size ** 2
    if pixel_values is None:
        pixel_values = torch.from_numpy(np.concatenate([d.pixels for d in docs]) if docs
                                        else np.zeros((0, p2), np.uint8))
    grid = np.concatenate([d.grid for d in docs]) if docs else np.zeros((0, 3), np.int64)
    ts = np.concatenate([d.timestamps for d in docs]) if docs else np.zeros(0, np.float32)
    visual_pos = np.nonzero((tokens == tokenizer.video_pad_id) | (tokens == tokenizer.image_pad_id))[0].astype(np.int64)
    return PackedSample(
        tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask), position_ids=torch.from_numpy(pos),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), pixel_values=pixel_values,
        grid_thw=torch.from_numpy(grid), visual_pos=torch.from_numpy(visual_pos),
        frame_timestamps=torch.from_numpy(ts), frame_doc=torch.tensor(frame_doc, dtype=torch.int32),
        num_docs=len(docs), num_pad=pad, text_docs=sum(int(d.grid.shape[0] == 0) for d in docs),
        image_docs=sum(int(d.is_image) for d in docs), sample_keys=list(keys), epoch=epoch, pack_index=pack_index,
        doc_kinds=["image" if d.is_image else "text" if d.grid.shape[0] == 0 else "video" for d in docs],
        failures=list(failures), planned_keys=list(planned_keys))


# ---------------------------------------------------------------------------------------------
# packing plan
# ---------------------------------------------------------------------------------------------

def pack_greedy(lengths: list[int], seq_len: int, lookahead: int = 1) -> list[list[int]]:
    """Best-fit packing of items (given in order) into bins of capacity seq_len.

    Keeps up to `lookahead` bins open; an item goes to the open bin with the least room that still
    fits it, else a new bin is opened (closing the oldest if more than `lookahead` are open).
    Returns bins as lists of item positions, in the order they are closed (oldest first); items in
    a bin keep their order. Every item must be <= seq_len.
    """
    bins: list[list[int]] = []           # open bins (items), oldest first
    room: list[int] = []
    out: list[list[int]] = []
    for i, L in enumerate(lengths):
        if L > seq_len:
            raise ValueError(f"item {i} has length {L} > seq_len {seq_len}")
        best, best_room = -1, seq_len + 1
        for b, r in enumerate(room):
            if L <= r < best_room:
                best, best_room = b, r
        if best < 0:
            bins.append([i])
            room.append(seq_len - L)
            if len(bins) > lookahead:
                out.append(bins.pop(0))
                room.pop(0)
        else:
            bins[best].append(i)
            room[best] -= L
    out += bins
    return out


def unpatchify(pixel_values: np.ndarray | torch.Tensor, grid_thw, patch: int, merge: int) -> list[np.ndarray]:
    """Inverse of `patchify` for a whole pack: list of uint8 frames [H, W, 3] (for tests/debugging)."""
    pv = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else np.asarray(pixel_values)
    grid = np.asarray(grid_thw)
    out, off = [], 0
    for t, gh, gw in grid.tolist():
        n = t * gh * gw
        x = pv[off:off + n].reshape(t, gh // merge, gw // merge, merge, merge, 3, patch, patch)
        x = x.transpose(0, 1, 3, 6, 2, 4, 7, 5)      # t, bh, mh, ph, bw, mw, pw, C
        frames = x.reshape(t, gh * patch, gw * patch, 3)
        out += list(frames)
        off += n
    return out
