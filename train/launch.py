"""From a composed Hydra config to a finished run: validation, per-rank logging, the trainer, teardown."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from parallel.groups import teardown, world_size_from_env
from parallel.layout import ParallelLayout
from train.config import Config, SettingsError, check_batches, register_configs, saved_consumed_samples, to_config
from train.determinism import apply_deterministic, check_deterministic
from train.preemption import LAUNCH_STARTED_ENV, launch_start

# this launch's start: a STOP file older than it is stale (train/preemption.py). The job step's start where a launch
# script exported it (KEYE_LAUNCH_STARTED), else this process's, near enough; LAUNCHED_WARNING names a value not a time
LAUNCHED, LAUNCHED_WARNING = launch_start(time.time(), os.environ.get(LAUNCH_STARTED_ENV))


def setup_logging(run_dir: str, rank: int, *, eval_only: bool = False) -> None:
    """Rank 0 logs to the console; every rank logs to run_dir/logs/rank<N>.log, or with eval_only
    (train.eval.only, which may score a run directory while its training still runs) to logs/eval_rank<N>.log. A
    record logged with extra={"file_only": True} (a traceback stderr shows already) goes to the file alone."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fh = logging.FileHandler(os.path.join(run_dir, "logs", f"{'eval_' if eval_only else ''}rank{rank}.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        sh.addFilter(lambda record: not getattr(record, "file_only", False))
        root.addHandler(sh)
    for noisy in ("megatron", "torch.distributed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_multimodal(cfg: Config, layout: ParallelLayout) -> None:
    """The vision tower and video data fit together and with the layout (ValueError naming the setting)."""
    v, d, t = cfg.model.vision, cfg.data, cfg.train
    # a part's own lr where that part does not train: a warning, not an error (nothing trains wrongly; one train
    # group's values may serve a stage that freezes the part, or a language model alone)
    for name, part, trains in (("vision_lr", "the ViT", t.trained == "all"),
                               ("projector_lr", "the projector", t.trained in ("all", "projector"))):
        if getattr(t, name) is not None and t.trained != "none" and not (v.enabled and trains):
            warnings.warn(f"train.{name}={getattr(t, name)} is not used: "
                          + (f"{part} is frozen (train.trainable={t.trainable})" if v.enabled else
                             "this model has no vision tower (model.vision.enabled=false)"))
    if t.trainable == "projector" and not v.enabled:
        raise ValueError("train.trainable=projector trains the vision projector: set model.vision.enabled=true")
    if t.checkpoint.vision_init_from and not v.enabled:
        raise ValueError(f"train.checkpoint.vision_init_from={t.checkpoint.vision_init_from!r} fills the vision "
                         "tower, which this model does not have: set model.vision.enabled=true or leave it empty")
    if d.kind == "video":
        # the packs are train.seq_length tokens (data/video_stream.py replaces data.video.seq_len with it): a length
        # they cannot be made at stopped the run in its data loader, after the process groups and the model
        if (why := d.video.seq_len_error(t.seq_length)) is not None:
            raise ValueError(f"train.seq_length ({t.seq_length}) is the length of the video data's packs, and it "
                             f"{why}")
        from data.video.config import VideoDataConfig

        if d.video.seq_len not in (t.seq_length, VideoDataConfig.seq_len):   # set, to another length: replaced
            warnings.warn(f"data.video.seq_len={d.video.seq_len} is not used: the video data's packs are "
                          f"train.seq_length's length ({t.seq_length} tokens)")
        if t.micro_batch_size != 1:
            raise ValueError(f"video data packs one sequence per micro-batch: train.micro_batch_size must be 1, "
                             f"got {t.micro_batch_size}")
        if d.video.vocab_size > cfg.model.lm.vocab_size:
            raise ValueError(f"data.video.vocab_size ({d.video.vocab_size}) exceeds model.lm.vocab_size "
                             f"({cfg.model.lm.vocab_size})")
    if not v.enabled:
        # a language model alone reads the packed loader's text-only samples (docs/data.md "A language model
        # on text"); frames would reach it as placeholder tokens, so synthetic data must be text only (real
        # shards are checked in check_paths)
        if d.kind == "video" and not d.video.shards and (d.synthetic_videos or d.synthetic_images):
            raise ValueError(f"model.vision.enabled=false (a language model alone) cannot see the synthetic videos "
                             f"and images (data.synthetic_videos={d.synthetic_videos}, data.synthetic_images="
                             f"{d.synthetic_images}): set both to 0 and data.synthetic_texts > 0, or use a "
                             f"multimodal model")
        return
    if d.kind != "video":
        raise ValueError(f"model.vision.enabled=true needs video data (data.kind=video), got data.kind={d.kind}"
                         + (" (data.kind=tokens feeds a language model alone; a multimodal run mixes token files into "
                            "its video packs with data.video.text_tokens)" if d.kind == "tokens" else ""))
    if d.video.patch_size != v.patch or d.video.merge_size != v.merge:
        raise ValueError(f"data.video.patch_size/merge_size ({d.video.patch_size}/{d.video.merge_size}) must equal "
                         f"model.vision.patch/merge ({v.patch}/{v.merge})")


def decode_once_unused(cfg: Config, layout: ParallelLayout) -> str | None:
    """Why parallel.vit.decode_once=true changes nothing in this run (the launcher's rank 0 logs it once at start),
    or None. Its default (null) resolves by the layout and is never named; true with layout replicated is an error
    (ViTParallelConfig)."""
    if cfg.parallel.vit.decode_once is not True:
        return None
    if not cfg.model.vision.enabled:
        why = "this model has no vision tower (model.vision.enabled=false) and its data no pixels to decode"
    elif layout.tp * layout.cp * layout.pp == 1:
        why = "each data-parallel replica is one rank (parallel.tp x cp x pp = 1), which decodes its own packs anyway"
    else:
        return None
    return f"parallel.vit.decode_once=true has no effect: {why}"


def check_token_files(cfg: Config) -> None:
    """data.kind=tokens fits the model and the batch (ValueError naming the setting)."""
    d, t = cfg.data, cfg.train
    if d.kind != "tokens":
        return
    if d.tokens.document_bounds and t.micro_batch_size != 1:
        raise ValueError(f"data.tokens.document_bounds=true packs one row per micro-batch: train.micro_batch_size must "
                         f"be 1, got {t.micro_batch_size} (or data.tokens.document_bounds=false, Megatron's rows: "
                         f"attention across the documents of a row)")
    if evaluates(cfg) and d.tokens.paths and not d.tokens.eval_paths:
        raise held_out_missing(cfg, f"data.tokens.eval_paths=PREFIX (token files not in "
                                    f"data.tokens.paths={d.tokens.paths!r})")


def check_token_paths(cfg: Config) -> None:
    """The token files of data.kind=tokens exist, are whole (damaged_prefix), hold tokens, were tokenized for a
    vocabulary the model holds (their sidecar's vocab_size, when launch/tokenize_text.py wrote one), and the held-out
    files are not training files."""
    from data.held_out import held_out_sets
    from data.token_files import (count_tokens, damaged_prefix, empty_prefix, resolve_prefixes, sidecar,
                                  specials_as_ids)

    vocab = cfg.model.lm.vocab_size
    tk = cfg.data.tokens
    found = {}
    for name in ("paths", "eval_paths"):
        spec = getattr(tk, name)
        # held-out sets each on their own (ValueError for a half-named list): a prefix named twice within one is read
        # twice (resolve_prefixes refuses it), one in two sets is scored in each
        specs = [paths for _, paths in held_out_sets(spec, field_name="data.tokens.eval_paths")] \
            if name == "eval_paths" else [spec]
        found[name] = [p for s in specs if s for g in resolve_prefixes(s, field_name=f"data.tokens.{name}") for p in g]
        for prefix in found[name]:
            # a .bin or .idx cut short (an interrupted copy) failed at the first row past the cut, naming no file
            if (why := damaged_prefix(prefix) or empty_prefix(prefix)) is not None:
                raise ValueError(f"data.tokens.{name}: {why}")
            meta = sidecar(prefix)
            if meta is not None and meta["vocab_size"] > vocab:
                raise ValueError(f"data.tokens.{name}: {prefix} was tokenized with {meta.get('tokenizer', '?')} "
                                 f"(vocab_size {meta['vocab_size']}), larger than model.lm.vocab_size ({vocab})")
        if (old := specials_as_ids(f"data.tokens.{name}", found[name])) is not None:
            warnings.warn(old)
    shared = sorted({os.path.realpath(p) for p in found["paths"]} & {os.path.realpath(p) for p in found["eval_paths"]})
    if shared:
        raise ValueError(f"data.tokens.eval_paths={tk.eval_paths!r}: {shared[0]} is also training data: held-out data "
                         f"must not be trained on")
    # each pool of files the loader reads as one source must fill a row (train.seq_length + 1 tokens): a held-out
    # set too short for one stopped a run only at its first evaluation, with a traceback naming no setting
    groups = resolve_prefixes(tk.paths, field_name="data.tokens.paths") if tk.paths else []
    weights = list(tk.weights or [])
    pools = ([("data.tokens.paths", tk.paths, "", g) for g, w in zip(groups, weights) if float(w) > 0] if weights else
             [("data.tokens.paths", tk.paths, "", [p for g in groups for p in g])] if groups else [])
    if tk.eval_paths:
        pools += [("data.tokens.eval_paths", tk.eval_paths, set_name,
                   [p for g in resolve_prefixes(paths, field_name="data.tokens.eval_paths") for p in g])
                  for set_name, paths in held_out_sets(tk.eval_paths, field_name="data.tokens.eval_paths")]
    need = cfg.train.seq_length + 1
    for field_name, spec, set_name, prefixes in pools:
        tokens, documents = count_tokens(prefixes)
        if tokens < need:
            what = f"held-out set {set_name!r} ({', '.join(prefixes)})" if set_name else ", ".join(prefixes)
            raise ValueError(f"{field_name}={spec!r}: {what} holds {tokens} tokens in {documents} documents, fewer "
                             f"than one row of train.seq_length + 1 = {need} tokens")


def check_tokenizer(cfg: Config) -> None:
    """The video documents' tokenizer fits the model and the weights it starts from (ValueError naming the
    setting): a Hugging Face tokenizer loads, holds Qwen-VL's special tokens and fits data.video.vocab_size;
    and a run that starts from weights with a tokenizer of their own (init_from holds a tokenizer.json) does not
    tokenize with the byte tokenizer, whose ids mean nothing to those weights."""
    from data.video.tokenizer import build_tokenizer

    if cfg.data.kind != "video":
        return
    v, source = cfg.data.video, cfg.train.checkpoint.init_from
    if v.tokenizer != "bytes":
        build_tokenizer(v)
    elif source and Path(source, "tokenizer.json").is_file():
        raise ValueError(f"train.checkpoint.init_from={source!r} holds the tokenizer its weights were trained with "
                         f"(tokenizer.json: a Hugging Face checkpoint, or a run launch/convert.py imported from one), "
                         f"but data.video.tokenizer=bytes: byte ids are not its text ids. "
                         f"Set data.video.tokenizer={source}")


def evaluates(cfg: Config) -> str:
    """The setting that asks for held-out evaluation ("train.eval.only=true", "train.eval.interval=N"), or ""."""
    e = cfg.train.eval
    return "train.eval.only=true" if e.only else f"train.eval.interval={e.interval}" if e.interval else ""


def held_out_missing(cfg: Config, what: str) -> ValueError:
    """The error for an evaluation without held-out data: the setting that asked for it, and `what` to set."""
    off = ", or train.eval.interval=0" if cfg.train.eval.interval else ""
    return ValueError(f"{evaluates(cfg)} needs held-out data: set {what}{off}")


def check_eval_only(cfg: Config) -> None:
    """train.eval.only scores existing weights: run_dir's checkpoints, or train.checkpoint.init_from's when it
    holds none; train.eval.checkpoints names ones that directory holds (ValueError naming what is missing)."""
    from train import checkpoint as ckpt

    if cfg.train.eval.only:
        ckpt.eval_checkpoints(cfg)


def latest_checkpoint(cfg: Config) -> tuple:
    """(the newest checkpoint of run_dir whose files have their sizes, its common state: {} where it cannot be read),
    or (None, {}): what check_resume judges and resume_position reads, found and read once per launch."""
    from train import checkpoint as ckpt

    ref = ckpt.find_latest(cfg.resolved_run_dir(), quiet=True)  # the trainer logs what it skips, once per rank
    return (None, {}) if ref is None else (ref, ckpt.saved_common(ref) or {})


def check_resume(cfg: Config, layout: ParallelLayout, latest: tuple | None = None) -> None:
    """A run directory holding a complete checkpoint is resumed: the model configured must be the one that
    checkpoint holds, at a layout its optimizer state loads at (train/checkpoint.check_resumable). ValueError naming
    each model setting that differs, before any process group exists; the
    settings that do not change what the model computes (train.config.MODEL_KEYS_FREE_ON_RESUME) may differ, and
    the trainer logs every other change (train, data, parallel) when it resumes. Checkpoints written before they
    recorded their config are not checked. With train.checkpoint.resume=false such a directory is refused: a fresh
    run would write its checkpoints among the old ones, and a later resume could take either run's.
    This judges the newest checkpoint whose files have their sizes (no process group yet, and checksumming a large
    checkpoint is the ranks' shared work); the trainer judges the one it resumes from again
    (train/checkpoint.check_resume_point) before it builds the model: a newest one whose checksums fail, or whose
    state cannot be read, gives way to an older one. `latest`: latest_checkpoint(cfg), where the caller has it."""
    from train import checkpoint as ckpt

    ref, common = latest_checkpoint(cfg) if latest is None else latest
    if ref is None:
        return
    if not cfg.train.checkpoint.resume and not cfg.train.eval.only:  # scoring it writes no checkpoint among them
        raise ValueError(f"run_dir={cfg.resolved_run_dir()} holds a checkpoint (step {ref.step}, {ref.path}) and "
                         f"train.checkpoint.resume=false: a fresh run would write its checkpoints among that run's. "
                         f"Give it another run_dir (train.checkpoint.init_from={cfg.resolved_run_dir()} to start from "
                         f"those weights), or remove {ref.path.parent}")
    ckpt.check_resume_point(cfg, layout, ref, common)


def resume_position(cfg: Config, latest: tuple) -> tuple[int, int]:
    """(steps, packed sequences consumed) of the checkpoint this launch resumes (`latest`: latest_checkpoint(cfg),
    check_resume's), (0, 0) for a fresh run or one whose checkpoint's state cannot be read (judged as fresh)."""
    ref, common = latest
    if not cfg.train.checkpoint.resume or ref is None:
        return 0, 0
    return (int(common["step"]), saved_consumed_samples(common, common.get("config"))) if "step" in common else (0, 0)


def check_paths(cfg: Config) -> None:
    """The data and weights a run reads are there, and the held-out shards are not training shards (ValueError naming
    the setting). The launcher checks this before
    any process group exists: a missing path would otherwise stop the run only once its model is built, minutes
    into a 30B job. Not part of `validate`, which also judges configs whose paths live on another machine
    (launch/memory.py, the recipe tests). `init_from` / `vision_init_from` are checked only for a fresh run: a run
    directory holding a checkpoint resumes from it and reads neither."""
    from data.held_out import held_out_sets
    from data.video.remote import RemoteOptions
    from data.video.shards import probe_remote, resolve_shards, same_files, shard_identity
    from models.hf import is_hf_checkpoint
    from train import checkpoint as ckpt

    if cfg.data.kind == "video":
        files = {}
        for name in ("shards", "long_shards", "eval_shards"):
            spec = getattr(cfg.data.video, name)
            # each held-out set on its own (ValueError for a half-named list)
            sets = held_out_sets(spec, field_name="data.video.eval_shards") if name == "eval_shards" else [("", spec)]
            files[name] = set()
            for set_name, paths in sets:
                named = resolve_shards(paths, RemoteOptions.of(cfg.data.video), field=name) if paths else []
                twice = same_files(named)
                if twice:
                    raise ValueError(f"data.video.{name}={spec!r}: {len(twice)} shard file(s) are named twice, through "
                                     f"a link ({twice[0][0]} and {twice[0][1]}, ...): their samples would be read "
                                     f"twice. Name each folder once")
                # by the files' real paths: a folder given through a link (or by two of its paths) is the same
                found = set(map(shard_identity, named))
                if paths and not found:
                    what = f" (held-out set {set_name!r}: {paths!r})" if set_name else ""
                    raise ValueError(f"data.video.{name}={spec!r}{what}: no .tar shards there (a directory of shards, a "
                                     f"glob, or a comma-separated list of either; launch/ingest.py writes them)")
                files[name] |= found
                try:
                    probe_remote(named, RemoteOptions.of(cfg.data.video))
                except ValueError as e:
                    raise ValueError(f"data.video.{name}={spec!r}: {e}") from None
        shared = sorted(files["eval_shards"] & (files["shards"] | files["long_shards"]))
        if shared:
            raise ValueError(f"data.video.eval_shards={cfg.data.video.eval_shards!r}: {len(shared)} shard file(s) are "
                             f"also training data ({shared[0]}, ...): held-out data must not be trained on")
        if not cfg.model.vision.enabled:
            check_text_only(cfg)
        if cfg.data.video.text_tokens_fraction > 0:   # token rows among the video packs: the documents' ids
            from data.token_files import TokenPacks, specials_as_ids
            from data.video.tokenizer import build_tokenizer

            prefixes = TokenPacks.check_tokenizer(cfg.data.video.text_tokens, build_tokenizer(cfg.data.video))
            if (old := specials_as_ids("data.video.text_tokens", prefixes)) is not None:
                warnings.warn(old)
    if cfg.data.kind == "tokens":
        check_token_paths(cfg)
    if cfg.data.exclude.strip():   # the files of samples to leave out are there and name samples
        from data.exclude import read_exclude

        if not read_exclude(cfg.data.exclude, spikes=cfg.data.exclude_spikes):
            raise ValueError(f"data.exclude={cfg.data.exclude!r}: the files name no sample (a nonfinite.jsonl whose "
                             f"records name whole steps of synthetic text, or an empty list)")
    c = cfg.train.checkpoint
    if ckpt.find_latest(cfg.resolved_run_dir(), quiet=True) is not None:  # resumed (check_resume refused resume=false)
        return
    for name in ("init_from", "vision_init_from"):
        source = getattr(c, name)
        if not source or is_hf_checkpoint(source):
            continue
        ref = ckpt.find_latest(source, quiet=True)
        if ref is None:
            raise ValueError(f"train.checkpoint.{name}={source!r} is neither a Hugging Face checkpoint (config.json "
                             f"with *.safetensors) nor a run directory with a complete checkpoint "
                             f"(checkpoints/step_<N>/COMPLETE.json)"
                             + ("" if Path(source).exists() else ": there is no such path"))
        check_source_model(cfg, name, source, ref)
    if c.init_from and is_hf_checkpoint(c.init_from):
        check_hf_model(c.init_from, cfg.model.lm)
        if cfg.train.distill.enabled:
            check_hf_teacher(c.init_from)


# the model settings that fix the shapes of the tensors a run directory's checkpoint hands to another run through
# train.checkpoint.init_from (the language model's; the DSA indexers' where both models have DSA layers) or
# vision_init_from (the vision tower's, where both have one). Everything else may differ: a dense model starts a
# DSA or KSA one, a language model a multimodal one (their own parameters keep their init).
SOURCE_SHAPE_KEYS = {
    "lm": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim", "vocab_size",
           "num_experts", "moe_ffn_hidden_size"),
    "lm.dsa": ("index_heads", "index_dim"),
    "lm.ksa": ("num_summary",),   # the summary embedding is [num_summary, hidden]
    "vision": ("depth", "hidden", "heads", "mlp", "patch", "merge", "pos_grid"),
}


