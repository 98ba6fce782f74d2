"""What the model sees: the first packed sequences of a run, written out to read before the run starts.

    python launch/preview.py recipe=keye_tiny [overrides ...] --packs 3 --out DIR
        [--dp-rank R] [--dp-size N] [--split train|eval|eval:NAME] [--tokenizer bytes|DIR|ids]

The overrides are pretrain.py's (Hydra's `key=value`). The config is composed and checked as pretrain.py checks it
(a wrong key, type or layout, missing data: `config error: ...`, exit 2, before anything is read or written). No
process group, no GPU, no model: the data stream of data-parallel rank R of N is made as the trainer makes it, from
the run's seed, and its first --packs micro-batches are written in the order the run reads them from step 1 (each
step's global batch as train.batch_rampup gives it). Rank 0 (the default) holds the run's first micro-batches; N
defaults to the fewest ranks the layout runs on (as launch/memory.py takes them), divided by tp x cp x pp.

    DIR/pack_<i>.md             each document: its key, its tokens, the text as tokenized (the tokens the model is
                                trained to predict in [[...]], each frame or image as one {{...}} marker naming it,
                                a text's spelling of a special token as \\<|im_end|>), its cuts; then the padding
    DIR/pack_<i>_frame_<k>.png  the pack's frames as the vision tower gets them (packing.unpatchify of its patches)
    DIR/summary.json            per pack: tokens, supervised tokens, frames, images, documents, padding

--split eval shows train.eval's held-out data (eval:NAME one set of several named ones). Token files
(data.kind=tokens) are decoded with the tokenizer their sidecar (PREFIX.json) names, or --tokenizer; synthetic text
(data.kind=synthetic_tokens) is a chain of ids without text and is shown as ids (--tokenizer ids shows any data so). A
run on its own synthetic data makes it in its run directory first, as the run would (the run then reads those
files); the preview records no bad sample in the run's quarantine (the packs' failures are in the files it writes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

SUPERVISED = ("[[", "]]")   # around the tokens whose labels carry loss: the ones the model learns to predict
FRAME = ("{{", "}}")        # around a frame's or an image's marker, standing for its run of placeholder tokens
IDS_SHOWN = 32              # of a row the tokenizer cannot decode, in the message


class PreviewError(ValueError):
    """An input the preview cannot show (the message names it): printed as `preview error: ...`, exit 2."""


# ---- the config, as pretrain.py composes and checks it ----------------------------------------------------------

def preview_config(overrides: list[str], dp_size: int | None):
    """(Config, ParallelLayout) of pretrain.py's command line `overrides` on dp_size data-parallel ranks (None: the
    fewest ranks the layout runs on). ValueError naming the setting for anything pretrain.py's launcher refuses
    before its process groups exist, but the device (the preview needs none)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from launch.memory import fewest_ranks
    from parallel.layout import ParallelLayout
    from train.config import to_config
    from train.launch import check_paths, check_run_dir, compose_config, validate

    try:
        dcfg = compose_config(overrides)
        cfg = to_config(dcfg)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({str(e.__cause__).splitlines()[0]})" if e.__cause__ is not None and str(e.__cause__) else ""
        raise ValueError(f"{e}{cause}") from None
    p = cfg.parallel
    model = p.tp * p.cp * p.pp
    dp = dp_size if dp_size is not None else fewest_ranks(p) // model
    try:
        ParallelLayout.build(p, world_size=dp * model, lm=cfg.model.lm)
    except ValueError as e:
        if dp_size is None:
            raise
        raise ValueError(f"--dp-size {dp_size} (world {dp * model} = dp {dp} x tp {p.tp} x cp {p.cp} x pp "
                         f"{p.pp}): {e}") from None
    cfg, layout = validate(dcfg, world_size=dp * model)   # the launcher's checks, on this many ranks
    check_paths(cfg)
    if makes_synthetic_data(cfg):
        check_run_dir(cfg)
    return cfg, layout


