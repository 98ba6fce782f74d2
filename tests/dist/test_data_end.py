"""A training run whose video data ends (data.video.num_epochs) before train.steps stops with a config error naming
the setting and the step, on every rank, instead of a bare StopIteration traceback; with checkpoints on, the steps
trained since the last checkpoint are saved first (at the data position of the last step trained), also when the
ranks' data ends in different steps (KEYE_FAULT=data_end_in_step), which must not leave a rank waiting for ever."""

import json

import pytest

from tests.launch_util import run_launch
from train import checkpoint as ckpt

pytestmark = pytest.mark.slow

# keye_tiny: global batch 4, micro-batch 1, 2 data-parallel ranks: each rank draws 2 packs a step
PACKS_PER_STEP_PER_RANK = 2
# the run's own synthetic videos, 12 where the recipe makes 24: one pack each, so the one epoch ends in step 4 where
# it ended in step 7 (the same ending, three steps sooner)
FEWER_VIDEOS = "data.synthetic_videos=12"


def _trained(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_data_that_ends_before_the_last_step_is_named(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_launch(2, ["recipe=keye_tiny", "data.video.num_epochs=1", "train.steps=40",
                          "train.checkpoint.enabled=false", FEWER_VIDEOS], run_dir, check=False, timeout=600)
    out = proc.stdout + proc.stderr
    # the steps trained before the data ended, as metrics.jsonl recorded them: the error names the next one
    trained = _trained(run_dir)
    assert trained == list(range(1, len(trained) + 1)) and 0 < len(trained) < 40, trained
    assert proc.returncode == 2, out[-4000:]   # a config error's exit code (train/launch.py)
    assert (f"config error: data.video.num_epochs=1: the training data ended in step {len(trained) + 1} of "
            f"train.steps=40") in proc.stderr, out[-4000:]
    assert "checkpoints are off (train.checkpoint.enabled=false): the steps trained are not saved" in proc.stderr
    assert "StopIteration" not in out


def test_training_data_that_ends_saves_the_steps_trained(tmp_path):
    """train.save_interval=20 of keye_tiny is past the step the data ends in: without the save at the end, the
    steps trained would be lost."""
    run_dir = tmp_path / "run"
    proc = run_launch(2, ["recipe=keye_tiny", "data.video.num_epochs=1", "train.steps=40",
                          "train.checkpoint.save_interval=20", FEWER_VIDEOS], run_dir, check=False, timeout=600)
    out = proc.stdout + proc.stderr
    trained = _trained(run_dir)
    n = len(trained)
    assert 0 < n < 20 and proc.returncode == 2, (trained, out[-4000:])
    ref = ckpt.find_latest(run_dir)
    assert ref is not None and ref.step == n, (ref, out[-4000:])
    assert (f"the training data ended in step {n + 1} of train.steps=40, its 1 epoch(s) holding fewer global "
            f"batches than the run's steps (no weight was updated in that step); the steps trained are saved: "
            f"checkpoint {ref.path} (step {n})") in proc.stderr, out[-4000:]
    common = ckpt.saved_common(ref)
    assert common["step"] == n and common["data"]["consumed"] == n * PACKS_PER_STEP_PER_RANK, common["data"]


def test_ranks_whose_data_ends_in_different_steps_stop_together(tmp_path):
    """Rank 1's data ends in step 3, rank 0's goes on: both stop in step 3 (a rank left in the step's collectives
    would wait until the run's timeout), and the checkpoint of step 2 holds rank 0's data position of step 2's end,
    not that after the packs it drew for step 3."""
    run_dir = tmp_path / "run"
    proc = run_launch(2, ["recipe=keye_tiny", "data.video.num_epochs=1", "train.steps=40"], run_dir,
                      check=False, timeout=300, env={"KEYE_FAULT": "data_end_in_step:step=3:rank=1"})
    out = proc.stdout + proc.stderr
    assert _trained(run_dir) == [1, 2], out[-4000:]
    assert proc.returncode == 2, out[-4000:]
    assert "(on rank 1; the other ranks' had data left)" in proc.stderr, out[-4000:]
    ref = ckpt.find_latest(run_dir)
    assert ref is not None and ref.step == 2, out[-4000:]
    common = ckpt.saved_common(ref)
    assert common["data"]["consumed"] == 2 * PACKS_PER_STEP_PER_RANK, common["data"]
    assert [c["stats"]["packs"] for c in common["data_counters"]] == [4, 4], common["data_counters"]
