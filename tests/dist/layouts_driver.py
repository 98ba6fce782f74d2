"""Runs several short trainings in ONE torchrun job, one layout after another, and writes their losses.

Used by the parity tests (through tests/launch_util.run_layouts, which forks the ranks from a warm
process instead of starting them under torchrun): starting a process costs ~11 CPU-s of imports on a
2-core machine, a layout's 3 training steps ~5 s, so the layouts share the processes. Between layouts megatron's parallel
state is destroyed and rebuilt by `build_process_groups`; nothing else carries over.

    torchrun --standalone --nproc_per_node 2 tests/dist/layouts_driver.py OUT.json RUN_ROOT 'name=override override;...'

An entry with `run_dir=<dir>` uses RUN_ROOT/<dir>, so later entries can resume an earlier one's checkpoints; one with
`KEYE_FAULT=<fault>` trains with that fault switched on (train/faults.py; one fault, as ';' separates entries).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()


from train.launch import compose_config, validate  # noqa: E402
from train.optim import torch_optimizers  # noqa: E402


def run(out: str, run_root: str, spec: str) -> None:
    """Trains each `name=overrides` entry of `spec` (';'-separated) in turn on this rank; rank 0 writes
    the losses, each step's further metrics, parameter digests and held-out results to `out`."""
    run_root = Path(run_root)
    results, digests, evals, extras, held, fds, norms = {}, {}, {}, {}, {}, {}, {}
    for item in spec.split(";"):
        item = item.replace("{root}", str(run_root))
        name, overrides = item.split("=", 1)
        # run_dir=<name> shares a run directory between entries (resume / reshard); default: own directory
        ov = [o for o in overrides.split() if not o.startswith(("run_dir=", "KEYE_FAULT="))]
        shared = [o.split("=", 1)[1] for o in overrides.split() if o.startswith("run_dir=")]
        fault = [o.split("=", 1)[1] for o in overrides.split() if o.startswith("KEYE_FAULT=")]
        os.environ.pop("KEYE_FAULT", None)
        if fault:
            os.environ["KEYE_FAULT"] = fault[-1]
        cfg, layout = validate(compose_config(ov + [f"run_dir={run_root / (shared[-1] if shared else name)}"]))
        from train.trainer import Trainer

        trainer = Trainer(cfg, layout)
        if cfg.train.eval.only:  # scores checkpoints, trains nothing (its evaluations: trainer.eval_history)
            trainer.evaluate_only()
            history = []
        else:
            history = trainer.train()
        results[name] = {s.step: s.loss for s in history}
        extras[name] = {s.step: s.extra for s in history}  # the step's further metrics (router statistics, ...)
        norms[name] = {s.step: s.grad_norm for s in history}  # the LM's gradient norm, as the log shows it
        evals[name] = trainer.eval_history  # train.eval's results, when the entry turns it on
        # rank 0's parameter values after training, summarised per tensor (to check what a stage froze); the
        # vision tower's (ViT and projector) under "vision."
        params = list(trainer.model[0].module.named_parameters())
        if trainer.vision is not None:
            params += [(f"vision.{n}", p) for n, p in trainer.vision.model.named_parameters()]
        digests[name] = {n: [float(p.detach().double().sum()), float(p.detach().double().abs().sum())]
                         for n, p in params}
        # what the trainer holds for training on this rank: gradient buffer elements (the LM's DDP buffers) and the
        # parameters its optimizers update (the LM's and the vision tower's)
        held[name] = {"grad_elements": sum(b.grad_data.numel() for m in trainer.model
                                           for b in (*m.buffers, *m.expert_parallel_buffers)),
                      "optimizer_params": sum(p.numel() for o in torch_optimizers(trainer.optimizer) if o is not None
                                              for g in o.param_groups for p in g["params"]),
                      "vision_optimizer_params": sum(p.numel() for p in trainer.vision.params)
                      if trainer.vision is not None else 0}
        trainer.close()
        del trainer
        fds[name] = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1  # open after it
        os.environ.pop("KEYE_FAULT", None)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({"losses": results, "digests": digests, "evals": evals,
                                            "extras": extras, "held": held, "open_fds": fds,
                                            "grad_norms": norms}))
    from parallel.groups import teardown

    teardown()


if __name__ == "__main__":
    run(*sys.argv[1:4])
