"""Failures that must lose nothing (issue 8). Every case ends in a resumable state, and the resumed run
reproduces an uninterrupted run's losses bit for bit (same layout, CPU fp32).

- a two-"node" SLURM-style job (two torchrun agents, one rendezvous, SLURM variables as SLURM sets
  them, launched through launch/slurm/node.sh) is sent SIGTERM, checkpoints, and the rerun resumes;
- a rank killed in the middle of a step, then (same run directory) a rank killed while a checkpoint is
  being written: the previous checkpoint stays the newest, and the third run resumes from it;
- a corrupted shard (same size, other bytes): detected by its checksum, named in the log, and the
  run resumes from the older checkpoint;
- a shard damaged in a checkpoint whose checksums were never recorded: its load fails on every rank, and
  the run resumes from the older checkpoint;
- the disk filling up during a save (a small tmpfs): a clear error, and the rerun resumes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch_util import QUIET, REPO, free_port, losses, run_launch, run_layouts, run_pretrain

pytestmark = pytest.mark.slow

OVERRIDES = ["recipe=keye_tiny_lm", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=128",
             "train.steps=6", "train.checkpoint.save_interval=2", "train.checkpoint.keep_last=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's losses (its ranks forked: tests/launch_util.run_layouts; the same losses as under
    torchrun, bit for bit, which test_nonfinite.py's stop-and-resume test also holds to)."""
    return run_layouts(2, {"reference": OVERRIDES + ["train.checkpoint.enabled=false"]},
                       tmp_path_factory.mktemp("reference"))["reference"]


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """A run of OVERRIDES stopped after step 4 (`train.stop_after`: checkpoints at steps 2 and 4): the three tests that
    damage its checkpoints each take a copy, and a stage's init_from reads it (one launch for the four)."""
    d = tmp_path_factory.mktemp("stopped_at_4") / "run"
    run_launch(2, OVERRIDES + ["train.stop_after=4"], d)
    return d


def _copy_run(src: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    return run_dir


def _env(**extra):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def _wait_for(path: Path, procs, timeout=600, poll=0.2, outputs=()):
    deadline = time.time() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), "training exited early:\n" + "\n".join(
            Path(o).read_text()[-3000:] for o in outputs if Path(o).exists())
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(poll)


