"""Hugging Face <-> our checkpoints for the Qwen3-MoE language model and the Keye-VL vision tower
(mapping: models/hf, guide: docs/hf.md).

    # HF -> a run directory holding checkpoints/step_000000, to start training from:
    python launch/convert.py import HF_DIR OUT_DIR [--model keye_30b_a3b] [--verify]
    torchrun --nproc_per_node 8 launch/convert.py import HF_DIR OUT_DIR --model keye_30b_a3b --ep 8
    torchrun --nproc_per_node 8 launch/pretrain.py recipe=keye_30b_a3b train.checkpoint.init_from=OUT_DIR

    # one of our checkpoints (a run directory: its newest checkpoint whose files verify, or a step_* directory) -> HF
    python launch/convert.py export RUN_OR_STEP_DIR HF_OUT [--model keye_30b_a3b] [--max-shard-size 5GB] [--dtype bf16]
    # (HF_OUT new, or an earlier export's; a directory holding other weights, such as the HF checkpoint a run was
    # imported from, is refused unless --overwrite: the export removes config.json and weight files first)

    # logits of our model (from the HF weights, or from one of our checkpoints) against transformers
    python launch/convert.py verify HF_DIR [--checkpoint RUN_OR_STEP_DIR] [--tp 2 --ep 2 under torchrun]

    # a multimodal Keye-VL directory (config.json with vision_config): `import` also writes the vision tower
    # into the checkpoint (keys vision.*, as the trainer's VisionTower saves them), `export` writes it back;
    # or only the vision tower + projector -> a torch file of our VisionModel
    python launch/convert.py import-vision HF_DIR VISION.pt [--strict]
    # combined export: the LM of a checkpoint plus a vision tower (VISION.pt) under visual.* / mlp_AR.*
    python launch/convert.py export RUN_OR_STEP_DIR HF_OUT --vision VISION.pt

A DSA model (a `*_dsa` preset, or a run trained with one) exports and imports with its indexers
(`self_attn.indexer.*`, and `index_n_heads` / `index_head_dim` / `index_topk` / `dsa_layers` in config.json;
docs/hf.md "DSA models"). The export also writes transformers' code for it (modeling_qwen3_moe_dsa.py, named in
config.json's auto_map): `AutoModelForCausalLM.from_pretrained(HF_OUT, trust_remote_code=True)` runs the indexers,
and `verify` compares against that at any length. A KSA model exports and imports the same way, with its
summary projections and embeddings and its own code (modeling_qwen3_moe_ksa.py; docs/hf.md "KSA models").

The model config comes from --model (a recipes/model preset name or a YAML file with an `lm:` node, plus
--set lm.FIELD=VALUE overrides), else from the HF config.json (import, verify) or, for export, from the
run directory's config.yaml. Import and verify run on any layout (--tp/--pp/--ep/--etp, under torchrun);
each rank reads only its own slices of the safetensors files. Exit code 1 when verification fails.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

import torch  # noqa: E402

from models.config import LMConfig  # noqa: E402
from models.hf.checkpoint_io import EXPORT_RECORD, export_record  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("convert")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ config
def model_file(model: str) -> Path:
    """The YAML file --model names: a recipes/model preset by name, or a path ending in .yaml (ValueError listing the
    presets when there is none)."""
    path = Path(model) if model.endswith((".yaml", ".yml")) else REPO / "recipes" / "model" / f"{model}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in (REPO / "recipes" / "model").glob("*.yaml"))
        raise ValueError(f"--model {model}: no such {'file' if path.name == model else 'model preset'} ({path}); "
                         f"the presets: {', '.join(presets)} (recipes/model/), or a YAML file")
    return path


def model_config(model: str | None, overrides: list[str], *, hf_dir: str | None = None,
                 run_dir: Path | None = None) -> LMConfig:
    """model.lm from --model (+ --set), else the HF config, else a run directory's config.yaml."""
    from omegaconf import OmegaConf

    from models.hf.keye_vision import lm_hf_config
    from models.hf.qwen3_moe import lm_config_from_hf

    if model:
        path = model_file(model)
        if path.resolve().parent == (REPO / "recipes" / "model").resolve():
            # a preset: composed as a launch composes it, through its defaults list (keye_30b_a3b_dsa is
            # keye_30b_a3b plus its attention; read alone, its `lm` node left every other size at the schema's
            # tiny default)
            from train.launch import compose_config

            node = compose_config([f"model={path.stem}"]).model.lm
        else:
            raw = OmegaConf.load(path)
            if "model" not in raw and "lm" not in raw:
                raise ValueError(f"--model {model}: the file has no `lm:` node (nor `model.lm`)")
            node = raw.model.lm if "model" in raw else raw.lm
        return _lm_from_dict(node, overrides, source=f"--model {model}")
    if hf_dir:
        return _lm_from_dict(asdict(lm_config_from_hf(lm_hf_config(hf_dir))), overrides)
    if run_yaml(run_dir) is not None:
        return model_config(str(run_yaml(run_dir)), overrides)
    raise ValueError("no model config: pass --model (a recipes/model preset or a YAML file)")


