"""train.tensorboard (train/tensorboard.py): the event files of a run read back by a reader of this file (the TFRecord
framing with its CRC-32C checks, TensorBoard's Python loader's rule for a restart marker) against the same run's
metrics.jsonl and eval.jsonl, every value of every record, over a launch killed after its last checkpoint and one
that resumes it; each value on disk once logged; the launch's error without the package."""

import struct
import types

import numpy as np
import pytest

from train.config import to_config
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


def expected_scalars(run_dir, *, eval_only: bool = False) -> dict[str, list[tuple[int, float]]]:
    """The same run's values from metrics.jsonl and eval.jsonl, each as TensorBoard keeps it (a 32-bit float); with
    eval_only, train.eval.only's lines of eval.jsonl alone, else the training's."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, group in (("eval.jsonl", "eval"),) if eval_only else (("metrics.jsonl", "train"), ("eval.jsonl", "eval")):
        for line in (run_dir / name).read_text().splitlines():
            rec = read_record(line)
            if rec.pop("eval_only", False) != eval_only:
                continue
            step = rec.pop("step")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(k if "/" in k else f"{group}/{k}", []).append((step, float(np.float32(v))))
    return out


def test_per_source_tables_and_a_skipped_steps_nan_are_scalars_of_their_own(tmp_path):
    """A step of a mixture (its loss per source and kind, their token counts) that was skipped as not finite (loss
    NaN, grad_norm inf) and an evaluation with its loss per kind, logged as the trainer logs them (Meter.log,
    Meter.log_eval) beside the record lines it writes: the tables are sections of their own, the non-finite values
    as they were (metrics.jsonl writes them as null, naming them)."""
    from train.metrics import Meter, StepStats, json_record

    meter = Meter(flops_per_token=1e6, world_size=2, peak_tflops=None, total_steps=9)
    meter.start_tensorboard(str(tmp_path / "tensorboard"), purge_step=0)
    stats = StepStats(step=7, loss=float("nan"), grad_norm=float("inf"), lr=1e-4, seconds=0.5, tokens=4096,
                      extra={"loss_src/long": 2.5, "loss_src/short": 2.25, "loss_src_tokens/long": 3000,
                             "loss_kind/video": 2.4, "data_wait_rank": 1, "skipped_steps": 1})
    rates = meter.rates(stats)
    ev = {"val_loss": 2.0, "val_loss_kind/video": 2.1, "val_loss_kind/text": 1.9, "val_sequences": 8}
    (tmp_path / "metrics.jsonl").write_text(json_record({"step": 7, **rates}) + "\n")
    (tmp_path / "eval.jsonl").write_text(json_record({"step": 7, **ev}) + "\n")
    meter.log(stats, rates, console=False)
    meter.log_eval(7, ev)
    meter.finish()
    got, want = read_scalars(tmp_path / "tensorboard"), expected_scalars(tmp_path)
    assert {"loss_src/long", "loss_src_tokens/long", "loss_kind/video", "val_loss_kind/text", "train/loss",
            "train/data_wait_rank", "eval/val_loss"} <= got.keys()
    assert got.keys() == want.keys()
    for tag in want:   # exact: one float64 rounded to float32 on both sides; NaN equal to NaN
        np.testing.assert_array_equal(np.array(got[tag]), np.array(want[tag]), err_msg=tag)
    assert np.isnan(got["train/loss"][0][1]) and got["train/grad_norm"] == [(7, float("inf"))]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A gloo world of one rank (tests/launch_util.one_rank_world); the checkpoint writer's helper process is started
    once for the module, not once per trainer."""
    with one_rank_world():
        yield tmp_path_factory.mktemp("tensorboard")


def _trainer(run_dir, *overrides):
    from train.launch import validate
    from train.trainer import Trainer

    cfg, layout = validate(compose_config(
        ["recipe=keye_tiny_lm", "parallel.ep=1", "train.wandb.enabled=false", "train.steps=2", "train.warmup_steps=1",
         "train.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=4", "model.lm.num_layers=1",
         "train.eval.interval=100", "train.checkpoint.save_interval=1", "train.tensorboard.enabled=true",
         "train.checkpoint.async_save=false", f"run_dir={run_dir}", *overrides]), world_size=1)
    return Trainer(cfg, layout)


def _train(run_dir, *overrides, before_step=None):
    tr = _trainer(run_dir, *overrides)
    if before_step is not None:   # called before each step with the trainer
        step = tr.train_step
        tr.train_step = types.MethodType(lambda self: (before_step(self), step())[1], tr)
    try:
        return tr.train()
    finally:
        tr.close()


@pytest.fixture(scope="module")
def resumed(world):
    """A launch trains steps 1 and 2 (checkpoints at each, evaluations at 0 and 2) and its checkpoint of step 2 is
    removed, as if it had been killed before saving it; the next launch resumes step 1 and trains step 2 again.
    Returns the run directory and what the event files held when the first launch's step 2 began."""
    import shutil

    run_dir = world / "run"
    seen = {}

    def before_step(tr):
        if tr.step == 1:
            seen[tr.step] = read_scalars(run_dir / "tensorboard")
    _train(run_dir, before_step=before_step)
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    _train(run_dir)
    return run_dir, seen


