"""The README's main job: `torchrun --nproc_per_node 2 launch/pretrain.py recipe=keye_tiny` trains on the
synthetic stream, the loss falls, and a sharded checkpoint is committed. Shortened to 30 steps."""

import json

import pytest

from tests.launch_util import run_pretrain

pytestmark = pytest.mark.slow


def test_tiny_recipe_trains_and_checkpoints(tmp_path):
    proc = run_pretrain(2, ["recipe=keye_tiny", "train.steps=30", "train.warmup_steps=5",
                            "train.checkpoint.save_interval=15"], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert len(records) == 30
    # ln(512) = 6.24 at initialisation; the sparse Markov chain's entropy is ~1.2 nats.
    assert first > 6.0 and last < 3.5, (first, last)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000015", "step_000030"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000030"
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "logs" / "rank1.log").exists()
    assert "tok/s" in proc.stdout and "MFU" in proc.stdout
