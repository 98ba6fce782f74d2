"""Sharded checkpoints through megatron-core `dist_checkpointing`, committed atomically.

Layout of a run directory:
    checkpoints/step_000040/          a complete checkpoint: shards + metadata + COMPLETE.json
    checkpoints/step_000060.partial/  being written (or torn by a crash): never loaded
    checkpoints/latest                name of the newest complete checkpoint (informational)

A save writes into `<name>.partial`; after every rank has finished writing (synchronously, or when an
asynchronous save's writers are all done), each rank reports the sizes of the files it wrote, rank 0
writes COMPLETE.json listing every file and renames the directory to its final name. Then each rank
checksums its own files in a background thread (CRC32 per 64 MiB chunk, CHECKSUMS.rank<r>.json), so the
checksum pass does not block training. Resuming takes the newest directory with COMPLETE.json whose
files all exist with their sizes and match their recorded checksums (the ranks split the work); a
corrupted file is named in the log and the next older checkpoint is used, so neither a crash mid-save
nor a damaged shard wins (one without checksum records that fails to load is dropped the same way, by the
trainer's resume); where every committed checkpoint is damaged (find_resume_point), or fails to load (the
trainer's resume: not called damage, damaged_everywhere), the run stops rather than start over. Retention: the
checkpoint just saved, the newest `keep_last - 1` before it whose files verify, plus every `keep_every`-th step.

What a checkpoint holds: the model chunks and the optimizer (fp32 master weights and Adam moments, in
megatron's "fully_reshardable" form, so a checkpoint written at TP2/EP2 loads at
TP1/EP1), each rank's RNG states, and the common state: step, data position, layout and config.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from train.faults import maybe_fail

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{6,})$")
COMPLETE = "COMPLETE.json"
# written into a committed checkpoint whose files a resume found not to match their checksums: every later check
# (the next resume's, retention's, an export's) skips it without reading it again; delete it after restoring the files
DAMAGED = "DAMAGED.json"
# Optimizer formats (train.checkpoint.optimizer_format): "dp_reshardable" (each rank its own flat buffers:
# fully parallel, no gather; loads at another DP size only) or "fully_reshardable" (per-parameter tensors
# in model space, gathered over DP at save: TP/PP/EP may change between save and load).
# ("fully_sharded_model_space" needs flattened shards, which 0.16.1 rejects.)
# megatron adds its data-parallel group to the metadata dict it is given, so every call gets a fresh
# dict with the group of the current layout (a shared dict would carry a stale group into the next one).
def _sharding_metadata(dp_cp_group, optimizer_format: str = "fully_reshardable") -> dict:
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True,
            "dp_cp_group": dp_cp_group}


MODEL_PARALLEL_KEYS = ("tp", "pp", "vpp", "ep", "etp", "cp")
# what a dp_reshardable optimizer state cannot change: its flat buffers are the shards of one rank's parameters over
# megatron's dp_cp group, and CP ranks hold the same parameters, so cp moves ranks between DP and CP like a DP change
DP_RESHARDABLE_FIXED = ("tp", "pp", "vpp", "ep", "etp")


def layout_record(layout) -> dict:
    """What a checkpoint's common state records of the parallel layout (parallel.layout.ParallelLayout) it was
    written at, and what check_resumable compares."""
    return {k: getattr(layout, k) for k in (*MODEL_PARALLEL_KEYS, "dp", "world_size")}


def check_resumable(saved_common: dict, layout: dict, where: Path) -> None:
    """Raises ValueError when a checkpoint's optimizer state cannot be loaded at `layout`: the
    dp_reshardable format follows the distributed optimizer's buffers, sharded over DP x CP, so only DP and CP
    may change (DP_RESHARDABLE_FIXED)."""
    fmt = saved_common.get("optimizer_format", "fully_reshardable")
    saved = saved_common["layout"]
    changed = {k: (saved.get(k), layout.get(k)) for k in DP_RESHARDABLE_FIXED if saved.get(k) != layout.get(k)}
    if fmt == "dp_reshardable" and changed:
        was = " ".join(f"{k}={saved.get(k)}" for k in DP_RESHARDABLE_FIXED)
        raise ValueError(
            f"checkpoint {where} stores the optimizer as dp_reshardable at {was}; this run changes "
            + ", ".join(f"{k} {a}->{b}" for k, (a, b) in changed.items())
            + ". That format reshards over data and context parallelism only. Resume once at the saved layout with "
              "train.checkpoint.optimizer_format=fully_reshardable train.stop_after=1 (it writes a checkpoint "
              "any layout loads), then start the new layout.")


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
    if (path / DAMAGED).is_file():
        return False, f"found corrupted by an earlier resume ({DAMAGED}, which names its files)"
    for rel, meta in info.get("files", {}).items():
        size = meta["size"] if isinstance(meta, dict) else meta
        f = path / rel
        if not f.is_file():
            return False, f"missing file {f}"
        if f.stat().st_size != size:
            return False, f"file {f} has {f.stat().st_size} bytes, {size} were written"
    return True, ""


def verify_checksums(ref: CheckpointRef) -> list[str]:
    """Collective: the ranks split the checksummed files and compare their CRC32s with the checksum records
    the saving ranks wrote. Returns the corrupted files (the same list on every rank). Files without a record
    (the save's background checksum pass had not finished when that run ended) are logged and not judged."""
    rank, world = dist.get_rank(), dist.get_world_size()
    records = read_checksums(ref.path)
    unrecorded = sorted(set(json.loads((ref.path / COMPLETE).read_text())["files"]) - set(records))
    if unrecorded and rank == 0:
        log.warning("checkpoint %s: no checksum recorded for %d file(s) (%s...); only their sizes are checked",
                    ref.path, len(unrecorded), unrecorded[0])
    bad = []
    for i, (name, want) in enumerate(sorted(records.items())):
        if i % world != rank:
            continue
        f = ref.path / name
        got = chunk_crc32s(f, want["chunk_bytes"]) if f.is_file() else None
        if got != want["crc32"]:
            bad.append(f"{f}: CRC32 differs from the one recorded at save time" if got is not None else f"{f}: missing")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, bad)
    return sorted(b for part in gathered for b in part)