def check_source_model(cfg: Config, name: str, source: str, ref) -> None:
    """The run directory `source` (train.checkpoint.<name>) holds a model whose tensors fit this one: the settings of
    SOURCE_SHAPE_KEYS its newest checkpoint recorded equal this run's (ValueError naming each that differs). Loading
    a checkpoint of another size otherwise stopped every rank with megatron's shape-mismatch traceback once the
    model was built. Checkpoints written before they recorded their config are not checked. `ref`: that run
    directory's newest complete checkpoint (check_paths found it)."""
    from dataclasses import asdict

    from train import checkpoint as ckpt

    common = ckpt.saved_common(ref) or {}
    recorded = common.get("config") or {}
    saved = recorded.get("model")
    if not saved and "model_lm" in common:
        # a checkpoint `launch/convert.py import` wrote records no run config, only its model.lm (and the vision
        # tower's VisionConfig, whose size fields are named as model.vision's): a run of other sizes stopped every
        # rank with megatron's "Global shape mismatch" once the model was built
        saved = {"lm": common["model_lm"]}
        if common.get("model_vision"):
            saved["vision"] = {**common["model_vision"], "enabled": True}
    if not saved:
        return
    ours = asdict(cfg.model)

    def layers(model: dict, variant: str) -> list[int]:   # LMConfig.layers_with, of a recorded model's dict
        lm = model.get("lm", {})
        kinds = lm.get("attention_per_layer") or [lm.get("attention")] * lm.get("num_layers", 1)
        return [l for l, kind in enumerate(kinds) if kind == variant]

    def uses(model: dict, variant: str) -> bool:
        return bool(layers(model, variant))

    parts = [] if name == "vision_init_from" else ["lm"] + [f"lm.{v}" for v in ("dsa", "ksa")
                                                            if uses(saved, v) and uses(ours, v)]
    # the vision tower comes from vision_init_from when it is set, else from init_from when that holds one
    if ((name == "vision_init_from" or not cfg.train.checkpoint.vision_init_from)
            and saved.get("vision", {}).get("enabled") and ours["vision"]["enabled"]):
        parts.append("vision")
    differ = []
    for part in parts:
        theirs, mine = saved, ours
        for k in part.split("."):
            theirs, mine = theirs.get(k, {}), mine[k]
        differ += [f"model.{part}.{k} is {theirs[k]!r} there, {mine[k]!r} here" for k in SOURCE_SHAPE_KEYS[part]
                   if k in theirs and theirs[k] != mine[k]]
    # a DSA or KSA layer's own tensors are stacked over that variant's layers (models/attention/layer_axis.py): the
    # i-th indexer is the i-th DSA layer's, whichever layer that is. Other layers with the variant loaded the source's
    # indexers onto the wrong layers without a word (or stopped every rank on a shape mismatch where the count differs)
    for v in ("dsa", "ksa"):
        if name == "init_from" and uses(saved, v) and uses(ours, v) and layers(saved, v) != layers(ours, v):
            differ.append(f"its {v.upper()} layers are {layers(saved, v)}, here {layers(ours, v)} "
                          f"(model.lm.attention_per_layer)")
    if differ:
        raise ValueError(f"train.checkpoint.{name}={source!r} holds a checkpoint (step {ref.step}, {ref.path}) of a "
                         f"model of other sizes: {'; '.join(differ)}. Its weights do not fit this model: give it the "
                         f"source's sizes, or a source of this model's")
    # a stage that keeps the language model frozen (projector alignment, the DSA warm-up, KSA distillation) must read
    # positions as the source learned them: at another RoPE base its frozen layers (and the attention the indexers or
    # summaries learn from) see every position moved. A stage that trains the whole model may move to a new base, as
    # the 64K curriculum stage does; a Hugging Face source is checked in check_hf_model
    theta = saved.get("lm", {}).get("rope_theta")
    ours_theta = cfg.model.lm.rope_theta
    if (name == "init_from" and cfg.train.trained not in ("all", "none") and theta is not None
            and not math.isclose(float(theta), ours_theta, rel_tol=1e-9)):
        raise ValueError(f"train.checkpoint.init_from={source!r} holds a model trained at model.lm.rope_theta="
                         f"{float(theta):g}, and train.trainable={cfg.train.trainable} keeps its language model frozen "
                         f"at model.lm.rope_theta={ours_theta:g} here: the frozen layers would read every position at "
                         f"another RoPE base than they learned. Give model.lm.rope_theta={float(theta):g}, or train "
                         f"the whole model (train.trainable=all) to move it to a new base")
    # a distillation's teacher is the source's weights with dense attention: the dense model only where the source
    # trained none of them under KSA attention (a stage-1 run, train.trainable=summary). From a KSA run that trained
    # them (keye_tiny_ksa, a stage-2 run) the teacher was that KSA model read densely, and the stage ran without a word
    # an import records no run, but how the exported run trained where its export said (launch/convert.py import)
    there = recorded.get("train") or common.get("trained") or {}
    if name == "init_from" and cfg.train.distill.enabled and uses(saved, "ksa") and not there:
        warnings.warn(f"train.checkpoint.init_from={source!r} holds KSA layers (step {ref.step}, {ref.path}) and no "
                      f"record of how they trained (an import of a Hugging Face directory without keye_export.json): "
                      f"the distillation takes its weights, read with dense attention, as the dense teacher. That "
                      f"holds for a stage-1 run's weights (train.trainable=summary), not for a stage-2 run's")
    if (name == "init_from" and cfg.train.distill.enabled and uses(saved, "ksa")
            and there.get("trainable", "summary") != "summary"):
        started = (there.get("checkpoint") or {}).get("init_from")
        raise ValueError(f"train.checkpoint.init_from={source!r} holds a KSA model (step {ref.step}, {ref.path}) whose "
                         f"run trained train.trainable={there['trainable']} with KSA attention: the distillation's "
                         f"teacher, those weights with dense attention, would not be a dense model. Distil from a "
                         f"dense run" + (f" (that run started from {started!r})" if started else "")
                         + ", or from a stage-1 run (train.trainable=summary), which keeps its source's dense weights")