def makes_synthetic_data(cfg) -> bool:
    """Whether the run makes its data under its run directory (the tiny recipes' synthetic videos or token files)."""
    d = cfg.data
    return (d.kind == "video" and not d.video.shards) or (d.kind == "tokens" and not d.tokens.paths)


def held_out_set(cfg, split: str) -> tuple[str, str, int] | None:
    """The held-out set `split` names (train.eval's (name, paths, global batches)), None for "train"; ValueError
    naming --split and the setting when the config holds no such set."""
    from data.held_out import eval_plan, held_out_spec

    if split == "train":
        return None
    if split != "eval" and not split.startswith("eval:"):
        raise ValueError(f"--split {split!r}: give train, eval, or eval:NAME (a named held-out set)")
    spec, setting = held_out_spec(cfg.data)
    d = cfg.data
    training = {"video": ("data.video.shards", d.video.shards), "tokens": ("data.tokens.paths", d.tokens.paths)}
    if setting and not spec and training[d.kind][1]:
        # a run on its own synthetic data makes its held-out set; one on given data scores only what it is given
        raise ValueError(f"--split {split}: this run has no held-out data: {setting} is empty ({training[d.kind][0]}="
                         f"{training[d.kind][1]!r} is the training data); set {setting}=... to the held-out data")
    sets = eval_plan(d, cfg.train.eval.batches, cfg.train.eval.set_batches)
    names = [name for name, *_ in sets if name]
    if split == "eval":
        if len(sets) > 1:
            raise ValueError(f"--split eval: {setting}={spec!r} names {len(sets)} held-out sets: give one, "
                             + " or ".join(f"--split eval:{n}" for n in names))
        return sets[0]
    name = split[len("eval:"):]
    for s in sets:
        if s[0] == name:
            return s
    raise ValueError(f"--split {split}: " + (f"{setting}={spec!r} names the sets {', '.join(names)}" if names else
                                             "this run's held-out data is one set without a name: give --split eval"))


# ---- the stream, as the trainer makes it ------------------------------------------------------------------------

def make_stream(cfg, layout, *, dp_rank: int, split: tuple[str, str, int] | None):
    """Data-parallel rank dp_rank's stream (train/data_streams.py, as the trainer builds it), of the training data
    or of the held-out set `split`; for a language model's rows, the first model chunk's."""
    from data.held_out import WHOLE
    from train.data_streams import eval_streams, text_streams, training_exclude, video_stream

    common = dict(run_dir=cfg.resolved_run_dir(), rank=0, dp_rank=dp_rank, dp_size=layout.dp)
    if split is not None:
        name, paths, batches = split
        return eval_streams(cfg, name, paths, batches == WHOLE, records_bad_samples=False, **common)[0]
    exclude = training_exclude(cfg)
    if cfg.data.kind == "video":
        return video_stream(cfg, records_bad_samples=False, exclude=exclude, **common)
    return text_streams(cfg, cfg.data, exclude=exclude, **common)[0]


def step_positions(stream, cfg, *, training: bool):
    """(step index, micro-batch index) of each next micro-batch the stream gives, without end. Training data
    (`training`) under train.batch_rampup: each step's global batch is set on the stream before its first micro-batch,
    as the trainer sets it (a token stream's rank then takes its slice of that batch); held-out data is read at
    train.global_batch_size."""
    step, consumed = 0, 0
    while True:
        batch = cfg.train.batch_size_at(consumed) if training else cfg.train.global_batch_size
        if training and cfg.train.batch_rampup.start:
            stream.set_global_batch_size(batch)
        for micro in range(stream.num_microbatches):
            yield step, micro
        step, consumed = step + 1, consumed + batch


# ---- rendering --------------------------------------------------------------------------------------------------

@dataclass
class Page:
    """One pack's markdown lines and its numbers for summary.json."""
    lines: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`."""
    runs = [len(m) for m in re.findall(r"`+", text)]
    return "`" * max(3, max(runs, default=0) + 1)


