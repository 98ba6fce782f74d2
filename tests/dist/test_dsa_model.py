"""The language model with DSA layers on CPU: the dense warm-up trains only the indexers (from a dense
checkpoint), the sparse stage trains everything and its loss falls, and TP2 equals one process."""

import pytest

from tests.launch_util import run_layouts

pytestmark = pytest.mark.slow

COMMON = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=128", "parallel=single"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_layouts(1, {
        "dense": COMMON + ["recipe=keye_tiny_lm", "train.steps=2"],
        "warmup": COMMON + ["recipe=keye_tiny_dsa_warmup", "train.steps=2", "train.checkpoint.enabled=false",
                            "train.checkpoint.init_from={root}/dense"],
        "sparse": COMMON + ["recipe=keye_tiny_dsa_sparse", "train.steps=8", "train.lr=3e-3", "train.min_lr=3e-4",
                            "train.checkpoint.enabled=false"],
    }, tmp_path_factory.mktemp("dsa"), digests=True)


def test_warmup_trains_only_the_indexers(runs):
    _, digests = runs
    dense, warm = digests["dense"], digests["warmup"]
    indexer = [n for n in warm if ".indexer." in n]
    assert indexer and all(n not in dense for n in indexer)
    for name, value in dense.items():
        assert warm[name] == value, f"{name} changed during the dense warm-up"


def test_sparse_stage_trains(runs):
    losses, _ = runs
    curve = losses["sparse"]
    assert curve[8] < curve[1] - 0.3, curve


def test_sparse_tp2_matches_single_process(runs, tmp_path):
    losses, _ = runs
    tp2 = run_layouts(2, {"tp2": COMMON + ["recipe=keye_tiny_dsa_sparse", "train.steps=8", "train.lr=3e-3",
                                           "train.min_lr=3e-4", "train.checkpoint.enabled=false",
                                           "parallel.tp=2"]}, tmp_path)["tp2"]
    for step in (1, 2, 3):  # fp32 reduction order only, see test_layout_parity.py
        assert abs(tp2[step] - losses["sparse"][step]) <= 2e-5 * losses["sparse"][step]
