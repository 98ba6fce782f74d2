"""The README's main job: `torchrun --nproc_per_node 2 launch/pretrain.py recipe=keye_tiny` trains the
tiny multimodal model (ViT + projector + MoE LM) end to end on synthetic videos the run makes itself,
the loss falls, sharded checkpoints are committed, and a stopped run resumes bit-identically
(model, ViT, both optimizers, RNG and the video loader's position), keeping the stopped launch's config.
Shortened to 10 steps."""

import json

import pytest
import yaml

from tests.launch_util import losses, run_launch, run_pretrain

pytestmark = pytest.mark.slow

COMMON = ["recipe=keye_tiny", "train.steps=10", "train.warmup_steps=2", "train.checkpoint.save_interval=5"]


def test_tiny_multimodal_recipe_trains_checkpoints_and_resumes(tmp_path):
    full = tmp_path / "full"
    proc = run_pretrain(2, COMMON, full)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 10
    first, last = records[0]["loss"], records[-1]["loss"]
    # ln(512) = 6.24 at initialisation; captions and timestamps are byte text with a lot of structure
    assert first > 5.8 and last < first - 1.0, (first, last)
    # the loss of each kind of document (train/loss_groups.py), summed over both data-parallel ranks in the step's
    # one all-reduce: the synthetic videos are the only kind, so it is the step's loss (each micro-batch's sum is
    # float32 there, float64 here: 1e-6), and with one kind the step line does not show it
    for r in records:
        assert r["loss_kind/video"] == pytest.approx(r["loss"], rel=1e-6) and r["loss_kind_tokens/video"] > 0, r
        assert not any(k.startswith(("loss_src", "loss_kind/image", "loss_kind/text")) for k in r), r
    assert "| kind " not in proc.stdout
    assert "vision tower" in proc.stdout + proc.stderr or "vision tower" in (full / "logs" / "rank0.log").read_text()
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000005", "step_000010"]
    assert (full / "config.yaml").exists() and (full / "logs" / "rank1.log").exists()
    assert "tok/s" in proc.stdout and "MFU" in proc.stdout

    # The resumed run reads the full run's shards. Encoding the synthetic videos again is not bit-identical
    # on every run (one full-suite run wrote 323,858 instead of 324,040 bytes of video, and its step-1 loss
    # differed by 4e-6; data/video/synthetic.py), and what this test checks is resumption, not the encoder. The
    # stopped and the resumed launch fork their ranks (tests/launch_util.run_launch: the same trainer, without
    # torchrun's ~20 CPU-seconds of imports per launch); the curve they must repeat is the torchrun launch's.
    resumed = tmp_path / "resumed"
    made = sorted(full.glob("synthetic_videos_*"))
    assert [p.name for p in made] == ["synthetic_videos_24_seed1234"], made     # the recipe's data
    shared = [f"data.video.shards={made[0] / 'shards'}"]
    run_launch(2, COMMON + shared + ["train.stop_after=5"], resumed)
    run_launch(2, COMMON + shared, resumed)
    assert "resumed from" in (resumed / "logs" / "rank0.log").read_text()
    assert losses(resumed) == losses(full), "a stopped and resumed multimodal run must repeat the curve exactly"
    # the stopped launch's config is kept beside the resumed one's, which differs from it in stop_after only
    before = yaml.safe_load((resumed / "config_history" / "until_step_000005.yaml").read_text())
    now = yaml.safe_load((resumed / "config.yaml").read_text())
    assert before["train"]["stop_after"] == 5 and now["train"]["stop_after"] != 5
    assert {**before, "train": {**before["train"], "stop_after": now["train"]["stop_after"]}} == now
    assert not (full / "config_history").exists()  # one launch, nothing to keep
    assert (resumed / "logs" / "rank0.log").read_text().count("code version") == 2  # each launch's, in the log
