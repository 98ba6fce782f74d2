"""What a launch holds as its run goes on: nothing may grow by the step.

A run lasts weeks; whatever it keeps per step (a record, a file descriptor, a thread, a process) ends it in time. The
launcher's run (train/launch.py `run`, on one forked rank) trains the tiny LM with a checkpoint every step, written
asynchronously and pruned to the newest two, and an evaluation every other step; what it holds is counted after each
step, and the counts of a later step must equal those of an early one, after the first save and evaluation made their
helpers (the checkpoint writer's Manager, the checksum thread).
"""

import json
import os
import threading
from pathlib import Path

from tests.launch_util import QUIET, run_ranks

STEPS = 8
EARLY = 3   # a step after the first asynchronous save was committed and the first evaluation ran


def _children() -> int:
    """This process's child processes (zombies too: a writer not reaped)."""
    me, n = str(os.getpid()), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    n += f.read().rsplit(")", 1)[1].split()[1] == me
            except OSError:
                pass
    return n


def worker(out: str, run_dir: str) -> None:
    import train.trainer as trainer_module
    from train.launch import compose_config, run

    counts, held = {}, []
    loop, step = trainer_module.Trainer._loop, trainer_module.Trainer.train_step

    def counting_loop(self, history, start, stops):
        held.append(history)        # what the training keeps of its steps
        return loop(self, history, start, stops)

    def counting_step(self):
        stats = step(self)
        counts[stats.step] = {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
                              "children": _children(), "history": len(held[0]),
                              "checkpoints": len(list(Path(run_dir, "checkpoints").glob("step_*")))}
        return stats

    trainer_module.Trainer._loop, trainer_module.Trainer.train_step = counting_loop, counting_step
    overrides = ["recipe=keye_tiny_lm", "parallel=single", f"train.steps={STEPS}", "train.global_batch_size=2",
                 "train.micro_batch_size=1", "train.seq_length=32", "model.lm.num_layers=2", "model.lm.hidden_size=64",
                 "model.lm.num_attention_heads=4", "model.lm.num_query_groups=2", "model.lm.head_dim=16",
                 "model.lm.num_experts=4", "model.lm.moe_topk=2", "model.lm.moe_ffn_hidden_size=32",
                 "train.checkpoint.save_interval=1", "train.checkpoint.keep_last=2", "train.checkpoint.async_save=true",
                 "train.eval.interval=2", "train.eval.batches=1", *QUIET, f"run_dir={run_dir}"]
    try:
        run(compose_config(overrides))
    except SystemExit as e:
        if e.code:
            raise
    counts["history_after"] = len(held[0])
    Path(out).write_text(json.dumps(counts))


def test_a_launch_holds_no_more_at_its_last_step_than_at_an_early_one(tmp_path):
    out = tmp_path / "counts.json"
    run_ranks(1, "tests.dist.test_run_resources:worker", (str(out), str(tmp_path / "run")), tmp_path / "logs",
              timeout=600)
    got = json.loads(out.read_text())
    early, last = got[str(EARLY)], got[str(STEPS)]
    # the launcher reads none of the steps' stats (metrics.jsonl has them): it kept every one, about 1 kB a step
    assert early["history"] == last["history"] == got["history_after"] == 1, got
    for what in ("fds", "threads", "children"):
        assert last[what] == early[what], (what, got)
    # keep_last=2: the step's save is committed at the next step's save (or at the end), so 2 to 3 on disk
    assert all(2 <= c["checkpoints"] <= 3 for k, c in got.items() if k.isdigit() and int(k) >= EARLY), got
