"""The data streams a run reads, built from its config: one data-parallel rank's training data, or one held-out set
of train.eval's. The trainer builds its streams here, and launch/preview.py the same streams without a process group,
so that what a preview shows is what the run reads.

A run on its own synthetic data makes it under its run directory first (rank 0, once; the other ranks wait for it).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

from data.synthetic_tokens import SyntheticTokenStream, samples_seed


def training_exclude(cfg):
    """data.exclude's samples (data/exclude.read_exclude), left out of the training data, not of held-out sets;
    None without the setting, and for train.eval.only, which trains none."""
    from data.exclude import read_exclude

    if not cfg.data.exclude.strip() or cfg.train.eval.only:
        return None
    return read_exclude(cfg.data.exclude, spikes=cfg.data.exclude_spikes)


SOURCE_SETTINGS = {"short": "data.video.shards", "long": "data.video.long_shards"}   # the loader's sources


def data_summary(stream) -> list[tuple[str, str]]:
    """What a training stream reads, to compare across ranks, as (setting, what it holds) per source: for video data
    (shards, long_shards) its samples and its catalog's fingerprint (the sample names of its shard indexes, in order:
    the same for copies of the same shards at other paths or times); for token files (data.tokens.paths,
    data.video.text_tokens) each pool's files by name, documents, tokens and a fingerprint of their contents
    (data/token_files.content_fingerprint: the same for copies at other paths or times, another for files of the
    same names and lengths holding other tokens). [] for synthetic text."""
    from data.token_files import content_fingerprint

    def tokens(src) -> str:
        return (f"{', '.join(map(os.path.basename, src.prefixes))}: {src.documents} documents, {src.tokens} tokens "
                f"(content {content_fingerprint(src.prefixes)})")

    loader, corpus = getattr(stream, "loader", None), getattr(stream, "corpus", None)
    if loader is not None:
        return [("data.video.text_tokens", tokens(planner.source)) if name == "tokens" else
                (SOURCE_SETTINGS.get(name, name), f"{len(cat)} samples (catalog {cat.fingerprint})")
                for name, cat, planner in zip(loader.source_names, loader.catalogs, loader.planners)]
    if corpus is not None:
        return [("data.tokens.paths", tokens(src)) for src in corpus.sources]
    return []


def check_same_data(stream, hosts=()) -> None:
    """Collective: every rank's training data is rank 0's (data_summary); SettingsError naming the ranks, and their
    hosts (`hosts`: every rank's, by rank), whose data differ. The data-parallel ranks split one plan of the samples
    between them, each planning it from its own view of the files: where a node saw other files (a copy on its own disk
    that lacks some or holds others), its ranks took their samples from another plan, so that samples were trained
    twice and others never, without a word."""
    import torch.distributed as dist

    from train.config import SettingsError
    from train.nonfinite import format_ranks

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, data_summary(stream))
    other = [r for r, g in enumerate(gathered) if g != gathered[0]]
    if not other:
        return

    def said(summary) -> str:
        return "; ".join(f"{setting} as {what}" for setting, what in summary)

    theirs = (f"{format_ranks(other, hosts)} {said(gathered[other[0]])}" if len(other) == 1 else
              f"{format_ranks(other, hosts)} other data (rank {other[0]}: {said(gathered[other[0]])})")
    raise SettingsError(f"the ranks do not see the same training data: {format_ranks([0], hosts)} reads "
                        f"{said(gathered[0])}, {theirs}. Data-parallel ranks split one plan of the samples: every node "
                        f"must see the same data files (a copy on a node's own disk that lacks some or holds others "
                        f"differs)")


def restore_data_state(streams, state: dict, *, checkpoint: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Continues each of a resumed run's data streams from `state` (the data state of `checkpoint`, one of
    `run_dir`'s). A state saved for other data or data settings (data/sample_position.DataStateMismatch: the video
    loader's LoaderStateMismatch, token files) is a SettingsError naming what changed and what the run's user can do:
    launch with what it was saved with, or start another run directory from its weights; the loader's own remedy
    (strict=False) is no setting of a run."""
    from data.sample_position import DataStateMismatch
    from data.video.loader import LATER_FIELDS

    for s in streams:
        try:
            s.load_state_dict(state)
        except DataStateMismatch as e:
            from train.config import SettingsError

            # only where documents moved by a version of the code (the frames' place, the reading of a text's special
            # tokens) nothing can be set back: the state is of its own
            exact = ("" if set(e.changed) <= set(LATER_FIELDS) and not e.catalog_changed else
                     f"to continue it exactly, launch it with {e.settings} it was saved with; ")
            raise SettingsError(
                f"the data state of {checkpoint} cannot be continued: {e.detail}; {exact}to go on from its weights "
                f"instead, start another run directory from them: run_dir=<a new directory> "
                f"train.checkpoint.init_from={run_dir} (its data from the beginning, a fresh optimizer)") from None


def check_data_state(cfg, state: dict, *, checkpoint: str | os.PathLike, run_dir: str | os.PathLike, rank: int,
                     dp_rank: int, dp_size: int, exclude=None) -> None:
    """Whether this rank's training data can continue `state` (the data state of `checkpoint`): restore_data_state's
    SettingsError if not. The trainer asks before it builds the model, so that a resume that cannot continue its data
    stops in seconds, not after the model, optimizer and checkpoint are built and loaded. The streams are built for
    the check alone (quarantining nothing, their workers stopped after it); what their load logs at INFO and warns
    (a mixture's changed weights) the resume's own load says."""
    data_log = logging.getLogger("data")
    level = data_log.level
    data_log.setLevel(max(level, logging.WARNING))
    streams: list = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            common = dict(run_dir=run_dir, rank=rank, dp_rank=dp_rank, dp_size=dp_size, exclude=exclude)
            streams = ([video_stream(cfg, records_bad_samples=False, **common)] if cfg.data.kind == "video" else
                       text_streams(cfg, cfg.data, **common))
            restore_data_state(streams, state, checkpoint=checkpoint, run_dir=run_dir)
    finally:
        data_log.setLevel(level)
        for s in streams:
            if hasattr(s, "close"):
                s.close()


def video_stream(cfg, *, run_dir: str | os.PathLike, rank: int, dp_rank: int, dp_size: int,
                 records_bad_samples: bool = True, exclude=None, held_out: bool = False, shards: str = "",
                 set_name: str = "", one_epoch: bool = False, decode_once=None):
    """This rank's packed video micro-batches (data/video_stream.VideoBatchStream): the training data, or (held_out)
    train.eval's data from its start: `shards` (one held-out set of data.video.eval_shards, `set_name` when the sets
    are named), one source without an end, its own quarantine file; a run on its own synthetic videos makes a second,
    smaller synthetic set under another seed. one_epoch: the set scored whole. records_bad_samples: this rank writes
    the quarantine file (the first rank of a data-parallel replica: its tensor, context and pipeline ranks read the
    same packs and meet the same bad samples). exclude: data.exclude's samples, left out of the training data.
    decode_once: the replica's data/video_stream.DecodeOnce (parallel.vit.decode_once), or None: this rank decodes."""
    from data.video_stream import VideoBatchStream, ensure_synthetic_shards

    v = cfg.data.video
    setting = ""    # what names a held-out set in the loader's errors
    if held_out:
        setting = ("data.video.eval_shards" + (f" (set {set_name!r})" if set_name else "") if shards else
                   "the run's own synthetic held-out videos")
        if not shards:  # validate() allows this only for a run on its own synthetic videos
            d = cfg.data      # videos as the training data's; text only for a language model alone
            shards = str(ensure_synthetic_shards(Path(run_dir) / "synthetic_eval_videos",
                                                 max(4, d.synthetic_videos // 4) if d.synthetic_videos else 0,
                                                 d.seed + 1, rank=rank,
                                                 n_text=0 if d.synthetic_videos else max(4, d.synthetic_texts // 4),
                                                 text_held_out_from=(d.seed, d.synthetic_texts)))
        stem = Path(v.quarantine_path or "quarantine.jsonl")
        suffix = f"_eval_{set_name}" if set_name else "_eval"
        v = replace(v, shards=shards, long_shards="", long_fraction=0.0, eval_shards="", text_tokens="",
                    text_tokens_fraction=0.0, num_epochs=None,
                    quarantine_path=f"{stem.stem}{suffix}{stem.suffix}")
    elif not v.shards:
        shards = ensure_synthetic_shards(Path(run_dir) / "synthetic_videos", cfg.data.synthetic_videos,
                                         cfg.data.seed, rank=rank, n_text=cfg.data.synthetic_texts,
                                         n_images=cfg.data.synthetic_images, scenes=cfg.data.synthetic_scenes)
        v = replace(v, shards=str(shards))
    if v.quarantine_path and not os.path.isabs(v.quarantine_path):
        stem = Path(v.quarantine_path)
        v = replace(v, quarantine_path=str(Path(run_dir) / f"{stem.stem}.rank{{rank}}{stem.suffix}"))
    if not records_bad_samples:
        v = replace(v, quarantine_path="")
    if v.text_tokens and not v.text_tokens_index_dir:
        v = replace(v, text_tokens_index_dir=str(Path(run_dir) / "token_index"))
    if not v.index_dir:        # the catalogs and epoch plans, made once per node and mapped by its processes
        v = replace(v, index_dir=str(Path(run_dir) / "data_index"))
    t = cfg.train
    # held-out shard files that are also training files stop the launcher (train/launch.check_paths)
    return VideoBatchStream(v, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                            global_batch_size=t.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                            seed=cfg.data.seed, one_epoch=one_epoch, exclude=None if held_out else exclude,
                            held_out=setting, decode_once=decode_once)


def text_streams(cfg, data, *, run_dir: str | os.PathLike, rank: int, dp_rank: int, dp_size: int, chunks: int = 1,
                 exclude=None, held_out: bool = False, paths: str = "", one_epoch: bool = False) -> list:
    """This rank's text micro-batches from `data` (a DataConfig): synthetic, or token files (data.kind=tokens; the
    training paths, or with held_out `paths`, one held-out set of train.eval's; one_epoch: scored whole,
    TokenFileStream), one stream per model chunk (`chunks`): the interleaved schedule pulls each chunk's micro-batches
    separately."""
    t = cfg.train
    if data.kind == "tokens":
        from data.token_files import TokenCorpus, TokenFileStream, ensure_synthetic_token_files

        tk = data.tokens
        paths = paths if held_out else tk.paths
        if not paths:  # validate() allows an empty eval_paths only with synthetic training data
            paths = ensure_synthetic_token_files(Path(run_dir) / "synthetic_tokens",
                                                 max(64, tk.synthetic_documents // 4) if held_out else
                                                 tk.synthetic_documents, data.seed + int(held_out), rank=rank,
                                                 vocab_size=min(512, cfg.model.lm.vocab_size),
                                                 held_out_from=(data.seed, tk.synthetic_documents) if held_out
                                                 else None)
        corpus = TokenCorpus(paths, weights=None if held_out else tk.weights, seq_length=t.seq_length,
                             seed=data.seed, shuffle=tk.shuffle, vocab_size=cfg.model.lm.vocab_size,
                             field_name="data.tokens.eval_paths" if held_out else "data.tokens.paths",
                             index_dir=tk.index_dir or Path(run_dir) / "token_index",
                             exclude=None if held_out else exclude)
        return [TokenFileStream(corpus, document_bounds=tk.document_bounds, micro_batch_size=t.micro_batch_size,
                                global_batch_size=t.global_batch_size, dp_rank=dp_rank,
                                dp_size=dp_size, one_epoch=one_epoch) for _ in range(chunks)]
    return [SyntheticTokenStream(data, vocab_size=cfg.model.lm.vocab_size, seq_length=t.seq_length,
                                 micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                                 dp_rank=dp_rank, dp_size=dp_size) for _ in range(chunks)]


def eval_streams(cfg, name: str, paths: str, whole: bool, *, run_dir: str | os.PathLike, rank: int, dp_rank: int,
                 dp_size: int, chunks: int = 1, records_bad_samples: bool = True, decode_once=None) -> list:
    """One held-out set's data from its start (fresh streams per evaluation), as training draws it: one video
    stream, or one text stream per model chunk; synthetic text: the same generator, other sequences. whole: the
    streams fill the set's last global batch with sequences that count for nothing (their `padding`)."""
    common = dict(run_dir=run_dir, rank=rank, dp_rank=dp_rank, dp_size=dp_size)
    if cfg.data.kind == "video":
        return [video_stream(cfg, held_out=True, shards=paths, set_name=name, one_epoch=whole,
                             records_bad_samples=records_bad_samples, decode_once=decode_once, **common)]
    if cfg.data.kind == "tokens":
        return text_streams(cfg, cfg.data, held_out=True, paths=paths, one_epoch=whole, chunks=chunks, **common)
    # other samples of the training text's Markov chain (data.seed + 1 was another chain: a distribution the run
    # never trained on, whose loss rose as training went on); eval_plan: never whole
    return text_streams(cfg, replace(cfg.data, sample_seed=samples_seed(cfg.data) + 1), chunks=chunks, **common)