def verify_checkpoint(path: Path) -> list[str]:
    """Collective: what is wrong with one checkpoint directory (its files' sizes, then their recorded CRC32s, as a
    resume checks them); [] when it verifies."""
    ok, why = _verify(path)
    return verify_checksums(CheckpointRef(path=path, step=0)) if ok else [why]


def find_latest_verified(run_dir, problems: list[str] | None = None, *, exclude: list[str] = (),
                         mark: bool = False) -> CheckpointRef | None:
    """Collective: the newest checkpoint that is complete AND whose files match their checksums; a
    corrupted one is reported (file named, and added to `problems`) and skipped for the next older one, and with
    `mark` (the run's own directory) marked so (DAMAGED): retention then counts it as no checkpoint, where its
    files' sizes alone kept it and removed a good older one. `exclude`: names of checkpoint directories not to
    consider (ones that failed to load)."""
    skipped: list[str] = list(exclude)
    while True:
        ref = find_latest(run_dir, exclude=skipped, problems=problems)
        if ref is None:
            return None
        bad = verify_checksums(ref)
        if not bad:
            return ref
        log.error("checkpoint %s is corrupted, looking for an older one: %s", ref.path, "; ".join(bad))
        if mark and dist.get_rank() == 0:
            _mark_damaged(ref.path, bad)
        if problems is not None:
            problems.append(f"{ref.path.name}: {'; '.join(bad)}")
        skipped.append(ref.path.name)