def check_device(cfg: Config, *, cuda: bool) -> None:
    """What the settings ask of the device this machine has (ValueError naming the setting). bf16 needs a GPU: the
    trainer refused it once its process groups existed. The Triton kernels need one too, or TRITON_INTERPRET=1, the
    interpreter the kernel tests use: they failed in the model's first forward, on every rank, after the process
    groups and the model were built ("0 active drivers" for the experts). KSA's FlexAttention backend trains on a GPU
    only (torch has no backward of it on the CPU)."""
    check_deterministic(cfg, cuda=cuda)
    if cuda:
        return
    if cfg.train.precision == "bf16":
        raise ValueError("train.precision=bf16 needs a GPU; use fp32 (or auto) on the CPU")
    lm = cfg.model.lm
    if lm.ksa.backend == "flex" and "ksa" in lm.layer_attention() and not cfg.train.eval.only:
        # torch raised NotImplementedError in the first step's backward, on every rank, after the model was built
        raise ValueError("model.lm.ksa.backend=flex: FlexAttention has no backward on the CPU, so it cannot train on "
                         "this machine (no CUDA GPU); auto (the mask reference on the CPU) or naive trains here, and "
                         "flex scores a checkpoint here with train.eval.only=true")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    asked = ["model.lm.experts_impl=triton"] if lm.experts_impl == "triton" else []
    asked += [f"model.lm.{v}.backend=triton" for v in ("ksa", "dsa")
              if getattr(lm, v).backend == "triton" and v in lm.layer_attention()]
    if asked:
        raise ValueError(f"{', '.join(asked)}: Triton kernels need a CUDA GPU and this machine has none; auto takes "
                         f"the PyTorch path on CPU (TRITON_INTERPRET=1 runs the kernels in Triton's interpreter, "
                         f"slowly)")


