"""`train.profile`: a torch.profiler trace of a few training steps, written where the run writes.

    torchrun ... launch/pretrain.py recipe=... train.profile.steps=2 [train.profile.start=3] [train.profile.ranks=[0,1]]

Steps `start` .. `start + steps - 1` (the step numbers of the log) are recorded on each listed rank: CPU
operators, and CUDA kernels on a GPU. Afterwards the rank writes into `<run_dir>/profile/`:

- `steps<A>-<B>.rank<R>.json.gz`: the Chrome / Perfetto trace (open it in https://ui.perfetto.dev);
- `steps<A>-<B>.rank<R>.txt`: the operators by total device time (CPU time on a CPU run), the top 40.

The window also holds what the trainer does between those steps (an evaluation, a checkpoint save). The
profiled steps run slower (the log's step time and throughput include the profiler's cost). A run that
stops inside the window (a stop request, the last step) writes what it recorded. A launch that resumes past
`start` records nothing and says so in a warning at its start, naming the `start` that would record its steps.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("train")


class StepProfiler:
    def __init__(self, cfg, run_dir: str, rank: int, *, first_step: int, last_step: int):
        """`first_step` .. `last_step`: the steps this launch trains (a resumed launch: from its checkpoint's step
        + 1; to train.steps)."""
        self.cfg, self.rank = cfg, rank
        self.dir = Path(run_dir) / "profile"
        self.on = cfg.steps > 0 and rank in cfg.ranks
        if cfg.steps > 0 and first_step > cfg.start:
            # the profiled ranks' logs, and the console; a launch with no step to train says so itself
            if (self.on or rank == 0) and first_step <= last_step:
                log.warning("train.profile: this launch starts at step %d (resumed), past train.profile.start=%d, so "
                            "it records no profile; train.profile.start=%d (or a later step up to train.steps) "
                            "records steps of this launch", first_step, cfg.start, first_step)
            self.on = False
        self.prof = None
        self.first = self.last = 0

    def before_step(self, step: int) -> None:
        """Called before training step `step` (1-based) runs."""
        if not self.on or self.prof is not None or step != self.cfg.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, profile_memory=self.cfg.memory, record_shapes=False)
        self.prof.__enter__()
        self.first = step
        log.info("profiling steps %d-%d on rank %d (train.profile): these steps run slower", step,
                 step + self.cfg.steps - 1, self.rank)

    def after_step(self, step: int) -> None:
        """Called after training step `step` finished."""
        if self.prof is None:
            return
        self.last = step
        if step >= self.cfg.start + self.cfg.steps - 1:
            self.finish()

    def finish(self) -> None:
        """Stops the profiler and writes the trace and the table (a no-op when not profiling)."""
        prof, self.prof = self.prof, None
        if prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        if self.last < self.first:  # stopped before the first profiled step finished
            log.info("train.profile: the run stopped before step %d finished; nothing written", self.first)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"steps{self.first}-{self.last}.rank{self.rank}"
        trace, summary = self.dir / f"{stem}.json.gz", self.dir / f"{stem}.txt"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        summary.write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
        log.info("train.profile: steps %d-%d of rank %d written to %s (and %s)", self.first, self.last, self.rank,
                 trace, summary.name)
