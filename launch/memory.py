"""Predicted peak memory per rank of a recipe + layout (parallel/memory.py), from the config alone.

    python launch/memory.py recipe=keye_30b_a3b_ctx_256k [world_size=16] [overrides ...]

The overrides are pretrain.py's (Hydra's `key=value`); world_size defaults to the fewest ranks the layout needs.
A wrong key, type or layout stops with pretrain.py's message (exit 2).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

from data.video.config import UnsetPathError  # noqa: E402
from parallel.memory import estimate, inputs_from_config  # noqa: E402


def memory_inputs(argv: list[str]):
    """(Config, ParallelLayout, MemoryInputs) of `recipe=NAME [world_size=N] [hydra overrides]`: the layout on N
    ranks, or on the fewest its sizes need (tp x cp x pp, more where the experts' ep x etp exceed tp x cp)."""
    from parallel.layout import ParallelLayout
    from train.config import to_config
    from train.launch import compose_config

    world = [a.split("=", 1)[1] for a in argv if a.startswith("world_size=")][-1:]
    if world and not world[0].isdigit():
        raise ValueError(f"world_size must be a positive integer, got {world[0]!r}")
    overrides = [a for a in argv if not a.startswith("world_size=")]
    try:
        cfg = to_config(compose_config(overrides))
    except UnsetPathError as e:
        # the estimate reads no data setting: a recipe whose video paths are left for the user to fill
        # (the long-context stages) is estimated with the project's own text data instead
        if any(a.startswith("data=") for a in overrides):
            raise
        print(f"(the recipe leaves {' and '.join(e.settings)} to set; the estimate reads no data setting, "
              f"so it uses data=synthetic_tokens)")
        cfg = to_config(compose_config(overrides + ["data=synthetic_tokens"]))
    p = cfg.parallel
    world_size = int(world[0]) if world else p.tp * p.cp * p.pp * max(1, p.ep * p.etp // (p.tp * p.cp))
    layout = ParallelLayout.build(p, world_size=world_size, lm=cfg.model.lm)
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
          f"{m.num_microbatches} micro-batches, {'bf16' if m.bf16 else 'fp32'}; worst stage {est.stage}")
    print(est.table())


if __name__ == "__main__":
    main(sys.argv[1:])
