"""A config error the launcher finds before any process group exists is printed once (by each node's local rank 0),
not once per rank: a resume at a layout the checkpoint's optimizer state cannot load at printed its paragraph once
for every rank of the launch (eight times over on an 8-GPU node). Every rank still exits 2.

The launches fork their ranks (tests/launch_util.run_launch: train.launch.run on each rank, with torchrun's
environment, RANK / LOCAL_RANK / WORLD_SIZE and a rendezvous store): what is printed, and by which rank, is the
launcher's; the ranks' output is read together as torchrun's console shows it, and the exit code is the ranks'
(torchrun's report of it, "exitcode  : 2", read before)."""

import pytest

from tests.launch_util import run_launch

pytestmark = pytest.mark.slow


def test_a_resume_layout_error_is_printed_once(tmp_path):
    run_dir = tmp_path / "run"
    run_launch(2, ["recipe=keye_tiny_lm", "train.steps=2"], run_dir, timeout=300)   # a checkpoint at EP2 (forked)
    proc = run_launch(2, ["recipe=keye_tiny_lm", "train.steps=3", "parallel.ep=1"], run_dir, check=False,
                      timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(errors) == 1, errors
    assert "stores the optimizer as dp_reshardable at tp=1 pp=1 vpp=1 ep=2" in errors[0], errors
    assert "this run changes ep 2->1" in errors[0], errors


def test_an_error_found_after_the_process_groups_exist_is_printed_once(tmp_path):
    """Errors the ranks meet alike once the process groups exist (here a held-out video set with nothing to plan, found
    by every rank as it starts) were printed by every rank, the same paragraph once per rank. Rank 0 prints it; rank 1,
    whose message is the same, prints a one-line pointer naming its log, which keeps the message."""
    from data.video.shards import ShardWriter
    from data.video_stream import ensure_synthetic_shards

    videos = ensure_synthetic_shards(tmp_path / "videos", 8, 1234, rank=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    w = ShardWriter(bad, 0)
    w.add_text_sample("unanswered", {"kind": "text", "video": None, "annotation": {"qa": [{"question": "no answer"}]}})
    w.close()
    run_dir = tmp_path / "run"
    proc = run_launch(2, ["recipe=keye_tiny", "train.steps=2", "train.checkpoint.enabled=false",
                          f"data.video.shards={videos}", f"data.video.eval_shards={bad}", "train.eval.interval=1"],
                      run_dir, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error")]
    message = "config error: video loader: data.video.eval_shards: none of the 1 samples can be planned"
    assert len(errors) == 2 and errors[0].startswith(message), errors
    assert errors[1] == (f"config error on rank 1: the same as rank 0's, printed once by rank 0 (and in "
                         f"{run_dir / 'logs' / 'rank1.log'})"), errors
    assert message.removeprefix("config error: ") in (run_dir / "logs" / "rank1.log").read_text()


def test_a_broken_shard_index_is_a_data_error_printed_once(tmp_path):
    """A training shard's index cut to 0 bytes (an interrupted copy) ended every rank with a traceback whose last line,
    `JSONDecodeError: Expecting value: line 1 column 1 (char 0)`, named no file. Now a `data error` naming the index,
    printed once, exit 2 (tests/data/test_shard_index_errors.py: each way an index can be wrong)."""
    from data.video_stream import ensure_synthetic_shards

    videos = ensure_synthetic_shards(tmp_path / "videos", 8, 1234, rank=0)
    index = sorted(videos.glob("*.idx.json"))[0]
    index.write_text("")
    run_dir = tmp_path / "run"
    proc = run_launch(2, ["recipe=keye_tiny", "train.steps=2", "train.checkpoint.enabled=false",
                          f"data.video.shards={videos}"], run_dir, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("data error")]
    assert len(errors) == 2 and errors[0].startswith(
        f"data error: VideoDataConfig.shards: shard index {index}: not JSON (Expecting value"), errors
    assert errors[1].startswith("data error on rank 1: the same as rank 0's"), errors
    assert "Traceback" not in proc.stderr
