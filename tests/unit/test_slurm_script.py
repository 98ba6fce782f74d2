"""launch/slurm/pretrain.sbatch run as sbatch runs it: a copy in a spool directory, from another working directory,
with stand-ins for srun and scontrol on PATH (no SLURM here). It finds the repository from the submitted script,
honours a MASTER_ADDR given to it, and after its early-warning signal touches STOP, waits for the job step, removes
the file, requeues the job where the trainer stopped well with a checkpoint and exits with the step's status."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "slurm" / "pretrain.sbatch"

SRUN = """#!/usr/bin/env bash
# records where and with what it ran; with FAKE_WAIT_STOP, runs until <run_dir>/STOP exists and stops as the trainer
# does: a checkpoint written (unless FAKE_NO_CHECKPOINT), STOP removed (unless FAKE_KEEP_STOP: a trainer that ended
# without looking), exit FAKE_RC
run_dir=""
for a in "$@"; do case "$a" in run_dir=*) run_dir="${a#run_dir=}" ;; esac; done
printf '%s\\n' "cwd=$PWD" "master=$MASTER_ADDR" "node_sh=$( [[ -x launch/slurm/node.sh ]] && echo yes )" \\
    "started=${KEYE_LAUNCH_STARTED:-}" "args=$*" > "$FAKE_RECORD"
if [[ -n "${FAKE_WAIT_STOP:-}" ]]; then
  for _ in $(seq 200); do [[ -e "$run_dir/STOP" ]] && break; sleep 0.1; done
  [[ -e "$run_dir/STOP" ]] || exit 99
  if [[ -z "${FAKE_NO_CHECKPOINT:-}" ]]; then
    mkdir -p "$run_dir/checkpoints/step_000003" && echo '{}' > "$run_dir/checkpoints/step_000003/COMPLETE.json"
  fi
  [[ -n "${FAKE_KEEP_STOP:-}" ]] || rm "$run_dir/STOP"
