"""The language model with KSA layers: trains on CPU, matches across TP layouts, and converts from a
dense checkpoint with only the summary parameters training in distillation stage 1."""

import pytest

from tests.launch_util import run_layouts

pytestmark = pytest.mark.slow

COMMON = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=128", "parallel=single"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_layouts(1, {
        "ksa": COMMON + ["recipe=keye_tiny_ksa", "train.steps=8", "train.checkpoint.enabled=false"],
        "dense": COMMON + ["recipe=keye_tiny_lm", "train.steps=2"],
        "distill": COMMON + ["recipe=keye_tiny_ksa_distill", "train.steps=3", "train.checkpoint.enabled=false",
                             "train.checkpoint.init_from={root}/dense"],
    }, tmp_path_factory.mktemp("ksa"), digests=True)


def test_ksa_model_trains(single):
    losses, _ = single
    curve = losses["ksa"]
    assert curve[1] > 6.0 and curve[8] < curve[1] - 0.3, curve


def test_ksa_tp2_matches_single_process(single, tmp_path):
    losses, _ = single
    tp2 = run_layouts(2, {"tp2": COMMON + ["recipe=keye_tiny_ksa", "train.steps=3", "train.checkpoint.enabled=false",
                                           "parallel.tp=2"]}, tmp_path)["tp2"]
    for step in (1, 2, 3):  # fp32 reduction order only, see test_layout_parity.py
        assert abs(tp2[step] - losses["ksa"][step]) <= 2e-5 * losses["ksa"][step]


def test_distillation_stage1_trains_only_summary_parameters(single):
    losses, digests = single
    dense, distilled = digests["dense"], digests["distill"]
    summary = [n for n in distilled if "summary" in n]
    assert summary and all(n not in dense for n in summary)
    for name, value in dense.items():
        assert distilled[name] == value, f"{name} changed in stage 1"
    # the dense checkpoint's text QKV seeded the summary QKV, then the summary parameters trained
    qkv = [n for n in summary if "linear_qkv_summary" in n]
    assert qkv and all(distilled[n] != dense[n.replace("linear_qkv_summary", "linear_qkv")] for n in qkv)
    assert sorted(losses["distill"]) == [1, 2, 3]
