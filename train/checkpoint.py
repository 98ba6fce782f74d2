"""Sharded checkpoints through megatron-core `dist_checkpointing`, committed atomically.

Layout of a run directory:
    checkpoints/step_000040/          a complete checkpoint: shards + metadata + COMPLETE.json
    checkpoints/step_000060.partial/  being written (or torn by a crash): never loaded
    checkpoints/latest                name of the newest complete checkpoint (informational)

A save writes into `<name>.partial`; after every rank has finished (dist_checkpointing's collective
save, then a barrier), rank 0 writes COMPLETE.json listing every file with its size and renames the
directory to its final name. Loading scans for directories with COMPLETE.json whose files all exist
with the recorded sizes, newest first, so a crash mid-save leaves the previous checkpoint as the
newest complete one.

What a checkpoint holds: the model chunks and the optimizer (fp32 master weights and Adam moments, in
megatron's "fully_reshardable" form, so a checkpoint written at TP2/EP2 loads at
TP1/EP1), each rank's RNG states, and the common state: step, data position, layout and config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{6,})$")
COMPLETE = "COMPLETE.json"
# "fully_reshardable": optimizer state in model space (one tensor per parameter), so TP/PP/EP/DP may change
# between save and load. ("fully_sharded_model_space" needs flattened shards, which 0.16.1 rejects.)
# megatron adds its data-parallel group to the metadata dict it is given, so every call gets a fresh
# dict with the group of the current layout (a shared dict would carry a stale group into the next one).
def _sharding_metadata(dp_cp_group) -> dict:
    return {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
            "dp_cp_group": dp_cp_group}


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    step: int


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _verify(path: Path) -> tuple[bool, str]:
    marker = path / COMPLETE
    if not marker.is_file():
        return False, "no COMPLETE.json (save did not finish)"
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return False, f"unreadable COMPLETE.json: {e}"
    for rel, size in info.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return False, f"missing file {f}"
        if f.stat().st_size != size:
            return False, f"file {f} has {f.stat().st_size} bytes, {size} were written"
    return True, ""


def find_latest(run_dir: str | os.PathLike) -> CheckpointRef | None:
    """Newest complete and verified checkpoint of a run directory (None if there is none)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))), reverse=True)
    for step, path in candidates:
        ok, why = _verify(path)
        if ok:
            return CheckpointRef(path=path, step=step)
        log.warning("skipping checkpoint %s: %s", path, why)
    return None


def _rng_state() -> dict:
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _unwrap(chunk):
    """The GPTModel inside megatron's DDP wrapper (whose state-dict keys carry a 'module.' prefix)."""
    return getattr(chunk, "module", chunk)


def _sharded_state(model_chunks, optimizer, *, is_loading: bool, with_optimizer: bool, rank: int, world: int,
                   dp_cp_group) -> dict:
    sd: dict = {}
    model_sd = {}
    metadata = _sharding_metadata(dp_cp_group)
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        sd[key] = _unwrap(chunk).sharded_state_dict(metadata=metadata)
        model_sd.update(sd[key])
    if with_optimizer:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    sd["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return sd


def save_checkpoint(run_dir, step: int, model_chunks, optimizer, common: dict, *, keep_last: int, dp_cp_group) -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint path."""
    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:06d}"
    partial = root / f"step_{step:06d}.partial"
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    sd = _sharded_state(model_chunks, optimizer, is_loading=False, with_optimizer=True, rank=rank, world=world,
                        dp_cp_group=dp_cp_group)
    sd["common"] = common
    dist_checkpointing.save(sd, str(partial))
    dist.barrier()
    if rank == 0:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in partial.rglob("*") if p.is_file()}
        (partial / COMPLETE).write_text(json.dumps({"step": step, "world_size": world, "files": files}, indent=1))
        if final.exists():  # an older copy of the same step (e.g. rerun after a crash): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = root / "latest.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, root / "latest")
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / COMPLETE).is_file())
    for _, p in complete[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ref: CheckpointRef, model_chunks, optimizer, *, dp_cp_group, load_optimizer: bool = True,
                    load_rng: bool = True) -> dict:
    """Collective. Loads model (and optimizer / RNG) in place; returns the common state."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sd = _sharded_state(model_chunks, optimizer, is_loading=True, with_optimizer=load_optimizer, rank=rank, world=world,
                        dp_cp_group=dp_cp_group)
    if not load_rng:
        sd.pop("rng_state")
    state = dist_checkpointing.load(sd, str(ref.path))
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(state["model" if len(model_chunks) == 1 else f"model{i}"], strict=True)
    if load_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    if load_rng:
        _set_rng_state(state["rng_state"])
    return state["common"]


def load_model_weights(ref: CheckpointRef, model_chunks, *, dp_cp_group) -> list[str]:
    """Collective. Loads the model weights that `ref` holds into the (unwrapped) chunks; returns the
    checkpoint keys of parameters it does not hold (they keep their values), e.g. the summary
    parameters when a KSA model starts from a dense checkpoint."""
    available = set(dist_checkpointing.load_tensors_metadata(str(ref.path)).keys())
    metadata = _sharding_metadata(dp_cp_group)
    sd, missing = {}, []
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        full = _unwrap(chunk).sharded_state_dict(metadata=metadata)
        kept = {}
        for name, sh in full.items():
            ck = getattr(sh, "key", None)
            if ck is None or name.endswith("_extra_state"):
                continue
            if ck in available:
                kept[name] = sh
            else:
                missing.append(ck)
        sd[key] = kept
    state = dist_checkpointing.load(sd, str(ref.path))
    for i, chunk in enumerate(model_chunks):
        loaded = state["model" if len(model_chunks) == 1 else f"model{i}"]
        result = _unwrap(chunk).load_state_dict(loaded, strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if unexpected:
            raise RuntimeError(f"checkpoint {ref.path} has tensors this model does not: {unexpected[:5]}")
    return missing