def check_wandb(cfg: Config) -> None:
    """wandb, which the run logs to unless told not to, is installed (ValueError naming the setting). Without it, rank
    0 stopped on `import wandb` once the model was built, the other ranks waiting for it in their first step."""
    import importlib.util

    from train.metrics import wandb_used

    w = cfg.train.wandb
    if wandb_used(w.enabled, w.mode) and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"train.wandb.enabled=true (train.wandb.mode={w.mode}) logs to wandb, which is not installed "
                         f"here: pip install wandb, or train.wandb.enabled=false to train without it")


def check_tensorboard(cfg: Config) -> None:
    """train.tensorboard's writer, tensorboardX, is installed (ValueError naming the setting and the pip command),
    before the model is built: rank 0 would find out at its first step, the other ranks waiting for it there."""
    import importlib.util

    from train.tensorboard import PACKAGE, missing_message, resolved_dir

    t = cfg.train.tensorboard
    if not t.enabled:
        return
    if importlib.util.find_spec(PACKAGE) is None:
        raise ValueError(missing_message())
    # rank 0 makes it at the first step, once the model is built: a file in the way stopped it there with a traceback
    where = Path(resolved_dir(cfg.resolved_run_dir(), t.dir)).absolute()
    problem = _unwritable(where, "TensorBoard's event files go there")
    if problem:
        raise ValueError(f"train.tensorboard.dir={t.dir!r}: {where}{problem}")