def _mark_damaged(path: Path, bad: list[str]) -> None:
    """Writes DAMAGED.json (what was found) into a checkpoint whose files do not match their checksums."""
    tmp = path / f"{DAMAGED}.tmp"
    try:
        tmp.write_text(json.dumps({"corrupted": bad, "found": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
        os.replace(tmp, path / DAMAGED)
    except OSError as e:     # a read-only copy: the next resume reads its files again
        log.warning("could not mark checkpoint %s as damaged (%s): %s", path, DAMAGED, e)


class CheckpointLoadError(RuntimeError):
    pass


class RunDirInUse(RuntimeError):
    pass


_HELD: dict[str, object] = {}     # run directory (real path) -> the open lock file this process holds on it


def lock_run_dir(run_dir) -> None:
    """Holds `<run_dir>/.lock` (flock) for the rest of this process: a second launch that would train in the same run
    directory at the same time (its checkpoints, metrics and logs interleaved with this one's) stops with
    RunDirInUse naming the holder. Called on one rank. The lock goes with the process, however it ends; a process
    that builds several trainers on one directory holds it once. Where the filesystem has no flock the launch goes
    on, with a warning."""
    import fcntl
    import socket

    key = os.path.realpath(run_dir)
    if key in _HELD:
        return
    os.makedirs(run_dir, exist_ok=True)
    path = Path(run_dir) / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirInUse(f"run_dir={run_dir} is in use by a launch that is still running ({holder}, holding "
                          f"{path}): two runs in one directory would write their checkpoints and logs among each "
                          f"other's. Wait for it to end, stop it (touch {Path(run_dir) / 'STOP'}), or give this launch "
                          f"another run_dir. Where that process is gone (its node died: an NFSv3 lock can outlive its "
                          f"node), remove {path}") from None
    except OSError as e:
        f.close()
        log.warning("run_dir=%s: no lock against a second launch in it (%s: %s)", run_dir, path, e)
        return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[key] = f


PROBE_PREFIX = ".shared_probe."   # check_shared_run_dir's file, named afresh by each launch and removed after it
PROBE_WAIT_S = 5.0   # how long a rank that does not see the probe keeps looking (a shared filesystem's caches)


def _probe_view(dirs: list[Path], token: str, wait_s: float) -> list[str]:
    """What this rank finds of rank 0's probe file in each of `dirs`: "" where it reads `token`, else what it found.
    A file rank 0 closed before the collective that sent `token` is read whole on NFS (close-to-open) and on
    Lustre; its fresh name has no negative cache entry. A rank keeps looking for `wait_s` seconds all the same."""
    deadline = time.monotonic() + wait_s
    while True:
        seen = []
        for d in dirs:
            try:
                got = (d / f"{PROBE_PREFIX}{token}").read_text()
                seen.append("" if got == token else f"it reads {got[:60]!r} there")
            except FileNotFoundError:
                seen.append("no such file")
            except OSError as e:
                seen.append(e.strerror or type(e).__name__)
        if not any(seen) or time.monotonic() >= deadline:
            return seen
        time.sleep(0.25)


def check_shared_run_dir(run_dir, *, checkpoints: bool, wait_s: float = PROBE_WAIT_S) -> list[str]:
    """Collective, as a launch starts: every rank's run directory is the one rank 0 sees (and, with `checkpoints`,
    its checkpoints/ directory, which may be a link elsewhere). Rank 0 writes a probe file of a fresh name there;
    every rank reads it back through its own run_dir; rank 0 removes it. Every rank raises SettingsError naming the
    directory and the ranks, with their hosts, that do not see it. A run directory on each node's own disk (the same
    path, another directory on every node) let a save "commit" on rank 0's node a checkpoint whose other shards lay
    on the other nodes, and its resume stop on rank 0's node ("every checkpoint ... is damaged") while the other
    nodes started afresh and waited in their first collective for ever. So did ranks given other run_dir values (a
    `${now:...}` in it resolves on each rank, in the second that rank started): each rank probes its own, not rank
    0's. Returns every rank's host name, by rank (for messages that name a rank: a user must find its node)."""
    import socket
    import uuid

    from data.sample_position import format_runs
    from train.config import SettingsError

    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return [socket.gethostname()]
    own = [Path(run_dir)] + [checkpoint_root(run_dir)] * bool(checkpoints)
    sent: list = [None, [], ""]
    if rank == 0:
        token = uuid.uuid4().hex
        try:
            for d in own:
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{PROBE_PREFIX}{token}").write_text(token)
            sent = [token, [str(d) for d in own], ""]
        except OSError as e:
            sent = [None, [], f"rank 0 ({socket.gethostname()}) cannot write in {d}: {e.strerror}"]
    dist.broadcast_object_list(sent, src=0)
    token, dirs, failed = sent[0], [Path(d) for d in sent[1]], sent[2]
    if failed:
        raise SettingsError(f"run_dir={run_dir}: {failed}")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (socket.gethostname(), str(Path(run_dir).absolute()),
                                      _probe_view(own, token, wait_s)))
    if rank == 0:
        for d in dirs:
            (d / f"{PROBE_PREFIX}{token}").unlink(missing_ok=True)
    others = [r for r, (_, theirs, _) in enumerate(gathered) if theirs != gathered[0][1]]
    for i, d in enumerate(dirs):
        blind = [r for r, (_, _, seen) in enumerate(gathered) if seen[i]]
        if not blind:
            continue
        hosts = list(dict.fromkeys(gathered[r][0] for r in blind))
        # rank 0's run_dir and directories, in the same words on every rank
        where = f"run_dir={dirs[0]} ({gathered[0][1]})" if i == 0 else f"run_dir={dirs[0]}: its checkpoints/ ({d})"
        if set(blind) & set(others):
            r = min(set(blind) & set(others))
            raise SettingsError(
                f"{where} is not the run directory of every rank: rank {r} (host {gathered[r][0]}) was given "
                f"run_dir={gathered[r][1]}, which does not hold rank 0's probe file {PROBE_PREFIX}{token} "
                f"({gathered[r][2][i]}). Every rank writes its checkpoint shards into its run_dir and rank 0 commits "
                f"them: give every rank the same run_dir (one that resolves per rank, such as ${{now:...}}, differs "
                f"where the ranks start in different seconds: write the time out)")
        raise SettingsError(
            f"{where} is not the same directory on every rank: rank 0 (host {gathered[0][0]}) "
            f"wrote {PROBE_PREFIX}{token} there and rank{'s' * (len(blind) > 1)} {format_runs(blind, sep='-')} "
            f"(host{'s' * (len(hosts) > 1)} {', '.join(hosts)}) do{'es' * (len(blind) == 1)} not see it "
            f"({gathered[blind[0]][2][i]}). Every rank writes its checkpoint shards there and rank 0 commits them, "
            f"so a multi-node run needs a run_dir on a filesystem every node mounts at the same path (NFS, Lustre, "
            f"...), not a node's own disk: give run_dir=<a shared path>")
    return [host for host, _, _ in gathered]


def remove_torn_saves(run_dir) -> list[str]:
    """Removes the `step_<N>.partial` directories of saves that never committed (a launch killed or out of disk
    while saving): no load reads them, and a full disk stayed full of them. Called on one rank as a launch starts,
    holding the run directory's lock, before any save of its own. Returns their names."""
    root = checkpoint_root(run_dir)
    torn = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith(".partial")) if root.is_dir() else []
    for p in torn:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in torn]


