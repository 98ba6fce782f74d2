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
