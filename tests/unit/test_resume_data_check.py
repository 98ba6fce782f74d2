"""A resume whose data state cannot be continued (other token files, another train.seq_length, ...) stops with the
config error of train/data_streams.restore_data_state BEFORE the model is built (Trainer._check_resume_point): it
stopped only after the model, optimizer and checkpoint were built and loaded, minutes of every node's time on a large
model. So does one whose checkpoint holds another model (the launcher's check_resume, of the checkpoint the resume
takes).

In one process (a gloo world of one rank): the checkpoint the resume takes and its common state are stood in for
(train/checkpoint.find_resume_point, saved_common), and building the model raises, so a test that reaches it fails."""

import os

import pytest
import torch.distributed as dist

from train.config import SettingsError


class ModelBuilt(Exception):
    pass


def _config(run_dir, *overrides):
    from train.launch import compose_config, validate

    return validate(compose_config(["recipe=keye_tiny_lm", "data=tokens_tiny", "train.micro_batch_size=1",
                                    "parallel.ep=1", f"run_dir={run_dir}", *overrides]), world_size=1)


def _stream(cfg, run_dir):
    from train.data_streams import text_streams

    return text_streams(cfg, cfg.data, run_dir=run_dir, rank=0, dp_rank=0, dp_size=1)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(run_dir, its data state): a run of token files at train.seq_length 256 that trained 2 steps."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    cfg, _ = _config(run_dir)
    stream = _stream(cfg, run_dir)
    for _ in range(2 * stream.num_microbatches):   # two steps' micro-batches
        next(stream)
    state = stream.state_dict()
    assert state["consumed_samples"] == 2 * cfg.train.global_batch_size
    return run_dir, state


@pytest.fixture
def resume(saved, monkeypatch):
    """(run_dir, saved data state, ref): the trainer resumes `saved`'s run from `ref`, whose common state holds its
    data state, and building its model raises ModelBuilt."""
    from megatron.core import parallel_state

    import train.trainer
    from train import checkpoint as ckpt

    run_dir, state = saved
    ref = ckpt.CheckpointRef(path=run_dir / "checkpoints" / "step_000002", step=2)
    monkeypatch.setattr(ckpt, "find_resume_point", lambda d: ref)
    monkeypatch.setattr(ckpt, "saved_common", lambda r: {"step": 2, "data": state})
    monkeypatch.setattr(ckpt, "lock_run_dir", lambda d: None)   # held for the process's life: not this test's

    def build_lm(*a, **k):
        raise ModelBuilt()

    monkeypatch.setattr(train.trainer, "build_lm", build_lm)
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(33000 + os.getpid() % 1000))
    monkeypatch.setitem(os.environ, "RANK", "0")
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "1")
    yield run_dir, state, ref
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_resume_at_another_seq_length_stops_before_the_model_is_built(resume):
    from train.data_streams import restore_data_state
    from train.trainer import Trainer

    run_dir, state, ref = resume
    cfg, layout = _config(run_dir, "train.seq_length=128")
    # the reference: the error of the resume's own load (after the model was built, before this check existed)
    with pytest.raises(SettingsError) as late:
        restore_data_state([_stream(cfg, run_dir)], state, checkpoint=ref.path, run_dir=run_dir)
    assert "seq_length" in str(late.value)
    with pytest.raises(SettingsError) as early:
        Trainer(cfg, layout)
    assert str(early.value) == str(late.value)


def test_every_rank_stops_where_another_rank_cannot_continue(resume, monkeypatch):
    """This rank's data continues the state, another's does not: this rank stops too, with that rank's error, and
    builds no model (it waited for the others in the model's first collective, or trained on alone)."""
    from train.trainer import Trainer

    run_dir, _, _ = resume
    cfg, layout = _config(run_dir)
    other = "the data state of ck cannot be continued: (rank 1's)"
    gather = dist.all_gather_object

    def two_ranks(out, obj, group=None):   # rank 1 of a world of two answers `other`
        gather(out, obj, group=group)
        out.append(other)

    monkeypatch.setattr(dist, "all_gather_object", two_ranks)
    with pytest.raises(SettingsError, match=r"^the data state of ck cannot be continued: \(rank 1's\)$"):
        Trainer(cfg, layout)


def test_a_resume_that_continues_its_data_goes_on_to_build_the_model(resume):
    from train.trainer import Trainer

    run_dir, _, _ = resume
    cfg, layout = _config(run_dir)
    with pytest.raises(ModelBuilt):
        Trainer(cfg, layout)


def test_the_checkpoint_the_resume_takes_is_judged_where_the_launcher_judged_another(resume, monkeypatch):
    """The launcher's check_resume judges the newest checkpoint whose files have their sizes; the resume takes the
    newest whose checksums also agree. Here the newest (step 4) has a common state that cannot be read, the launcher
    judges nothing, and the resume takes step 2, of a model with another hidden size: the trainer stops with the
    launcher's error for step 2 before it builds the model. (Before, it went on to build the model: here ModelBuilt,
    in a run the load of step 2 into a model its shapes do not fit, a checkpoint error after the build instead of the
    config error before it.) The reference is check_resume's own error for a newest checkpoint of step 2's state."""
    import json
    from dataclasses import asdict

    from train import checkpoint as ckpt
    from train.launch import check_resume
    from train.trainer import Trainer

    run_dir, state, ref = resume
    newest = run_dir / "checkpoints" / "step_000004"
    newest.mkdir(parents=True, exist_ok=True)
    (newest / ckpt.COMPLETE).write_text(json.dumps({"files": {}}))    # complete by its sizes, its state unreadable
    with pytest.raises(Exception):   # what saved_common reads: it answers None (stood in for below)
        ckpt.dist_checkpointing.load_common_state_dict(str(newest))
    other, _ = _config(run_dir, "model.lm.hidden_size=96")
    common = {"step": 2, "data": state, "config": asdict(other)}
    monkeypatch.setattr(ckpt, "saved_common", lambda r: common if r == ref else None)
    assert ckpt.find_latest(run_dir, quiet=True).path == newest
    cfg, layout = _config(run_dir)   # the launcher's checks of this launch pass: they judged step 4
    monkeypatch.setattr(ckpt, "find_latest", lambda d, **k: ref)   # the reference: step 2 as the newest
    with pytest.raises(ValueError) as launcher:
        check_resume(cfg, layout)
    assert "model.lm.hidden_size is 96 there" in str(launcher.value)
    with pytest.raises(SettingsError) as trainer:
        Trainer(cfg, layout)
    assert str(trainer.value) == str(launcher.value)