def run_yaml(run_dir: Path | None) -> Path | None:
    """A run directory's config.yaml, None where there is none (no run directory: a step folder copied out of it)."""
    return run_dir / "config.yaml" if run_dir is not None and (run_dir / "config.yaml").is_file() else None


def recorded_model(common: dict) -> dict:
    """The `model` node of the resolved config a training checkpoint records (train/trainer.py), {} where none."""
    return ((common.get("config") or {}).get("model")) or {}


def checkpoint_lm(common: dict, model: str | None, overrides: list[str], run_dir: Path | None) -> LMConfig:
    """model.lm of a checkpoint whose common state is `common`: --model (+ --set); else the model.lm a checkpoint
    written by `import` records; else its run directory's config.yaml; else the resolved config a training
    checkpoint records (a step folder copied out of its run directory, which has no config.yaml)."""
    if not model and "model_lm" in common:
        return _lm_from_dict(common["model_lm"], overrides)
    if not model and run_yaml(run_dir) is None and "lm" in recorded_model(common):
        return _lm_from_dict(recorded_model(common)["lm"], overrides)
    return model_config(model, overrides, run_dir=run_dir)


def resolve_checkpoint(path: str | Path):
    """(step directory, run directory) of a run directory's newest checkpoint whose files verify (sizes and the
    CRC32s recorded at save time, as a resume checks them), or of a step_* directory, which must verify.
    Collective (the ranks split the checksums)."""
    from train import checkpoint as ckpt

    p = Path(path)
    if (p / ckpt.COMPLETE).is_file():
        bad = ckpt.verify_checkpoint(p)
        if bad:
            raise ValueError(f"checkpoint {p} is damaged: {'; '.join(bad)}")
        return p, p.parent.parent
    problems: list[str] = []
    ref = ckpt.find_latest_verified(p, problems)
    if ref is None:
        raise ValueError(f"{p} holds no complete checkpoint whose files verify"
                         + (f": {'; '.join(problems)}" if problems else ""))
    if problems:
        log.warning("%s: using %s; newer ones are damaged: %s", p, ref.path.name, "; ".join(problems))
    return ref.path, p


# ------------------------------------------------------------------------------------------ building
class _NoOptimizer:
    """Stands in for the optimizer in train.checkpoint.save_checkpoint: an imported checkpoint holds the
    model only (a fresh run initialises from it with train.checkpoint.init_from and builds its own)."""

    def sharded_state_dict(self, model_sd, is_loading=False, metadata=None):
        return {}


def build_model(lm: LMConfig, *, tp=1, pp=1, ep=1, etp=1, dtype=torch.float32):
    """Process groups for the torchrun world and the model chunk of this rank (weights uninitialised)."""
    from models.lm import build_lm, transformer_config
    from parallel.groups import build_process_groups, init_distributed, seed_all, world_size_from_env
    from parallel.layout import ParallelConfig, ParallelLayout

    device = init_distributed()
    layout = ParallelLayout.build(ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp), world_size=world_size_from_env(), lm=lm)
    pgs = build_process_groups(layout)
    seed_all(0, pgs)  # megatron's RNG trackers (sequence-parallel embedding dropout forks one, even at p=0)
    tconfig = transformer_config(lm, layout.model_sizes(), bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    tconfig.perform_initialization = False  # every value is overwritten
    chunk = build_lm(lm, tconfig, pg_collection=pgs, pp_rank=pgs.pp.rank(), pp_size=layout.pp).to(device)
    return [chunk], pgs, layout


def _hf_dtype(hf_dir: str) -> torch.dtype:
    from models.hf.checkpoint_io import HFCheckpoint

    ck = HFCheckpoint(hf_dir)
    return torch.bfloat16 if ck.dtype(ck.names()[0]) == "BF16" else torch.float32


# ------------------------------------------------------------------------------------------ commands
def import_hf(hf_dir: str, out_dir: str, *, lm: LMConfig, tp=1, pp=1, ep=1, etp=1, dtype: str = "auto",
              verify: bool = False) -> dict:
    """HF checkpoint -> OUT_DIR/checkpoints/step_000000 (collective under torchrun).
    Returns {"checkpoint": that path, "verify": the logit comparison or None}."""
    import torch.distributed as dist

    from models.hf.checkpoint_io import read_json
    from models.hf.keye_vision import is_multimodal, lm_checkpoint
    from models.hf.qwen3_moe import check_hf_config, load_hf_into
    from train import checkpoint as ckpt

    # an import is step 0: beside a run's later checkpoints, init_from and a resume would take those instead
    later = [ref.path.name for ref in reversed(ckpt.complete_checkpoints(out_dir)) if ref.step > 0]
    if later:
        raise ValueError(f"{out_dir} holds checkpoints of a run ({', '.join(later[:3])}): an import there writes "
                         f"step 0, and train.checkpoint.init_from={out_dir} would take {later[0]} instead. Import "
                         "into a new directory")
    multimodal = is_multimodal(read_json(Path(hf_dir, "config.json")))
    source = lm_checkpoint(hf_dir)
    check_hf_config(source.config, lm)  # before building anything
    torch_dtype = _hf_dtype(hf_dir) if dtype == "auto" else DTYPES[dtype]
    # --verify compares in fp32 (models/hf/verify.py's tolerance is for summation order); the weights are cast to
    # torch_dtype after it, for the save
    chunks, pgs, layout = build_model(lm, tp=tp, pp=pp, ep=ep, etp=etp, dtype=torch.float32 if verify else torch_dtype)
    stats = load_hf_into(chunks, source, lm=lm)
    log.info("loaded %s into %s (%s): %d tensors, %d elements on rank %d", hf_dir, layout.describe(), torch_dtype,
             stats["tensors"], stats["elements"], dist.get_rank())
    extra, vision_common = None, {}
    if multimodal:
        extra, vision_common = _vision_extra(hf_dir, lm)
    result = None
    if verify:
        result = verify_chunks(chunks, hf_dir, pgs=pgs)
        if not result["ok"]:
            raise RuntimeError(f"logits differ from transformers beyond the tolerance: {result}")
        for chunk in chunks:
            chunk.to(torch_dtype)
    common = {"step": 0, "recipe": "hf_import",
              "source": {"hf_dir": str(Path(hf_dir).resolve()), "format": "keye_vl" if multimodal else "qwen3_moe"},
              "layout": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "ep": layout.ep, "etp": layout.etp,
                         "cp": layout.cp, "dp": layout.dp, "world_size": layout.world_size},
              "model_lm": asdict(lm), **vision_common}
    # how the exported run trained (an export of ours records it): a distillation from this import judges its teacher
    # by it, as it would the export's (train/launch.py check_source_model)
    if trained := (export_record(hf_dir) or {}).get("trained"):
        common["trained"] = trained
    path = ckpt.save_checkpoint(out_dir, 0, chunks, _NoOptimizer(), common, keep_last=1, dp_cp_group=pgs.dp_cp,
                                extra=extra)
    tokenizer = copy_tokenizer(hf_dir, out_dir) if dist.get_rank() == 0 else []
    log.info("wrote %s (use it with train.checkpoint.init_from=%s%s)", path, out_dir,
             f" data.video.tokenizer={out_dir}" if tokenizer else "")
    return {"checkpoint": path, "verify": result}


