"""The language model with DSA layers on CPU: the dense warm-up trains only the indexers (from a dense
checkpoint), its indexer-only step equals the backward through the frozen model, the sparse stage trains
everything and its loss falls, and TP2 equals one process."""

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
        # the reference for the indexer-only step: the KL's gradient back through the frozen model
        "warmup_model": COMMON + ["recipe=keye_tiny_dsa_warmup", "train.steps=2", "train.checkpoint.enabled=false",
                                  "train.checkpoint.init_from={root}/dense", "train.indexer_backward=model"],
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


def test_warmup_indexer_only_step_equals_the_backward_through_the_model(runs):
    """train.indexer_backward=local (the default: each layer back-propagates its KL in its forward, the step
    runs the frozen model forward only) trains the indexers exactly as the KL's gradient carried back through
    the frozen model does: 4 micro-batches per step, so the per-token scaling of the gradients is checked
    too. The same KL backward on the same inputs, added in the same micro-batch order: equal bit for bit."""
    losses, digests = runs
    assert losses["warmup"] == losses["warmup_model"]
    local, model = digests["warmup"], digests["warmup_model"]
    assert local.keys() == model.keys()
    indexer = [n for n in local if ".indexer." in n]
    assert indexer
    for name in local:
        assert local[name] == model[name], name


def test_warmup_indexer_only_step_on_two_ranks(tmp_path):
    """The same on 2 ranks, as tensor parallelism (the replicated indexers' gradients summed over TP), as
    data parallelism (summed over DP, the token count all-reduced), as context parallelism (each rank's
    KL over its tokens, with the index keys all-gathered, back-propagated in its forward on both ranks at
    once) and as two pipeline stages, plain and interleaved (megatron's schedules forward-only, the token
    count broadcast from the last stage; rank 0's digests are its stages'): each equals its backward through
    the model bit for bit (the same sums in the same order)."""
    ov = COMMON + ["recipe=keye_tiny_dsa_warmup", "train.steps=2", "train.checkpoint.enabled=false"]
    # parallel=single on 2 ranks: dp = 2
    par_ov = {"tp2": ["parallel.tp=2"], "dp2": [], "cp2": ["parallel.cp=2"], "pp2": ["parallel.pp=2"],
              "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"]}
    layouts = {f"{par}_{mode}": ov + par_ov[par] + [f"train.indexer_backward={mode}"]
               for par in par_ov for mode in ("local", "model")}
    losses, digests = run_layouts(2, layouts, tmp_path, digests=True)
    for par in par_ov:
        assert losses[f"{par}_local"] == losses[f"{par}_model"]
        local, model = digests[f"{par}_local"], digests[f"{par}_model"]
        assert [n for n in local if ".indexer." in n] and local == model, par


def test_warmup_on_the_multimodal_model_moves_only_the_indexers(tmp_path_factory):
    """The warm-up on the tiny multimodal model (ViT + projector + LM with DSA layers, packed synthetic videos):
    against the same run at lr 0, only indexer parameters moved (the ViT and the projector stay frozen too),
    and the indexer-only step equals the backward through the model bit for bit."""
    from data.video_stream import ensure_synthetic_shards
    shards = ensure_synthetic_shards(tmp_path_factory.mktemp("videos"), 8, 1234, rank=0)
    ov = ["recipe=keye_tiny", "parallel=single", "train.steps=2", "train.warmup_steps=1",
          "train.global_batch_size=2", "train.checkpoint.enabled=false", "data.synthetic_videos=8",
          f"data.video.shards={shards}", "model.lm.attention=dsa", "model.lm.dsa.index_heads=4",
          "model.lm.dsa.index_dim=8", "model.lm.dsa.topk=32", "model.lm.dsa.stage=dense_warmup",
          "train.trainable=indexer"]
    _, d = run_layouts(1, {"local": ov, "model": ov + ["train.indexer_backward=model"],
                           "lr0": ov + ["train.lr=0", "train.min_lr=0"]},
                       tmp_path_factory.mktemp("vl"), digests=True)
    assert any(n.startswith("vision.") for n in d["local"])
    assert d["local"] == d["model"]
    moved = {n for n in d["local"] if d["local"][n] != d["lr0"][n]}
    assert moved and all(".indexer." in n for n in moved), moved


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
