"""The same seed gives the same loss curve at TP1/EP1/PP1 and at TP2, EP2, PP2, interleaved PP2, CP2 and DP2,
and the same router statistics (train/moe_stats.py) each step, the auxiliary-loss-free routing bias included; a
batch-size ramp (train.batch_rampup) at DP2 and under interleaved PP2 the same as in one process.

Tolerance: relative 2e-5 on each of 3 steps' losses. The layouts differ only in the order of fp32
reductions (TP all-reduce and sequence-parallel gathers, DP / expert-DP reduce-scatter of gradients,
the per-stage split of the loss): measured 2e-8 at step 1 and at most 3e-6 by step 3, where Adam's
early sign-like updates have amplified last-bit differences. The two layout bugs these tests found in
megatron-core 0.16.1 (expert gradients left partial at TP2/ETP1; the load-balancing loss halved under
sequence parallelism) moved the step-2 loss by 7e-4 and 7e-5 relative.

Router statistics: the expert counts behind `moe_load_max` / `moe_idle_experts` are summed over every rank
and must be equal (the layouts route every token alike: their router logits agree to ~1e-7 relative and
this seed has no top-k tie that close); the balancing loss is an fp32 sum of partial losses over TP x CP
ranks and an average over DP ranks, measured within 1.5e-8 relative of the single process at step 1, held to 1e-6
there; later steps' come from weights that differ as the losses' do (RTOL: measured 1.1e-6 at TP2/ETP2, step 3, with
the expert bias on, whose changed choices change which weights train).

Held-out loss (train.eval, evaluations at steps 0, 2 and 3 of 2 global batches each): at TP2, PP2, interleaved PP2,
EP2 and DP2 within RTOL of the single process's at every step (the same reductions in another order, as the training
loss). With the expert bias on, the single process's evaluating run trains as the one without (the same losses and
router statistics, bit for bit). The held-out loss's other checks (against the training loss on that data, the video
layouts, train.eval.only) are tests/dist/test_eval.py's.
"""

import pytest

from tests.launch_util import run_layouts_all

pytestmark = pytest.mark.slow

# auxiliary-loss-free balancing on beside the balancing loss, its bias moved by 0.05 a step (the tiny LM's 4 experts
# score ~0.25): steps 2 and 3 route with the bias each layout computed from its world-summed counts
COMMON = ["recipe=keye_tiny_lm", "train.steps=3", "train.checkpoint.enabled=false", "train.global_batch_size=8",
          "train.micro_batch_size=2", "train.seq_length=128", "parallel=single",
          "model.lm.moe_expert_bias=true", "model.lm.moe_bias_update_rate=0.05"]
RTOL = 2e-5
# held-out evaluations at steps 0, 2 and 3, two global batches each (as test_eval.py's LM runs)
EVAL = ["train.eval.interval=2", "train.eval.batches=2"]
EVALUATED = ("tp2", "pp2", "pp2_vpp2", "ep2_alltoall", "dp2")
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2_etp2": ["parallel.tp=2", "parallel.etp=2"],
    "ep2_alltoall": ["parallel.ep=2", "parallel.moe_dispatcher=alltoall"],
    "ep2_allgather": ["parallel.ep=2", "parallel.moe_dispatcher=allgather"],
    "pp2": ["parallel.pp=2"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "cp2": ["parallel.cp=2"],
    "dp2": [],
}


# train.batch_rampup: global batch 4 in step 1, then 8 (its micro-batches per step and rank: 2 then 4 in one process
# and at PP2, 1 then 2 at DP2, where each rank takes its half of each step's batch); 2 steps, the batch changing between
RAMP = [o for o in COMMON if o != "train.steps=3"] + [
    "train.steps=2", "train.batch_rampup.start=4", "train.batch_rampup.increment=4", "train.batch_rampup.samples=4"]
