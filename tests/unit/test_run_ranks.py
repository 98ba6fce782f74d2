"""tests/launch_util.run_ranks: ranks forked from the warm fork server get torchrun's environment, form a
gloo world, and a failing rank stops the job with its traceback instead of leaving the others blocked."""

import json
import os
from pathlib import Path

import pytest

from tests.launch_util import run_ranks


def sum_ranks(out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// from the variables run_ranks set
    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    env["threads"] = torch.get_num_threads()
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"sum": x.item(), **env}))
    dist.destroy_process_group()


def rank1_fails() -> None:
    import torch.distributed as dist

    # rank 1 fails before it joins the world, so rank 0 stays blocked in the rendezvous (for its 30-minute timeout
    # if nobody stopped it) and rank 1 alone fails; a failure after joining would make rank 0's collective fail a
    # moment later too, and which of the two exited first could not be told
    if os.environ["RANK"] == "1":
        raise ValueError("rank 1 broke on purpose")
    dist.init_process_group("gloo")
    dist.barrier()


@pytest.mark.slow
def test_ranks_form_a_world_with_torchrun_environment(tmp_path):
    run_ranks(3, "tests.unit.test_run_ranks:sum_ranks", (str(tmp_path),), tmp_path / "logs", timeout=120)
    for r in range(3):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got == {"sum": 6.0, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "3",
                       "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "0", "TRITON_INTERPRET": None, "threads": 1}


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_with_its_traceback(tmp_path):
    with pytest.raises(AssertionError, match="rank 1 exited") as err:
        run_ranks(2, "tests.unit.test_run_ranks:rank1_fails", (), tmp_path / "logs", timeout=120)
    assert "rank 1 broke on purpose" in str(err.value)
