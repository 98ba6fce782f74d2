"""train.tensorboard (train/tensorboard.py): the event files of a run read back by a reader of this file (the TFRecord
framing with its CRC-32C checks, TensorBoard's Python loader's rule for a restart marker) against the same run's
metrics.jsonl and eval.jsonl, every value of every record, over a launch that stops after its last checkpoint and one
that resumes it; the flush at a checkpoint; the settings' errors."""

import json
import struct
import types

import numpy as np
import pytest

from train.config import TensorboardConfig, to_config
from train.launch import check_tensorboard, compose_config
from train.metrics import read_record
from tests.launch_util import one_rank_world

pytest.importorskip("tensorboardX", reason="train.tensorboard writes with tensorboardX (pip install -e '.[dev]')")


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _events(path):
    """The Event protos of one file: [length u64][masked crc of length u32][data][masked crc of data u32] each."""
    from tensorboardX.proto.event_pb2 import Event

    raw, out, at = path.read_bytes(), [], 0
    while at < len(raw):
        head = raw[at:at + 8]
        (n,) = struct.unpack("<Q", head)
        (head_crc,) = struct.unpack("<I", raw[at + 8:at + 12])
        data = raw[at + 12:at + 12 + n]
        (data_crc,) = struct.unpack("<I", raw[at + 12 + n:at + 16 + n])
        assert head_crc == _masked(_crc32c(head)) and data_crc == _masked(_crc32c(data)), f"{path}: bad CRC at {at}"
        out.append(Event.FromString(data))
        at += 16 + n
    return out