def find_resume_point(run_dir) -> CheckpointRef | None:
    """Collective: the checkpoint a run directory resumes from (find_latest_verified); None for a fresh run,
    including one whose only save was torn before its commit. CheckpointLoadError when the directory holds
    committed checkpoints (COMPLETE.json written) and none of them verifies: starting afresh there would drop
    the run's progress without a word (and its first save would replace the damaged files), so the run stops
    and says what it found."""
    problems: list[str] = []
    ref = find_latest_verified(run_dir, problems, mark=True)
    if ref is not None:
        return ref
    if not any((path / COMPLETE).is_file() for _, path in _candidates(run_dir)):
        return None
    raise damaged_everywhere(run_dir, problems)


def damaged_everywhere(run_dir, problems: list[str], unloaded: list[str] = (),
                       changed: str = "") -> CheckpointLoadError:
    """The error of a run directory none of whose committed checkpoints can be resumed: `problems`, what was found
    of each; `unloaded`, the names of those whose files passed their checks and whose load failed (the trainer's
    resume), and `changed`, the settings this launch changed since the newest of them. Such a failure is not known
    to be damage (a setting of this launch the checkpoint was not written for, the memory, the software), so the
    error says damage only where the checks found it."""
    root = checkpoint_root(run_dir)
    keep = "(a run directory holding a checkpoint is resumed, never restarted silently)"
    if not unloaded:
        return CheckpointLoadError(
            f"every checkpoint in {root} is damaged, so there is none to resume from: {'; '.join(problems)}. Restore "
            f"them from a copy, or move them out of that directory to start this run afresh {keep}")
    which = "its" if len(unloaded) == 1 else "their"
    changed = f" ({changed})" if changed else ""
    return CheckpointLoadError(
        f"no checkpoint in {root} could be resumed from: {'; '.join(problems)}. {', '.join(unloaded)} passed the "
        f"checks of {which} files (sizes, and checksums where recorded) and failed to load: damage from before "
        f"{which} checksums were recorded, or a cause outside the files, such as a setting of this launch that the "
        f"checkpoint was not written for{changed}, as the error says. The checkpoints are left as they are: remove "
        f"that cause and rerun; only a damaged checkpoint is to be restored from a copy or moved out of the "
        f"directory {keep}")


def load_failure(e: BaseException | None) -> str:
    """One line per distinct cause of a failed load (a CheckpointException carries every rank's traceback: only
    their last lines are kept); "" for None. A message of several lines gives its first and its last: megatron's
    may print a tensor in the middle of one (`Model param Parameter containing:`, the tensor, then `... not in
    model_sharded_state_dict`), whose first line alone said nothing of the cause."""
    if e is None:
        return ""
    causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
    lines = []
    for exc in causes:
        msg = [m.strip() for m in str(exc).strip().splitlines() if m.strip()] or [""]
        text = msg[0][:300] + (f" ... {msg[-1][-300:]}" if len(msg) > 1 else "")
        line = f"{type(exc).__name__}: {text}"
        if line not in lines:
            lines.append(line)
    return " | ".join(lines)


def agree_on_failure(failure: str) -> str:
    """Collective: the ranks' load failures, joined (the same text on every rank); "" when every rank loaded."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failure)
    return " | ".join(dict.fromkeys(f for f in gathered if f))


def saved_common(ref: CheckpointRef) -> dict | None:
    """The common state the run that wrote `ref` saved (its step, layout, optimizer format, resolved config, ...);
    None where it cannot be read (the resume then names the problem, or takes an older checkpoint). Needs no
    process group."""
    try:
        return dist_checkpointing.load_common_state_dict(str(ref.path))["common"]
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: judged where the checkpoint is loaded
        log.warning("checkpoint %s: its recorded state could not be read (%s)", ref.path, e)
        return None


def saved_config(ref: CheckpointRef) -> dict | None:
    """The resolved config (train.config.Config as a dict) the run that wrote `ref` had; None for checkpoints
    written before checkpoints recorded it, or whose common state cannot be read."""
    common = saved_common(ref)
    return None if common is None else common.get("config")


def _candidates(run_dir: str | os.PathLike, exclude: list[str] = ()) -> list[tuple[int, Path]]:
    """(step, path) of a run directory's checkpoint directories, newest first, complete or not."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.name not in exclude),
                  reverse=True)


