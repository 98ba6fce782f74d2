"""A training run whose video data ends (data.video.num_epochs) before train.steps stops with a config error naming
the setting and the step, on every rank, instead of a bare StopIteration traceback."""

import json

import pytest

from tests.launch_util import run_pretrain

pytestmark = pytest.mark.slow


def test_training_data_that_ends_before_the_last_step_is_named(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_pretrain(2, ["recipe=keye_tiny", "data.video.num_epochs=1", "train.steps=40",
                            "train.checkpoint.enabled=false"], run_dir, check=False, timeout=600)
    out = proc.stdout + proc.stderr
    # the steps trained before the data ended, as metrics.jsonl recorded them: the error names the next one
    trained = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert trained == list(range(1, len(trained) + 1)) and 0 < len(trained) < 40, trained
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, out[-4000:]   # torchrun's report of the ranks
    assert (f"config error: data.video.num_epochs=1: the training data ended in step {len(trained) + 1} of "
            f"train.steps=40") in proc.stderr, out[-4000:]
    assert "StopIteration" not in out