RAMPED = {"dp2_ramp": [], "pp2_vpp2_ramp": ["parallel.pp=2", "parallel.vpp=2"]}


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    ref = run_layouts_all(1, {"single": COMMON, "single_eval": COMMON + EVAL, "single_ramp": RAMP},
                          tmp_path_factory.mktemp("single"))
    layouts = {name: COMMON + ov + (EVAL if name in EVALUATED else []) for name, ov in LAYOUTS.items()}
    two = run_layouts_all(2, {**layouts,
                              **{name: RAMP + ov for name, ov in RAMPED.items()}}, tmp_path_factory.mktemp("two"))
    return ref, two


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(curves, name):
    reference, runs = curves
    got = runs["losses"][name]
    assert sorted(got) == [1, 2, 3]
    for step, ref in reference["losses"]["single"].items():
        assert abs(got[step] - ref) <= RTOL * abs(ref), f"{name} step {step}: loss {got[step]!r} vs {ref!r} (single process)"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_router_statistics_match_single_process(curves, name):
    reference, runs = curves
    for step, ref in reference["extras"]["single"].items():
        got = runs["extras"][name][step]
        # the expert bias (model.lm.moe_expert_bias) moves by whole steps of the rate from equal counts: equal
        for key in ("moe_load_max", "moe_load_max_layer", "moe_idle_experts", "moe_bias_min", "moe_bias_max"):
            assert got[key] == ref[key], f"{name} step {step}: {key} {got[key]!r} vs {ref[key]!r} (single process)"
        assert got["moe_lb_loss"] == pytest.approx(ref["moe_lb_loss"], rel=1e-6 if step == 1 else RTOL), (name, step)
        assert ref["moe_load_max"] > 1.0 and 0.9 < ref["moe_lb_loss"] < 2.0  # a real imbalance, a sane loss
        assert step == 1 or ref["moe_bias_min"] < ref["moe_bias_max"]   # a bias that moved


@pytest.mark.parametrize("name", list(RAMPED))
def test_a_ramp_matches_the_single_process_ramp(curves, name):
    """A batch-size ramp at DP2 (each rank's slice of each step's global batch, the loss over both ranks' tokens) and
    under the interleaved schedule (its micro-batch groups and warm-up at each step's count) against one process
    running the same ramp: each step's loss within RTOL (the same reductions in another order, as above), the same
    global batch and sequences consumed, and the balancing loss (averaged over the step's micro-batches) within 1e-6 at
    step 1 and RTOL after (the expert bias of COMMON: see test_router_statistics_match_single_process)."""
    reference, runs = curves
    ref, got = reference["extras"]["single_ramp"], runs["extras"][name]
    assert [(ref[s]["global_batch"], ref[s]["consumed_samples"]) for s in (1, 2)] == [(4, 4), (8, 12)]
    for step, loss in reference["losses"]["single_ramp"].items():
        got_loss = runs["losses"][name][step]
        assert abs(got_loss - loss) <= RTOL * abs(loss), f"{name} step {step}: loss {got_loss!r} vs {loss!r}"
        assert (got[step]["global_batch"], got[step]["consumed_samples"]) == \
            (ref[step]["global_batch"], ref[step]["consumed_samples"])
        assert got[step]["moe_lb_loss"] == pytest.approx(ref[step]["moe_lb_loss"], rel=1e-6 if step == 1 else RTOL), \
            (name, step)


def test_evaluating_changes_no_training_step_nor_router_statistic(curves):
    """With the expert bias on, a run that evaluates (EVAL) trains as the one that does not, bit for bit: the same
    losses, router statistics and bias range at every step (evaluation runs the routers without gradients: no count,
    no bias moved, no balancing loss tracked)."""
    reference, _ = curves
    assert [e["step"] for e in reference["evals"]["single_eval"]] == [0, 2, 3]
    assert reference["losses"]["single_eval"] == reference["losses"]["single"]
    moe = {name: {s: {k: v for k, v in e.items() if k.startswith("moe_")} for s, e in reference["extras"][name].items()}
           for name in ("single", "single_eval")}
    assert moe["single_eval"] == moe["single"] and "moe_bias_max" in moe["single"][3]


@pytest.mark.parametrize("name", EVALUATED)
def test_layouts_give_the_single_process_held_out_loss(curves, name):
    """Each layout's held-out loss against the single process's at every evaluation (RTOL, as the training loss)."""
    reference, runs = curves
    ref = {e["step"]: e["val_loss"] for e in reference["evals"]["single_eval"]}
    got = {e["step"]: e["val_loss"] for e in runs["evals"][name]}
    assert sorted(got) == sorted(ref) == [0, 2, 3]
    for step in ref:
        assert abs(got[step] - ref[step]) <= RTOL * abs(ref[step]), (name, step, got[step], ref[step])
