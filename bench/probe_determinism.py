"""Which parameters' gradients differ between two identical forward + backward passes, with train.deterministic off
and on (train/determinism.py).

One process (a child per mode, so that the mode's environment is set before CUDA starts in it) builds the recipe's
Trainer (parallel=single, lr 0 so that no weight moves, no clipping), runs two training steps on the same micro-batches
(the loader's micro-batches of the first step are recorded and replayed), and compares every parameter's gradient as the
optimizer would take it (the LM's reduced main_grad, the vision tower's reduced grad). It prints, per mode, the
losses of the two passes, each parameter whose gradient differs (forward order: vision tower, projector, LM) with the
largest difference and its place in the backward's order, and the one the backward reaches first (from gradient
hooks; every parameter it reaches later may differ only because that one did).

    python bench/probe_determinism.py --out $OUT/probe.json                  # one GPU, keye_tiny, off and on
    python bench/probe_determinism.py --device cpu --out /tmp/probe.json     # CPU: checks the script (fp32, gloo)
    python bench/probe_determinism.py --recipe keye_tiny_vl_ksa --set model.lm.ksa.backend=triton

A check, no speed claim (bench/gpu_checks_determinism.sh times the mode).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(recipe: str, mode: str, run_dir: str, extra: list[str]) -> list[str]:
    """The probe's run: `recipe` in one process, nothing moving the weights, no checkpoint, wandb or memory check."""
    return [f"recipe={recipe}", "parallel=single", "train.lr=0", "train.min_lr=0", "train.vision_lr=0",
            "train.projector_lr=0", "train.grad_clip=0", "train.warmup_steps=1", "train.steps=2",
            "train.checkpoint.enabled=false", "train.wandb.enabled=false", "train.memory_check=off",
            f"train.deterministic={'true' if mode == 'on' else 'false'}", f"run_dir={run_dir}", *extra]


def child(recipe: str, mode: str, extra: list[str]) -> dict:
    """Two passes on one batch in this process; the comparison as a dict."""
    from train.noise import silence_known_warnings

    silence_known_warnings()
    import torch

    from train.launch import check_device, compose_config, validate
    from train.trainer import Trainer

    cfg, layout = validate(compose_config(overrides(recipe, mode, tempfile.mkdtemp(prefix="probe_det_"), extra)))
    check_device(cfg, cuda=torch.cuda.is_available())
    if cfg.data.kind != "video":
        raise SystemExit(f"the probe replays the video loader's micro-batches; recipe {recipe} reads "
                         f"data.kind={cfg.data.kind}")
    trainer = Trainer(cfg, layout)
    recorded: list = []
    replay: list = []
    stream = trainer.streams[0]
    take = stream.take

    def same_batches(n):   # the loader's micro-batches (the vision tower encodes them each time)
        if replay:
            return replay.pop(0)
        mbs = take(n)
        recorded.append(copy.deepcopy(mbs))
        return mbs

    stream.take = same_batches
    grads: list[dict] = []

    def snapshot(named):
        return {name: g.detach().float().clone() for name, g in named}

    lm_params = [(f"lm.{n}", p) for i, c in enumerate(trainer.model) for n, p in c.module.named_parameters()
                 if p.requires_grad]
    vision = trainer.vision
    vis_params = [(f"vision.{n}", p) for n, p in vision.model.named_parameters()] if vision is not None else []
    if vision is not None and vision.optimizer is not None:
        vision_update = vision.update

        def update(step):
            grads.append(snapshot((n, p.grad) for n, p in vis_params if p.grad is not None))
            return vision_update(step)

        vision.update = update
    optimizer_step = trainer.optimizer.step

    def step():
        got = snapshot((n, p.main_grad) for n, p in lm_params if getattr(p, "main_grad", None) is not None)
        if vision is not None and vision.optimizer is not None:
            grads[-1].update(got)
        else:
            grads.append(got)
        return optimizer_step()

    trainer.optimizer.step = step
    reached: dict[str, int] = {}   # the order in which the first pass's backward produced each gradient

    def seen(name):
        def hook(_):
            reached.setdefault(name, len(reached))
        return hook

    hooks = [p.register_post_accumulate_grad_hook(seen(n)) for n, p in vis_params + lm_params if p.requires_grad]
    losses = []
    for i in range(2):
        losses.append(trainer.train_step().loss)
        if i == 0:
            replay.extend(recorded)
            for h in hooks:
                h.remove()
    trainer.close()
    first, second = grads
    order = [n for n, _ in vis_params + lm_params if n in first]
    differ = [{"param": n, "max_abs_diff": float((first[n] - second[n]).abs().max()),
               "max_abs": float(first[n].abs().max()), "backward_order": reached.get(n)}
              for n in order if not torch.equal(first[n], second[n])]
    # the backward reached it first: the latest in the forward when the hooks saw none (every parameter it reaches
    # later may differ only because it did)
    source = min(differ, key=lambda d: d["backward_order"]) if differ and None not in [
        d["backward_order"] for d in differ] else (differ[-1] if differ else None)
    return {"mode": mode, "recipe": recipe, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else "cpu", "losses": losses, "same_loss": losses[0] == losses[1], "params": len(order),
            "differ": differ, "first_in_backward": source["param"] if source else None, "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="keye_tiny")
    ap.add_argument("--modes", default="off,on")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--set", action="append", default=[], help="another override, e.g. model.lm.dsa.backend=naive")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("PROBE " + json.dumps(child(a.recipe, a.child, a.set)), flush=True)
        return
    if a.device == "gpu":
        from bench.cli import require_gpus

        require_gpus(__file__, hint="--device cpu checks the script on the CPU")
    results = []
    for mode in a.modes.split(","):
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
        if a.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, __file__, "--child", mode, "--recipe", a.recipe]
        cmd += [x for s in a.set for x in ("--set", s)]
        p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("PROBE ")), None)
        if line is None:
            results.append({"mode": mode, "recipe": a.recipe, "error": (p.stderr or p.stdout)[-3000:]})
        else:
            results.append(json.loads(line[len("PROBE "):]))
    for r in results:
        print(f"== {r['recipe']} train.deterministic={r['mode']}")
        if "error" in r:
            print("  failed:\n" + r["error"])
            continue
        print(f"  {r['device']}, torch {r['torch']}: losses {r['losses'][0]!r} / {r['losses'][1]!r} "
              f"({'the same' if r['same_loss'] else 'different'}); {len(r['differ'])} of {r['params']} gradients "
              f"differ")
        for d in r["differ"]:
            print(f"    {d['param']:70} max |diff| {d['max_abs_diff']:.3g} (max |grad| {d['max_abs']:.3g}), "
                  f"backward #{d['backward_order']}")
        if r["first_in_backward"]:
            print(f"  first reached by the backward: {r['first_in_backward']}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
