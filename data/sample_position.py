"""The position of a stream of samples that are pure functions of their global index (the synthetic token stream,
token files): one integer, `consumed_samples`.

A step consumes the next G global samples [c, c + G) for the global batch size G, c the samples consumed before it;
data-parallel rank r of R takes the contiguous slice [c + r G / R, c + (r + 1) G / R), micro-batch by micro-batch. A
resume is exact, and under another data-parallel size, micro-batch size or global batch size neither repeats nor skips
a sample.
"""
from __future__ import annotations


class DataStateMismatch(ValueError):
    """A data state saved for other data or settings than the stream's that loads it (`load_state_dict`): `detail`
    says what changed, `changed` holds the fields that differ as (saved, now), `catalog_changed` whether the samples
    differ; `settings`: the settings a resume would have to set back (train/data_streams.restore_data_state names
    them)."""

    def __init__(self, detail: str, changed: dict, catalog_changed: bool, *,
                 settings: str = "the data and data.video settings") -> None:
        super().__init__(detail)
        self.detail, self.changed, self.catalog_changed, self.settings = detail, changed, catalog_changed, settings


class GlobalSamplePosition:
    """Where one data-parallel rank's next micro-batch starts; a subclass names its state's `kind` and makes the
    micro-batch from `next_start()`."""

    kind = ""
    what = ""      # the stream, as an error message names it

    def __init__(self, *, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int):
        per_rank = global_batch_size // dp_size
        if global_batch_size % dp_size or per_rank % micro_batch_size:
            raise ValueError(f"train.global_batch_size ({global_batch_size}) must be a multiple of data-parallel size "
                             f"({dp_size}) x train.micro_batch_size ({micro_batch_size})")
        self.mbs, self.gbs, self.dp_rank, self.dp_size = micro_batch_size, global_batch_size, dp_rank, dp_size
        self.num_microbatches = per_rank // micro_batch_size
        self.consumed_samples = 0  # global samples of completed steps
        self._micro = 0            # micro-batches already handed out in the current step

    def set_global_batch_size(self, global_batch_size: int) -> None:
        """The next steps take `global_batch_size` samples each (train.batch_rampup); call between steps. The samples
        go on from where the last step's ended."""
        if self._micro not in (0, self.num_microbatches):
            raise RuntimeError("global batch size set in the middle of a step")
        per_rank = global_batch_size // self.dp_size
        if global_batch_size % self.dp_size or per_rank % self.mbs:
            raise ValueError(f"global batch {global_batch_size} must be a multiple of data-parallel size "
                             f"({self.dp_size}) x train.micro_batch_size ({self.mbs})")
        if self._micro == self.num_microbatches:   # close the last step at its own size
            self.consumed_samples += self.gbs
            self._micro = 0
        self.gbs, self.num_microbatches = global_batch_size, per_rank // self.mbs

    def __iter__(self):
        return self

    def next_start(self) -> int:
        """The global index of the next micro-batch's first sample (advancing the position by one micro-batch)."""
        if self._micro == self.num_microbatches:
            self.consumed_samples += self.gbs
            self._micro = 0
        start = self.consumed_samples + self.dp_rank * (self.gbs // self.dp_size) + self._micro * self.mbs
        self._micro += 1
        return start

    def step_samples(self, micro_batches: list[int] | None = None, rows: dict[int, list[int]] | None = None
                     ) -> list[int]:
        """The global indices of the samples this rank drew in the current step, or in those of its micro-batches
        (their indices in the step); `rows` narrows some of those micro-batches (by index) to some of their rows."""
        first = self.consumed_samples + self.dp_rank * (self.gbs // self.dp_size)
        drawn = range(self._micro) if micro_batches is None else [i for i in micro_batches if i < self._micro]
        rows = rows or {}
        return [first + i * self.mbs + k for i in drawn for k in range(self.mbs) if i not in rows or k in rows[i]]

    def describe_step(self, micro_batches: list[int] | None = None, parts: dict[int, list[int]] | None = None) -> str:
        """The samples this rank drew in the current step (or in those of its micro-batches; `parts`: of some of
        those, by index, the rows whose tokens' loss was not finite alone), for a message about the step."""
        named, drawn = self.step_samples(micro_batches, parts), self.step_samples(micro_batches)
        narrowed = f" (the rows whose tokens' loss was not finite, of {format_runs(drawn)})" if named != drawn else ""
        return f"{self.what}: global samples {format_runs(named)}{narrowed}"

    def step_record(self, micro_batches: list[int] | None = None, parts: dict[int, list[int]] | None = None) -> dict:
        """describe_step's data as fields (train/nonfinite.py's record): the stream's kind and its global samples."""
        return {"stream": self.kind, "global_samples": self.step_samples(micro_batches, parts)}

    def step_metrics(self) -> dict | None:
        """Scalars for the training log since the last call (VideoBatchStream.step_metrics'); None: none to give."""
        return None

    def counters(self) -> dict:
        """This rank's own counts since the run began, which a checkpoint keeps per data-parallel rank
        (VideoPackedLoader.counters); a position alone has none."""
        return {}

    def load_counters(self, entries: list[dict]) -> None:
        """Sets this rank's counts to the sums of `entries`, the saved `counters()` it takes (counters_of_rank)."""

    def samples_record(self) -> dict:
        """What the map from global index to sample depends on, kept in the state; {}: nothing (a subclass's)."""
        return {}

    def resume_samples(self, saved: dict, consumed: int) -> None:
        """Continues after `consumed` global samples read with `saved` (a state's samples_record): DataStateMismatch
        where that would read other samples than those its run trained on and would have read next."""

    def state_dict(self) -> dict:
        """Position after the last completed step (call between steps)."""
        if self._micro not in (0, self.num_microbatches):
            raise RuntimeError("data state taken in the middle of a step")
        done = self.consumed_samples + (self.gbs if self._micro == self.num_microbatches else 0)
        record = self.samples_record()
        return {"kind": self.kind, "consumed_samples": done, **({"samples": record} if record else {})}

    def load_state_dict(self, state: dict) -> None:
        """Continues after the saved global samples, at any global batch size (the next step takes the next G)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"data state of kind {state.get('kind')!r} cannot resume {self.what}")
        if "samples" in state:   # absent from states written before it was kept: not checked
            self.resume_samples(state["samples"], int(state["consumed_samples"]))
        self.consumed_samples, self._micro = int(state["consumed_samples"]), 0


def counters_of_rank(saved: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """The entries of `saved` (every data-parallel rank's `counters()` when a checkpoint was written, by rank) that
    data-parallel rank `dp_rank` of `dp_size` takes on resume: its own at the same size. At another size no saved
    rank's part of the data is this rank's, so rank 0 takes them all and the others none: the sums over the ranks,
    which the metrics report, stay those saved."""
    if len(saved) == dp_size:
        return [saved[dp_rank]]
    return list(saved) if dp_rank == 0 else []


def format_runs(indices: list[int], *, sep: str = "..") -> str:
    """"40..47", "17, 21..22": runs of consecutive indices as ranges (their ends joined by `sep`)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}{sep}{b}" for a, b in runs) or "none"