def read_scalars(logdir, *, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of a TensorBoard run directory, its files in name order; with purge, as TensorBoard's
    Python loader reads files of version 2: a restart marker (SessionLog.START) at step S drops every value read so
    far at a step >= S."""
    from tensorboardX.proto.event_pb2 import SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for ev in _events(path):
            if purge and ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in vals if s < ev.step] for tag, vals in out.items()}
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return {tag: vals for tag, vals in out.items() if vals}


def expected_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The same run's values from metrics.jsonl and eval.jsonl, each as TensorBoard keeps it (a 32-bit float)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, group in (("metrics.jsonl", "train"), ("eval.jsonl", "eval")):
        for line in (run_dir / name).read_text().splitlines():
            rec = read_record(line)
            step = rec.pop("step")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(k if "/" in k else f"{group}/{k}", []).append((step, float(np.float32(v))))
    return out


def test_tags_and_values_of_a_record():
    from train.tensorboard import tag_of

    assert tag_of("loss", "train") == "train/loss" and tag_of("val_loss", "eval") == "eval/val_loss"
    assert tag_of("loss_src/short", "train") == "loss_src/short"   # a per-source table: a section of its own


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A gloo world of one rank (tests/launch_util.one_rank_world); the checkpoint writer's helper process is started
    once for the module, not once per trainer."""
    import train.trainer as trainer_module

    restart, started = trainer_module.restart_checkpoint_helpers, []

    def once():
        if not started:
            started.append(restart())
    trainer_module.restart_checkpoint_helpers = once
    try:
        with one_rank_world():
            yield tmp_path_factory.mktemp("tensorboard")
    finally:
        trainer_module.restart_checkpoint_helpers = restart


def _train(run_dir, *overrides, before_step=None):
    from train.launch import validate
    from train.trainer import Trainer

    cfg, layout = validate(compose_config(
        ["recipe=keye_tiny_lm", "parallel.ep=1", "train.wandb.enabled=false", "train.steps=2", "train.warmup_steps=1",
         "train.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=4", "model.lm.num_layers=1",
         "train.eval.interval=100", "train.checkpoint.save_interval=1", "train.tensorboard.enabled=true",
         "train.tensorboard.flush_secs=1e9",
         "train.checkpoint.async_save=false", f"run_dir={run_dir}", *overrides]), world_size=1)
    tr = Trainer(cfg, layout)
    if before_step is not None:   # called before each step with the trainer
        step = tr.train_step
        tr.train_step = types.MethodType(lambda self: (before_step(self), step())[1], tr)
    try:
        return tr.train()
    finally:
        tr.close()


def test_every_logged_value_is_a_scalar_at_its_step_and_a_resume_drops_the_steps_it_trains_again(world):
    """A launch trains steps 1 and 2 (checkpoints at each, evaluations at 0 and 2) and its checkpoint of step 2 is
    removed, as if it had been killed before saving it; the next launch resumes step 1 and trains step 2 again. The
    event files, read as TensorBoard does, hold every value of metrics.jsonl and eval.jsonl (which set the first step
    2 aside) at its step: the first launch's step 2 is in its file, and the second launch's restart marker at step 2
    drops it. With flush_secs far off, the values up to the checkpoint of step 1 are on disk when step 2 begins: the
    checkpoint flushed them."""
    import shutil

    run_dir = world / "run"
    seen = {}

    def before_step(tr):
        if tr.step == 1:
            seen[tr.step] = read_scalars(run_dir / "tensorboard")
    _train(run_dir, before_step=before_step)
    assert {s for s, _ in seen[1]["train/loss"]} == {1} and {s for s, _ in seen[1]["eval/val_loss"]} == {0}
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    _train(run_dir)

    got, want = read_scalars(run_dir / "tensorboard"), expected_scalars(run_dir)
    assert [s for s, _ in want["train/loss"]] == [1, 2] and [s for s, _ in want["eval/val_loss"]] == [0, 2]
    assert len(want) > 10 and got.keys() == want.keys()
    for tag in want:   # exact: both are the same float64 rounded once to float32 (NaN, a skipped step's, equal to NaN)
        np.testing.assert_array_equal(np.array(got[tag]), np.array(want[tag]), err_msg=tag)
    # the first launch's step 2, set aside in metrics.superseded.jsonl, is in the files and dropped by the marker
    raw = read_scalars(run_dir / "tensorboard", purge=False)
    (old,) = [read_record(x) for x in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert old["step"] == 2
    assert [v for s, v in raw["train/step_time_s"] if s == 2] == [float(np.float32(old["step_time_s"])),
                                                                 got["train/step_time_s"][1][1]]


def test_bad_settings_stop_the_launch_naming_them(monkeypatch):
    with pytest.raises(ValueError, match=r"train\.tensorboard\.flush_secs must be a finite number of seconds > 0, "
                                         r"got 0"):
        TensorboardConfig(flush_secs=0)
    with pytest.raises(ValueError, match=r"train\.tensorboard\.flush_secs must be"):
        to_config(compose_config(["recipe=keye_tiny_lm", "train.tensorboard.flush_secs=nan"]))
    cfg = to_config(compose_config(["recipe=keye_tiny_lm", "train.tensorboard.enabled=true"]))
    assert to_config(compose_config(["recipe=keye_tiny_lm"])).train.tensorboard.enabled is False
    check_tensorboard(cfg)   # installed here
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else
                        find_spec(name, *a))
    with pytest.raises(ValueError, match=r"train\.tensorboard\.enabled=true writes TensorBoard event files with the "
                                         r"tensorboardX package, which is not installed here: pip install tensorboardX"):
        check_tensorboard(cfg)
    cfg.train.tensorboard.enabled = False
    check_tensorboard(cfg)


def test_values_reach_the_disk_at_a_flush_or_once_flush_secs_have_passed(tmp_path):
    """A killed launch loses what was logged since its last flush: with flush_secs far off, logged values are in the
    process alone until flush(); with flush_secs passed at each call, every call writes them."""
    from train.tensorboard import TensorBoardLog

    held = TensorBoardLog(str(tmp_path / "held"), purge_step=0, flush_secs=1e9)
    for step in (1, 2):
        held.scalars(step, {"loss": 1.0 / step, "skipped": True, "note": "x"}, group="train")
    assert read_scalars(tmp_path / "held") == {}
    held.flush()
    assert read_scalars(tmp_path / "held") == {"train/loss": [(1, 1.0), (2, 0.5)]}   # booleans and text are no scalars
    eager = TensorBoardLog(str(tmp_path / "eager"), purge_step=None, flush_secs=1e-9)
    eager.scalars(5, {"val_loss": 0.25}, group="eval")
    assert read_scalars(tmp_path / "eager") == {"eval/val_loss": [(5, 0.25)]}
    held.close()
    eager.close()
