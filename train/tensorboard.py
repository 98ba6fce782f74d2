"""TensorBoard event files of a run (train.tensorboard), written by rank 0 beside metrics.jsonl and eval.jsonl.

Each step's values (metrics.jsonl's) and each evaluation's (eval.jsonl's) are one event at the step: one scalar per
numeric value, tagged `train/<key>` or `eval/<key>`, a key that is already a group (`loss_src/<source>`,
`loss_kind/<kind>`, `val_loss_kind/<kind>`, their `_tokens/` counts) as it is, so each table is a section of its own.
TensorBoard stores 32-bit floats: a count above 2^24 shows rounded (metrics.jsonl has it exact).

Each event is written to disk (flushed) as it is logged, as metrics.jsonl's line is: a killed launch loses no value
logged before the kill (at most the record being written, whose cut end TensorBoard skips). The events are written in
this process: tensorboardX's own SummaryWriter queues them to a thread, and its flush() leaves the queued ones
unwritten (they reach the disk up to 120 s later, or at close).

A launch that starts at step S (the checkpoint it resumes, or 0) trains the steps after S again: its file opens with
a restart marker at step S + 1 (0 for a run started over), as `SummaryWriter(purge_step=...)` writes, so TensorBoard
shows the run as one curve without the values a killed launch logged for those steps, as metrics.jsonl sets their
records aside (train/metrics.py set_aside_redone): TensorBoard's Python loader drops every event at or after that
step read before the marker; its Rust loader (`--load_fast`) drops a tag's later values when the same tag is logged at
an earlier step again."""

from __future__ import annotations

import os
import time

PACKAGE = "tensorboardX"   # the writer; `pip install tensorboardX` (setup.py's extra "tensorboard")


def missing_message(setting: str = "train.tensorboard.enabled=true") -> str:
    return (f"{setting} writes TensorBoard event files with the {PACKAGE} package, which is not installed here: pip "
            f"install {PACKAGE} (or pip install -e '.[tensorboard]'), or train.tensorboard.enabled=false")


def tag_of(key: str, group: str) -> str:
    """The TensorBoard tag of a record's key: the key itself where it names a group of its own (`loss_src/short`),
    else under the record's group (`train/loss`, `eval/val_loss`)."""
    return key if "/" in key else f"{group}/{key}"


class TensorBoardLog:
    """One event file of a launch in `logdir` (made if missing); `purge_step`: the step of the restart marker, or
    None for none (train.eval.only's own run)."""

    def __init__(self, logdir: str, *, purge_step: int | None):
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            from tensorboardX.proto.summary_pb2 import Summary
        except ImportError as e:
            raise ValueError(missing_message()) from e
        self._event, self._summary = Event, Summary
        os.makedirs(logdir, exist_ok=True)
        # a name of its own: EventsWriter names files by the second, and a second launch in the same second (a quick
        # resume) would truncate the first's; nanoseconds keep the names in the order the launches began, which is
        # the order TensorBoard reads them in
        self._writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix=f".{time.time_ns()}")
        self.path = self._writer._file_name
        if purge_step is not None:
            self._writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                           session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def scalars(self, step: int, values: dict, *, group: str) -> None:
        """One event at `step` with a scalar per numeric value of `values` (booleans and text are not scalars; a
        non-finite value is kept, as TensorBoard shows it), written to disk."""
        out = [self._summary.Value(tag=tag_of(k, group), simple_value=float(v)) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if out:
            self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=self._summary(value=out)))
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def resolved_dir(run_dir: str, configured: str) -> str:
    """train.tensorboard.dir: "" <run_dir>/tensorboard; a relative path under run_dir, an absolute one as it is (`~`
    the home directory, where it was a directory named `~` under run_dir)."""
    return os.path.join(run_dir, os.path.expanduser(configured or "tensorboard"))