fi
exit "${FAKE_RC:-0}"
"""

SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf 'node1\\nnode2\\n' ;;
  "show job") printf 'JobId=%s JobName=keye-pretrain\\n   Command=%s recipe=keye_tiny_lm\\n' "$3" "$FAKE_SUBMITTED" ;;
  *) echo "$*" >> "$FAKE_RECORD.scontrol" ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    spool = tmp_path / "spool" / "job42"
    spool.mkdir(parents=True)
    shutil.copy(SCRIPT, spool / "slurm_script")
    elsewhere = tmp_path / "submitted_from"
    elsewhere.mkdir()
    record = tmp_path / "record.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(elsewhere), "FAKE_RECORD": str(record),
           "FAKE_SUBMITTED": str(SCRIPT)}
    env.pop("MASTER_ADDR", None)

    def start(*args, **extra_env):
        return subprocess.Popen(["bash", str(spool / "slurm_script"), *args], cwd=elsewhere, env={**env, **extra_env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def recorded() -> dict:
        return dict(line.split("=", 1) for line in record.read_text().splitlines())

    return start, recorded, record


def test_the_spool_copy_runs_the_job_step_from_the_repository(fake_slurm, tmp_path):
    start, recorded, _ = fake_slurm
    p = start("recipe=keye_tiny_lm", f"run_dir={tmp_path / 'run'}", FAKE_RC="7")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 7, err                      # the job step's status
    got = recorded()
    assert got["cwd"] == str(REPO) and got["node_sh"] == "yes", got
    assert got["master"] == "node1" and (tmp_path / "run").is_dir()
    p = start("recipe=keye_tiny_lm", f"run_dir={tmp_path / 'run'}", MASTER_ADDR="10.1.2.3")
    p.communicate(timeout=60)
    assert p.returncode == 0 and recorded()["master"] == "10.1.2.3"   # the README's override


def _warn_while_the_step_runs(start, record, run_dir, **env):
    """Starts the job with the stand-in trainer that stops on STOP, sends the early warning once the step has started;
    returns its exit status, its stderr, and when it was started and warned (time.time())."""
    began = time.time()
    p = start("recipe=keye_tiny_lm", f"run_dir={run_dir}", FAKE_WAIT_STOP="1", **env)
    deadline = time.time() + 30
    while not record.exists() and time.time() < deadline:   # the job step has started
        time.sleep(0.1)
    warned = time.time()
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    return p.returncode, err, began, warned


def test_the_early_warning_stops_the_step_requeues_and_exits_zero(fake_slurm, tmp_path):
    start, recorded, record = fake_slurm
    run_dir = tmp_path / "run"
    status, err, began, warned = _warn_while_the_step_runs(start, record, run_dir)
    assert "asking the trainer to checkpoint and stop" in err and "requeueing job 42" in err, err
    assert status == 0, err                      # the step ended well: not the interrupted wait's 138
    assert (tmp_path / "record.txt.scontrol").read_text().split() == ["requeue", "42"]
    assert not (run_dir / "STOP").exists()              # a requeued attempt does not stop at its first step
    # the job step's start, for the trainer: a STOP touched after it is this launch's (train/preemption.py). The
    # trainer's own start (its import) came later: a warning while the workers started was dropped as stale
    started = float(recorded()["started"])
    assert began - 1 <= started <= warned, (began, started, warned)


@pytest.mark.parametrize("env,said", [
    ({"FAKE_RC": "3"}, "the job step exited with status 3 after the stop request: not requeueing job 42"),
    ({"FAKE_NO_CHECKPOINT": "1"}, "holds no complete checkpoint (train.checkpoint.enabled=false?): not requeueing"),
    ({"FAKE_KEEP_STOP": "1"}, "the trainer ended without taking the stop request (its training had finished): not "
                              "requeueing job 42"),
])
def test_after_the_early_warning_only_a_stop_with_a_checkpoint_is_requeued(fake_slurm, tmp_path, env, said):
    """The job was requeued after any warning, whatever the step's status and whether a checkpoint was written,
    saying 'checkpoint written': a failing trainer was requeued to fail again, one that had finished to train
    nothing, one without a checkpoint to start over."""
    start, recorded, record = fake_slurm
    run_dir = tmp_path / "run"
    status, err, _, _ = _warn_while_the_step_runs(start, record, run_dir, **env)
    assert said in err and "requeueing job 42" not in err.replace("not requeueing job 42", ""), err
    assert status == int(env.get("FAKE_RC", "0")), err
    assert not (tmp_path / "record.txt.scontrol").exists()
    assert not (run_dir / "STOP").exists()


def test_without_a_recipe_the_job_trains_the_recipe_its_run_directory_names(fake_slurm):
    """The script names the run directory after keye_30b_a3b when no recipe= is given, but passed no recipe on:
    launch/pretrain.py then trained its own default (recipes/config.yaml) under runs/keye_30b_a3b-<job id>."""
    default = next(line.split(":")[1].strip() for line in (REPO / "recipes" / "config.yaml").read_text().splitlines()
                   if line.strip().startswith("- recipe:"))
    assert default != "keye_30b_a3b"          # else the test could not tell
    start, recorded, _ = fake_slurm
    made = REPO / "runs" / "keye_30b_a3b-9042"
    assert not made.exists()
    try:
        p = start(SLURM_JOB_ID="9042")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        got = recorded()["args"].split()         # srun's own flags, node.sh, then what node.sh hands to pretrain.py
        assert got[got.index("launch/slurm/node.sh") + 1:] == ["recipe=keye_30b_a3b", "run_dir=runs/keye_30b_a3b-9042"]
    finally:
        if made.is_dir():
            made.rmdir()
            if not any((REPO / "runs").iterdir()):
                (REPO / "runs").rmdir()


def test_a_repository_path_with_spaces_is_found(fake_slurm, tmp_path):
    """scontrol's Command= was cut at its first space: a repository under a path with a space was not found, and the
    directory sbatch was called in was not tried (the cut path was not empty), so the job stopped with 'cannot find
    the repository'. The whole value is taken now, shortened at spaces from the right (scontrol appends the script's
    arguments) until it names a file."""
    start, recorded, _ = fake_slurm
    spaced = tmp_path / "my repo"
    spaced.symlink_to(REPO)
    p = start("recipe=keye_tiny_lm", f"run_dir={tmp_path / 'run'}",
              FAKE_SUBMITTED=str(spaced / "launch" / "slurm" / "pretrain.sbatch"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    got = recorded()
    assert got["cwd"] == str(spaced) and got["node_sh"] == "yes", got


def test_a_submitted_path_that_is_gone_falls_back_to_the_submit_directory(fake_slurm, tmp_path):
    """A Command= that names no file (the script moved since, or a path scontrol does not show whole) leaves the
    directory sbatch was called in to try."""
    start, recorded, _ = fake_slurm
    p = start("recipe=keye_tiny_lm", f"run_dir={tmp_path / 'run'}", FAKE_SUBMITTED=str(tmp_path / "gone" / "x.sbatch"),
              SLURM_SUBMIT_DIR=str(REPO))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert recorded()["cwd"] == str(REPO)
    p = start("recipe=keye_tiny_lm", f"run_dir={tmp_path / 'run'}", FAKE_SUBMITTED=str(tmp_path / "gone" / "x.sbatch"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "cannot find the repository" in err and "call sbatch in the repository's" in err, err