def check_run_dir(cfg: Config) -> None:
    """run_dir is, or can be made, a directory this process can write (ValueError naming it): the launch writes its
    logs there first, which failed with a traceback on every rank for a path that is a file or read-only. Leaves
    nothing (a probe directory is made and removed): a config that is not valid leaves no directory behind."""
    run_dir = Path(cfg.resolved_run_dir()).absolute()
    problem = _unwritable(run_dir, "the run's logs, config and checkpoints go there")
    if problem:
        raise ValueError(f"run_dir={run_dir}{problem}")


def _unwritable(path: Path, what: str) -> str:
    """"" where `path` (absolute) is, or can be made, a directory this process can write; else what is wrong, to
    follow its name (`what`: what goes there). Leaves nothing behind."""
    if path.exists() and not path.is_dir():
        return " is a file, not a directory"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f": cannot be made a directory ({existing} is a file)"
    # tried, not judged by os.access: that answers yes to root for any directory (a root-squashed NFS mount, /proc),
    # where the launch's first write failed with a traceback on every rank
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".write_probe_", dir=existing))
    except OSError as e:
        return f": this process cannot write {'there' if existing == path else existing} ({e.strerror}; {what})"
    return ""


def check_hf_model(source: str, lm) -> None:
    """The language model of the Hugging Face directory `source` (train.checkpoint.init_from) is model.lm: its
    sizes, and its DSA indexers if it has any (models/hf/qwen3_moe.py check_hf_config; a plain directory starts a
    DSA model, whose indexers keep their init). The trainer checks it again when it loads; here a wrong recipe
    stops the launch before any process group or model exists."""
    from models.hf import check_hf_config, lm_hf_config

    try:
        check_hf_config(lm_hf_config(source), lm, plain_ok=True)
    except ValueError as e:
        raise ValueError(f"train.checkpoint.init_from={source!r}: {e}") from None


def check_hf_teacher(source: str) -> None:
    """A distillation from the Hugging Face directory `source`: its teacher is those weights with dense attention,
    a dense model only where the run that wrote them trained none of them under KSA (check_source_model says why).
    An export of ours records how its run trained (keye_export.json "trained"): one that trained under KSA is refused
    as its run directory is; a KSA directory that records nothing (another program's, a copy without the record, an
    older export) is taken with a warning, as its history cannot be read."""
    from models.hf import lm_hf_config
    from models.hf.checkpoint_io import EXPORT_RECORD, export_record

    if not lm_hf_config(source).get("ksa_layers"):
        return
    record = export_record(source) or {}
    trained = record.get("trained") or {}
    if trained.get("trainable", "summary") != "summary":
        raise ValueError(f"train.checkpoint.init_from={source!r} is an export of a KSA model (of "
                         f"{record.get('checkpoint')}) whose run trained train.trainable={trained['trainable']} "
                         f"with KSA attention: the "
                         f"distillation's teacher, those weights with dense attention, would not be a dense model. "
                         f"Distil from a dense model, or from an export of a stage-1 run (train.trainable=summary), "
                         f"which keeps its source's dense weights")
    if not trained:
        warnings.warn(f"train.checkpoint.init_from={source!r} holds KSA layers and no record of how they trained "
                      f"({EXPORT_RECORD} {'names none' if record else 'is not there'}): the distillation takes its "
                      f"weights, read with dense attention, as the dense teacher. That holds for a stage-1 run's "
                      f"export (train.trainable=summary), not for one that trained its language model under KSA")


