"""train.grad_clip=0 is no clipping, for the language model (megatron's optimizer) and the vision tower
(train/vision.clip_grads) alike.

Reference: the same run with a bound no gradient reaches (1e9): every loss, the LM's logged gradient norm and
every parameter (the vision tower's among them) the same, bit for bit; neither side scales a gradient, and both
compute the norm (megatron's chained optimizer, which every model here gets, computes it whatever the bound).
Before, the vision tower's gradients were scaled to 0 (torch's clip_grad_norm_ with max_norm 0), so its weights
moved by AdamW's weight decay alone.
"""
import pytest

from tests.launch_util import run_layouts_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data.video_stream import ensure_synthetic_shards

    shards = ensure_synthetic_shards(tmp_path_factory.mktemp("videos"), 8, 1234, rank=0)
    vl = ["recipe=keye_tiny", "train.steps=3", "train.warmup_steps=1", "train.global_batch_size=4",
          "train.checkpoint.enabled=false", "data.synthetic_videos=8", f"data.video.shards={shards}"]
    # vl_clipped is read at step 2 alone: it stops there (train.stop_after; the schedule of train.steps=3 unchanged)
    return run_layouts_all(2, {"vl_off": vl + ["train.grad_clip=0"], "vl_unreached": vl + ["train.grad_clip=1e9"],
                               "vl_clipped": vl + ["train.grad_clip=0.01", "train.stop_after=2"]},
                           tmp_path_factory.mktemp("clip"))


def test_a_clip_of_zero_is_no_clip(runs):
    losses, norms, digests = runs["losses"], runs["grad_norms"], runs["digests"]
    assert losses["vl_off"] == losses["vl_unreached"] and sorted(losses["vl_off"]) == [1, 2, 3]
    assert norms["vl_off"] == norms["vl_unreached"] and all(n > 0.01 for n in norms["vl_off"].values()), norms
    assert digests["vl_off"] == digests["vl_unreached"]
    assert any(k.startswith("vision.") for k in digests["vl_off"])
    # a bound the gradients pass does clip: another curve (the check above could not pass by clipping nothing)
    assert losses["vl_clipped"][2] != losses["vl_off"][2]
