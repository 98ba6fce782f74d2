"""train.batch_rampup: the global batch grows from `start` to train.global_batch_size over the first `samples` packed
sequences (train/config.py TrainConfig.batch_size_at), by the micro-batches per step.

References: the schedule against megatron's formula written out with exact fractions; a ramped run's steps against a
run ramped by hand (one launch per global batch, each resuming the last at the batch the ramp gives that step: a
resume at another train.global_batch_size takes the next samples, data/sample_position.py); a resume mid-ramp
against the uninterrupted run. The trainers run in this process (a gloo world of one rank) on the tiny MoE LM."""

import json
import math
from fractions import Fraction

import pytest
import torch

from tests.launch_util import one_rank_world
from train.config import BatchRampupConfig, TrainConfig

RAMP = ["train.global_batch_size=8", "train.batch_rampup.start=4", "train.batch_rampup.increment=4",
        "train.batch_rampup.samples=4"]
RAMP_LOG = ("train.batch_rampup: the global batch grows", "train.batch_rampup: over")   # the launch's line on the ramp
# global batch 4 (0 sequences consumed), then 8 (4 consumed: 4 x 1 // 4 = 1 increment, the ramp's last)
BATCHES = [4, 8, 8]


def _reference_batch(c: int, start: int, inc: int, samples: int, gbs: int) -> int:
    """megatron's RampupBatchsizeNumMicroBatchesCalculator.update as its docstring states it, in exact fractions."""
    if c > samples:
        return gbs
    per_increment = Fraction(samples, (gbs - start) // inc)
    return start + math.floor(Fraction(c) / per_increment) * inc


@pytest.mark.parametrize("start,inc,samples,gbs", [(4, 4, 12, 16), (3072, 3072, 469_000_000_000 // 4096, 15360),
                                                  (2, 2, 7, 10), (1, 3, 1, 7)])
def test_the_schedule_is_megatrons_formula(start, inc, samples, gbs):
    t = TrainConfig(global_batch_size=gbs, micro_batch_size=1,
                    batch_rampup=BatchRampupConfig(start=start, increment=inc, samples=samples))
    points = sorted({0, 1, samples - 1, samples, samples + 1, *range(0, samples + 2, max(1, samples // 997))})
    assert [t.batch_size_at(c) for c in points] == [_reference_batch(c, start, inc, samples, gbs) for c in points]
    assert t.batch_sizes() == list(range(start, gbs + 1, inc))
    assert TrainConfig(global_batch_size=gbs).batch_size_at(0) == gbs   # off: the configured batch


def test_the_ramps_steps_and_a_ramp_that_outlasts_the_run():
    """rampup_steps: the steps whose batch is below train.global_batch_size, against a loop over the reference
    formula (DeepSeek-V3's ramp at 4K sequences: 19,414 steps). samples given in tokens, not sequences, outlasts a
    100,000-step run: a warning names the setting and the batch the run ends at."""
    def reference(start, inc, samples, gbs):
        steps, c = 0, 0
        while (b := _reference_batch(c, start, inc, samples, gbs)) < gbs:
            steps, c = steps + 1, c + b
        return steps

    for start, inc, samples, gbs in [(4, 4, 12, 16), (3072, 3072, 469_000_000_000 // 4096, 15360), (1, 3, 1, 7)]:
        t = TrainConfig(steps=100_000, global_batch_size=gbs, micro_batch_size=1,
                        batch_rampup=BatchRampupConfig(start=start, increment=inc, samples=samples))
        assert t.rampup_steps() == reference(start, inc, samples, gbs)
    assert t.rampup_steps() == 1 and reference(3072, 3072, 469_000_000_000 // 4096, 15360) == 19414
    with pytest.warns(UserWarning, match=r"^train\.batch_rampup\.samples \(469000000000\) outlasts the run: every "
                      r"one of its train\.steps=100000 steps takes a global batch below train\.global_batch_size "
                      r"\(15360\), the last 3072 \(samples counts packed sequences: tokens / train\.seq_length\)$"):
        TrainConfig(steps=100_000, global_batch_size=15360, micro_batch_size=1,
                    batch_rampup=BatchRampupConfig(start=3072, increment=3072, samples=469_000_000_000))


def _validate(*overrides, world_size=1, recipe="keye_tiny_lm"):
    from train.launch import compose_config, validate

    return validate(compose_config([f"recipe={recipe}", *overrides]), world_size=world_size)


@pytest.mark.parametrize("overrides,world_size,message", [
    (["parallel.ep=1", "train.batch_rampup.start=16", "train.batch_rampup.increment=4",
      "train.batch_rampup.samples=10"], 1,
     "train.batch_rampup.start (16) must be below train.global_batch_size (16), the batch it ramps up to"),
    (["parallel.ep=1", "train.batch_rampup.start=4", "train.batch_rampup.increment=8",
      "train.batch_rampup.samples=10"], 1,
     "train.batch_rampup.increment (8) must divide train.global_batch_size - train.batch_rampup.start (16 - 4 = 12)"),
    (["train.batch_rampup.start=4", "train.batch_rampup.samples=10"], 1,
     "train.batch_rampup.increment must be >= 1 with a ramp-up (train.batch_rampup.start 4), got 0"),
    (["parallel.ep=1", "train.batch_rampup.start=2", "train.batch_rampup.increment=2",
      "train.batch_rampup.samples=10"], 1,
     "train.batch_rampup.start (2) must be a multiple of train.micro_batch_size (4) x data-parallel size (1)"),
    (["parallel.ep=1", "train.batch_rampup.start=4", "train.batch_rampup.increment=4", "train.batch_rampup.samples=10"],
     2, "train.batch_rampup.start (4) must be a multiple of train.micro_batch_size (4) x data-parallel size (2)"),
    (["parallel.ep=1", "train.global_batch_size=24", "train.batch_rampup.start=4", "train.batch_rampup.increment=4",
      "train.batch_rampup.samples=10", "parallel.pp=2", "parallel.vpp=2", "model.lm.num_layers=4"], 2,
     "parallel.vpp (2) runs megatron's interleaved pipeline schedule, which takes micro-batches in groups of "
     "parallel.pp (2): the micro-batches per step and data-parallel rank (1 = train.batch_rampup's global batch 4 "
     "from step 1 / (train.micro_batch_size x 1)) must be a multiple of 2"),
])
def test_nonsense_settings_stop_the_launch_naming_them(overrides, world_size, message):
    with pytest.raises(ValueError) as e:
        _validate("train.micro_batch_size=4", *overrides, world_size=world_size)
    assert message in str(e.value)


def test_a_vit_group_that_does_not_divide_a_ramp_batch_stops_the_launch():
    with pytest.raises(ValueError) as e:
        _validate("train.global_batch_size=8", "parallel.vit.group=4", "train.batch_rampup.start=2",
                  "train.batch_rampup.increment=2", "train.batch_rampup.samples=10", world_size=2, recipe="keye_tiny")
    assert ("parallel.vit.group (4) must divide the micro-batches per step and data-parallel rank (1 = "
            "train.batch_rampup's global batch 2 from step 1 / (train.micro_batch_size x 2))") in str(e.value)


def test_the_ramps_checks_bind_only_the_batches_a_resumed_run_still_takes():
    """train/config.check_batches at a resumed run's position (its checkpoint's steps and sequences consumed), against
    the batches megatron's formula gives each step (_reference_batch). Past the ramp, a DeepSeek-V3-sized run raises
    train.global_batch_size to a batch off the ramp's grid (15360 -> 16384 with increment 3072) on twice the
    data-parallel ranks: nothing binds; mid-ramp the same change names the increment and the position. Under the
    interleaved schedule (pp 2), a ramp 1, 1, 2, 3, 4 (micro-batch 1, dp 1) resumed after step 3 is refused naming
    step 4's batch 3, and after step 4 (past the ramp) it goes on."""
    from types import SimpleNamespace

    from train.config import Config, check_batches

    def cfg(gbs, start, inc, samples, mbs=1):
        return Config(train=TrainConfig(steps=100_000, global_batch_size=gbs, micro_batch_size=mbs, warmup_steps=1,
                                        batch_rampup=BatchRampupConfig(start, inc, samples)))

    samples = 469_000_000_000 // 4096
    deepseek = cfg(16384, 3072, 3072, samples)   # refused as it was built before: increment must divide 13312
    steps, consumed = 0, 0
    while (b := _reference_batch(consumed, 3072, 3072, samples, 15360)) < 15360:
        steps, consumed = steps + 1, consumed + b
    check_batches(deepseek, SimpleNamespace(dp=1024, pp=1, vpp=1), step=steps, consumed_samples=consumed)
    with pytest.raises(ValueError, match=r"^train\.batch_rampup\.increment \(3072\) must divide train\."
                       r"global_batch_size - train\.batch_rampup\.start \(16384 - 3072 = 13312\) \(this run resumes "
                       rf"after step 10, 30720 of the ramp's train\.batch_rampup\.samples \({samples}\) sequences "
                       r"consumed\)$"):
        check_batches(deepseek, SimpleNamespace(dp=1024, pp=1, vpp=1), step=10, consumed_samples=30720)

    ramp, vpp = cfg(4, 1, 1, 6), SimpleNamespace(dp=1, pp=2, vpp=2)
    assert [_reference_batch(c, 1, 1, 6, 4) for c in (0, 1, 2, 4, 7)] == [1, 1, 2, 3, 4]
    assert ramp.train.batches_from() == [(1, 1), (3, 2), (4, 3), (5, 4)]
    with pytest.raises(ValueError, match=r"\(3 = train\.batch_rampup's global batch 3 from step 4 / \(train\."
                       r"micro_batch_size x 1\)\) must be a multiple of 2 \(this run resumes after step 3, 4 of the "
                       r"ramp's train\.batch_rampup\.samples \(6\) sequences consumed\)$"):
        check_batches(ramp, vpp, step=3, consumed_samples=4)
    check_batches(ramp, vpp, step=4, consumed_samples=7)


def test_the_memory_estimate_judges_the_largest_batch():
    """launch/memory.py (and the launcher's memory check) predicts the run's peak at train.global_batch_size's
    micro-batches, the most a step of a ramped run takes: the same prediction as without the ramp, and not below that
    of the ramp's first batch."""
    from launch.memory import memory_inputs
    from parallel.memory import estimate

    def inputs(*overrides):
        return memory_inputs(["recipe=keye_30b_a3b", "world_size=8", *overrides])[2]

    ramped = inputs("train.batch_rampup.start=8", "train.batch_rampup.increment=8", "train.batch_rampup.samples=1000")
    plain, first = inputs(), inputs("train.global_batch_size=8")
    assert ramped == plain and ramped.num_microbatches == 256 // 8
    assert estimate(ramped).total >= estimate(first).total


# ------------------------------------------------------------------------------------------------------------------
# the trainer, in this process


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A gloo world of one rank (the trainers of this module build their process groups in it:
    tests/launch_util.one_rank_world); the checkpoint writer's helper process is started once for the module, not
    once per trainer."""
    with one_rank_world():
        yield tmp_path_factory.mktemp("rampup")


def _train(run_dir, *overrides):
    """Trains the tiny MoE LM (1 layer; 1 rank, 4 sequences of 32 tokens per micro-batch) in run_dir; returns each
    step's StepStats, the final weights, the data state after the last step and the sequences consumed."""
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    cfg, layout = validate(compose_config(
        ["recipe=keye_tiny_lm", "parallel.ep=1", "train.wandb.enabled=false", "train.steps=3", "train.warmup_steps=1",
         "train.seq_length=32", "train.micro_batch_size=4", "model.lm.num_layers=1",
         "train.checkpoint.save_interval=100", f"run_dir={run_dir}", *overrides]), world_size=1)
    tr = Trainer(cfg, layout)
    try:
        history = tr.train()
        weights = {k: v.detach().clone() for k, v in tr.model[0].module.state_dict().items() if torch.is_tensor(v)}
        return history, weights, tr.streams[0].state_dict(), tr.consumed_samples
    finally:
        tr.close()


@pytest.fixture(scope="module")
def ramped(world):
    return _train(world / "ramped", "train.checkpoint.enabled=false", *RAMP)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_ramp_step_is_a_step_at_its_global_batch(world, ramped):
    """The ramped run's 3 steps (batches 4, 8, 8) against a launch of one step at train.global_batch_size 4 and one of
    two steps at 8 resuming it: the same losses and the same weights, bit for bit (the same micro-batches of the same
    samples, summed in the same order; the lr schedule counts steps in both). Each step logs its batch, the sequences
    consumed, and its tokens per second over its own batch's tokens."""
    history, weights, state, consumed = ramped
    first, _, _, _ = _train(world / "by_hand", "train.global_batch_size=4", "train.stop_after=1")
    rest, hand_weights, hand_state, _ = _train(world / "by_hand", "train.global_batch_size=8")
    hand = first + rest
    assert [s.loss for s in history] == [s.loss for s in hand]
    assert [s.lr for s in history] == [s.lr for s in hand]
    assert _same_weights(weights, hand_weights)
    assert [(s.extra["global_batch"], s.extra["consumed_samples"], s.tokens) for s in history] == \
        [(4, 4, 4 * 32), (8, 12, 8 * 32), (8, 20, 8 * 32)]
    assert state == hand_state and state["consumed_samples"] == consumed == 20
    records = [json.loads(line) for line in (world / "ramped" / "metrics.jsonl").read_text().splitlines()]
    # tokens/s x the step's seconds gives back its tokens: float rounding of one division and one product
    assert [r["tokens_per_s"] * r["step_time_s"] for r in records] == pytest.approx([4 * 32, 8 * 32, 8 * 32],
                                                                                    rel=1e-9)


@pytest.fixture(scope="module")
def one_step(world):
    """The ramped run stopped after step 1 (batch 4; 4 sequences consumed, the next steps' batch 8): its run directory
    (a checkpoint at step 1) and that step's StepStats."""
    first, _, _, _ = _train(world / "one_step", "train.stop_after=1", *RAMP)
    return world / "one_step", first


def test_a_resume_mid_ramp_continues_as_the_uninterrupted_run(world, ramped, one_step, caplog):
    """Stopped after step 1 and resumed with the same settings: steps 2 and 3 as the uninterrupted run's, bit for bit,
    the same final weights and data position. The checkpoint holds the sequences consumed; the resumed launch logs
    the ramp as over (it logged the ramp's first batch, 4 sequences in 1 micro-batch, as where it goes on from)."""
    import logging
    import shutil

    history, weights, state, consumed = ramped
    shutil.copytree(one_step[0], world / "resumed")
    first = one_step[1]
    with caplog.at_level(logging.INFO):
        second, resumed_weights, resumed_state, resumed_consumed = _train(world / "resumed", *RAMP)
    ramp_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(RAMP_LOG)]
    assert ramp_lines == ["train.batch_rampup: over (4 of its 4 sequences consumed): global batch 8, 2 micro-batches "
                          "per step and data-parallel rank"]
    assert [s.loss for s in first + second] == [s.loss for s in history]
    assert [s.extra["global_batch"] for s in second] == BATCHES[1:]
    assert _same_weights(weights, resumed_weights)
    assert (resumed_state, resumed_consumed) == (state, consumed)


def test_a_resume_past_the_ramp_goes_on_at_another_data_parallel_size(world, one_step):
    """A checkpoint after one ramp step (batch 4; 4 sequences consumed: train.batch_rampup.samples=4, the ramp is over)
    resumes on 2 data-parallel ranks with the ramp's settings unchanged (the launcher judged them as a fresh run's:
    start 4 is no multiple of micro-batch 4 x 2 ranks). With samples=24 and train.global_batch_size=16 instead, the
    same checkpoint is mid-ramp (batches 4, 8, 12 to come at steps 2, 3 and 4): refused, naming the step, its batch,
    the position and the ramp's end; a fresh run in another directory is refused naming train.batch_rampup.start."""
    run_dir = one_step[0]
    common = ["parallel.ep=1", "train.micro_batch_size=4", "train.steps=10", "train.warmup_steps=1",
              "train.seq_length=32", "model.lm.num_layers=1"]
    cfg, layout = _validate(*common, f"run_dir={run_dir}", *RAMP, world_size=2)
    assert layout.dp == 2 and cfg.train.batch_size_at(4) == 8
    longer = ["train.global_batch_size=16", "train.batch_rampup.start=4", "train.batch_rampup.increment=4",
              "train.batch_rampup.samples=24"]
    assert [_reference_batch(c, 4, 4, 24, 16) for c in (4, 8, 16, 28)] == [4, 8, 12, 16]
    with pytest.raises(ValueError) as e:
        _validate(*common, f"run_dir={run_dir}", *longer, world_size=2)
    assert str(e.value) == (
        "train.batch_rampup gives step 2 the global batch 4, which must be a multiple of train.micro_batch_size (4) x "
        "data-parallel size (2) (this run resumes after step 1, 4 of the ramp's train.batch_rampup.samples (24) "
        "sequences consumed): resume the rest of the ramp (its batches 4, 8, 12, to step 4) at a data-parallel size "
        "that divides each, and change it once the ramp is over")
    cfg, _ = _validate(*common, f"run_dir={run_dir}", *longer, world_size=1)   # on its one rank it goes on
    # the trainer judges the checkpoint it resumes (an older one where the newest fails its checksums) the same way
    from parallel.layout import ParallelLayout
    from train import checkpoint as ckpt

    ref = ckpt.find_latest(run_dir)
    with pytest.raises(ValueError) as again:
        ckpt.check_resume_point(cfg, ParallelLayout.build(cfg.parallel, world_size=2, lm=cfg.model.lm), ref,
                                ckpt.saved_common(ref))
    assert str(again.value) == str(e.value)
    with pytest.raises(ValueError, match=r"^train\.batch_rampup\.start \(4\) must be a multiple of train\."
                       r"micro_batch_size \(4\) x data-parallel size \(2\)$"):
        _validate(*common, f"run_dir={world / 'fresh_at_dp2'}", *RAMP, world_size=2)


def test_a_resume_with_other_ramp_settings_warns_naming_both():
    """The ramp is a function of the sequences consumed: a resume under other settings (or another global batch to
    ramp to) goes on with the new settings' batch at that point, and the warning names the old settings, the new and
    that batch (train/config.py rampup_changed; the trainer logs it on resume)."""
    from dataclasses import asdict

    from train.config import rampup_changed

    def train(gbs, start=0, inc=0, samples=0):
        return TrainConfig(global_batch_size=gbs, batch_rampup=BatchRampupConfig(start, inc, samples))

    saved = asdict(train(8, 4, 4, 4))
    assert rampup_changed(saved, train(8, 4, 4, 4), 20) == ""
    assert rampup_changed(asdict(train(8)), train(16), 20) == ""   # no ramp either side: held_out_moved's concern
    assert rampup_changed(saved, train(16, 4, 4, 100), 20) == (
        "train.batch_rampup changed since the checkpoint: start 4, increment 4, samples 4 (to 8) -> start 4, "
        "increment 4, samples 100 (to 16); after the 20 sequences consumed, the next step's global batch is 4 "
        "sequences by the new settings")
    assert rampup_changed(saved, train(8), 20) == (
        "train.batch_rampup changed since the checkpoint: start 4, increment 4, samples 4 (to 8) -> none (global "
        "batch 8); after the 20 sequences consumed, the next step's global batch is 8 sequences by the new settings")


def test_a_checkpoint_from_before_the_count_gives_its_sequences_consumed():
    """A checkpoint written before the sequences consumed were recorded (no ramp then) resumes a ramp where its data
    stood: a token stream's position, else (video packs) its steps x the global batch it was saved with."""
    from train.config import saved_consumed_samples

    config = {"train": {"global_batch_size": 256}}
    assert saved_consumed_samples({"step": 10, "consumed_samples": 1234, "data": {}}, config) == 1234
    tokens = {"kind": "token_files", "consumed_samples": 2000}
    assert saved_consumed_samples({"step": 10, "data": tokens}, config) == 2000
    assert saved_consumed_samples({"step": 10, "data": {"version": 3, "consumed": 17}}, config) == 2560


def test_an_evaluation_mid_ramp_scores_the_global_batch(world):
    """train.eval scores train.global_batch_size sequences per held-out batch whatever the training step's batch: an
    evaluation after step 1 (the ramp's batch 4, one micro-batch of 4) gives the same val_loss, bit for bit, as the
    same weights evaluated once the trainer's batch is 8 (two micro-batches; the held-out data from its start both
    times). It scored the ramp step's micro-batches of each held-out batch: 4 of the 8 sequences it counted."""
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    cfg, layout = validate(compose_config(
        ["recipe=keye_tiny_lm", "parallel.ep=1", "train.wandb.enabled=false", "train.steps=3", "train.warmup_steps=1",
         "train.seq_length=32", "train.micro_batch_size=4", "model.lm.num_layers=1", "train.stop_after=1",
         "train.checkpoint.enabled=false", "train.eval.batches=2", f"run_dir={world / 'eval_mid_ramp'}", *RAMP]),
        world_size=1)
    tr = Trainer(cfg, layout)
    try:
        tr.train()
        assert (tr.global_batch, tr.num_microbatches) == (4, 1)   # mid-ramp: the step's batch
        mid = tr.evaluate()
        tr.consumed_samples = 100   # past the ramp: the next step's batch is train.global_batch_size
        assert tr._set_global_batch() == 8 and tr.num_microbatches == 2
        full = tr.evaluate()
    finally:
        tr.close()
    assert mid["val_sequences"] == full["val_sequences"] == 2 * 8
    assert mid["val_loss"] == full["val_loss"]


def test_a_video_mixture_resumed_mid_ramp_reads_and_trains_as_the_uninterrupted_run(world, caplog):
    """The multimodal tiny model (ViT, projector, MoE LM) on synthetic video shards with token-file rows as 0.4 of its
    packs (data.video.text_tokens), ramped 1, 1, 1, 2 packs over 4 steps: the run's checkpoint after step 2 (2 packs
    consumed, mid-ramp; the run's later checkpoints removed from a copy) resumed. Steps 3 and 4 against the
    uninterrupted run's, bit for bit (the same packs summed in the same order on one CPU), the same packs in the last
    step (sources, epochs and samples), the same sequences consumed, and the same per-step data counts (documents of
    each kind, from the loader's counters: a pack read twice or skipped would move them)."""
    import logging
    import shutil

    from data.token_files import ensure_synthetic_token_files
    from data.video_stream import ensure_synthetic_shards
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    shards = ensure_synthetic_shards(world / "videos", 4, 1234, rank=0)
    text = ensure_synthetic_token_files(world / "video_tokens", 300, 13, rank=0, vocab_size=512)

    def train(run_dir):
        cfg, layout = validate(compose_config(
            ["recipe=keye_tiny", "parallel=single", "model.lm.num_layers=1", "train.wandb.enabled=false",
             "train.steps=4", "train.warmup_steps=1", "data.video.num_workers=0", f"data.video.shards={shards}",
             f"data.video.text_tokens={text}", "data.video.text_tokens_fraction=0.4", "train.global_batch_size=2",
             "train.batch_rampup.start=1", "train.batch_rampup.increment=1", "train.batch_rampup.samples=3",
             "train.checkpoint.save_interval=2",
             f"run_dir={run_dir}"]), world_size=1)
        tr = Trainer(cfg, layout)
        try:
            history = tr.train()
            return history, tr.streams[0].step_record(), tr.consumed_samples
        finally:
            tr.close()

    whole, last, consumed = train(world / "video_ramp")
    assert [s.extra["global_batch"] for s in whole] == [1, 1, 1, 2] and consumed == 5
    shutil.copytree(world / "video_ramp", world / "video_ramp_resumed")
    shutil.rmtree(world / "video_ramp_resumed" / "checkpoints" / "step_000004")
    (world / "video_ramp_resumed" / "checkpoints" / "latest").unlink()
    with caplog.at_level(logging.INFO):
        resumed, resumed_last, resumed_consumed = train(world / "video_ramp_resumed")
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(RAMP_LOG)] == [
        "train.batch_rampup: the global batch grows from 1 to 2 sequences by 1 over the first 3 sequences "
        "(micro-batches per step and data-parallel rank: 1 to 2; steps 3 to 3 ramp, from batch 1 after the 2 "
        "sequences consumed)"]   # the ramp from where the run goes on (it logged steps 1 to 3)
    assert [s.step for s in resumed] == [3, 4]
    assert [s.loss for s in resumed] == [s.loss for s in whole[2:]]
    assert [s.extra["global_batch"] for s in resumed] == [1, 2]
    assert resumed_last == last and len(last["packs"]) == 2 and resumed_consumed == consumed
    counts = sorted(k for k in whole[-1].extra if k.startswith("data_samples"))
    assert counts and [[s.extra[k] for k in counts] for s in resumed] == [[s.extra[k] for k in counts]
                                                                          for s in whole[2:]]
