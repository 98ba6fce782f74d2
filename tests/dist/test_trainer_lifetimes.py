"""How long a trainer keeps what it allocates.

megatron-core's MoE token dispatcher keeps the last micro-batch's routing probabilities with their autograd
graph: megatron's own until the layer's next forward, with parallel/megatron_compat.py fix 3 until its combine ends
(so still after a step that raised between the two). After the backward that graph still holds each AccumulateGrad
node it reaches: every parameter's (DDP's gradient hooks on them close over the DDP module, a cycle through C++ that
the garbage collector cannot see) and the leaves the micro-batch read, such as its visual embeddings and their
gradients. The trainer detaches such graphs after each round's schedule and in `Trainer.close()` (train/trainer.py
`_drop_stale_graphs`); the control runs megatron's own dispatchers without it.

- A dropped trainer frees its model. Several trainings in one process (the parity tests' layouts driver, the
  benchmarks' cases) otherwise kept every earlier trainer's parameters, gradients and optimizer state: about
  35 GB per case at the ViT benchmark's 30B-width slice on a GPU (bench/RESULTS.md).
- A round's visual embeddings and their gradients are gone before the optimizer steps (they held 2 GB through
  both optimizers at the same slice).
"""

import gc
import json
import weakref
from pathlib import Path

import pytest

from tests.launch_util import QUIET, run_ranks


def _lifetimes(overrides: list[str], *, drop_graphs: bool, close: bool) -> dict:
    """Trains two steps and reports how many of each step's visual embedding tensors were alive when the LM's
    optimizer stepped, then drops the trainer (closing it first or not) and reports what is still alive.
    drop_graphs=False: the steps leave their stale graphs in place (as a step that raised would: its dispatchers
    keep their probabilities when the forward stops between dispatch and combine; here megatron's own dispatchers,
    which keep them after every forward, without parallel/megatron_compat.py fix 3)."""
    from megatron.core.transformer.moe import token_dispatcher

    import train.trainer as trainer_module
    from train.launch import compose_config, validate

    cfg, layout = validate(compose_config(overrides))
    tr = trainer_module.Trainer(cfg, layout)
    refs, embeds_alive = [], []
    orig = {"forward": tr.vision.forward, "step": tr.optimizer.step}  # cleared before the trainer is dropped

    def recording_forward(*a, **k):
        parts = orig["forward"](*a, **k)
        refs.extend(weakref.ref(p) for p in parts or [])
        return parts

    def checking_step(*a, **k):
        embeds_alive.append(sum(r() is not None for r in refs))
        refs.clear()
        return orig["step"](*a, **k)

    tr.vision.forward, tr.optimizer.step = recording_forward, checking_step
    for chunk in tr.model:
        chunk.train()
    del chunk  # the loop variable would keep the last DDP module alive
    drop = trainer_module._drop_stale_graphs
    dispatchers = [token_dispatcher.MoEAlltoAllTokenDispatcher, token_dispatcher.MoEAllGatherTokenDispatcher]
    combine = [d.combine_postprocess for d in dispatchers]
    if not drop_graphs:  # and megatron's own dispatchers (fix 3 undone), which keep their graphs too
        trainer_module._drop_stale_graphs = lambda chunks: None
        for d, c in zip(dispatchers, combine):
            d.combine_postprocess = c.__wrapped__
    try:
        for _ in range(2):
            tr.train_step()
    finally:
        trainer_module._drop_stale_graphs = drop
        for d, c in zip(dispatchers, combine):
            d.combine_postprocess = c
    alive = {"lm_param": weakref.ref(next(tr.model[0].module.parameters())), "ddp": weakref.ref(tr.model[0]),
             "vision_param": weakref.ref(next(tr.vision.model.parameters()))}
    if close:
        tr.close()
    orig.clear()
    del tr
    gc.collect()
    return {"embeds_alive": embeds_alive, **{k: r() is not None for k, r in alive.items()}}


def worker(out: str, run_root: str, shards: str) -> None:
    # the embedded default's model (ViT + projector + MoE LM) on one rank, 2 micro-batches per step
    base = ["recipe=keye_tiny", "parallel=single", "train.steps=2", "train.global_batch_size=2",
            "train.checkpoint.enabled=false", f"data.video.shards={shards}", *QUIET]
    cases = {"trained": ([], True, False),
             "rounds_of_one": (["parallel.vit.group=1"], True, False),
             "graphs_kept": ([], False, False),           # the control: what the checks catch
             "graphs_kept_closed": ([], False, True)}
    res = {name: _lifetimes(base + ov + [f"run_dir={run_root}/{name}"], drop_graphs=d, close=c)
           for name, (ov, d, c) in cases.items()}
    Path(out).write_text(json.dumps(res))
    from parallel.groups import teardown

    teardown()


@pytest.fixture(scope="module")
def lifetimes(tmp_path_factory):
    from data.video_stream import ensure_synthetic_shards

    tmp = tmp_path_factory.mktemp("lifetimes")
    shards = ensure_synthetic_shards(tmp / "videos", 8, 1234, rank=0)
    out = tmp / "alive.json"
    run_ranks(1, "tests.dist.test_trainer_lifetimes:worker", (str(out), str(tmp / "runs"), str(shards)),
              tmp / "logs", timeout=600)
    return json.loads(out.read_text())


FREED = {"lm_param": False, "ddp": False, "vision_param": False}


def test_a_dropped_trainer_frees_its_model(lifetimes):
    # the control: with the stale graphs left in place (megatron-core 0.16.1), the dropped trainer stays alive
    kept = lifetimes["graphs_kept"]
    assert kept["lm_param"] and kept["ddp"], lifetimes
    for name in ("trained", "rounds_of_one", "graphs_kept_closed"):  # close() frees it even then
        got = lifetimes[name]
        assert {k: got[k] for k in FREED} == FREED, (name, lifetimes)


def test_visual_embeddings_are_freed_before_the_optimizer_steps(lifetimes):
    # per step, of the step's 2 micro-batches' embedding tensors (one round of 2, or two rounds of 1); the control
    # keeps the last micro-batch's through its stale graph
    assert lifetimes["graphs_kept"]["embeds_alive"] == [1, 1], lifetimes
    assert lifetimes["trained"]["embeds_alive"] == [0, 0], lifetimes
    assert lifetimes["rounds_of_one"]["embeds_alive"] == [0, 0], lifetimes
