"""Which checkpoint a resume picks: the newest complete and verified one, never a torn save."""

import json
import shutil
from pathlib import Path

from train.checkpoint import COMPLETE, find_latest


def make(root, step, *, complete=True, files=None, suffix=""):
    d = root / "checkpoints" / f"step_{step:06d}{suffix}"
    d.mkdir(parents=True)
    files = files or {"__0_0.distcp": b"x" * 10, ".metadata": b"m"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    if complete:
        (d / COMPLETE).write_text(json.dumps({"step": step, "files": {k: len(v) for k, v in files.items()}}))
    return d


def test_no_checkpoint(tmp_path):
    assert find_latest(tmp_path) is None


def test_newest_complete_wins(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20)
    assert find_latest(tmp_path).step == 20


def test_partial_and_unmarked_saves_are_skipped(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 30, complete=False, suffix=".partial")
    make(tmp_path, 20, complete=False)
    assert find_latest(tmp_path).step == 10


def test_truncated_or_missing_shard_is_detected(tmp_path):
    make(tmp_path, 10)
    d = make(tmp_path, 20)
    (d / "__0_0.distcp").write_bytes(b"x" * 3)
    assert find_latest(tmp_path).step == 10
    d30 = make(tmp_path, 30)
    (d30 / ".metadata").unlink()
    assert find_latest(tmp_path).step == 10


def test_chunk_checksums_match_zlib_per_slice(tmp_path):
    import random
    import zlib

    from train.checkpoint import chunk_crc32s

    data = random.Random(0).randbytes(10_000)
    f = tmp_path / "shard"
    f.write_bytes(data)
    want = [f"{zlib.crc32(data[i:i + 3000]):08x}" for i in range(0, len(data), 3000)]
    assert chunk_crc32s(f, 3000, threads=3) == want  # 4 chunks, the last one short
    assert chunk_crc32s(f, 1 << 20) == [f"{zlib.crc32(data):08x}"]


def test_dp_reshardable_refuses_a_model_parallel_change_with_a_way_out(tmp_path):
    import pytest

    from train.checkpoint import check_resumable

    lay = {"tp": 2, "pp": 1, "vpp": 1, "ep": 2, "etp": 1, "cp": 1, "dp": 2, "world_size": 4}
    saved = {"layout": lay, "optimizer_format": "dp_reshardable"}
    check_resumable(saved, {**lay, "dp": 4, "world_size": 8}, tmp_path)  # DP may change
    with pytest.raises(ValueError, match=r"tp 2->1, ep 2->1.*optimizer_format=fully_reshardable"):
        check_resumable(saved, {**lay, "tp": 1, "ep": 1}, tmp_path)
    check_resumable({**saved, "optimizer_format": "fully_reshardable"}, {**lay, "tp": 1, "ep": 1}, tmp_path)


def test_dp_reshardable_resumes_at_another_context_parallel_size(tmp_path):
    """The distributed optimizer shards its flat buffers over DP x CP (megatron's dp_cp group) and CP ranks hold the
    same parameters, so a dp_reshardable state loads at another cp as at another dp. The check refused it ("this run
    changes cp 2->1"): a CP2 long-context run resumed at CP1 needed a conversion launch first. By hand, the tiny LM
    (text_tiny, constant lr) stopped at step 4 at CP2 and resumed at CP1, and the other way round, trained steps 5-8
    within 3e-8 relative of an uninterrupted CP1 run (tests/dist/test_resume.py resumes one at CP2)."""
    import pytest

    from train.checkpoint import check_resumable

    lay = {"tp": 2, "pp": 1, "vpp": 1, "ep": 2, "etp": 1, "cp": 2, "dp": 1, "world_size": 4}
    saved = {"layout": lay, "optimizer_format": "dp_reshardable"}
    check_resumable(saved, {**lay, "cp": 1, "dp": 2}, tmp_path)   # the same world, its CP ranks now DP ranks
    check_resumable(saved, {**lay, "cp": 1, "world_size": 2}, tmp_path)
    check_resumable(saved, {**lay, "cp": 4, "world_size": 8}, tmp_path)
    with pytest.raises(ValueError, match=r"at tp=2 pp=1 vpp=1 ep=2 etp=1; this run changes tp 2->1\. "):
        check_resumable(saved, {**lay, "tp": 1, "cp": 4}, tmp_path)   # cp is not named among the changes


def test_retention_counts_only_checkpoints_that_verify_and_keeps_the_one_just_saved(tmp_path):
    """A run whose newest checkpoint (40) is torn resumes from 20 and saves 27 below it. The old rule counted 40
    among the `keep_last` newest and deleted 27 (and 20) with keep_last=1, leaving nothing to resume from."""
    from train.checkpoint import _prune

    root = tmp_path / "checkpoints"
    for keep_last, kept in ((1, [27]), (2, [20, 27])):
        for step in (10, 20, 27, 40):
            make(tmp_path, step, files={"__0_0.distcp": b"x" * 10} if step != 40 else None)
        (root / "step_000040" / "__0_0.distcp").write_bytes(b"x" * 3)     # torn after its commit
        make(tmp_path, 15, files={"__0_0.distcp": b"x" * 10})
        (root / "step_000015" / "__0_0.distcp").unlink()                   # an older broken one goes too
        _prune(root, keep_last, committed=27)
        left = sorted(int(p.name[5:]) for p in root.iterdir())
        assert left == kept + [40], (keep_last, left)                      # the newer one is not ours to judge
        assert find_latest(tmp_path).step == 27
        for p in root.iterdir():
            shutil.rmtree(p)
    for step in (4, 8, 12, 16):
        make(tmp_path, step)
    _prune(root, 1, keep_every=8, committed=16)
    assert sorted(int(p.name[5:]) for p in root.iterdir()) == [8, 16]


def test_a_checkpoint_a_resume_found_corrupted_is_no_checkpoint_to_retention(tmp_path):
    """A resume that found its newest checkpoint (20) corrupted (same sizes, a CRC32 that differs) resumed from 10 and
    saved 30; retention with keep_last=2 judged 20 by its sizes alone, kept it and removed 10: the run was left one
    good checkpoint. The resume now marks 20 (DAMAGED.json, naming its files), so retention keeps 10 and 30, and later
    checks skip 20 without reading it again."""
    import datetime

    import torch.distributed as dist

    from train.checkpoint import DAMAGED, _prune, chunk_crc32s, find_resume_point

    for step in (10, 20):
        d = make(tmp_path, step)
        records = {n: {"chunk_bytes": 4, "crc32": chunk_crc32s(d / n, 4)} for n in ("__0_0.distcp", ".metadata")}
        (d / "CHECKSUMS.rank0.json").write_text(json.dumps({"files": records}))
    (d / "__0_0.distcp").write_bytes(b"x" * 5 + b"z" + b"x" * 4)          # step 20: same size, one byte changed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert find_resume_point(tmp_path).step == 10
    finally:
        dist.destroy_process_group()
    assert "__0_0.distcp: CRC32 differs" in json.loads((d / DAMAGED).read_text())["corrupted"][0]
    problems = []
    assert find_latest(tmp_path, problems=problems).step == 10                 # sizes alone: 20 is marked
    assert problems == [f"step_000020: found corrupted by an earlier resume ({DAMAGED}, which names its files)"]
    make(tmp_path, 30)
    _prune(tmp_path / "checkpoints", 2, committed=30)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000010", "step_000030"]


def test_a_run_directory_whose_every_checkpoint_is_damaged_stops_instead_of_starting_over(tmp_path):
    """Torn saves alone (no COMPLETE.json) are a fresh run. Committed checkpoints that all fail their checks, by
    size or (checksums recorded at save time) by CRC32, stop the run with each one's reason; the old trainer
    started from random weights there, ignoring init_from, and its first save replaced the damaged files."""
    import datetime

    import pytest
    import torch.distributed as dist

    from train.checkpoint import CheckpointLoadError, chunk_crc32s, find_resume_point

    make(tmp_path, 30, complete=False, suffix=".partial")
    assert find_resume_point(tmp_path) is None
    d20 = make(tmp_path, 20)
    (d20 / "__0_0.distcp").write_bytes(b"x" * 3)
    with pytest.raises(CheckpointLoadError, match=r"every checkpoint in .*checkpoints is damaged.*step_000020: file "
                                                  r".*__0_0.distcp has 3 bytes, 10 were written"):
        find_resume_point(tmp_path)
    d10 = make(tmp_path, 10, files={"__0_0.distcp": b"y" * 10, ".metadata": b"m"})
    records = {n: {"chunk_bytes": 4, "crc32": chunk_crc32s(d10 / n, 4)} for n in ("__0_0.distcp", ".metadata")}
    (d10 / "CHECKSUMS.rank0.json").write_text(json.dumps({"files": records}))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert find_resume_point(tmp_path).step == 10                     # its checksums agree
        (d10 / "__0_0.distcp").write_bytes(b"y" * 5 + b"z" + b"y" * 4)     # same size, one byte changed
        with pytest.raises(CheckpointLoadError, match=r"step_000020: file .*; step_000010: .*__0_0.distcp: CRC32 "
                                                      r"differs"):
            find_resume_point(tmp_path)
    finally:
        dist.destroy_process_group()


def test_one_training_launch_per_run_directory_and_torn_saves_go(tmp_path):
    """A second launch in a run directory while one trains there would write its checkpoints and logs among the
    first's; it stops naming the holder (here: another process holds the lock). The process that holds it may build
    trainers there again. A launch removes the torn saves (`.partial`) of the ones before it, and nothing else."""
    import subprocess
    import sys

    import pytest

    from train.checkpoint import RunDirInUse, lock_run_dir, remove_torn_saves

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                               "from train.checkpoint import lock_run_dir; lock_run_dir(sys.argv[2]); print('held', "
                               "flush=True); sys.stdin.read()", str(Path(__file__).resolve().parents[2]), str(run)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=rf"run_dir={run} is in use by a launch that is still running \(pid "
                                              rf"{holder.pid} on .*give this launch another run_dir\. Where that "
                                              rf"process is gone \(its node died: .*\), remove {run / '.lock'}$"):
            lock_run_dir(run)
    finally:
        holder.communicate("", timeout=60)                 # it ends: the lock goes with it
    lock_run_dir(run)
    lock_run_dir(run)                                      # this process again: allowed
    make(tmp_path / "run", 4)
    make(tmp_path / "run", 6, complete=False, suffix=".partial")
    make(tmp_path / "run", 2, complete=False, suffix=".partial")
    assert remove_torn_saves(run) == ["step_000002.partial", "step_000006.partial"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004"]
    assert remove_torn_saves(tmp_path / "fresh") == []


def test_a_save_failure_reported_on_rank_0_alone_is_worded_as_such_on_the_others(tmp_path):
    """An asynchronous save whose write fails raises on every rank, its errors on rank 0 alone (megatron's finalize
    gathers them there); another rank's message read 'failed (CheckpointException ranks:dict_keys([]); ...', which
    says nothing. It now points at rank 0's; rank 0's still names the errors."""
    from torch.distributed.checkpoint.api import CheckpointException

    from train.checkpoint import save_failure_message

    partial = tmp_path / "checkpoints" / "step_000004.partial"
    partial.parent.mkdir()
    other = save_failure_message(4, partial, CheckpointException("write", {}))
    assert "dict_keys" not in other and "its errors, every rank's, are reported by rank 0" in other, other
    error = OSError(28, "No space left on device")
    rank0 = save_failure_message(4, partial, CheckpointException("write", {1: (error, [])}))
    assert "No space left on device" in rank0 and "reported by rank 0" not in rank0, rank0


def test_a_load_failure_of_several_lines_keeps_its_cause():
    """A failed load is logged and named in `checkpoint error` as one line per cause. megatron's message for a parameter
    the optimizer cannot find prints the tensor in its middle: its first line alone was all a resume said
    ('ValueError: Model param Parameter containing:'); its last line, which names the cause, is kept too."""
    import torch

    from train.checkpoint import load_failure

    e = ValueError(f"Model param {torch.nn.Parameter(torch.zeros(6, 6))} not in model_sharded_state_dict. Hint: ...")
    assert load_failure(e) == ("ValueError: Model param Parameter containing: ... [0., 0., 0., 0., 0., 0.]], "
                               "requires_grad=True) not in model_sharded_state_dict. Hint: ...")
    assert load_failure(KeyError("step")) == "KeyError: 'step'"    # a message of one line stays as it was


def test_a_commit_whose_listed_shards_are_not_in_its_directory_is_refused(tmp_path, monkeypatch):
    """Rank 1 saved into another run directory (ranks given other run_dir values): rank 0 committed a checkpoint
    whose COMPLETE.json listed rank 1's shards, which its directory did not hold, and every resume stopped on it.
    The commit now refuses, naming the shards and their rank; nothing is committed. In one process, rank 1 stood in
    for by the gather (its part lists its shard). Reference: the same commit with that shard present commits."""
    import types

    import pytest

    from train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    partial = root / "step_000002.partial"
    partial.mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes(b"x" * 10)
    (partial / ".metadata").write_bytes(b"m")

    def all_gather_object(out, obj, group=None):
        out[:] = [obj, {"__1_0.distcp": {"size": 10}}]

    fake = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 2, all_gather_object=all_gather_object,
                                 barrier=lambda: None)
    monkeypatch.setattr(ckpt, "dist", fake)
    monkeypatch.setattr(ckpt, "PROBE_WAIT_S", 0.0)
    monkeypatch.setattr(ckpt.CHECKSUMS, "start", lambda *a: None)
    with pytest.raises(ckpt.CheckpointSaveError, match=r"step_000002\.partial: the shards \['__1_0\.distcp'\] of "
                                                        r"rank\(s\) \[1\] are not there .*not committed"):
        ckpt._commit(root, partial, root / "step_000002", 2, keep_last=2, keep_every=0)
    assert not (root / "step_000002").exists() and not (partial / COMPLETE).exists()
    (partial / "__1_0.distcp").write_bytes(b"y" * 10)
    ckpt._commit(root, partial, root / "step_000002", 2, keep_last=2, keep_every=0)
    assert sorted(json.loads((root / "step_000002" / COMPLETE).read_text())["files"]) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