SPELLED = "\\"    # before a special token's spelling in a text (its characters, not the token)


class Decoder:
    """Token ids as text with a tokenizer (None: the ids as numbers); PreviewError, naming the tokenizer and showing
    the ids, for ids it does not hold or cannot decode. A text that spells a special token ("<|im_end|>", the byte
    tokenizer's "<eos>") or a chat template's turn token is its characters, not that token: it is shown with SPELLED
    before it, so that it does not read as the token."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        self.sep = " " if tokenizer is None else ""    # between runs: ids are words, a tokenizer's text is not
        self.special_ids, spellings = set(), set()
        if tokenizer is not None:
            from data.video.tokenizer import QWEN_CHAT_TOKENS, SPECIAL_TOKENS

            token_id = getattr(tokenizer, "token_id", lambda t: None)
            spellings = set(getattr(tokenizer, "special_tokens", ())) | set(QWEN_CHAT_TOKENS)
            self.special_ids = {i for t in spellings if (i := token_id(t)) is not None}
            self.special_ids |= {i for n in SPECIAL_TOKENS if (i := getattr(tokenizer, f"{n}_id", None)) is not None}
            for i in self.special_ids:
                try:
                    spellings.add(tokenizer.decode([i]))
                except Exception:  # noqa: BLE001 - an id it cannot decode is named when it is met
                    pass
        self.spelled = re.compile("|".join(re.escape(t) for t in sorted(spellings, key=len, reverse=True) if t)
                                  ) if spellings else None

    def _text(self, ids: list[int]) -> str:
        """ids decoded, the spellings of special tokens in their text marked (the special ids themselves are not)."""
        out, j = [], 0
        for k in range(len(ids) + 1):
            if k == len(ids) or ids[k] in self.special_ids:
                text = self.tokenizer.decode(ids[j:k]) if k > j else ""
                out.append(self.spelled.sub(lambda m: SPELLED + m.group(0), text) if self.spelled else text)
                if k < len(ids):
                    out.append(self.tokenizer.decode([ids[k]]))
                j = k + 1
        return "".join(out)

    def __call__(self, ids: list[int], where: str, row: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        bad = sorted({i for i in ids if not 0 <= i < self.tokenizer.vocab_size})
        why = ""
        if bad:
            why = (f"id{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:8]))}{' ...' if len(bad) > 8 else ''} "
                   f"outside its vocabulary (0..{self.tokenizer.vocab_size - 1})")
        else:
            try:
                return self._text(ids)
            except Exception as e:  # noqa: BLE001 - any tokenizer's failure is the input's: named with its ids
                why = f"{type(e).__name__}: {e}"
        raise PreviewError(f"the tokenizer {self.name} cannot decode {where}: {why}. Its ids "
                           f"({len(row)}, the first {min(len(row), IDS_SHOWN)}): {row[:IDS_SHOWN]}. Give the "
                           f"tokenizer the data was tokenized with (--tokenizer bytes|DIR), or --tokenizer ids")


def render_text(ids: list[int], targets: list[bool], decode: Decoder, where: str, *, markers: dict | None = None,
                row: list[int] | None = None) -> str:
    """ids as text: each run of tokens the model learns to predict (targets) in SUPERVISED marks, each run of
    placeholder tokens of one frame (`markers`: index in ids -> (frame number, its marker)) as its marker; every run
    decoded on its own."""
    markers = markers or {}
    out, i, n = [], 0, len(ids)
    while i < n:
        if i in markers:
            frame, text = markers[i]
            j = i
            while j < n and j in markers and markers[j][0] == frame:
                j += 1
            out.append(f"{FRAME[0]}{text}{FRAME[1]}")
            i = j
            continue
        j = i
        while j < n and j not in markers and targets[j] == targets[i]:
            j += 1
        s = decode(ids[i:j], where, row if row is not None else ids)
        out.append(f"{SUPERVISED[0]}{s}{SUPERVISED[1]}" if targets[i] else s)
        i = j
    return decode.sep.join(out)


def _legend(decode: Decoder) -> list[str]:
    shown = (f"Text decoded with {decode.name}, each run of tokens on its own" if decode.tokenizer is not None else
             f"Token ids as numbers (tokenizer: {decode.name})")
    return [f"{shown}. `{SUPERVISED[0]}...{SUPERVISED[1]}`: "
            f"the tokens that carry loss, those the model is trained to predict (token i when position i - 1's label "
            f"counts); `{FRAME[0]}...{FRAME[1]}`: one frame's or image's placeholder tokens, named"
            + (f"; `{SPELLED}<|im_end|>`: a text that spells a special or turn token, its characters, not the token"
               if decode.tokenizer is not None else "") + ".", ""]


def video_pages(stream, packs: int, *, cfg, split_name: str, out: Path, tokenizer_override: str) -> list[Page]:
    """The first `packs` packed sequences of a VideoBatchStream, read from its loader as the stream reads them."""
    import numpy as np
    from PIL import Image

    from data.token_files import TokenPacks
    from data.video.packing import unpatchify

    loader = stream.loader
    tok = loader.tokenizer
    decode = Decoder(None if tokenizer_override == "ids" else tok, repr(tok))
    v = loader.cfg
    merge, patch = v.merge_size, v.patch_size
    pages = []
    positions = step_positions(stream, cfg, training=not split_name)
    for i in range(packs):
        step, micro = next(positions)
        pack = next(loader)
        if stream.one_epoch and pack.epoch > 0:   # VideoBatchStream: a whole set's filler, no loss
            pack.loss_mask.zero_()
            pack.labels.fill_(v.label_ignore_index)
        page = Page()
        S = pack.seq_len
        tokens, mask = pack.tokens.tolist(), pack.loss_mask
        targets = [False] + (mask[:-1] > 0).tolist()       # token i is predicted when position i - 1's label counts
        grid = pack.grid_thw.tolist()
        per_frame = [t * h * w // merge ** 2 for t, h, w in grid]
        starts = np.concatenate([[0], np.cumsum(per_frame)]).astype(int)
        vis = pack.visual_pos.tolist()
        is_image = [tokens[vis[starts[f]]] == tok.image_pad_id for f in range(len(grid))]
        pictures = unpatchify(pack.pixel_values, pack.grid_thw, patch, merge)
        names = []
        for f, a in enumerate(pictures):
            names.append(f"pack_{i}_frame_{f}.png")
            Image.fromarray(np.ascontiguousarray(a)).save(out / names[-1])
        # the documents' plans: cuts, and each frame's source frame and slow / fast
        src = loader.source_names.index(pack.source) if loader.mixed else 0
        planner = loader.planners[src]
        plans: list = []
        if isinstance(planner, TokenPacks):
            row_pieces = planner.source.pieces(pack.epoch * planner.source.per_epoch + pack.pack_index)
        else:
            row_pieces = None
            queue = [planner.doc(item, pack.epoch) for item in planner.epoch(pack.epoch).packs[pack.pack_index]]
            for key in pack.sample_keys:
                while queue and queue[0].key != key:
                    queue.pop(0)
                plans.append(queue.pop(0) if queue else None)
        cu = pack.cu_seqlens.tolist()
        when = (f"step {step + 1}, micro-batch {micro}" if not split_name else
                f"{split_name}: global batch {step + 1}, micro-batch {micro}")
        L = page.lines
        L += [f"# Pack {i}: {when}", "",
              f"Data-parallel rank {loader.dp_rank} of {loader.dp_world}; epoch {pack.epoch}, pack {pack.pack_index} "
              f"of the epoch's global order{f', source {pack.source}' if pack.source else ''}; seed {loader.seed}. "
              f"{S} tokens, {int(mask.sum())} supervised, {_count(pack.num_docs, 'document')}, "
              f"{_count(len(grid), 'frame')} ({_count(sum(is_image), 'image')}), {pack.num_pad} padding.", ""]
        if stream.one_epoch and pack.epoch > 0:
            L += ["This pack is past the held-out set's first epoch: it fills the last global batch and counts for "
                  "nothing (no loss).", ""]
        for f in pack.failures:
            L.append(f"- Left out, failed to load: `{f['shard']}/{f['key']}`: {f['reason']} ({f['detail'][:200]})")
        for k in pack.excluded:
            L.append(f"- Left out by data.exclude: `{k}`")
        if pack.failures or pack.excluded:
            L.append("")
        L += _legend(decode)
        frame_in_doc: dict[int, int] = {}
        for d in range(pack.num_docs):
            a, b = cu[d], cu[d + 1]
            key = pack.sample_keys[d]
            plan = plans[d] if d < len(plans) else None
            frames = [f for f in range(len(grid)) if int(pack.frame_doc[f]) == d]
            kind = ("image" if frames and is_image[frames[0]] else "video" if frames else "text")
            sup = sum(targets[a:b])
            L += [f"## Document {d}: `{key}` ({kind})", "",
                  f"Tokens {a}..{b - 1} of the pack: {b - a} tokens, {sup} supervised, "
                  f"{_count(len(frames), 'image' if kind == 'image' else 'frame')}, "
                  f"{sum(per_frame[f] for f in frames)} visual tokens."]
            cuts = []
            if plan is not None and plan.truncated:
                cuts.append(f"text cut: {plan.truncated} tokens of its text did not fit (data.video.max_text_tokens "
                            f"{v.max_text_tokens}, or the room the sequence leaves)")
            if plan is not None and plan.pieces > 1:
                cuts.append(f"piece {plan.piece + 1} of {plan.pieces} of a text longer than a sequence "
                            f"(text_overflow continue: each piece a document of its own)")
            if row_pieces is not None and d < len(row_pieces):
                _, _, offset, n, length = _row_piece(planner.source, row_pieces[d])
                if offset or offset + n < length:   # a row's S + 1 tokens: its last one only as the last label
                    cuts.append(f"a piece of a document of {length} tokens: its tokens {offset}..{offset + b - a - 1}"
                                + (" (and its next token as the label of the row's last position)" if n > b - a
                                   else "") + ", the rest in other rows")
            L += [f"Cut: {c}." for c in cuts]
            L.append("")
            markers = {}
            for f in frames:
                k = frame_in_doc[d] = frame_in_doc.get(d, -1) + 1
                t, h, w = grid[f]
                fp = plan.frames if plan is not None and plan.frames is not None else None
                if is_image[f]:
                    what = f"image {k} of `{key}`"
                else:
                    what = (f"`{key}` frame {k}" + (f" (video frame {fp.indices[k]})" if fp else "")
                            + f", {float(pack.frame_timestamps[f]):.2f}s"
                            + (f", {'fast' if fp.is_fast(k) else 'slow'}" if fp and v.fast_frame_ratio > 0 else ""))
                text = (f"frame {f}: {what}, grid {t}x{h}x{w} patches, {h // merge}x{w // merge} = {per_frame[f]} "
                        f"tokens")
                for q in range(starts[f], starts[f + 1]):
                    markers[vis[q] - a] = (f, text)
            body = render_text(tokens[a:b], targets[a:b], decode, f"document {d} ({key}) of pack {i}",
                               markers=markers)
            fence = _fence(body)
            L += [fence + "text", body, fence, ""]
            if frames:
                L += ["| frame | what | at positions | t position | picture |", "|---|---|---|---|---|"]
                for f in frames:
                    p0, p1 = vis[starts[f]], vis[starts[f + 1] - 1]
                    L.append(f"| {f} | {markers[p0 - a][1]} | {p0}..{p1} | {int(pack.position_ids[0, p0])} | "
                             f"![frame {f}]({names[f]}) |")
                L.append("")
        pad = S - cu[pack.num_docs]
        L += ["## Padding", "", f"{pad} padding tokens (id {tok.pad_id}) after the last document, no loss."
              if pad else "No padding: the documents fill the sequence.", ""]
        images = sum(is_image)
        page.numbers = {"pack": i, "step": step + 1, "micro_batch": micro, "epoch": pack.epoch,
                        "pack_index": pack.pack_index, "source": pack.source, "tokens": S,
                        "supervised_tokens": int(mask.sum()), "frames": len(grid) - images, "images": images,
                        "fast_frames": pack.fast_frames, "visual_tokens": len(vis), "documents": pack.num_docs,
                        "text_documents": pack.text_docs, "padding": pad,
                        "failed": [f"{f['shard']}/{f['key']}" for f in pack.failures],
                        "excluded": list(pack.excluded), "frame_files": names}
        pages.append(page)
    stream.close()
    return pages


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _row_piece(source, piece: tuple[int, int, int, int]) -> tuple[str, int, int, int, int]:
    """A TokenSource.pieces entry as (file prefix, document number, offset, tokens, length)."""
    doc, offset, n, length = piece
    return (*source.document_name(doc), offset, n, length)


def row_decoder(cfg, stream, override: str) -> Decoder:
    """How token rows are shown: token files with token_file_tokenizer, synthetic text as ids."""
    from data.token_files import TokenFileStream

    if isinstance(stream, TokenFileStream):
        return Decoder(*token_file_tokenizer(stream, override, cfg))
    return Decoder(None, "none: synthetic text is a Markov chain of ids")


def token_file_tokenizer(stream, override: str, cfg):
    """(tokenizer or None for ids, its name) for token rows: --tokenizer, else the one the files' sidecar names
    (launch/tokenize_text.py writes it), else a PreviewError naming the files."""
    from data.token_files import sidecar
    from data.video.tokenizer import ByteTokenizer, HFTokenizer

    if override == "ids":
        return None, "none, --tokenizer ids"
    if override == "bytes":
        v = cfg.data.video
        t = ByteTokenizer(vocab_size=v.vocab_size, special_token_offset=v.special_token_offset)
        return t, repr(t)
    if override:
        try:
            t = HFTokenizer(override)
        except ValueError as e:
            raise PreviewError(str(e).replace("data.video.tokenizer", "--tokenizer")) from None
        return t, repr(t)
    prefix = stream.corpus.sources[0].prefixes[0]
    named = (sidecar(prefix) or {}).get("tokenizer", "")
    m = re.fullmatch(r"ByteTokenizer\(vocab_size=(\d+), special_token_offset=(\d+)\)", named)
    if m:
        t = ByteTokenizer(vocab_size=int(m[1]), special_token_offset=int(m[2]))
        return t, repr(t)
    m = re.fullmatch(r"HFTokenizer\('(.*)', vocab_size=\d+\)", named)
    if m and os.path.isfile(m[1]):
        t = HFTokenizer(m[1])
        return t, repr(t)
    raise PreviewError(f"no tokenizer known for the token files {prefix}: their sidecar {prefix}.json "
                       + (f"names {named!r}, which is not here" if named else "is missing or names none")
                       + ": give --tokenizer bytes|DIR (the one they were tokenized with), or --tokenizer ids")


def row_pages(stream, packs: int, *, cfg, split_name: str, decode: Decoder) -> list[Page]:
    """The first `packs` micro-batches of a token stream (token files, or synthetic text), row by row, decoded with
    `decode` (row_decoder)."""
    from data.token_files import TokenFileStream

    files = isinstance(stream, TokenFileStream)
    bounds = files and stream.document_bounds
    pages = []
    positions = step_positions(stream, cfg, training=not split_name)
    for i in range(packs):
        step, micro = next(positions)
        mb = next(stream)
        samples = stream.step_samples()[-stream.mbs:]
        page = Page()
        L = page.lines
        when = (f"step {step + 1}, micro-batch {micro}" if not split_name else
                f"{split_name}: global batch {step + 1}, micro-batch {micro}")
        L += [f"# Micro-batch {i}: {when}", "",
              f"Data-parallel rank {stream.dp_rank} of {stream.dp_size}; global samples "
              f"{', '.join(map(str, samples))}; data.seed {cfg.data.seed}.", ""]
        L += _legend(decode)
        rows = []
        for r, j in enumerate(samples):
            tokens = mb["tokens"][r].tolist()
            mask = mb["loss_mask"][r]
            S = len(tokens)
            targets = [False] + (mask[:-1] > 0).tolist()
            L += [f"## Row {r}: global sample {j}", ""]
            if files:
                pieces = stream.corpus.pieces(j)
                if not bounds:   # TokenSource.row: the other pieces close up, those left out go to the row's end
                    pieces = [q for q in pieces if not q[5]] + [q for q in pieces if q[5]]
            else:
                pieces = [("synthetic", j, 0, S + 1, S + 1, False)]
            docs, at = [], 0
            tail = " (the last of them only as the label of the row's last position)"
            for prefix, n, offset, count, length, bl in pieces:
                a, b = at, min(at + count, S)
                at += count
                if a >= S:   # the row's last label alone: the first token of a document after the row
                    continue
                doc_name = f"{os.path.basename(prefix)}#{n}" if files else f"synthetic sample {j}"
                sup = sum(targets[a:b])
                L += [f"### Document `{doc_name}`" if files else f"### `{doc_name}`", "",
                      f"Tokens {a}..{b - 1} of the row: {b - a} tokens, {sup} supervised."]
                if files and (offset or offset + count < length):
                    L.append(f"Cut: a piece of a document of {length} tokens: its tokens {offset}..{offset + count - 1}"
                             f"{tail if at > S else ''}"
                             f", the rest in other rows.")
                if bl:
                    L += [f"Left out by data.exclude: its {b - a} tokens are padding (id 0) without loss.", ""]
                    docs.append({"document": doc_name, "tokens": b - a, "left_out": True})
                    continue
                L.append("")
                body = render_text(tokens[a:b], targets[a:b], decode, f"global sample {j}, {doc_name}", row=tokens)
                fence = _fence(body)
                L += [fence + "text", body, fence, ""]
                docs.append({"document": doc_name, "tokens": b - a, "supervised_tokens": sup})
            last = int(mb["labels"][r][-1])
            shown = render_text([last], [bool(mask[-1] > 0)], decode, f"global sample {j}'s last label", row=tokens)
            L += [f"The row's last position predicts the token after it (its label), not among the row's tokens: "
                  f"`{shown}`.", ""]
            rows.append({"global_sample": j, "tokens": S, "supervised_tokens": int(mask.sum()),
                         "documents": len(docs), "padding": sum(d["tokens"] for d in docs if d.get("left_out")),
                         "pieces": docs})
        page.numbers = {"pack": i, "step": step + 1, "micro_batch": micro,
                        "tokens": sum(r["tokens"] for r in rows),
                        "supervised_tokens": sum(r["supervised_tokens"] for r in rows), "frames": 0, "images": 0,
                        "documents": sum(r["documents"] for r in rows), "padding": sum(r["padding"] for r in rows),
                        "rows": rows}
        pages.append(page)
    return pages


# ---- the command ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/preview.py", description=__doc__.splitlines()[0],
                                epilog="Other arguments are pretrain.py's overrides (recipe=NAME key=value ...).")
    p.add_argument("overrides", nargs="*", help="pretrain.py's command line: recipe=NAME key=value ...")
    p.add_argument("--packs", type=int, default=3, help="packed sequences (micro-batches) to show (default 3)")
    p.add_argument("--out", required=True, help="the directory to write pack_<i>.md, its PNGs and summary.json to")
    p.add_argument("--dp-rank", type=int, default=0, help="the data-parallel rank whose data to show (default 0)")
    p.add_argument("--dp-size", type=int, default=None,
                   help="data-parallel ranks of the run (default: those of the fewest ranks its layout runs on)")
    p.add_argument("--split", default="train", help="train (default), eval (train.eval's held-out data), or "
                                                    "eval:NAME (one named held-out set)")
    p.add_argument("--tokenizer", default="", help="token files: bytes or a Hugging Face tokenizer directory "
                                                   "(default: the one their sidecar names); ids: show ids")
    a = p.parse_intermixed_args(argv)
    if a.packs < 1:
        p.error(f"--packs must be >= 1, got {a.packs}")
    if a.dp_size is not None and a.dp_size < 1:
        p.error(f"--dp-size must be >= 1, got {a.dp_size}")
    if a.dp_rank < 0 or (a.dp_size is not None and a.dp_rank >= a.dp_size):
        p.error(f"--dp-rank {a.dp_rank}: must be in [0, --dp-size {a.dp_size})" if a.dp_size is not None else
                f"--dp-rank must be >= 0, got {a.dp_rank}")
    return a


def preview(a: argparse.Namespace) -> dict:
    """Writes the preview `a` asks for (parse_args) and returns summary.json's content."""
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a directory")
    cfg, layout = preview_config(a.overrides, a.dp_size)
    if a.dp_rank >= layout.dp:
        raise ValueError(f"--dp-rank {a.dp_rank}: the run has {layout.dp} data-parallel ranks ({layout.describe()}); "
                         f"give --dp-size for another")
    split = held_out_set(cfg, a.split)
    if a.tokenizer not in ("", "ids") and cfg.data.kind != "tokens":
        raise PreviewError(f"--tokenizer {a.tokenizer}: " + (
            f"video packs are tokenized with data.video.tokenizer ({cfg.data.video.tokenizer}), and shown with it"
            if cfg.data.kind == "video" else "synthetic text (data.kind=synthetic_tokens) is a Markov chain of ids "
                                             "that no tokenizer wrote, shown as ids") + " (or --tokenizer ids)")
    stream = make_stream(cfg, layout, dp_rank=a.dp_rank, split=split)
    decode = row_decoder(cfg, stream, a.tokenizer) if cfg.data.kind != "video" else None
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("pack_*.md")) + list(out.glob("pack_*_frame_*.png")):   # an earlier preview's
        old.unlink()
    split_name = "" if split is None else f"held-out set {split[0]}" if split[0] else "held-out data"
    if cfg.data.kind == "video":
        pages = video_pages(stream, a.packs, cfg=cfg, split_name=split_name, out=out, tokenizer_override=a.tokenizer)
    else:
        pages = row_pages(stream, a.packs, cfg=cfg, split_name=split_name, decode=decode)
    for i, page in enumerate(pages):
        (out / f"pack_{i}.md").write_text("\n".join(page.lines))
    summary = {"recipe": cfg.recipe_name, "data_kind": cfg.data.kind, "split": a.split, "dp_rank": a.dp_rank,
               "dp_size": layout.dp, "seed": cfg.data.seed, "seq_length": cfg.train.seq_length,
               # train.global_batch_size's (a step of train.batch_rampup takes fewer: each pack names its step)
               "micro_batches_per_step": cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp),
               "packs": [p.numbers for p in pages]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str]) -> None:
    a = parse_args(argv)
    try:
        summary = preview(a)
    except PreviewError as e:
        print(f"preview error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    n = summary["packs"]
    print(f"{summary['recipe']}: {len(n)} pack{'s' if len(n) > 1 else ''} of data-parallel rank {a.dp_rank} of "
          f"{summary['dp_size']} ({a.split}) in {a.out}: pack_0.md{f' ... pack_{len(n) - 1}.md' if len(n) > 1 else ''}"
          f", summary.json; "
          f"{sum(p['tokens'] for p in n)} tokens, {sum(p['supervised_tokens'] for p in n)} supervised, "
          f"{sum(p['frames'] for p in n)} frames, {sum(p['images'] for p in n)} images")


if __name__ == "__main__":
    main(sys.argv[1:])
