"""What a launch finds in its run directory before it trains: a run_dir it cannot write (stopped with a config error
naming it, not a traceback per rank), and a STOP file an earlier launch left (removed, so the run does not stop
after its first step; one written after the launch began still stops it)."""
import logging
import os
import time
from types import SimpleNamespace

import pytest

from train.launch import check_run_dir
from train.preemption import StopRequests


def _cfg(path):
    return SimpleNamespace(resolved_run_dir=lambda: str(path))


def test_run_dir_must_be_a_directory_the_launch_can_make(tmp_path):
    check_run_dir(_cfg(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()                   # judged, not made: an invalid launch writes nothing
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"run_dir=.*afile is a file, not a directory"):
        check_run_dir(_cfg(tmp_path / "afile"))
    with pytest.raises(ValueError, match=r"run_dir=.*afile/run/sub: cannot be made a directory \(.*afile is a file"):
        check_run_dir(_cfg(tmp_path / "afile" / "run" / "sub"))


def test_a_stop_file_from_before_the_launch_is_removed_and_a_new_one_kept(tmp_path, caplog):
    stop = tmp_path / "STOP"
    launched = time.time()
    stop.touch()
    os.utime(stop, (launched - 60, launched - 60))            # the last launch's
    requests = StopRequests(str(tmp_path), signals=())
    with caplog.at_level(logging.WARNING):
        requests.drop_stale(launched)
    assert not stop.exists() and "written before this launch began" in caplog.text
    stop.touch()                                              # a user's, during the model build: honoured
    requests.drop_stale(launched)
    assert stop.exists()
    # its mtime from the kernel's coarse clock (a tick behind time.time()) or a filesystem's whole seconds: still
    # this launch's. Without the slack the assertion above failed once in CI: the file touched right after `launched`
    # read as older than it
    os.utime(stop, (launched - 1, launched - 1))
    requests.drop_stale(launched)
    assert stop.exists()
    stop.unlink()
    requests.drop_stale(launched)                             # nothing to do without one


def test_a_fault_drill_with_a_misspelled_fault_stops_before_the_run(monkeypatch):
    """KEYE_FAULT names what the drill breaks: a fault name not in the list, or an argument that is not
    NAME=INTEGER, stops the launch naming the part (a misspelled drill used to run clean and 'pass')."""
    from train.faults import _parse, check_env

    assert _parse("kill_in_step:step=3:rank=1; nan_in_step:micro=1:doc=0") == [
        ("kill_in_step", {"step": 3, "rank": 1}), ("nan_in_step", {"micro": 1, "doc": 0})]
    for spec, message in (("kill_in_steps:step=3", r"'kill_in_steps' is not a fault; the faults are kill_in_save"),
                          ("kill_in_step:step3", r"'step3' in 'kill_in_step:step3' is not NAME=INTEGER"),
                          ("kill_in_step:stp=3", r"'stp=3' .* is not NAME=INTEGER with NAME one of step, rank"),
                          ("nan_in_step:rank=one", r"'rank=one' .* is not NAME=INTEGER")):
        monkeypatch.setenv("KEYE_FAULT", spec)
        with pytest.raises(ValueError, match=r"KEYE_FAULT=.*" + message):
            check_env()
    monkeypatch.delenv("KEYE_FAULT")
    check_env()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a directory nobody can make one in")
def test_a_run_dir_that_cannot_be_made_is_a_config_error_even_for_root(tmp_path):
    """os.access answers yes to root for any directory, so a root launch (a container's) under /proc or a
    root-squashed NFS mount passed the check and failed at its first write with a traceback on every rank: the check
    tries a write instead."""
    with pytest.raises(ValueError, match=r"run_dir=/proc/keye_run/sub: this process cannot write /proc \("):
        check_run_dir(_cfg("/proc/keye_run/sub"))
    check_run_dir(_cfg(tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []                     # the probe is removed
