"""CPU: what building trainers one after another in a process costs, with the checkpoint writer's helper kept per
process (train/preemption.restart_checkpoint_helpers) against a fresh helper per trainer (the earlier behaviour,
emulated in the same run by forgetting the live helper before each trainer). Each trainer: keye_tiny_lm, one rank,
4 steps, a checkpoint every step.

    python bench/probe_trainer_start.py --trainers 3 --out /tmp/trainer_start.json
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainers", type=int, default=3)
    ap.add_argument("--out", default="trainer_start.json")
    args = ap.parse_args()
    from launch.supervise import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WANDB_MODE="disabled")
    from tests.dist import layouts_driver
    from tests.launch_util import QUIET
    from train import preemption

    common = QUIET + ["recipe=keye_tiny_lm", "train.steps=4", "train.global_batch_size=8",
                      "train.micro_batch_size=2", "train.seq_length=128", "parallel=single",
                      "train.checkpoint.save_interval=1"]
    keep = preemption.restart_checkpoint_helpers
    results = {}
    for mode in ("fresh_helper_per_trainer", "helper_kept", "fresh_helper_per_trainer", "helper_kept"):
        def restart(fresh=mode.startswith("fresh")):
            if fresh:
                preemption._MANAGERS.clear()   # forgotten (its finalizer shuts it down): the next call spawns one
            keep()
        preemption.restart_checkpoint_helpers = restart
        import train.trainer as trainer_module
        trainer_module.restart_checkpoint_helpers = restart
        with tempfile.TemporaryDirectory() as root:
            spec = ";".join(f"t{i}=" + " ".join(common) for i in range(args.trainers))
            t0 = time.perf_counter()
            layouts_driver.run(os.path.join(root, "out.json"), os.path.join(root, "runs"), spec)
            results.setdefault(mode, []).append(time.perf_counter() - t0)
    out = {"trainers": args.trainers, "seconds": results, "command": " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