# generation_config.json travels with them: it holds the ids generate() stops at (Qwen3's <|im_end|> and
# <|endoftext|>), which config.json as export writes it does not; an export without it generated past every answer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer(hf_dir: str, out_dir: str) -> list[str]:
    """The Hugging Face directory's tokenizer files (and generation_config.json), copied beside the imported
    checkpoint: the run that starts from it tokenizes with them (data.video.tokenizer=OUT_DIR), and the launcher
    refuses byte ids there; export copies them on into the HF directory it writes."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if Path(hf_dir, name).is_file():
            shutil.copyfile(Path(hf_dir, name), Path(out_dir, name))
            copied.append(name)
    return copied




def _weight_files(out_dir: str | os.PathLike) -> list[Path]:
    """The weight files and index of an HF directory that an export there replaces (config.json aside)."""
    from models.hf.checkpoint_io import earlier_save_files

    return [p for p in earlier_save_files(out_dir) if p.name != "config.json"]


_SAMPLE_BYTES = 1 << 20


def _file_mark(p: Path) -> list:
    """What an export record keeps of a weight file: its size, modification time (ns) and the SHA-256 of its first and
    last MiB. Size and time alone passed a same-size rewrite within one tick of a coarse clock (a filesystem keeping
    seconds), or a copy that kept its source's time, as the export's own; the files of one model have the same sizes
    whatever their weights, and its first MiB holds the header and the first tensor's values, its last the last
    tensor's. 2 MiB read per file: hashing whole files would read every weight again at each export."""
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        if st.st_size > _SAMPLE_BYTES:
            f.seek(max(_SAMPLE_BYTES, st.st_size - _SAMPLE_BYTES))
            h.update(f.read())
    return [st.st_size, st.st_mtime_ns, h.hexdigest()]


def _same_file(recorded, p: Path) -> bool:
    """Whether weight file `p` is as an export record left it (`recorded`: _file_mark's list; an older record's
    [size, time] is compared on those alone)."""
    if not isinstance(recorded, list) or len(recorded) not in (2, 3):
        return False
    st = p.stat()
    if recorded[:2] != [st.st_size, st.st_mtime_ns]:
        return False
    return len(recorded) == 2 or recorded == _file_mark(p)


