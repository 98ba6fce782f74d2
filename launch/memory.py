"""Predicted peak memory per rank of a recipe + layout (parallel/memory.py), from the config alone.

    python launch/memory.py recipe=keye_30b_a3b_ctx_256k [world_size=16] [overrides ...]

The overrides are pretrain.py's (Hydra's `key=value`); world_size defaults to the fewest ranks the layout needs.
A wrong key, type or layout, or settings that do not fit together, stop with pretrain.py's message (exit 2); the
files the run reads (data, checkpoints, tokenizer) are not checked, as they may live on another machine.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

from data.video.config import UnsetPathError  # noqa: E402
from parallel.memory import GIB, estimate, inputs_from_config  # noqa: E402


def fewest_ranks(p) -> int:
    """The fewest ranks the layout `p` (ParallelConfig) runs on: a multiple of tp x cp x pp (the attention side) and
    of etp x ep x pp (the experts'), with ep x etp at most tp x cp x dp (parallel/layout.py)."""
    model, step = p.tp * p.cp * p.pp, math.lcm(p.tp * p.cp * p.pp, p.etp * p.ep * p.pp)
    world = step
    while p.ep * p.etp > p.tp * p.cp * (world // model):
        world += step
    return world


def memory_inputs(argv: list[str]):
    """(Config, ParallelLayout, MemoryInputs) of `recipe=NAME [world_size=N] [hydra overrides]`: the layout on N
    ranks, or on the fewest its sizes need (fewest_ranks)."""
    from parallel.layout import ParallelLayout
    from train.config import to_config
    from train.launch import check_settings, compose_config, evaluates

    world = [a.split("=", 1)[1] for a in argv if a.startswith("world_size=")][-1:]
    if world and (not world[0].isdigit() or int(world[0]) < 1):
        raise ValueError(f"world_size must be a positive integer, got {world[0]!r}")
    overrides = [a for a in argv if not a.startswith("world_size=")]
    # the estimate reads no data file: the data paths a recipe leaves for the user to fill (the long-context
    # stages), and the held-out data an evaluation needs, are judged and estimated with stand-in paths
    unset: list[str] = []

    def composed():
        return to_config(compose_config(overrides + [f"{name}=/set/at/launch/{name}" for name in unset]))

    try:
        cfg = composed()
    except UnsetPathError as e:
        unset = list(e.settings)
        cfg = composed()
    d = cfg.data
    held_out = {"video": ("data.video.eval_shards", d.video.shards, d.video.eval_shards),
                "tokens": ("data.tokens.eval_paths", d.tokens.paths, d.tokens.eval_paths)}.get(d.kind)
    if evaluates(cfg) and held_out and held_out[1] and not held_out[2]:
        unset.append(held_out[0])
        cfg = composed()
    if unset:
        print(f"({' and '.join(unset)} left to set: the estimate reads no data file)")
    p = cfg.parallel
    world_size = int(world[0]) if world else fewest_ranks(p)
    layout = ParallelLayout.build(p, world_size=world_size, lm=cfg.model.lm)
    check_settings(cfg, layout)   # pretrain.py's checks of the settings together (it also reads the run's files)
    return cfg, layout, inputs_from_config(cfg, layout)


def main(argv: list[str]) -> None:
    """`python launch/memory.py recipe=NAME [world_size=N] [hydra overrides]`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    try:
        cfg, layout, m = memory_inputs(argv)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        cause = f" ({str(e.__cause__).splitlines()[0]})" if e.__cause__ is not None and str(e.__cause__) else ""
        print(f"launch/memory.py: {e}{cause}", file=sys.stderr)
        sys.exit(2)
    est = estimate(m)
    print(f"{cfg.recipe_name}: {layout.describe()}; recompute {layout.recompute}"
          + (f"; offload {layout.offload} of "
             f"{'all but the last layer' if layout.offload_layers == -1 else f'{layout.offload_layers} layers'}"
             " per model chunk" if layout.offload != "none" else ""))
    if m.trainable == "none":
        print("train.eval.only=true: the model runs forward only, with no gradients or optimizer state")
    if m.indexer_step:
        print("train.trainable=indexer with indexer_backward=local: the step runs the frozen model forward only "
              "(recompute and offload unused), gradients and optimizer state for the indexers alone")
    print(f"seq {m.seq_length} text tokens ({m.model_seq} with summaries), micro-batch {m.micro_batch_size}, "
          f"{m.num_microbatches} micro-batches, {'bf16' if m.bf16 else 'fp32'}")
    if m.pp > 1:   # every pipeline rank holds other layers, micro-batches in flight, embedding or loss
        print("pipeline ranks (predicted peak, GiB): "
              + ", ".join(f"{r}: {t / GIB:.2f}" for r, t in enumerate(est.ranks))
              + f"; the heaviest is rank {est.stage} (of 0-{m.pp - 1}), item by item:")
    print(est.table())


if __name__ == "__main__":
    main(sys.argv[1:])
