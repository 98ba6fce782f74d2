"""What the routers of a freshly initialised language model see at its first step, layer by layer.

The router statistics (`train/moe_stats.py`) showed the 30B-width model routing almost every token to the
same experts from step 1 when it starts from scratch. This probe runs the launcher in this process (one rank)
with a global forward hook and records, on the first training forward of each layer, for the layer's input,
its attention output, its MoE output and its router's input (the normalised hidden state):

- `rms`: root mean square of the entries;
- `common`: the share of the tokens' energy in their mean vector, |mean_t x|^2 / mean_t |x|^2 (1.0: every
  token carries the same vector);
- `cos`: the mean cosine between two different tokens' vectors;
- for the router input, `load_max`: tokens of the busiest expert / mean tokens per expert (E / k when every
  token goes to the same k experts).

    torchrun --standalone --nproc_per_node 1 bench/probe_router_init.py --out /tmp/route.json -- \\
        recipe=keye_30b_a3b_lm parallel=single model.lm.num_layers=2 model.lm.moe_ffn_hidden_size=192 \\
        train.steps=1 train.warmup_steps=0 train.global_batch_size=1 train.seq_length=2048 \\
        train.precision=fp32 train.checkpoint.enabled=false run_dir=/tmp/route_run

Everything after `--` is the launcher's Hydra overrides. Runs on the CPU (about 2 minutes for the command above,
18 GB of resident memory; the narrower expert FFN keeps the 128 experts' weights and optimizer state in memory and does
not enter the routers' inputs before the first MoE layer).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def token_stats(x: torch.Tensor) -> dict:
    x = x.detach().float().reshape(-1, x.shape[-1])
    n = x.shape[0]
    energy = (x * x).sum(1).mean()
    mean = x.mean(0)
    unit_sum = torch.nn.functional.normalize(x, dim=1).sum(0)
    cos = ((unit_sum @ unit_sum) - n) / (n * (n - 1)) if n > 1 else torch.tensor(float("nan"))
    return {"rms": float((energy / x.shape[1]).sqrt()), "common": float((mean @ mean) / energy), "cos": float(cos)}


class Recorder:
    """Forward hook on every module: the first training forward of each (layer, part) is recorded."""

    def __init__(self):
        self.stats: dict[str, dict] = {}

    def __call__(self, module, args, kwargs, output) -> None:
        if not torch.is_grad_enabled():
            return
        name, layer = type(module).__name__, getattr(module, "layer_number", None)
        first = output[0] if isinstance(output, tuple) else output
        if name == "TransformerLayer":
            part, x = "input", kwargs.get("hidden_states", args[0] if args else None)
        elif name == "SelfAttention":
            part, x = "attention_out", first
        elif name == "MoELayer":
            part, x = "moe_out", first
        elif name == "TopKRouter":
            part, x = "router_in", args[0]
        else:
            return
        key = f"layer{layer}.{part}"
        if key in self.stats or x is None:
            return
        self.stats[key] = token_stats(x)
        if name == "TopKRouter":
            counts = output[1].sum(0).float()  # routing map [tokens, experts]
            self.stats[key]["load_max"] = float(counts.max() / counts.mean())


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    recorder = Recorder()
    torch.nn.modules.module.register_module_forward_hook(recorder, with_kwargs=True)
    sys.argv = [os.path.join(ROOT, "launch", "pretrain.py")] + overrides
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:  # Hydra exits after the run; a non-zero code is the run's failure
        if e.code:
            raise
    finally:
        with open(args.out, "w") as f:
            json.dump({"overrides": overrides, "stats": recorder.stats}, f, indent=1)
        for key in sorted(recorder.stats):
            print(key, {k: round(v, 4) for k, v in recorder.stats[key].items()})


if __name__ == "__main__":
    main()