def complete_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointRef]:
    """Every complete checkpoint of a run directory (files present with their recorded sizes), oldest first."""
    return [CheckpointRef(path=path, step=step) for step, path in reversed(_candidates(run_dir)) if _verify(path)[0]]


def eval_checkpoints(cfg) -> tuple[str, list[CheckpointRef]]:
    """What train.eval.only scores (cfg: train.config.Config): its source, run_dir when that holds a complete
    checkpoint, else train.checkpoint.init_from; and train.eval.checkpoints' choice among the source's complete
    checkpoints, oldest first ([] for a Hugging Face source, scored once). ValueError naming the setting when
    there is no source, or no such checkpoint."""
    from models.hf import is_hf_checkpoint
    from train.config import eval_checkpoint_steps

    e, run_dir = cfg.train.eval, cfg.resolved_run_dir()
    held = complete_checkpoints(run_dir)
    source = str(run_dir) if held else cfg.train.checkpoint.init_from
    if not source:
        raise ValueError(f"train.eval.only=true scores existing weights, and run_dir={run_dir} holds no complete "
                         f"checkpoint: give the run_dir of a run that saved one, or train.checkpoint.init_from=DIR "
                         f"(one of our run directories or a Hugging Face checkpoint)")
    if not held and is_hf_checkpoint(source):
        if e.checkpoints:
            raise ValueError(f"train.eval.checkpoints={e.checkpoints!r} picks checkpoints of one of our run "
                             f"directories; train.checkpoint.init_from={source!r} is a Hugging Face checkpoint")
        return source, []
    held = held or complete_checkpoints(source)
    if not held:
        raise ValueError(f"train.eval.only=true: train.checkpoint.init_from={source!r} holds no complete checkpoint")
    steps = eval_checkpoint_steps(e.checkpoints)
    missing = sorted(set(steps or []) - {r.step for r in held})
    if missing:
        raise ValueError(f"train.eval.checkpoints={e.checkpoints!r}: {source} holds no complete checkpoint of step "
                         f"{', '.join(map(str, missing))}; its complete checkpoints are of steps "
                         f"{', '.join(str(r.step) for r in held)}")
    if e.checkpoints == "":
        return source, held[-1:]
    return source, held if steps is None else [r for r in held if r.step in steps]


def find_latest(run_dir: str | os.PathLike, *, exclude: list[str] = (),
                problems: list[str] | None = None, quiet: bool = False) -> CheckpointRef | None:
    """Newest complete checkpoint of a run directory whose files exist with their recorded sizes; the ones
    skipped are logged (unless `quiet`: the launcher's checks, which the trainer's resume repeats in the logs)
    and, with their reasons, added to `problems`."""
    for step, path in _candidates(run_dir, exclude):
        ok, why = _verify(path)
        if ok:
            return CheckpointRef(path=path, step=step)
        if not quiet:
            log.warning("skipping checkpoint %s: %s", path, why)
        if problems is not None:
            problems.append(f"{path.name}: {why}")
    return None


