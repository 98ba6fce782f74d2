"""Where activation offload's saving shows on a GPU: device memory at the end of each forward (the decoder's final
norm) and each step's peak, with and without parallel.offload=activations, in one process each; and, in the last
step, the peak between one decoder layer's forward and the next one's (a layer's forward runs again in backward under
full recompute, so the interval after it is that layer's backward), labelled by layer and pass.

    torchrun --standalone --nproc_per_node 1 bench/probe_offload_memory.py OUT.json OVERRIDES...
"""
from __future__ import annotations

import json
import os
import sys

import torch


def main() -> None:
    from parallel.groups import teardown
    from parallel.offload import total_stats
    from train.launch import compose_config, validate
    from train.noise import silence_known_warnings
    from train.trainer import Trainer

    silence_known_warnings()
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg, layout = validate(compose_config(overrides))
    tr = Trainer(cfg, layout)
    at_end = []
    intervals = []      # (the hook that closes an interval, memory allocated then, the peak since the hook before)

    blocks = []         # with PROBE_SNAPSHOT=1: the live blocks of 256 MiB or more at the last layer's backward

    def mark(label):
        intervals.append((label, torch.cuda.memory_allocated() / 2 ** 30, torch.cuda.max_memory_allocated() / 2 ** 30))
        torch.cuda.reset_peak_memory_stats()
        if label == "layer 0 recompute" and recording:
            for seg in torch.cuda.memory._snapshot()["segments"]:
                for b in seg["blocks"]:
                    if b["state"] == "active_allocated" and b["size"] >= 2 ** 28:
                        frames = [f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']}:{f['name']}"
                                  for f in b.get("frames", []) if f["filename"].endswith(".py")]
                        blocks.append({"mib": b["size"] / 2 ** 20, "frames": frames[:14]})

    def forward_end(*_):
        at_end.append(torch.cuda.memory_allocated() / 2 ** 30)
        mark("final norm")

    for m in tr.model:     # DDP (and megatron's bf16 wrapper) around the model: found by name
        norm = next(mod for name, mod in m.named_modules() if name.endswith("decoder.final_layernorm"))
        norm.register_forward_hook(forward_end)

    for m in tr.model:
        for name, mod in m.named_modules():
            tail = name.rsplit("decoder.layers.", 1)
            if len(tail) == 2 and tail[1].isdigit():
                mod.register_forward_pre_hook(lambda mod, args, i=int(tail[1]): mark(
                    f"layer {i} {'recompute' if torch.is_grad_enabled() else 'forward'}"))
    steps = []
    recording = False
    for i in range(3):
        if i == 2 and os.environ.get("PROBE_SNAPSHOT") == "1":
            torch.cuda.memory._record_memory_history(max_entries=200000)
            recording = True
        intervals.clear()
        torch.cuda.reset_peak_memory_stats()
        s = tr.train_step()
        mark("end of step")
        steps.append({"loss": s.loss, "seconds": s.seconds, "peak_gib": max(x[2] for x in intervals),
                      "allocated_after_gib": torch.cuda.memory_allocated() / 2 ** 30})
    off = total_stats(tr.offloaders) if getattr(tr, "offloaders", None) else None
    rec = {"overrides": overrides, "steps": steps, "last_step_intervals": intervals,
           "allocated_at_forward_end_gib": at_end, "live_blocks_at_layer_0_backward": blocks,
           "offloaded_gib": off.offloaded_bytes / 2 ** 30 if off else 0.0}
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps(rec))
    tr.close()
    teardown()


if __name__ == "__main__":
    main()