def check_export_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
    """ValueError when an export into `out_dir` would delete weights that no earlier export into it wrote: an export
    removes the directory's config.json and weight files first (models/hf/checkpoint_io.py remove_earlier_save), and
    there they may be a Hugging Face checkpoint's own, such as the one a run was imported from. An earlier export's
    are known by its record (EXPORT_RECORD: each weight file's size, modification time and a hash of its first and
    last MiB as it left them, _file_mark; an
    export cut off part-way is recorded as such, and its files are its own); a directory without one, whose
    config.json or weight files are then someone else's, or a weight file changed since, is refused unless
    `overwrite`. Reads files only (every rank alike, before any process group)."""
    out = Path(out_dir)
    if overwrite or not out.is_dir():
        return
    record = export_record(out)
    if record is not None and not record.get("complete", False):
        return   # an export of ours that did not finish: every weight file there is its own
    written = record.get("files", {}) if record is not None else {}
    foreign = [p.name for p in _weight_files(out) if not _same_file(written.get(p.name), p)]
    if record is None and (out / "config.json").is_file():
        foreign.insert(0, "config.json")
    if foreign:
        why = (f"changed since the export that {EXPORT_RECORD} records" if record is not None
               else f"no {EXPORT_RECORD} there: a Hugging Face checkpoint's own, such as one a run was imported from?")
        raise ValueError(
            f"{out} holds {', '.join(foreign)}, which no earlier export into it wrote ({why}); an export removes a "
            f"directory's config.json and weight files before writing its own, so it would delete them. Give another "
            f"output directory, or --overwrite to replace them")


