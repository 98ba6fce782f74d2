"""model.lm.moe_aux_loss_coeff acts at its configured strength against the mean LM loss whatever share of the tokens
carries loss (parallel/megatron_compat.py fix 2): the routers' gradient of a training step is that of

    mean LM loss + coeff x (the loss-token-weighted mean of the micro-batches' switch losses)

written out in plain torch (tests/dist/balancing_worker.py reference_grads), on a batch whose micro-batches carry loss
on 0, 1/2, 1/2 and 2/3 of their tokens, in one process and at DP2, CP2, TP2 (sequence parallel), PP2 (also with full
recompute, whose routers attach their loss in the backward, and interleaved). Before, each micro-batch's switch loss
was weighted by its routed tokens, so the balancing part of the routers' gradient here was 1.8 to 2.1 times the
reference's, and a micro-batch without a loss token balanced as much as any other; for text rows whose every token
carries loss both weightings agree (checked too).

model.lm.moe_balance=global_batch (models/moe/router.py) the same way: each micro-batch's switch loss takes its expert
shares from the step's counts so far over every data-parallel replica; in one process, at PP2 with full recompute
(the counts taken once, in the backward's rerun) and at DP2 (both replicas' counts summed, against a reference
computed by rank 0 from both replicas' micro-batches).

model.lm.moe_balance=sequence on packed rows (three documents and a padding segment, as a video pack's): each
document's switch loss on its own, weighted by its tokens, the padding in none; at CP2 (a document's tokens on both
ranks) and TP2 (sequence parallel) against the one-process reference. Before, the row was one sequence: the routers'
gradient was 0.25 relative RMSE off there.

Tolerance: relative RMSE 1e-5 per layer's router gradient. Trainer and reference run the same fp32 forward and
backward; they differ in the order of fp32 sums (the reference sums the micro-batches in float64, layouts reduce
over ranks, split sequences and stages): measured <= 6.4e-7 in every layout. At the coefficient used (0.03) the
balancing part moves each router's gradient by 0.25 to 0.99 relative RMSE (checked below, > 0.15), so a wrong
weighting fails by far more than the tolerance (the weighting by routed tokens: 0.32).
"""

import json

import pytest
import torch

from tests.kernels.helpers import assert_close, rel_rmse
from tests.launch_util import QUIET, run_ranks

pytestmark = pytest.mark.slow

RTOL = 1e-5
COMMON = QUIET + ["recipe=keye_tiny_lm", "parallel=single", "train.global_batch_size=8", "train.micro_batch_size=2",
                  "train.seq_length=128", "train.checkpoint.enabled=false", "model.lm.moe_aux_loss_coeff=0.03",
                  "parallel.distributed_optimizer=false"]
# model.lm.moe_balance=sequence on packed rows of three documents and padding (balancing_worker.packed_documents)
SEQUENCE_DOCS = ["docs=packed", "model.lm.moe_balance=sequence", "train.micro_batch_size=1",
                 "train.global_batch_size=2"]
ONE = {"single": ["mask=partial"], "single_all": ["mask=all"],
       "single_recompute": ["mask=partial", "parallel.recompute=full"],
       "single_global": ["mask=partial", "model.lm.moe_balance=global_batch"],
       "single_sequence_docs": ["mask=partial"] + SEQUENCE_DOCS}
TWO = {"dp2": [], "cp2": ["parallel.cp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"],
       "pp2_recompute": ["parallel.pp=2", "parallel.recompute=full"], "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
       "dp2_global": ["model.lm.moe_balance=global_batch"],
       "pp2_recompute_global": ["parallel.pp=2", "parallel.recompute=full", "model.lm.moe_balance=global_batch"],
       "cp2_sequence_docs": ["parallel.cp=2"] + SEQUENCE_DOCS,
       "tp2_sequence_docs": ["parallel.tp=2"] + SEQUENCE_DOCS}
TWO = {name: ["mask=partial"] + ov for name, ov in TWO.items()}
# each layout's reference: one process's (global_batch at DP1: the same micro-batches counted together), except at DP2
# with global_batch, which counts both replicas' micro-batches together: there rank 0 computes it, holding the model
REF = {"pp2_recompute_global": "single_global", "cp2_sequence_docs": "single_sequence_docs",
       "tp2_sequence_docs": "single_sequence_docs"}


def _job(nproc: int, entries: dict, tmp) -> dict:
    spec = ";".join(f"{name}={' '.join(COMMON + ov)}" for name, ov in entries.items())
    run_ranks(nproc, "tests.dist.balancing_worker:run", (str(tmp / "out.json"), str(tmp / "runs"), spec), tmp / "logs")
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = _job(1, ONE, tmp_path_factory.mktemp("one"))
    two = _job(2, TWO, tmp_path_factory.mktemp("two"))
    return one, two


def _grads(d: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in d.items()}


def test_the_batch_has_varied_shares_of_loss_tokens(runs):
    one, two = runs
    assert one["single"]["loss_tokens"] == [[0.0, 128.0, 128.0, 171.0]]  # of 256 per micro-batch
    assert one["single_all"]["loss_tokens"] == [[256.0] * 4]
    for name in (n for n in TWO if "docs" not in n):  # each data-parallel replica holds half the micro-batches
        got = sorted(t for rank in two[name]["loss_tokens"] for t in rank)
        assert got == ([0.0, 128.0, 128.0, 171.0] if name.startswith("dp2") else [0.0, 0.0, 128.0, 128.0, 128.0, 128.0,
                                                                        171.0, 171.0]), name


@pytest.mark.parametrize("name", list(ONE))
def test_one_process_matches_the_plain_reference(runs, name):
    one, _ = runs
    ref_name = name if "reference" in one[name] else "single"
    ref, lm_only, got = (_grads(one[ref_name]["reference"]), _grads(one[ref_name]["reference_lm"]),
                         _grads(one[name]["grads"]))
    assert sorted(got) == ["1", "2", "3", "4"]
    for layer in got:
        # the balancing part is a large share of the gradient: a wrong weighting of it could not pass
        assert rel_rmse(ref[layer], lm_only[layer]) > 0.15, layer
        assert_close(f"{name} router {layer}", ref[layer], got[layer], RTOL)


@pytest.mark.parametrize("name", list(TWO))
def test_layouts_match_the_plain_reference(runs, name):
    one, two = runs
    ref = _grads((two[name] if "reference" in two[name] else one[REF.get(name, "single")])["reference"])
    got = _grads(two[name]["grads"])
    assert sorted(got) == ["1", "2", "3", "4"]  # every pipeline stage's routers
    for layer in got:
        assert_close(f"{name} router {layer}", ref[layer], got[layer], RTOL)



def test_global_batch_differs_from_micro_batch(runs):
    """The global-batch counts move the routers' gradient away from the micro-batch loss's, and at DP2 (every
    replica's micro-batches so far) away from one process's: a level computed as the other, or counts not summed
    over the replicas, could not pass."""
    one, two = runs
    micro, glob, glob_dp2 = (_grads(one["single"]["reference"]), _grads(one["single_global"]["reference"]),
                             _grads(two["dp2_global"]["reference"]))
    # measured: 0.06 to 0.74 relative RMSE per layer
    for a, b in ((micro, glob), (micro, glob_dp2), (glob, glob_dp2)):
        assert min(rel_rmse(a[layer], b[layer]) for layer in a) > 0.03