def test_every_logged_value_is_a_scalar_at_its_step_and_a_resume_drops_the_steps_it_trains_again(resumed):
    """The run of `resumed`: its event files, read as TensorBoard does, hold every value of metrics.jsonl and
    eval.jsonl (which set the first step 2 aside) at its step: the first launch's step 2 is in its file, and the
    second launch's restart marker at step 2 drops it. The values logged so far are on disk when step 2 begins (not
    held in the process, where a kill would lose them)."""
    run_dir, seen = resumed
    assert {s for s, _ in seen[1]["train/loss"]} == {1} and {s for s, _ in seen[1]["eval/val_loss"]} == {0}

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


def test_eval_only_writes_a_run_of_its_own(resumed):
    """train.eval.only on the same run directory scores its newest checkpoint (step 2) into a run of its own under
    the training's TensorBoard directory, with the values of its eval.jsonl line; the training's run is unchanged."""
    run_dir, _ = resumed
    before = read_scalars(run_dir / "tensorboard")
    tr = _trainer(run_dir, "train.eval.only=true", "train.eval.batches=1")
    try:
        tr.evaluate_only()
    finally:
        tr.close()
    (own,) = (run_dir / "tensorboard" / "eval_only").iterdir()
    got, want = read_scalars(own), expected_scalars(run_dir, eval_only=True)
    assert [s for s, _ in want["eval/val_loss"]] == [2] and got == want
    assert read_scalars(run_dir / "tensorboard") == before


def test_a_launch_without_the_package_stops_naming_the_setting_and_the_pip_command(monkeypatch):
    cfg = to_config(compose_config(["recipe=keye_tiny_lm", "train.tensorboard.enabled=true"]))
    assert to_config(compose_config(["recipe=keye_tiny_lm"])).train.tensorboard.enabled is False
    check_tensorboard(cfg)   # installed here
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else
                        find_spec(name, *a))
    with pytest.raises(ValueError, match=r"train\.tensorboard\.enabled=true writes TensorBoard event files with the "
                                         r"tensorboardX package, which is not installed here: pip install "
                                         r"tensorboardX"):
        check_tensorboard(cfg)
    cfg.train.tensorboard.enabled = False
    check_tensorboard(cfg)


def test_the_directory_setting_and_a_file_in_its_way(tmp_path, monkeypatch):
    """train.tensorboard.dir: "" <run_dir>/tensorboard, a relative path under run_dir, `~` the home directory (it
    was a directory named `~` under run_dir); a file where the directory goes stops the launch naming the setting
    (it stopped rank 0 with NotADirectoryError at its first step, after the model was built)."""
    from train.tensorboard import resolved_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolved_dir("runs/x", "") == "runs/x/tensorboard" and resolved_dir("runs/x", "tb") == "runs/x/tb"
    assert resolved_dir("runs/x", "/abs/tb") == "/abs/tb" and resolved_dir("runs/x", "~/tb") == f"{tmp_path}/home/tb"
    (tmp_path / "file").write_text("")
    cfg = to_config(compose_config(["recipe=keye_tiny_lm", "train.tensorboard.enabled=true", f"run_dir={tmp_path}",
                                    f"train.tensorboard.dir={tmp_path}/file/tb"]))
    with pytest.raises(ValueError, match=rf"train\.tensorboard\.dir='{tmp_path}/file/tb': {tmp_path}/file/tb: "
                                         rf"cannot be made a directory \({tmp_path}/file is a file\)"):
        check_tensorboard(cfg)
    cfg.train.tensorboard.dir = "file"
    with pytest.raises(ValueError, match=rf"train\.tensorboard\.dir='file': {tmp_path}/file is a file, not a "
                                         r"directory"):
        check_tensorboard(cfg)
    cfg.train.tensorboard.dir = "tb"
    check_tensorboard(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]   # the probe leaves nothing


def test_each_value_is_on_disk_once_logged(tmp_path):
    """A killed launch loses no value it logged: each is written to disk as it is logged (not held in the process
    until a flush), the restart marker too; booleans and text are not scalars."""
    from train.tensorboard import TensorBoardLog

    tb = TensorBoardLog(str(tmp_path), purge_step=3)
    tb.scalars(3, {"loss": 0.5, "skipped": True, "note": "x"}, group="train")
    assert read_scalars(tmp_path) == {"train/loss": [(3, 0.5)]}
    tb.scalars(4, {"val_loss": 0.25}, group="eval")
    assert read_scalars(tmp_path) == {"train/loss": [(3, 0.5)], "eval/val_loss": [(4, 0.25)]}
    (marker,) = [e for p in tmp_path.glob("events.*") for e in _events(p) if e.HasField("session_log")]
    assert marker.step == 3
    tb.close()