def _record_export(out_dir: str | os.PathLike, checkpoint: Path, *, complete: bool,
                   trained: dict | None = None) -> None:
    """Writes EXPORT_RECORD: before the export writes (complete=False), and after, with each weight file's size,
    modification time and sampled hash (_file_mark; check_export_dir). `trained`: how the source run trained
    (_trained), which a later run starting from the export reads (train/launch.py check_hf_teacher)."""
    rec: dict = {"checkpoint": str(checkpoint), "complete": complete}
    if trained:
        rec["trained"] = trained
    if complete:
        rec["files"] = {p.name: _file_mark(p) for p in _weight_files(out_dir)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(out_dir, EXPORT_RECORD + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, Path(out_dir, EXPORT_RECORD))


def _trained(common: dict) -> dict | None:
    """How the run that wrote a checkpoint trained, from its recorded config: which parameters
    (train.trainable) under which attention per layer. A KSA model whose run trained its language model under KSA
    is no dense teacher for a distillation (train/launch.py check_hf_teacher). None for a checkpoint that records no
    run config (one `import` wrote)."""
    train = (common.get("config") or {}).get("train") or {}
    lm = ((common.get("config") or {}).get("model") or {}).get("lm") or {}
    if "trainable" not in train:
        return None
    return {"trainable": train["trainable"], "attention": lm.get("attention_per_layer") or lm.get("attention")}


def export(checkpoint: str, out_dir: str, *, lm: LMConfig | None = None, model: str | None = None,
           overrides: list[str] = (), max_shard_bytes: int = 5 * 2**30, dtype: str | None = None,
           vision: str | None = None, overwrite: bool = False) -> dict:
    """One of our checkpoints -> HF layout (collective under torchrun; rank 0 writes). `vision`: a torch
    file from import-vision whose tower and projector are added (visual.* / mlp_AR.*, one index). Refuses (ValueError)
    to replace weights in `out_dir` that no earlier export wrote, unless `overwrite` (check_export_dir)."""
    from megatron.core import dist_checkpointing

    from models.hf.qwen3_moe import export_hf
    from parallel.groups import init_distributed

    check_export_dir(out_dir, overwrite=overwrite)
    init_distributed()
    step_dir, run_dir = resolve_checkpoint(checkpoint)
    if lm is None:
        lm = checkpoint_lm(dist_checkpointing.load_common_state_dict(str(step_dir)).get("common", {}), model,
                           list(overrides), run_dir)
    import torch.distributed as dist

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    # the files this export writes are its own from here on, even if it is cut off: recorded once export_hf has judged
    # the checkpoint (a refused export that recorded first replaced an earlier export's record, and a later export then
    # took a Hugging Face checkpoint's weights for its own and removed them without --overwrite)
    record = functools.partial(_record_export, out_dir, step_dir, complete=False) if rank0 else None
    result = export_hf(step_dir, out_dir, lm=lm, max_shard_bytes=max_shard_bytes,
                       dtype=DTYPES[dtype] if dtype else None, before_write=record)
    log.info("exported %s -> %s: %d tensors, %.1f MB in %d file(s)", step_dir, out_dir, result["tensors"],
             result["bytes"] / 1e6, len(result["files"]))
    common = dist_checkpointing.load_common_state_dict(str(step_dir)).get("common", {})
    stored = vision_from_checkpoint(step_dir, common, run_dir, lm)
    if vision and stored is not None:
        raise ValueError(f"{step_dir} already holds a vision tower: leave out --vision {vision}")
    if vision or stored is not None:
        from models.hf.keye_vision import add_vision_to_hf_dir, export_keye_vision
        from models.hf.qwen3_moe import hf_mrope_fields

        def add_vision() -> dict:
            vm = load_vision_file(vision) if vision else stored
            vis = add_vision_to_hf_dir(out_dir, export_keye_vision(vm, dtype=DTYPES[dtype] if dtype else None),
                                       vm.cfg, max_shard_bytes=max_shard_bytes, lm_fields=hf_mrope_fields(lm))
            log.info("added the vision tower of %s: %d tensors in %s", vision or step_dir, vis["tensors"], vis["files"])
            return vis

        vis = _on_rank0(add_vision, f"adding the vision tower of {vision or step_dir} to {out_dir}")
        if rank0:
            result = {**result, "files": result["files"] + vis["files"], "tensors": result["tensors"] + vis["tensors"]}
    if rank0:
        _record_export(out_dir, step_dir, complete=True, trained=_trained(common))
        if export_tokenizer(common, run_dir, out_dir) and (vision or stored is not None):
            ids = add_vision_token_ids(out_dir, trained_tokenizer(common, run_dir))
            if ids:
                log.info("config.json names the tokens the frames were written with: %s", ids)
    return result


# config.json's names (Keye-VL's and Qwen2.5-VL's: their code finds a frame's or an image's place by these ids) of
# the tokens a document writes its frames and images with -> data.video.tokenizer's attribute holding the id
VISION_TOKEN_FIELDS = {"vision_start_token_id": "vision_start_id", "vision_end_token_id": "vision_end_id",
                       "image_token_id": "image_pad_id", "video_token_id": "video_pad_id"}


def add_vision_token_ids(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> dict:
    """Writes into a multimodal export's config.json the ids of the tokens its run wrote the frames and images with
    (VISION_TOKEN_FIELDS, read from the tokenizer it trained with): without them, Keye-VL's and Qwen2.5-VL's configs
    give Qwen's ids (151652, 151653, 151655, 151656), which another tokenizer's vocabulary does not hold there. A
    tokenizer without those tokens (its run wrote no frames with it) leaves config.json as it is, with a warning."""
    from data.video.tokenizer import HFTokenizer

    try:
        tok = HFTokenizer(tokenizer_dir)
    except ValueError as e:   # the weights are written by now: an export is not failed for the names of ids
        log.warning("config.json names no vision token ids: %s", e)
        return {}
    ids = {field: int(getattr(tok, attr)) for field, attr in VISION_TOKEN_FIELDS.items()}
    path = Path(out_dir, "config.json")
    config = json.loads(path.read_text())
    config.update(ids)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return ids


def trained_tokenizer(common: dict, run_dir: Path | None) -> Path | None:
    """The Hugging Face tokenizer directory a checkpoint's text was tokenized with: its run's
    data.video.tokenizer when that names a directory (an import's, or the HF checkpoint's own), else the run
    directory itself when it holds a tokenizer.json (an import's checkpoint). None for byte ids (synthetic data)."""
    config = common.get("config") or {}
    name = ((config.get("data") or {}).get("video") or {}).get("tokenizer")
    if name and name != "bytes":
        for base in launch_dirs(common, run_dir):
            if Path(base, name, "tokenizer.json").is_file():
                return Path(base, name)
    if run_dir is not None and Path(run_dir, "tokenizer.json").is_file():
        return Path(run_dir)
    if name and name != "bytes":
        log.warning("the run tokenized with data.video.tokenizer=%s, which holds no tokenizer.json (now): copy the "
                    "tokenizer files into the export yourself", name)
    return None


def launch_dirs(common: dict, run_dir: Path | None) -> list[Path]:
    """Where a checkpoint's config's relative paths may be relative to, most likely first: the working directory of
    the launch that saved it (its common state's launch_dir; older checkpoints lack it), the one its relative run_dir
    implies (the run directory's path without that run_dir at its end), this process's. An export run from another
    directory looked for a relative data.video.tokenizer in its own and lost the tokenizer and the vision token ids."""
    out = [Path(common["launch_dir"])] if common.get("launch_dir") else []
    config = common.get("config") or {}
    recorded = config.get("run_dir") or (f"runs/{config['recipe_name']}" if config.get("recipe_name") else "")
    if run_dir is not None and recorded and not os.path.isabs(recorded):
        here, parts = Path(run_dir).resolve(), Path(recorded).parts
        if here.parts[-len(parts):] == parts:
            out.append(Path(*here.parts[:-len(parts)]))
    return out + [Path.cwd()]


def export_tokenizer(common: dict, run_dir: Path | None, out_dir: str) -> list[str]:
    """Copies the tokenizer the checkpoint was trained with (trained_tokenizer) into the export, as the import copied
    it beside the checkpoint: an export without one could not be tokenized as it was trained (AutoTokenizer on it
    failed)."""
    source = trained_tokenizer(common, run_dir)
    if source is None:
        return []
    copied = copy_tokenizer(str(source), out_dir)
    log.info("copied the tokenizer the run trained with (%s): %s", source, ", ".join(copied))
    return copied


def _vision_extra(hf_dir: str, lm: LMConfig) -> tuple[dict, dict]:
    """The vision tower of a multimodal HF directory as extra checkpoint tensors under the keys the
    trainer's VisionTower saves (`vision.{parameter name}`, fp32, written by rank 0), and the common-state
    entry recording its VisionConfig ("model_vision")."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from models.hf.checkpoint_io import HFCheckpoint
    from models.hf.keye_vision import load_keye_vision_into, vision_config_from_hf
    from models.vision import VisionModel

    vcfg = vision_config_from_hf(HFCheckpoint(hf_dir).config)
    if vcfg.lm_hidden != lm.hidden_size:
        raise ValueError(f"HF vision projector output {vcfg.lm_hidden} != model.lm.hidden_size {lm.hidden_size}")
    model = VisionModel(vcfg)
    stats = load_keye_vision_into(model, hf_dir)
    log.info("loaded the vision tower of %s (%s layout): %d tensors, %.1fM parameters", hf_dir, stats["layout"],
             stats["tensors"], stats["elements"] / 1e6)
    extra = {f"vision.{n}": ShardedTensor.from_rank_offsets(f"vision.{n}", p.data, replica_id=dist.get_rank())
             for n, p in model.named_parameters()}
    return extra, {"model_vision": asdict(vcfg)}


def checkpoint_vision_config(common: dict, run_dir: Path | None, lm: LMConfig):
    """The VisionConfig of a checkpoint whose common state is `common`: the one `import` records (`model_vision`),
    else the run's config.yaml's model.vision, else the one a training checkpoint's resolved config records; None
    where there is none."""
    from omegaconf import OmegaConf

    from models.config import VisionModelConfig
    from models.vision import VisionConfig

    if "model_vision" in common:
        return VisionConfig(**common["model_vision"])
    yaml = run_yaml(run_dir)
    node = (OmegaConf.load(yaml).model.vision if yaml is not None else recorded_model(common).get("vision"))
    if node is None:
        return None
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VisionModelConfig), node)).build(lm.hidden_size)


def vision_from_checkpoint(step_dir: Path, common: dict, run_dir: Path | None, lm: LMConfig):
    """The VisionModel stored in one of our checkpoints (`vision.*` tensors: written by a multimodal import
    or by a training run with model.vision.enabled), or None when it holds none. Its VisionConfig comes
    from the checkpoint's common state (`model_vision`, import), the run's config.yaml (model.vision), or the resolved
    config a training checkpoint records."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from models.vision import VisionModel

    meta = dist_checkpointing.load_tensors_metadata(str(step_dir))
    if not any(k.startswith("vision.") for k in meta):
        return None
    vcfg = checkpoint_vision_config(common, run_dir, lm)
    if vcfg is None:
        raise ValueError(f"{step_dir} holds vision.* tensors but no vision config (common model_vision, the run's "
                         "config.yaml or the config the checkpoint records)")
    model = VisionModel(vcfg)
    sd = {f"vision.{n}": ShardedTensor.from_rank_offsets(f"vision.{n}", p.data, replica_id=0)
          for n, p in model.named_parameters()}
    missing = sorted(set(sd) - set(meta))
    if missing:
        raise ValueError(f"{step_dir}: vision tensors missing: {missing[:8]}")
    loaded = dist_checkpointing.load(sd, str(step_dir), validate_access_integrity=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(loaded[f"vision.{n}"])
    return model


def import_vision(hf_dir: str, out_path: str, *, strict: bool = False) -> dict:
    """The vision tower + projector of a Keye-VL HF checkpoint -> a torch file holding our VisionModel's
    state_dict ("vision_model"), its VisionConfig ("vision_config", a dict) and the source. No process
    group is needed: the tower is replicated on every rank in training (train/vision.py)."""
    from models.hf.checkpoint_io import HFCheckpoint
    from models.hf.keye_vision import KNOWN_UNUSED, load_keye_vision_into, vision_config_from_hf
    from models.vision import VisionModel

    vcfg = vision_config_from_hf(HFCheckpoint(hf_dir).config)
    model = VisionModel(vcfg)
    stats = load_keye_vision_into(model, hf_dir, ignore=() if strict else KNOWN_UNUSED)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({"vision_model": model.state_dict(), "vision_config": asdict(vcfg),
                "source": {"hf_dir": str(Path(hf_dir).resolve()), "format": "keye_vl", "layout": stats["layout"],
                           "skipped": stats["skipped"]}}, tmp)
    os.replace(tmp, out)
    log.info("vision tower of %s (%s layout, %d tensors, %.1fM parameters) -> %s", hf_dir, stats["layout"],
             stats["tensors"], stats["elements"] / 1e6, out)
    return stats


def load_vision_file(path: str):
    """The VisionModel written by import-vision (or any file of that form)."""
    from models.vision import VisionConfig, VisionModel

    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = VisionModel(VisionConfig(**blob["vision_config"]))
    model.load_state_dict(blob["vision_model"])
    return model


def _lm_from_dict(d, overrides=(), *, source: str = "the Hugging Face config") -> LMConfig:
    """LMConfig from `d` (a dict or config node; `source` names it) with the --set overrides. A key that is not one
    of its settings: ValueError naming it (omegaconf's ConfigKeyError is a KeyError, which ended the command with a
    traceback)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    dots = [o.removeprefix("lm.") for o in overrides]
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig), d, OmegaConf.from_dotlist(dots)))
    except ConfigKeyError as e:
        key = e.full_key or e.key
        where = next((f"--set {o}" for o, dot in zip(overrides, dots) if dot.split("=", 1)[0] == key), source)
        raise ValueError(f"{where}: lm.{key} is not a setting of the language model (models/config.py LMConfig)") \
            from None


class PeerFailed(RuntimeError):
    """Rank 0 failed in work it does alone (transformers' reference logits, the vision tower's files): the other
    ranks, which wait for its outcome, stop too, naming its error."""


def _on_rank0(fn, what: str):
    """fn() on rank 0 alone (every rank when no process group exists), its result given to every rank. Collective.
    A failure there is raised on rank 0 as it is and on the others as PeerFailed naming it: before, they waited for
    rank 0's result until the process group's timeout, while rank 0 waited for them in the teardown's barrier."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    box, failure = [None], None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - any error: the other ranks must hear of it
            failure, box[0] = e, ("failed", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    status, value = box[0]
    if status != "ok":
        raise PeerFailed(f"rank 0 failed {what}: {value}")
    return value


def verify_seq(hf_config: dict, tp: int = 1) -> int:
    """The input length `verify` compares at unless told (--seq): 32 tokens for a dense model; for a sparse one the
    shortest (a multiple of `tp`, sequence parallel) at which every sparse layer leaves keys out, so that the
    comparison reaches what differs from dense attention: past a DSA layer's top-k (16 rows beyond it), past the
    widest KSA window (two chunks beyond it). At 32 a tiny DSA model's top-32 and its KSA windows of 4 and 64 chunks of
    8 were never reached, and the sparse code of both sides went unchecked."""
    seq = 32
    if hf_config.get("dsa_layers"):
        seq = max(seq, int(hf_config["index_topk"]) + 16)
    if hf_config.get("ksa_layers"):
        seq = max(seq, int(hf_config["ksa_chunk"]) * (max(hf_config["ksa_windows"]) + 2))
    return -(-seq // tp) * tp


def verify_chunks(chunks, hf_dir: str, *, pgs, batch: int = 2, seq: int | None = None, seed: int = 0) -> dict:
    """Collective: our logits vs transformers' (computed on rank 0) on a fixed input of `seq` tokens (verify_seq when
    None); same verdict on all ranks (PeerFailed on the others when rank 0 cannot compute transformers' logits)."""
    from models.hf.keye_vision import lm_hf_config
    from models.hf.verify import compare_logits, fixed_input_ids, model_logits, reference_logits

    config = lm_hf_config(hf_dir)
    if seq is None:
        seq = verify_seq(config, pgs.tp.size())
        log.info("verify: %d tokens per row (--seq to change)", seq)
    ids = fixed_input_ids(config["vocab_size"], batch=batch, seq=seq, seed=seed)
    ours = model_logits(chunks[0], ids, tp_group=pgs.tp)

    def compare() -> dict:
        result = compare_logits(ours, reference_logits(hf_dir, ids))
        log.info("logits vs transformers: max |diff| %.3g (tolerance %.3g, max |logit| %.3g), argmax agreement %.3f",
                 result["max_abs_diff"], result["tolerance"], result["max_abs_ref"], result["argmax_agree"])
        return result

    return _on_rank0(compare, f"computing transformers' reference logits of {hf_dir}")


def verify(hf_dir: str, *, lm: LMConfig, checkpoint: str | None = None, tp=1, ep=1, etp=1, batch=2,
           seq: int | None = None) -> dict:
    """Builds our model (fp32) from the HF weights or from `checkpoint`, and compares logits with transformers.
    With DSA layers, transformers runs the directory's DSA code (models/hf/modeling_qwen3_moe_dsa.py, which the
    export writes), so the indexers select the keys on both sides at any `seq`."""
    from models.hf.keye_vision import lm_checkpoint, lm_hf_config
    from models.hf.qwen3_moe import check_hf_config, load_hf_into
    from train import checkpoint as ckpt

    chunks, pgs, _ = build_model(lm, tp=tp, ep=ep, etp=etp, dtype=torch.float32)
    if checkpoint:
        check_hf_config(lm_hf_config(hf_dir), lm)
        step_dir, _ = resolve_checkpoint(checkpoint)
        missing = ckpt.load_model_weights(ckpt.CheckpointRef(step_dir, 0), chunks, dp_cp_group=pgs.dp_cp)
        if missing:
            raise RuntimeError(f"{step_dir} lacks model tensors: {sorted(set(missing))[:8]}")
        stored = _hf_dtype(hf_dir)
        if stored != torch.float32:  # an export with --dtype bf16: compare the same weights, not their rounding
            log.info("the weights in %s are %s: the checkpoint's are rounded to it for the comparison", hf_dir, stored)
            with torch.no_grad():
                for chunk in chunks:
                    for p in chunk.parameters():
                        p.copy_(p.to(stored))
    else:
        load_hf_into(chunks, lm_checkpoint(hf_dir), lm=lm)   # a Keye-VL directory: its language model
    return verify_chunks(chunks, hf_dir, pgs=pgs, batch=batch, seq=seq)


# ------------------------------------------------------------------------------------------ CLI
def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(t)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(s):
        s.add_argument("--model", help="recipes/model preset name or YAML file with an `lm:` node")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="lm.FIELD=VALUE")

    def layout_args(s, pp=True):
        for name in ("tp", "ep", "etp") + (("pp",) if pp else ()):
            s.add_argument(f"--{name}", type=int, default=1)

    s = sub.add_parser("import", help="HF checkpoint -> our checkpoint (OUT/checkpoints/step_000000)")
    s.add_argument("hf_dir")
    s.add_argument("out_dir")
    model_args(s)
    layout_args(s)
    s.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: as stored in the HF files")
    s.add_argument("--verify", action="store_true", help="also compare logits with transformers (pp=1)")

    s = sub.add_parser("export", help="our checkpoint -> HF safetensors + config.json")
    s.add_argument("checkpoint", help="a run directory (newest checkpoint) or a step_* directory")
    s.add_argument("out_dir")
    model_args(s)
    s.add_argument("--max-shard-size", type=_size, default=5 * 2**30, help="e.g. 5GB, 500MB (default 5GiB)")
    s.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast (default: as stored)")
    s.add_argument("--vision", help="torch file from import-vision: add its tower + projector (Keye-VL names)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the config.json and weight files of OUT even where no earlier export wrote them "
                        "(a Hugging Face checkpoint's own); without it such a directory is refused")

    s = sub.add_parser("import-vision", help="Keye-VL HF checkpoint's vision tower + projector -> torch file")
    s.add_argument("hf_dir")
    s.add_argument("out_path")
    s.add_argument("--strict", action="store_true",
                   help="also fail on the tensors Keye's forward does not use (packing_position_embedding, head.*)")

    s = sub.add_parser("code", help="write this version's transformers code (and auto_map) into the HF directory "
                                    "of a DSA or KSA model, e.g. one exported by an older version")
    s.add_argument("hf_dir")

    s = sub.add_parser("verify", help="our logits vs transformers' on a fixed input (fp32)")
    s.add_argument("hf_dir")
    s.add_argument("--checkpoint", help="load our weights from this checkpoint instead of the HF files")
    model_args(s)
    layout_args(s, pp=False)
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--seq", type=int, default=None,
                   help="tokens per row (default: 32, or for a DSA or KSA model the shortest length at which every "
                        "sparse layer leaves keys out: top-k + 16, or the widest window + 2 chunks)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    if args.cmd == "code":  # files only: no process group
        from models.hf.qwen3_moe import MODELING, update_modeling

        try:
            variant, changed = update_modeling(args.hf_dir)
        except ValueError as e:
            print(f"convert code: {e}", file=sys.stderr)
            return 2
        print(f"{args.hf_dir}: {'wrote' if changed else 'already has'} this version's {MODELING[variant][0].name} "
              f"({variant.upper()}) and its auto_map")
        return 0
    if args.cmd in ("import", "verify") and not Path(args.hf_dir, "config.json").is_file():  # before any group
        print(f"convert {args.cmd}: {args.hf_dir}: no config.json (not a Hugging Face checkpoint directory)",
              file=sys.stderr)
        return 2
    out = getattr(args, "out_dir", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():  # before any group or file is made
        print(f"convert {args.cmd}: {out} is a file, not a directory to write the output into", file=sys.stderr)
        return 2
    try:
        if getattr(args, "model", None):  # before any process group is made, as the paths above
            model_file(args.model)
        if args.cmd == "export":   # weights the export would delete: before any group or file is made
            check_export_dir(args.out_dir, overwrite=args.overwrite)
        if args.cmd == "verify" or getattr(args, "verify", False):  # the reference's code: rank 0 alone runs it, so
            # a refusal there would leave the other ranks waiting for its logits
            from models.hf.verify import check_modeling_current

            try:
                config = json.loads(Path(args.hf_dir, "config.json").read_text())
            except ValueError:  # not JSON: the reading below names the file
                config = None
            if isinstance(config, dict):
                check_modeling_current(args.hf_dir, config)
    except ValueError as e:
        print(f"convert {args.cmd}: {e}", file=sys.stderr)
        return 2
    from parallel.groups import teardown

    failed = False   # an error this rank alone met: no barrier at the teardown (the others may be in a collective)
    try:
        if args.cmd == "import":
            lm = model_config(args.model, args.overrides, hf_dir=args.hf_dir)
            import_hf(args.hf_dir, args.out_dir, lm=lm, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                      dtype=args.dtype, verify=args.verify)
        elif args.cmd == "export":
            export(args.checkpoint, args.out_dir, model=args.model, overrides=args.overrides,
                   max_shard_bytes=args.max_shard_size, dtype=args.dtype, vision=args.vision,
                   overwrite=args.overwrite)
        elif args.cmd == "import-vision":
            import_vision(args.hf_dir, args.out_path, strict=args.strict)
        else:
            lm = model_config(args.model, args.overrides, hf_dir=args.hf_dir)
            result = verify(args.hf_dir, lm=lm, checkpoint=args.checkpoint, tp=args.tp, ep=args.ep, etp=args.etp,
                            batch=args.batch, seq=args.seq)
            print(json.dumps(result))
            if not result["ok"]:
                return 1
    except (ValueError, OSError, PeerFailed) as e:  # a config / checkpoint mismatch, a path, rank 0's failure
        failed = isinstance(e, PeerFailed)
        print(f"convert {args.cmd}: {e}", file=sys.stderr)
        return 2
    except Exception:
        failed = True
        raise
    finally:
        teardown(barrier=not failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