def check_text_only(cfg: Config) -> None:
    """A language model alone (model.vision.enabled=false) on the packed loader's data: every shard holds
    text-only samples only (ValueError naming the first video or image sample and how many there are). Reads the
    shard indexes, as the loader will."""
    from data.held_out import held_out_paths
    from data.video.remote import RemoteOptions
    from data.video.shards import load_catalog

    for name in ("shards", "long_shards", "eval_shards"):
        spec = getattr(cfg.data.video, name)
        if name == "eval_shards":
            spec = held_out_paths(spec, field_name="data.video.eval_shards")
        if not spec:
            continue
        cat = load_catalog(spec, field=name, remote=RemoteOptions.of(cfg.data.video))
        kinds = {k: cat.count(k) for k in ("video", "image")}
        if kinds["video"] or kinds["image"]:
            first = cat[min(int(u[0]) for u in (cat.uids("video"), cat.uids("image")) if len(u))]
            raise ValueError(f"data.video.{name}={spec!r} holds {kinds['video']} video and {kinds['image']} image "
                             f"sample(s) (first: {Path(first.shard).name}/{first.key}), but model.vision.enabled="
                             f"false: a language model alone trains on text-only samples (docs/data.md \"A language "
                             f"model on text\"). Give shards of text only, or a multimodal model")


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def compose_config(overrides) -> DictConfig:
    """The config `launch/pretrain.py` sees for these command-line overrides (Hydra over recipes/config.yaml), for
    code that builds a run without the launcher: launch/memory.py, the benchmarks, the tests."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        return compose("config", overrides=list(overrides))


def validate(dcfg: DictConfig, world_size: int | None = None) -> tuple[Config, ParallelLayout]:
    """Typed config and layout on `world_size` ranks (None: torchrun's WORLD_SIZE), or ValueError naming the bad
    setting. Builds no process group."""
    cfg = to_config(dcfg)
    layout = ParallelLayout.build(cfg.parallel, world_size=world_size_from_env() if world_size is None else world_size,
                                  lm=cfg.model.lm)
    latest = latest_checkpoint(cfg)   # listed and read once: its position for the settings, then judged
    check_settings(cfg, layout, resumed_at=resume_position(cfg, latest))
    check_tokenizer(cfg)
    check_resume(cfg, layout, latest)
    check_eval_only(cfg)  # after the held-out data's checks: what to score it with comes second
    return cfg, layout


def check_settings(cfg: Config, layout: ParallelLayout, *, resumed_at: tuple[int, int] = (0, 0)) -> None:
    """The settings fit each other and the layout (ValueError naming them), for a run that starts after
    `resumed_at` = (steps, packed sequences consumed): its checkpoint's (resume_position), (0, 0) for a fresh run.
    Reads no file: launch/memory.py judges a run that will start on another machine with these checks alone."""
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * layout.dp):
        raise ValueError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x data-parallel size ({layout.dp})")
    if cfg.train.distill.enabled and not cfg.model.lm.uses_ksa:
        raise ValueError("train.distill.enabled needs KSA layers (model.lm.attention=ksa)")
    # the teacher is the model's own weights in teacher mode (train/distill.py): any of them that trained would move
    # the teacher with the student, which ran without a word and distilled towards a target it was itself moving
    if cfg.train.distill.enabled and cfg.train.trainable != "summary":
        raise ValueError(f"train.distill.enabled needs train.trainable=summary (got {cfg.train.trainable}): the "
                         f"teacher is this model's own weights with dense attention, so training more than the summary "
                         f"parameters would train the teacher too and it would no longer be the dense model the run "
                         f"starts from. Stage 2 trains everything without distillation (train.distill.enabled=false)")
    check_attention_stage(cfg)
    if cfg.train.distill.enabled and layout.pp > 1:
        raise ValueError(f"train.distill needs parallel.pp=1 (got {layout.pp}): teacher and student run on one rank")
    pr = cfg.train.profile
    if pr.steps:   # a profile that would record nothing
        absent = [r for r in pr.ranks if r >= layout.world_size]
        if absent:
            raise ValueError(f"train.profile.ranks {list(pr.ranks)}: rank{'s' if len(absent) > 1 else ''} "
                             f"{', '.join(map(str, absent))} not among this run's {layout.world_size} ranks")
        if pr.start > cfg.train.steps:
            raise ValueError(f"train.profile.start ({pr.start}) is past the run's last step (train.steps="
                             f"{cfg.train.steps}): nothing would be profiled")
    check_multimodal(cfg, layout)
    # train.batch_rampup's batches still to come (a resumed run's: from its checkpoint's position), and each batch's
    # micro-batches against parallel.vit.group and the interleaved pipeline schedule
    check_batches(cfg, layout, step=resumed_at[0], consumed_samples=resumed_at[1])
    check_quarantine_path(cfg, layout)
    check_token_files(cfg)
    from data.held_out import eval_plan

    eval_plan(cfg.data, cfg.train.eval.batches, cfg.train.eval.set_batches)  # set_batches names held-out sets
    v = cfg.data.video
    if evaluates(cfg) and cfg.data.kind == "video" and v.shards and not v.eval_shards:
        raise held_out_missing(cfg, f"data.video.eval_shards=DIR (shards not in data.video.shards={v.shards!r})")
    layout.check_seq_length(cfg.train.seq_length, cfg.model.lm)
    if cfg.train.distill.enabled and layout.cp > 1:
        raise ValueError(f"train.distill needs parallel.cp=1 (got {layout.cp}): the teacher pass is not split")
    ksa = cfg.model.lm.ksa
    if cfg.model.lm.uses_ksa and ksa.chunk > cfg.train.seq_length:
        raise ValueError(f"model.lm.ksa.chunk ({ksa.chunk}) exceeds train.seq_length ({cfg.train.seq_length}): no chunk "
                         "of a sequence would complete, so no summary token would exist and the KSA layers would be "
                         "plain causal attention, their summary parameters never used")
    if cfg.model.lm.uses_ksa:
        # a text query of chunk c reads the summaries of chunks before c - W alone: a row of n chunks uses them only
        # where n >= W + 2. Windows that cover a whole row left the summaries out of every loss (grad 0.000, the
        # dense model's loss) without a word
        n = -(-cfg.train.seq_length // ksa.chunk)
        if min(ksa.window(l) for l in cfg.model.lm.layers_with("ksa")) + 2 > n:   # a warning: such a model is the dense one, which a check may want to show
            warnings.warn(f"model.lm.ksa.windows {list(ksa.windows)} (chunks of {ksa.chunk} tokens) cover every row "
                          f"of train.seq_length={cfg.train.seq_length} ({n} chunks at most): a token reads the "
                          f"summaries of chunks before its window alone, so no KSA layer reads one, the model is the "
                          f"dense one and its summary parameters get no gradient. Give a window of at most {n - 2} "
                          f"chunks, or a longer train.seq_length, for them to train")
    if cfg.train.seq_length > cfg.model.lm.max_position_embeddings:
        raise ValueError(f"train.seq_length ({cfg.train.seq_length}) exceeds model.lm.max_position_embeddings "
                         f"({cfg.model.lm.max_position_embeddings})")


def check_quarantine_path(cfg: Config, layout: ParallelLayout) -> None:
    """An absolute data.video.quarantine_path names one file for every data-parallel replica unless it holds '{rank}'
    (a relative one becomes <run_dir>/<name>.rank<N>.jsonl, one per replica): ValueError. Each replica's first rank
    appended to that one file, from every node of the run, and appends of several nodes to one file on NFS are not
    atomic (lines lost or interleaved)."""
    q = cfg.data.video.quarantine_path
    if cfg.data.kind == "video" and layout.dp > 1 and os.path.isabs(q) and "{rank}" not in q:
        stem, dot, suffix = q.rpartition(".") if "." in Path(q).name else (q, "", "")
        raise ValueError(f"data.video.quarantine_path={q!r} would be one file that the first rank of each of the "
                         f"{layout.dp} data-parallel replicas appends to, from every node of the run (appends of "
                         f"several nodes to one file are not atomic on NFS: records lost or interleaved). Put "
                         f"'{{rank}}' in it, one file per replica (data.video.quarantine_path='{stem}.{{rank}}{dot}"
                         f"{suffix}', quoted on the command line), or give a relative path (<run_dir>/<name>.rank<N>"
                         f".jsonl)")


def check_attention_stage(cfg: Config) -> None:
    """A stage that trains one attention variant's own parameters (train.trainable=indexer / summary) needs layers of
    that variant somewhere in the model (ValueError): a pipeline stage may hold none of them, so this is decided here,
    for the whole model, and not by the ranks that build it. A DSA warm-up stage on a model without DSA layers is
    ignored, with a warning."""
    kinds = set(cfg.model.lm.layer_attention())
    for trainable, variant in (("indexer", "dsa"), ("summary", "ksa")):
        if cfg.train.trained == trainable and variant not in kinds:
            raise ValueError(f"train.trainable={trainable} trains the {variant.upper()} layers' own parameters, but "
                             f"model.lm has no {variant.upper()} layer (its attention: {', '.join(sorted(kinds))}); "
                             f"set model.lm.attention={variant} (or model.lm.attention_per_layer)")
    if cfg.model.lm.dsa.stage == "dense_warmup" and "dsa" not in kinds:
        warnings.warn("model.lm.dsa.stage=dense_warmup is ignored: model.lm has no DSA layer "
                      f"(its attention: {', '.join(sorted(kinds))})")
    dsa = cfg.model.lm.dsa
    if "dsa" in kinds and cfg.train.trained == "indexer" and dsa.loss_weight == 0:
        # the stage's whole loss is lambda x KL: it ran with grad 0.000 every step, its checkpoints its source's
        raise ValueError("model.lm.dsa.loss_weight=0 with train.trainable=indexer: the indexers learn from the KL "
                         "alone (the loss is lambda x KL), so the stage would train nothing; give a weight > 0 "
                         "(DeepSeek's 1.0)")
    if "dsa" in kinds and cfg.train.trained in ("all", "indexer") and dsa.stage == "sparse" and dsa.topk == 1:
        warnings.warn("model.lm.dsa.topk=1 in the sparse stage: its KL is over each query's selected keys, one key, "
                      "so it is 0 and the indexers get no gradient (the warm-up's KL over every key trains them)")


# layouts check_memory proposes when the configured one does not fit, cheapest in compute first
_LAYOUTS_THAT_SAVE_MEMORY = (("parallel.recompute=full", {"recompute": "full"}),
                             ("parallel.offload=activations", {"offload": "activations"}),
                             ("parallel.recompute=full parallel.offload=activations",
                              {"recompute": "full", "offload": "activations"}))


def check_memory(cfg: Config, layout: ParallelLayout, capacity: float) -> str | None:
    """parallel/memory.py's predicted peak per rank against `capacity` bytes (a GPU's memory).

    None when the prediction with its 10% fragmentation margin fits. Otherwise a message naming the prediction,
    the GPU's memory and the memory-saving layouts with their predictions: raised as a ValueError with
    train.memory_check=error (such a run would most likely stop at its first step, after building the model: the
    estimate has measured up to 9% below a real peak, bench/RESULTS.md, and the CUDA context and NCCL buffers
    come on top), returned as a warning with train.memory_check=warn."""
    from dataclasses import replace

    from parallel.memory import GIB, estimate, inputs_from_config

    m = inputs_from_config(cfg, layout)
    est = estimate(m)
    peak = est.total
    if peak * 1.1 <= capacity:
        return None
    options = [f"{label}: {estimate(replace(m, **kw)).total / GIB:.1f} GiB"
               for label, kw in _LAYOUTS_THAT_SAVE_MEMORY if any(getattr(m, k) != v for k, v in kw.items())]
    largest = sorted(est.rows.items(), key=lambda kv: -kv[1])[:3]
    where = f" (pipeline rank {est.stage} of 0-{m.pp - 1}, the heaviest)" if m.pp > 1 else ""
    msg = (f"the predicted peak memory per rank is {peak / GIB:.1f} GiB{where} ({peak * 1.1 / GIB:.1f} with a 10% "
           f"fragmentation margin; largest: {', '.join(f'{k} {v / GIB:.1f}' for k, v in largest)}; python "
           f"launch/memory.py prints it item by item), and this GPU has "
           f"{capacity / GIB:.1f} GiB (parallel.recompute={layout.recompute}, parallel.offload={layout.offload}). "
           f"Predicted instead: {'; '.join(options) or 'no other recompute / offload setting'}; or more GPUs "
           "(larger parallel.ep, tp, pp or cp)" + ("" if m.vision is None else
           f"; or a smaller parallel.vit.group, or more data-parallel ranks: the vision tower holds the frames and "
           f"embeddings of {m.vit_group or m.num_microbatches} micro-batches per rank at a time"))
    if cfg.train.memory_check == "error":
        raise ValueError(msg + ". train.memory_check=warn runs it anyway")
    return msg


ERROR_KEY = "keye/stop_message/rank0"   # rank 0's message in the process group's store (print_stop_message)


def _default_store():
    """The process group's key-value store (torchrun's agent store), or None without one."""
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - a torch without it: every rank prints its own message
        return None


def print_stop_message(message: str, *, rank: int, store=None, log_file: str = "", wait_s: float = 5.0) -> None:
    """Prints the error (`message`, e.g. "config error: ...") that ends this rank once the process groups exist.
    Every rank meets most of them alike (data that ended, a setting found in a checkpoint), and each printed the
    same paragraph (eight times over on an 8-GPU node): rank 0 prints it and leaves it in `store`; another rank
    whose message is rank 0's prints a one-line pointer, one whose message differs (or that hears nothing from rank 0
    within wait_s seconds: rank 0 did not stop so) prints its own."""
    if rank == 0 or store is None:
        print(message, file=sys.stderr, flush=True)
        if rank == 0 and store is not None:
            try:
                store.set(ERROR_KEY, message)
            except Exception:  # noqa: BLE001 - the others then print their own
                pass
        return
    from datetime import timedelta

    try:
        store.wait([ERROR_KEY], timedelta(seconds=wait_s))
        first = store.get(ERROR_KEY).decode()
    except Exception:  # noqa: BLE001 - no message from rank 0 in time, or no store left
        first = None
    if first != message:
        print(message, file=sys.stderr, flush=True)
        return
    prefix = message.split(":", 1)[0]
    print(f"{prefix} on rank {rank}: the same as rank 0's, printed once by rank 0" +
          (f" (and in {log_file})" if log_file else ""), file=sys.stderr, flush=True)


def run(dcfg: DictConfig) -> None:
    try:
        from train.faults import check_env

        check_env()   # a fault drill's KEYE_FAULT
        cfg, layout = validate(dcfg)
        cuda = torch.cuda.is_available()   # asks for the device count: no context, cuBLAS or NCCL yet
        check_device(cfg, cuda=cuda)
        apply_deterministic(cfg.train.deterministic)   # train.deterministic: before CUDA is first used
        check_wandb(cfg)
        check_run_dir(cfg)
        check_tensorboard(cfg)   # its directory is under run_dir unless told otherwise
        check_paths(cfg)
        warning, unused = None, decode_once_unused(cfg, layout)
        if cfg.train.memory_check != "off" and cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            warning = check_memory(cfg, layout, torch.cuda.get_device_properties(local).total_memory)
    except ValueError as e:
        # every rank checks the same config against the same files and device: the first on each node says it (each
        # rank said it, eight times over on an 8-GPU node), and every rank exits
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(cfg.resolved_run_dir(), rank, eval_only=cfg.train.eval.only)
    if warning and rank == 0:
        logging.getLogger("train").warning("memory: %s", warning)
    if unused and rank == 0:
        logging.getLogger("train").warning("%s", unused)
    if LAUNCHED_WARNING and rank == 0:
        logging.getLogger("train").warning("%s", LAUNCHED_WARNING)
    from train.nonfinite import NonFiniteStepError
    from train.spikes import SpikeStepError
    from train.trainer import Trainer

    from data.video.shards import ShardIndexError
    from train.checkpoint import CheckpointLoadError, CheckpointSaveError, RunDirInUse

    failed = False   # an error this rank alone may have met: no barrier at the teardown (parallel/groups.py)
    log_file = os.path.join(cfg.resolved_run_dir(), "logs", f"{'eval_' if cfg.train.eval.only else ''}rank{rank}.log")

    def stop(message: str, *, logged: bool = True) -> None:  # stderr has it once where the ranks' messages agree
        print_stop_message(message, rank=rank, store=_default_store(), log_file=log_file if logged else "")

    try:
        trainer = Trainer(cfg, layout, resolved_config_yaml=OmegaConf.to_yaml(dcfg), launched=LAUNCHED)
        trainer.evaluate_only() if cfg.train.eval.only else trainer.train(keep_history=False)
    except SettingsError as e:   # found once the process groups exist (what init_from holds): on every rank
        logging.getLogger("train").error("config error: %s", e)
        stop(f"config error: {e}")
        sys.exit(2)
    except ShardIndexError as e:   # the data's fault, read alike on every rank before the first step
        logging.getLogger("train").error("data error: %s", e)
        stop(f"data error: {e}")
        sys.exit(2)
    except RunDirInUse as e:   # before this launch wrote anything there but its log lines
        logging.getLogger("train").error("run_dir error: %s", e)
        stop(f"run_dir error: {e}")
        sys.exit(2)
    except (CheckpointSaveError, CheckpointLoadError) as e:
        logging.getLogger("train").error("checkpoint error: %s", e)
        stop(f"checkpoint error: {e}")
        sys.exit(3)
    except NonFiniteStepError as e:  # each rank logged its data in the step already
        stop(f"non-finite step: {e}", logged=False)
        sys.exit(4)
    except SpikeStepError as e:  # likewise; a step refused as a non-finite one is, by train.spike
        stop(f"gradient spike: {e}", logged=False)
        sys.exit(4)
    except Exception:  # the rank's log says why it ended, beside the traceback on stderr
        failed = True
        logging.getLogger("train").exception("the run failed", extra={"file_only": True})
        raise
    except KeyboardInterrupt:  # SIGINT (Ctrl-C), which may have reached this rank alone, mid-step: the others may be
        failed = True          # in a collective it left, where the teardown's barrier would wait with them for ever
        logging.getLogger("train").error("interrupted (SIGINT): the run stops without a checkpoint (SIGTERM, "
                                         "SIGUSR1 or a STOP file stop it with one)")
        raise
    finally:
        teardown(barrier=not failed)