def test_two_node_slurm_job_sigterm_then_resume(reference, tmp_path):
    """The job saves asynchronously, every step, and SIGTERM comes while the step-3 save is in flight (its directory
    made, its shards staged or being written by a forked writer; the commit follows the next step). torchrun sends
    the signal to each worker's whole process group, which killed the process megatron's writer reports through:
    the save in flight and the stop's own failed ('checkpoint error: ... Broken pipe', no checkpoint of the stop).
    Now both commit. The resume is made to take the asynchronous one (the stop's own, written synchronously as
    test_resume.py's are, is moved out of the directory): it reproduces the uninterrupted (synchronously saving) run
    bit for bit."""
    run_dir = tmp_path / "run"
    overrides = OVERRIDES + ["train.checkpoint.async_save=true", "train.checkpoint.save_interval=1"]
    port = free_port()
    agents = []
    for node in (0, 1):
        env = _env(SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_NODEID=str(node), SLURM_JOB_NODELIST="localhost",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPUS_PER_NODE="1", RUN_LOG_DIR=str(tmp_path / "logs"))
        with open(tmp_path / f"node{node}.out", "wb") as f:
            agents.append(subprocess.Popen([str(REPO / "launch" / "slurm" / "node.sh"), *QUIET, *overrides,
                                            f"run_dir={run_dir}"], cwd=REPO, env=env, stdout=f,
                                           stderr=subprocess.STDOUT))
    try:
        _wait_for(run_dir / "checkpoints" / "step_000003.partial", agents, poll=0.02,
                  outputs=[tmp_path / "node0.out", tmp_path / "node1.out"])
        for a in agents:
            a.send_signal(signal.SIGTERM)  # torchrun forwards it to its worker
        for a in agents:
            a.wait(timeout=120)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "stop requested (SIGTERM" in log and "checkpoint error" not in log, log[-2000:]
    stopped_at = max(losses(run_dir))
    assert 3 < stopped_at < 6   # step 3's save commits after step 4 trained, where the stop is seen
    for step in (3, stopped_at):
        assert (run_dir / "checkpoints" / f"step_{step:06d}" / "COMPLETE.json").exists(), step
    for step in range(4, stopped_at + 1):
        shutil.move(run_dir / "checkpoints" / f"step_{step:06d}", tmp_path / f"step_{step:06d}")
    run_launch(2, overrides, run_dir)   # the rerun (its ranks forked: what it restores is the trainer's)
    assert "step_000003 at step 3" in (run_dir / "logs" / "rank0.log").read_text()
    assert losses(run_dir) == reference


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_sigusr1_to_the_node_script_stops_the_workers_with_a_checkpoint(tmp_path):
    """SLURM's early warning delivered to the tasks (`--signal=USR1@<seconds>`, train/preemption.py) reaches the
    torchrun that launch/slurm/node.sh starts. torchrun's own default for SIGUSR1 is to die: its workers then trained
    on, orphaned, and the job step would kill them before any checkpoint. node.sh has torchrun forward it, so the
    workers stop at the step boundary with a checkpoint and end, as on SIGTERM."""
    run_dir = tmp_path / "run"
    env = _env(SLURM_JOB_ID="4343", SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPUS_PER_NODE="2",
               RUN_LOG_DIR=str(tmp_path / "logs"))
    env.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    steps = 400   # far more than run before the signal lands: a run that ignored it would still be training
    out = tmp_path / "node.out"
    with open(out, "wb") as f:
        agent = subprocess.Popen([str(REPO / "launch" / "slurm" / "node.sh"), *QUIET, *OVERRIDES,
                                  f"train.steps={steps}", f"run_dir={run_dir}"], cwd=REPO, env=env, stdout=f,
                                 stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        _wait_for(run_dir / "checkpoints" / "step_000002" / "COMPLETE.json", [agent], outputs=[out])
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        agent.send_signal(signal.SIGUSR1)     # node.sh exec'd torchrun: this is the agent
        agent.wait(timeout=120)
        deadline = time.time() + 60
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        left = [w for w in workers if Path(f"/proc/{w}").exists()]
    finally:
        if agent.poll() is None:
            agent.kill()
        for w in workers:        # an orphaned worker (the fault this checks) is this test's to end
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"workers {left} still running after torchrun ended"
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "stop requested (SIGUSR1" in log, log[-2000:]
    stopped_at = max(losses(run_dir))
    assert stopped_at < steps and (run_dir / "checkpoints" / f"step_{stopped_at:06d}" / "COMPLETE.json").exists()


def test_rank_killed_mid_step_then_during_save(reference, tmp_path):
    """One run dir, two crashes: rank 1 dies inside step 3 (checkpoint 2 is the newest), the rerun resumes
    and rank 1 dies between writing its step-4 shards and the commit (a torn step_000004.partial, latest
    still step 2); the third run resumes from step 2 and reproduces the uninterrupted curve exactly."""
    run_dir = tmp_path / "run"
    proc = run_pretrain(2, OVERRIDES, run_dir, check=False, env={"KEYE_FAULT": "kill_in_step:step=3:rank=1"})
    assert proc.returncode != 0
    assert max(losses(run_dir)) == 2
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    proc = run_pretrain(2, OVERRIDES, run_dir, check=False, env={"KEYE_FAULT": "kill_in_save:step=4:rank=1"})
    assert proc.returncode != 0
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert (ckpts / "step_000004.partial").is_dir() and not (ckpts / "step_000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    metrics = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4]    # the second run logged steps 3 and 4 before it died in step 4's save
    run_launch(2, OVERRIDES, run_dir)
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert losses(run_dir) == reference
    # the third run trained steps 3 and 4 again: their first records are set aside, so metrics.jsonl reads as
    # one run (train/metrics.py set_aside_redone)
    metrics = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == sorted(reference) and len(metrics) == len(reference)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()] \
        == [3, 4]
    assert ("metrics.jsonl: 2 record(s) after step 2, which this launch trains again, moved to "
            "metrics.superseded.jsonl") in (run_dir / "logs" / "rank0.log").read_text()


def test_corrupted_shard_is_named_and_skipped(reference, stopped_at_4, tmp_path):
    run_dir = _copy_run(stopped_at_4, tmp_path)
    shard = sorted((run_dir / "checkpoints" / "step_000004").glob("__1_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    run_launch(2, OVERRIDES, run_dir)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "step_000004 is corrupted" in log and shard.name in log
    assert "resumed from" in log and "step_000002 at step 2" in log
    assert losses(run_dir) == reference


def test_a_shard_damaged_before_its_checksums_were_recorded_fails_its_load_and_the_older_checkpoint_is_used(
        reference, stopped_at_4, tmp_path):
    """The run ended before its save's background checksum pass wrote CHECKSUMS.rank<r>.json, and then a shard was
    damaged: only the load can tell. Every rank drops that checkpoint together and resumes from the older one."""
    run_dir = _copy_run(stopped_at_4, tmp_path)
    newest = run_dir / "checkpoints" / "step_000004"
    for record in newest.glob("CHECKSUMS.rank*.json"):
        record.unlink()
    shard = sorted(newest.glob("__1_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # same size, serialisation headers zeroed: a torch.load error
    shard.write_bytes(bytes(data))
    run_launch(2, OVERRIDES, run_dir)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "step_000004: no checksum recorded" in log
    assert "step_000004 could not be loaded, looking for an older one" in log
    assert "resumed from" in log and "step_000002 at step 2" in log
    assert losses(run_dir) == reference


def test_checkpoints_that_verify_and_fail_to_load_are_not_called_damaged(stopped_at_4, tmp_path):
    """Every checkpoint's files pass their checks (no checksum records: the run ended before its saves' background
    checksum passes), and each load fails. Damage is not established (a load can fail for a cause outside the files:
    a setting of this launch, the software), so the run stops (exit 3) naming each checkpoint's error and the
    settings changed since the newest, and does not call them damaged (whose advice, to move them out and start
    afresh, would drop checkpoints that may be sound); they stay as they were."""
    run_dir = _copy_run(stopped_at_4, tmp_path)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert [p for p in before if p.startswith("step_")] == ["step_000002", "step_000004"], before
    for step in ("step_000002", "step_000004"):
        for record in (run_dir / "checkpoints" / step).glob("CHECKSUMS.rank*.json"):
            record.unlink()
        shard = sorted((run_dir / "checkpoints" / step).glob("__1_*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[: len(data) // 2] = bytes(len(data) // 2)  # same size, serialisation headers zeroed: a torch.load error
        shard.write_bytes(bytes(data))
    proc = run_launch(2, OVERRIDES + ["train.lr=1e-3"], run_dir, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]     # train/launch.py's exit code of a checkpoint error
    (line,) = {x for x in proc.stderr.splitlines() if x.startswith("checkpoint error:")}
    assert line.startswith(f"checkpoint error: no checkpoint in {run_dir / 'checkpoints'} could be resumed from: "
                           "step_000004: could not be loaded: "), line
    assert "; step_000002: could not be loaded: " in line
    assert ("step_000004, step_000002 passed the checks of their files (sizes, and checksums where recorded) and "
            "failed to load") in line
    # the settings this launch changed since the newest of them, where the cause may lie
    assert "the checkpoint was not written for (settings changed since step_000004: " in line
    assert "train.lr 0.003 -> 0.001" in line
    assert "is damaged" not in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_disk_full_during_save(reference, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # one checkpoint of the tiny model is 18.5 MB: room for the first, not the second
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the disk-full case is not exercised")
    try:
        run_dir = mnt / "run"
        proc = run_launch(2, OVERRIDES + ["train.checkpoint.keep_last=2"], run_dir, check=False,
                          output_dir=tmp_path / "ranks")   # the ranks' output off the full disk
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "MB free on the disk holding" in out and "newest complete one is still used on resume" in out, out[-4000:]
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
        moved = tmp_path / "moved"  # "free space": move the run to a disk with room and rerun
        shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("*.partial"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    run_launch(2, OVERRIDES, moved)
    assert losses(moved) == reference


def test_a_stage_whose_init_from_cannot_fill_its_frozen_vision_tower_stops_with_a_config_error(stopped_at_4,
                                                                                                  tmp_path):
    """What init_from holds is known only once the process groups exist (the trainer reads it): a multimodal stage
    started from a language model's run (a 2-rank one, resharded as init_from does), its ViT frozen, stops with
    `config error: ...` naming init_from (exit 2), as the launcher's own checks do, not with a ValueError traceback
    on every rank."""
    one = ["parallel.ep=1", "train.steps=2", "train.warmup_steps=1"]
    proc = run_launch(1, ["recipe=keye_tiny_vl_dsa_warmup", f"train.checkpoint.init_from={stopped_at_4}"] + one,
                      tmp_path / "vl", check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "config error: train.checkpoint.init_from=" in proc.stderr and "holds no weights for" in proc.stderr
    assert "ValueError" not in proc.stderr, proc.stderr[-4000:]


def test_sigint_to_one_rank_ends_the_run_instead_of_hanging(tmp_path):
    """SIGINT (Ctrl-C) reaching one rank mid-training: that rank left its step while the other waited in the step's
    collective, and the teardown's barrier then waited on that rank for ever (the process group's timeout, 30
    minutes): neither rank ended, and torchrun with them. An interrupted rank now skips the barrier, as a failed one
    does, so it ends, the other's collective fails, and torchrun ends the run; the rank's log says it was
    interrupted."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "pretrain.py"), *QUIET, *OVERRIDES, "train.steps=2000",
           "train.checkpoint.enabled=false", f"run_dir={run_dir}"]
    agent = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 600
        while len(losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < 3:
            assert agent.poll() is None, "training exited early"
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        rank1 = [w for w in _children(agent.pid)
                 if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{w}/environ").read_bytes()]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGINT)
        try:
            agent.wait(timeout=90)      # it ends in seconds; a hang lasts the process group's timeout
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not end within 90 s of SIGINT to rank 1")
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0
    assert "interrupted (SIGINT): the run stops without a checkpoint" in (run_dir / "logs" / "rank1.log").read_text()


def interrupted_with_a_save_in_flight(overrides: str, error: str) -> None:
    """Trains `overrides` (asynchronous saves every step); rank 0 meets `error` (KeyboardInterrupt: SIGINT reaching it
    alone; RuntimeError: a fault of its own) as step 4 begins, the step-3 save in flight, while rank 1 goes into step
    4's collectives."""
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    cfg, layout = validate(compose_config(overrides.split()))
    tr = Trainer(cfg, layout)
    step = tr.train_step

    def interrupt_rank0():
        if tr.rank == 0 and tr.step == 3:
            raise {"KeyboardInterrupt": KeyboardInterrupt, "RuntimeError": RuntimeError}[error]("rank 0 alone")
        return step()

    tr.train_step = interrupt_rank0
    tr.train()


@pytest.mark.parametrize("error", ["KeyboardInterrupt", "RuntimeError"])
def test_a_rank_leaving_alone_with_an_asynchronous_save_in_flight_ends_at_once(tmp_path, error):
    """SIGINT ends the run without a checkpoint, also when it reaches one rank alone, which does not wait for the
    others (README, Stopping); an exception of one rank's own ends it likewise. With an asynchronous save in flight
    that rank waited in its commit, a collective, for ranks that were in the step's collectives, until the process
    group's timeout: the run hung (torchrun, SIGINT to rank 0's pid: no exit in 5 minutes). Now that rank ends the
    save's writer, names the save as not committed, and ends; the other rank is then stopped as torchrun does.
    Forked ranks (tests/launch_util.run_ranks), which stop the others when one fails; its timeout bounds the old
    hang. Errors every rank meets alike (data that ends, a non-finite step, a checkpoint or config error) still
    commit the save in flight."""
    from tests.launch_util import run_ranks

    run_dir = tmp_path / "run"
    overrides = QUIET + OVERRIDES + ["train.checkpoint.async_save=true", "train.checkpoint.save_interval=1",
                                     f"run_dir={run_dir}"]
    began = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        run_ranks(2, "tests.dist.test_faults:interrupted_with_a_save_in_flight", (" ".join(overrides), error),
                  tmp_path / "logs", timeout=120)
    assert "rank 0 exited with 1" in str(failed.value), str(failed.value)[-3000:]
    assert time.monotonic() - began < 100
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert (f"the asynchronous save of step 3 was in flight: not committed "
            f"({run_dir / 'checkpoints' / 'step_000003'}.partial)") in log, log[-3000:]
    assert error in log
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_000002" / "COMPLETE.json").is_file() and not (ckpts / "step_000003").exists()
