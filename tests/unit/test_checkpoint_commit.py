"""Which checkpoint a resume picks: the newest complete and verified one, never a torn save."""

import json

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
