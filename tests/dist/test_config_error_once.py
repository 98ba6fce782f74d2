"""A config error the launcher finds before any process group exists is printed once (by each node's local rank 0),
not once per rank: a resume at a layout the checkpoint's optimizer state cannot load at printed its paragraph once
for every rank of the launch (eight times over on an 8-GPU node). Every rank still exits 2."""

import pytest

from tests.launch_util import run_pretrain

pytestmark = pytest.mark.slow


def test_a_resume_layout_error_is_printed_once(tmp_path):
    run_dir = tmp_path / "run"
    run_pretrain(2, ["recipe=keye_tiny_lm", "train.steps=2"], run_dir, timeout=300)   # a checkpoint at EP2
    proc = run_pretrain(2, ["recipe=keye_tiny_lm", "train.steps=3", "parallel.ep=1"], run_dir, check=False,
                        timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-4000:]
    assert len(errors) == 1, errors
    assert "stores the optimizer as dp_reshardable at tp=1 pp=1 vpp=1 ep=2" in errors[0], errors
    assert "this run changes ep 2->1" in errors[0], errors