def rng_state() -> dict:
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
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
                   dp_cp_group, optimizer_format: str = "fully_reshardable", extra: dict | None = None) -> dict:
    sd: dict = {"extra": extra} if extra else {}
    # the chunks' state dicts side by side, as megatron's own checkpointing hands them to the optimizer (which finds
    # its parameters' sharded tensors in any nesting): the model chunks of an interleaved pipeline share their local
    # key names (each numbers its layers from 0), so one merged dict kept the last chunk's tensors alone
    model_sd = {}
    metadata = _sharding_metadata(dp_cp_group, optimizer_format)
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        sd[key] = model_sd[key] = _unwrap(chunk).sharded_state_dict(metadata=metadata)
    if with_optimizer:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    sd["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    return sd


class CheckpointSaveError(RuntimeError):
    pass


def save_checkpoint(run_dir, step: int, model_chunks, optimizer, common: dict, *, keep_last: int, keep_every: int = 0,
                    dp_cp_group, async_queue=None, optimizer_format: str = "dp_reshardable",
                    extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the path the checkpoint is committed to.

    Synchronous: returns after the commit. With `async_queue` (megatron's AsyncCallsQueue): returns once
    the shards are staged; a forked writer writes them while training goes on, and the commit runs when
    `async_queue.maybe_finalize_async_calls` finds every rank's writer done.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:06d}"
    partial = root / f"step_{step:06d}.partial"
    ok = torch.ones(1, device=_device())
    if rank == 0:
        try:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as e:
            log.error("cannot create %s: %s", partial, e)
            ok.zero_()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise CheckpointSaveError(f"could not create checkpoint directory {partial}; see rank 0's log")
    sd = _sharded_state(model_chunks, optimizer, is_loading=False, with_optimizer=optimizer is not None,
                        rank=rank, world=world,
                        dp_cp_group=dp_cp_group, optimizer_format=optimizer_format, extra=extra)
    sd["common"] = {**common, "optimizer_format": optimizer_format}
    commit = functools.partial(_commit, root, partial, final, step, keep_last, keep_every)
    try:
        if async_queue is None:
            dist_checkpointing.save(sd, str(partial))
            commit()
        else:
            request = dist_checkpointing.save(sd, str(partial), async_sharded_save=True)
            request.add_finalize_fn(commit)
            async_queue.schedule_async_request(request)
    except CheckpointSaveError:
        raise
    except (Exception, CheckpointException) as e:  # e.g. ENOSPC while writing shards: raised on every rank.
        # torch's CheckpointException derives from BaseException, hence named here.
        raise CheckpointSaveError(save_failure_message(step, partial, e)) from e
    return final


def save_failure_message(step: int, partial: Path, e: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(partial.parent).free / 1e6:.0f} MB free on the disk holding {partial.parent}"
    except OSError:
        free = f"free space on the disk holding {partial.parent} unknown"
    first = str(e).strip().splitlines()
    causes = sorted({line.strip() for line in str(e).splitlines() if "Error" in line and ":" in line})
    why = "; ".join(causes) if causes else (first[0] if first else type(e).__name__)
    if isinstance(e, CheckpointException) and not e.failures:
        # megatron's asynchronous save gathers every rank's write errors on rank 0 and raises them there; the other
        # ranks learn only that it failed ("CheckpointException ranks:dict_keys([])")
        why = "the shards' write failed; its errors, every rank's, are reported by rank 0"
    return (f"saving step {step} to {partial} failed ({why}; {free}). The checkpoint is not committed; the "
            f"newest complete one is still used on resume. Free space (or fix the cause) and rerun to resume.")


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _own_files(directory: Path, rank: int) -> list[Path]:
    """Files this rank wrote: its __<rank>_<n>.distcp shards (rank 0 also the metadata / common files)."""
    mine = []
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.name == COMPLETE:
            continue
        m = re.match(r"^__(\d+)_\d+\.distcp$", p.name)
        if (m and int(m.group(1)) == rank) or (not m and rank == 0):
            mine.append(p)
    return mine


CHECKSUM_CHUNK = 1 << 26  # 64 MiB: files are checksummed in chunks, in parallel threads


def chunk_crc32s(path: Path, chunk_bytes: int = CHECKSUM_CHUNK, *, threads: int = 8) -> list[str]:
    """CRC32 of each `chunk_bytes` piece of a file. zlib releases the GIL on large buffers, so chunks are
    hashed in parallel threads: a checkpoint of tens of GB is checksummed at memory speed, not 1-2 GB/s."""
    size = path.stat().st_size
    n = max(1, -(-size // chunk_bytes))

    def one(i: int) -> str:
        with open(path, "rb") as f:
            f.seek(i * chunk_bytes)
            return f"{zlib.crc32(f.read(chunk_bytes)):08x}"

    if n == 1:
        return [one(0)]
    with concurrent.futures.ThreadPoolExecutor(min(threads, n)) as pool:
        return list(pool.map(one, range(n)))


def _checksum_record_name(rank: int) -> str:
    return f"CHECKSUMS.rank{rank}.json"


def read_checksums(path: Path) -> dict:
    """name -> {"chunk_bytes", "crc32": [...]}, merged from every rank's record in a checkpoint directory."""
    out = {}
    for rec in sorted(path.glob("CHECKSUMS.rank*.json")):
        try:
            out.update(json.loads(rec.read_text())["files"])
        except (OSError, json.JSONDecodeError, KeyError) as e:
            log.warning("unreadable checksum record %s (%s): ignored", rec, e)
    return out


class _Checksummer:
    """Per process: after a commit, checksums this rank's files of the committed checkpoint in a background
    thread and records them beside them (CHECKSUMS.rank<r>.json, written atomically), so neither a
    synchronous nor an asynchronous save blocks training for it. `wait()` joins the pending pass (called
    before the next save and at the end of training)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self, final: Path, rank: int, names: list[str]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(final, rank, names), daemon=True,
                                        name=f"checksum-{final.name}")
        self._thread.start()

    @staticmethod
    def _run(final: Path, rank: int, names: list[str]) -> None:
        try:
            files = {n: {"chunk_bytes": CHECKSUM_CHUNK, "crc32": chunk_crc32s(final / n)} for n in names}
            tmp = final / (_checksum_record_name(rank) + ".tmp")
            tmp.write_text(json.dumps({"files": files}))
            os.replace(tmp, final / _checksum_record_name(rank))
        except FileNotFoundError:  # pruned meanwhile
            pass
        except OSError as e:
            log.warning("could not record checksums of %s: %s (the checkpoint stays usable, sizes are checked)",
                        final, e)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


CHECKSUMS = _Checksummer()


def _commit(root: Path, partial: Path, final: Path, step: int, keep_last: int, keep_every: int) -> None:
    """Collective, after every rank's shards are on disk: record sizes and checksums, then make the
    checkpoint visible by renaming it (rank 0), and prune old ones."""
    rank, world = dist.get_rank(), dist.get_world_size()
    maybe_fail("kill_in_save", step=step, rank=rank)
    CHECKSUMS.wait()  # the previous checkpoint's pass (it may be pruned below)
    mine = {p.name: {"size": p.stat().st_size} for p in _own_files(partial, rank)}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        files = {k: v for part in gathered for k, v in part.items()}
        on_disk = {p.name for p in partial.iterdir() if p.is_file()}
        if on_disk - set(files):
            raise CheckpointSaveError(f"files in {partial} that no rank accounted for: {sorted(on_disk - set(files))}")
        if missing := _not_there(partial, set(files) - on_disk):
            # a rank that wrote its shards elsewhere (another run_dir, which check_shared_run_dir refuses at the
            # start): committed, this checkpoint would list files it does not hold, and every resume would stop on it
            ranks = sorted({r for r, part in enumerate(gathered) if set(part) & missing})
            raise CheckpointSaveError(f"{partial}: the shards {sorted(missing)[:4]} of rank(s) {ranks} are not there "
                                      f"(those ranks wrote them into another directory): not committed")
        (partial / COMPLETE).write_text(json.dumps({"step": step, "world_size": world, "files": files}, indent=1))
        if final.exists():  # an older copy of the same step (e.g. rerun after a crash): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = root / "latest.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, root / "latest")
        _prune(root, keep_last, keep_every, committed=step)
        log.info("committed checkpoint %s (%d files, %.1f MB)", final, len(files),
                 sum(v["size"] for v in files.values()) / 1e6)
    dist.barrier()
    CHECKSUMS.start(final, rank, sorted(mine))


def _not_there(partial: Path, names: set[str]) -> set[str]:
    """Of files the ranks listed and rank 0's listing of `partial` lacks, those still not there after PROBE_WAIT_S
    seconds (another node's newly closed file can lag in a directory listing on NFS; its own name is looked up)."""
    deadline = time.monotonic() + PROBE_WAIT_S
    while names:
        names = {n for n in names if not (partial / n).is_file()}
        if not names or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return names


def _prune(root: Path, keep_last: int, keep_every: int = 0, *, committed: int) -> None:
    """Keeps the checkpoint just committed (step `committed`) and the newest `keep_last - 1` complete ones before
    it, plus every step that is a multiple of `keep_every`; removes the other older ones.

    Only checkpoints whose files verify count as kept: a newer one that is torn or corrupted (the reason a run
    resumed from an older one and now saves below it) is no checkpoint to resume from, and counting it deleted
    the good ones, the one just saved among them. Checkpoints after `committed` are left as they are: the run
    replaces each as it saves that step again."""
    older = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))
                    and int(m.group(1)) < committed and (p / COMPLETE).is_file()), reverse=True)
    kept = [step for step, p in older if _verify(p)[0]][:max(keep_last - 1, 0)]
    for step, p in older:
        if step in kept or keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ref: CheckpointRef, model_chunks, optimizer, *, dp_cp_group, load_optimizer: bool = True,
                    load_rng: bool = True, extra: dict | None = None) -> dict:
    """Collective. Loads model (and optimizer / RNG) in place; returns the common state. `extra`: more
    ShardedTensors (e.g. the vision tower's, train/vision.py), loaded into their tensors in place."""
    rank, world = dist.get_rank(), dist.get_world_size()
    fmt = dist_checkpointing.load_common_state_dict(str(ref.path))["common"].get("optimizer_format",
                                                                                 "fully_reshardable")
    sd = _sharded_state(model_chunks, optimizer, is_loading=True, with_optimizer=load_optimizer, rank=rank, world=world,
                        dp_cp_group=dp_cp_group, optimizer_format=fmt, extra=extra)
    targets = {k: sh.data for k, sh in (extra or {}).items()}  # load() replaces the entries in place
    if not load_rng:
        sd.pop("rng_state")
    state = dist_checkpointing.load(sd, str(ref.path))
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(state["model" if len(model_chunks) == 1 else f"model{i}"], strict=True)
    if load_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    if load_rng:
        set_rng_state(state["rng_state"])
    for k, target in targets.items():
        target.copy_(state["extra"][k])
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


def saved_shapes(ref: CheckpointRef) -> dict[str, tuple]:
    """The global shape of every tensor `ref` holds, by checkpoint key (its metadata only; no process group)."""
    return {k: tuple(getattr(v, "global_shape", ())) for k, v in
            dist_checkpointing.load_tensors_metadata(str(ref.path)).items()}


def load_extra_weights(ref: CheckpointRef, sharded: dict) -> list[str]:
    """Collective. Loads the ShardedTensors of `sharded` (e.g. the vision tower's) that `ref` holds into their
    tensors in place; returns the keys it does not hold (those keep their values)."""
    available = set(dist_checkpointing.load_tensors_metadata(str(ref.path)).keys())
    present = {k: sh for k, sh in sharded.items() if sh.key in available}
    targets = {k: sh.data for k, sh in present.items()}
    if present:
        state = dist_checkpointing.load(present, str(ref.path))
        for k, target in targets.items():
            target.copy_(state[k])
    return sorted(sh.key for k, sh in sharded.items() if k not in present)


def check_resume_point(cfg, layout, ref: CheckpointRef, common: dict) -> None:
    """train/launch.check_resume's judgement of one checkpoint `ref` whose common state is
    `common` ({} where it cannot be read: nothing to judge): its model is this launch's, its stage's train.trainable
    this launch's, its optimizer state loads at `layout`, and the batches the run takes from its position split at
    `layout` (train.batch_rampup's, still to come there: train/config.check_batches) (ValueError naming what
    differs)."""
    from dataclasses import asdict

    from train.config import (MODEL_KEYS_FREE_ON_RESUME, Config, check_batches, config_changes,
                              saved_consumed_samples)

    saved = common.get("config") or {}     # absent from checkpoints written before they recorded it: not checked
    # a setting added to the schema since the checkpoint, at its default here, is the model it trained (the
    # trainer's resume log reads the same rule)
    changed = [c for c in config_changes(saved["model"], asdict(cfg.model), defaults=asdict(Config())["model"])
               if c[0] not in MODEL_KEYS_FREE_ON_RESUME] if "model" in saved else []
    if changed:
        scoring = cfg.train.eval.only   # an eval-only launch scores the run directory's checkpoints with its model
        raise ValueError(
            f"run_dir={cfg.resolved_run_dir()} holds a checkpoint (step {ref.step}, {ref.path}) of another model, and "
            + ("train.eval.only scores a run directory's checkpoints with the model they trained: " if scoring else
               "a run directory with a checkpoint is resumed: ")
            + "; ".join(f"model.{k} is {a!r} there, {b!r} here" for k, a, b in changed)
            + (". Score it with its own model settings" if scoring else
               ". Resume it with its own model settings, or give this model another run_dir "
               f"(train.checkpoint.init_from={cfg.resolved_run_dir()} starts a new run from those weights, as the "
               "stage recipes do)"))
    trained = (saved.get("train") or {}).get("trainable")
    if trained is not None and trained != cfg.train.trainable and not cfg.train.eval.only:
        # its optimizer state holds the parameters that stage trained: megatron's load failed after the build, on
        # every rank (KeyError naming an optimizer entry for indexer -> all), or would start the others' moments at 0
        raise ValueError(
            f"run_dir={cfg.resolved_run_dir()} holds a checkpoint (step {ref.step}, {ref.path}) of a stage with "
            f"train.trainable={trained}, and this launch has train.trainable={cfg.train.trainable}: a checkpoint's "
            f"optimizer state holds the parameters its stage trained, so a run directory is resumed with its own "
            f"train.trainable. Start the next stage in another run_dir with "
            f"train.checkpoint.init_from={cfg.resolved_run_dir()} (as the stage recipes do), or resume this one with "
            f"train.trainable={trained}")
    if "layout" in common and not cfg.train.eval.only:  # a layout its optimizer state cannot load at, before the build
        check_resumable(common, layout_record(layout), ref.path)
    if "step" in common:   # the launcher judged the newest checkpoint's position; the trainer may resume an older one
        check_batches(cfg, layout, step=int(common["step"]),
                      consumed_samples=saved_consumed_samples(common, common.get("config")))
