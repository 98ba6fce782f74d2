"""train/launch.py setup_logging: rank 0 logs to the console and every rank to <run_dir>/logs/rank<N>.log; a record
marked file_only (the traceback of an error that ends a run, which stderr shows already) goes to the file alone.
train.eval.only, which may score a run directory while its training still runs, logs beside the training's logs and
wandb run, not into them (train/metrics.py Meter.start_wandb)."""

import logging

import pytest

from train.launch import setup_logging
from train.metrics import Meter


def _log_in(run_dir, eval_only: bool, message: str) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(str(run_dir), 0, eval_only=eval_only)
        logging.getLogger("train").info(message)
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def test_an_eval_only_launch_logs_beside_the_training_logs(tmp_path):
    _log_in(tmp_path, False, "a training step")
    _log_in(tmp_path, True, "an evaluation")
    _log_in(tmp_path, False, "the next training step")
    train_log = (tmp_path / "logs" / "rank0.log").read_text()
    eval_log = (tmp_path / "logs" / "eval_rank0.log").read_text()
    assert "a training step" in train_log and "the next training step" in train_log
    assert "an evaluation" not in train_log
    assert "an evaluation" in eval_log and "training step" not in eval_log


def test_an_eval_only_launch_logs_to_a_wandb_run_of_its_own_in_the_training_runs_group(tmp_path, monkeypatch):
    # real wandb, offline (no network): wandb ignores values logged at a step below a resumed run's last, so the
    # scores of a run's checkpoints logged into its own run after training would be dropped (online)
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = []
    for eval_only in (False, True, False, True):
        m = Meter(flops_per_token=1.0, world_size=1, peak_tflops=None, total_steps=4)
        m.start_wandb(enabled=True, mode="offline", project="test", run_dir=str(tmp_path), name="tiny", config={},
                      eval_only=eval_only)
        m.log_eval(2 if eval_only else 4, {"val_loss": 1.0})
        runs.append((m.wandb.id, m.wandb.group, m.wandb.job_type, m.wandb.name))
        m.finish()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    train1, eval1, train2, eval2 = runs
    assert train1 == train2 == (run_id, run_id, "train", "tiny")  # the training resumes its one run
    assert eval1[1:] == eval2[1:] == (run_id, "eval", "tiny eval")  # each scoring launch in the training's group
    assert len({run_id, eval1[0], eval2[0]}) == 3  # ... as a run of its own


def test_a_file_only_record_reaches_the_rank_log_and_not_the_console(tmp_path, capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(str(tmp_path), 0)
        log = logging.getLogger("train")
        log.info("on both")
        try:
            raise KeyError("boom")
        except KeyError:
            log.exception("the run failed", extra={"file_only": True})
        for h in root.handlers:
            h.flush()
        console = capsys.readouterr().out
        text = (tmp_path / "logs" / "rank0.log").read_text()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "on both" in console and "on both" in text
    assert "the run failed" not in console and "boom" not in console
    assert "[rank0] train: the run failed" in text and "KeyError: 'boom'" in text


def test_a_distillation_s_small_terms_are_readable_on_the_step_and_eval_lines():
    """The tiny KSA distillation's attention MSE is ~4e-5 (its metrics.jsonl): the step line and the eval line showed
    it, and any value under 5e-5, as 0.0000. A value under 0.001 now reads back to its own to 4 significant digits
    (rel 1e-3: .3e rounding); values from 0.001 up keep their 4 decimals."""
    import re

    from train.metrics import StepStats

    terms = {"kl": 0.005456669954583049, "attn_mse": 4.050733423355268e-05}
    m = Meter(flops_per_token=1.0, world_size=1, peak_tflops=None, total_steps=30)
    line = m.line(StepStats(step=1, loss=1.5424, grad_norm=0.5, lr=2e-4, seconds=1.0, tokens=1024, extra=terms))
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    metrics_log, keep = logging.getLogger("train"), Keep()
    metrics_log.addHandler(keep)
    level = metrics_log.level
    metrics_log.setLevel(logging.INFO)
    try:
        m.log_eval(0, {"val_loss": 1.4604, **{f"val_{k}": v for k, v in terms.items()}, "val_seconds": 1.1,
                       "val_sequences": 16})
    finally:
        metrics_log.removeHandler(keep)
        metrics_log.setLevel(level)
    for text, prefix in ((line, ""), (lines[0], "val_")):
        got = re.search(rf"\| {prefix}attn_mse (\S+) \|", text)
        assert got and float(got.group(1)) == pytest.approx(terms["attn_mse"], rel=1e-3), text
        assert f"| {prefix}kl 0.0055 |" in text, text


def test_a_stop_message_is_printed_once_where_the_ranks_agree(capsys):
    """print_stop_message with the process group's store (here an in-process HashStore): rank 0 prints its message
    and leaves it there; a rank with the same message prints a pointer, one with another message prints its own, and
    without rank 0's message (rank 0 did not stop so) after the wait a rank prints its own too."""
    import torch.distributed as dist

    from train.launch import print_stop_message

    store = dist.HashStore()
    print_stop_message("config error: the data ended", rank=0, store=store)
    print_stop_message("config error: the data ended", rank=1, store=store, log_file="run/logs/rank1.log")
    print_stop_message("checkpoint error: disk full on rank 2", rank=2, store=store)
    print_stop_message("config error: the data ended", rank=3, store=dist.HashStore(), wait_s=0.1)
    assert capsys.readouterr().err.splitlines() == [
        "config error: the data ended",
        "config error on rank 1: the same as rank 0's, printed once by rank 0 (and in run/logs/rank1.log)",
        "checkpoint error: disk full on rank 2",
        "config error: the data ended"]
