"""train.profile: the steps asked for are recorded on the ranks asked for, and written where the run writes.

Two ranks (DP 2 on the tiny LM). Rank 1 only, steps 2-3 of 4: its trace (gzipped Chrome JSON) holds the
matmuls of the model's step and the profiler's own step markers, its table names the operators; rank 0 writes
nothing. A window past the run's last step is cut there and still written (steps 3-3 of 3). A launch that resumes
past the window's start records nothing and says so at its start, naming the start that would record its steps.
"""

import gzip
import json

import pytest

from tests.launch_util import run_layouts

pytestmark = pytest.mark.slow

COMMON = ["recipe=keye_tiny_lm", "train.checkpoint.enabled=false", "train.global_batch_size=8",
          "train.micro_batch_size=2", "train.seq_length=128", "parallel=single"]

SAVED = [o for o in COMMON if o != "train.checkpoint.enabled=false"] + [
    "train.steps=4", "train.checkpoint.save_interval=1", "run_dir=past"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    run_layouts(2, {
        "window": COMMON + ["train.steps=4", "train.profile.start=2", "train.profile.steps=2", "train.profile.ranks=[1]"],
        "cut": COMMON + ["train.steps=3", "train.profile.start=3", "train.profile.steps=5"],
        # stopped after step 2 with a checkpoint, then resumed (at step 3) asking for step 2
        "saved": SAVED + ["train.stop_after=2"],
        "resumed": SAVED + ["train.profile.start=2", "train.profile.steps=1"],
    }, tmp)
    return tmp / "runs"


def test_the_window_is_recorded_on_the_ranks_asked_for(runs):
    out = runs / "window" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["steps2-3.rank1.json.gz", "steps2-3.rank1.txt"]
    events = json.loads(gzip.decompress((out / "steps2-3.rank1.json.gz").read_bytes()))["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::mm" in names, "the model's matmuls are in the trace"
    assert "Self CPU" in (out / "steps2-3.rank1.txt").read_text() and "aten::mm" in (out / "steps2-3.rank1.txt").read_text()


def test_a_window_past_the_last_step_is_cut_and_written(runs):
    out = runs / "cut" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["steps3-3.rank0.json.gz", "steps3-3.rank0.txt"]


def test_a_launch_resumed_past_the_window_says_it_records_nothing(runs):
    assert not (runs / "past" / "profile").exists()
    log0 = (runs.parent / "logs" / "rank0.log").read_text()
    assert ("train.profile: this launch starts at step 3 (resumed), past train.profile.start=2, so it records no "
            "profile; train.profile.start=3 (or a later step up to train.steps) records steps of this launch") in log0
    assert log0.count("train.profile: this launch starts at") == 1   # the launches that start at step 1: none
