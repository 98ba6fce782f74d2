"""The language model with DSA layers on CPU: the dense warm-up trains only the indexers (from a dense
checkpoint), its indexer-only step equals the backward through the frozen model, the sparse stage trains
everything and its loss falls, and TP2 equals one process."""

import pytest

from tests.launch_util import run_layouts, run_layouts_all

pytestmark = pytest.mark.slow

COMMON = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=128", "parallel=single"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    job = run_layouts_all(1, {
        "dense": COMMON + ["recipe=keye_tiny_lm", "train.steps=2"],
        "warmup": COMMON + ["recipe=keye_tiny_dsa_warmup", "train.steps=2", "train.checkpoint.enabled=false",
                            "train.checkpoint.init_from={root}/dense"],
        # the reference for the indexer-only step: the KL's gradient back through the frozen model
        "warmup_model": COMMON + ["recipe=keye_tiny_dsa_warmup", "train.steps=2", "train.checkpoint.enabled=false",
                                  "train.checkpoint.init_from={root}/dense", "train.indexer_backward=model"],
        "sparse": COMMON + ["recipe=keye_tiny_dsa_sparse", "train.steps=8", "train.lr=3e-3", "train.min_lr=3e-4",
                            "train.checkpoint.enabled=false"],
        # each step's 8 sequences as one micro-batch instead of 4: the indexer KL of all of them at once
        "warmup_one_mb": COMMON + ["recipe=keye_tiny_dsa_warmup", "train.steps=2", "train.checkpoint.enabled=false",
                                   "train.checkpoint.init_from={root}/dense", "train.micro_batch_size=8"],
        "sparse_one_mb": COMMON + ["recipe=keye_tiny_dsa_sparse", "train.steps=2", "train.lr=3e-3",
                                   "train.min_lr=3e-4", "train.checkpoint.enabled=false", "train.micro_batch_size=8"],
    }, tmp_path_factory.mktemp("dsa"))
    return job["losses"], job["digests"], job["extras"]


def test_warmup_trains_only_the_indexers(runs):
    _, digests, _ = runs
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
    losses, digests, _ = runs
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


def test_a_pipeline_stage_without_the_trained_variant_is_frozen_whole(tmp_path):
    """train.trainable=indexer (summary) on a model whose DSA (KSA) layers all sit on the first pipeline stage: the
    second stage holds none of those parameters and runs frozen, as the same model does in one process. Before, that
    stage stopped with 'this model (stage) has no such parameters' while the first waited for it forever. The
    indexers (summary projections) train as in one process, bit for bit (rank 0's digests: the first stage's)."""
    cases = {"dsa": ["recipe=keye_tiny_dsa_warmup", "model.lm.attention_per_layer=[dsa,dsa,dense,dense]"],
             "ksa": ["recipe=keye_tiny_ksa", "train.trainable=summary", "model.lm.attention_per_layer=[ksa,ksa,dense,dense]"]}
    ov = COMMON + ["train.steps=2", "train.checkpoint.enabled=false"]
    one = run_layouts_all(1, {k: ov + c for k, c in cases.items()}, tmp_path / "one", timeout=300)
    two = run_layouts_all(2, {k: ov + c + ["parallel.pp=2"] for k, c in cases.items()}, tmp_path / "two", timeout=300)
    for k, marker in (("dsa", ".indexer."), ("ksa", "summary")):
        assert sorted(two["losses"][k]) == [1, 2] and two["losses"][k] == one["losses"][k], k
        trained = {n: v for n, v in two["digests"][k].items() if marker in n}
        assert trained and all(one["digests"][k][n] == v for n, v in trained.items()), k


def test_multimodal_stages_hand_over_from_dense_to_warmup_to_sparse(tmp_path_factory):
    """The 30B DSA stages' CPU mirrors (keye_tiny_vl_dsa_{warmup,sparse}: ViT + projector + LM with DSA layers,
    packed synthetic videos), each started as its recipe says, from the stage before:
    - the warm-up from a dense keye_tiny checkpoint keeps everything but the indexers equal to that checkpoint
      (the ViT and the projector stay frozen with the LM), moves the indexers (against the same run at lr 0),
      and its indexer-only step equals the backward through the model bit for bit;
    - the sparse stage from the warm-up's checkpoint at lr 0 ends with exactly the warm-up's weights (ViT and
      indexers included: nothing is lost or re-initialised in the hand-over), and at its own lr it moves every
      part: ViT, projector, language model and indexers."""
    from data.video_stream import ensure_synthetic_shards
    shards = ensure_synthetic_shards(tmp_path_factory.mktemp("videos"), 8, 1234, rank=0)
    common = ["parallel=single", "train.steps=2", "train.warmup_steps=1", "train.global_batch_size=2",
              "data.synthetic_videos=8", f"data.video.shards={shards}"]
    warm = common + ["recipe=keye_tiny_vl_dsa_warmup", "train.checkpoint.init_from={root}/dense"]
    no_save = ["train.checkpoint.enabled=false"]
    sparse = common + no_save + ["recipe=keye_tiny_vl_dsa_sparse", "train.checkpoint.init_from={root}/local"]
    _, d = run_layouts(1, {"dense": common + ["recipe=keye_tiny"],
                           "local": warm,
                           "model": warm + no_save + ["train.indexer_backward=model"],
                           "lr0": warm + no_save + ["train.lr=0", "train.min_lr=0"],
                           "sparse_lr0": sparse + ["train.lr=0", "train.min_lr=0"],
                           "sparse": sparse},
                       tmp_path_factory.mktemp("vl"), digests=True)
    dense, local = d["dense"], d["local"]
    assert any(n.startswith("vision.") for n in dense)
    assert local == d["model"]
    indexer = {n for n in local if ".indexer." in n}
    assert indexer and not indexer & dense.keys() and local.keys() == dense.keys() | indexer
    assert all(local[n] == dense[n] for n in dense), [n for n in dense if local[n] != dense[n]]
    assert all(local[n] != d["lr0"][n] for n in indexer)
    assert d["sparse_lr0"] == local
    moved = {n for n in local if d["sparse"][n] != local[n]}
    for part in ("vision.vit.", "vision.projector.", "decoder.", ".indexer."):
        assert any(part in n for n in moved), (part, sorted(moved)[:5])


def test_the_indexer_kl_of_packed_rows_is_the_same_under_context_parallelism(tmp_path_factory):
    """The multimodal warm-up (packed synthetic videos, whose rows end with padding) from a dense checkpoint, at CP 2
    in the sequence layout against one process: each step's indexer_kl the same. The layout gives rank 0 the row's
    last chunk, so the ranks attend different shares of it (each leaves its part of the trailing padding out) and
    their KLs are means over different numbers of tokens: the step's KL weighs each by its tokens (an unweighted
    mean of the ranks' means was 0.7% off at step 1). Relative 1e-5: the same fp32 KL terms summed over ranks
    in another order (the losses, from a frozen model, to 2e-6 as tests/dist/test_cp_model.py allows)."""
    from data.video_stream import ensure_synthetic_shards
    shards = ensure_synthetic_shards(tmp_path_factory.mktemp("videos"), 8, 1234, rank=0)
    common = ["parallel=single", "train.steps=2", "train.warmup_steps=1", "train.global_batch_size=2",
              "data.synthetic_videos=8", f"data.video.shards={shards}"]
    one_root = tmp_path_factory.mktemp("one")
    warm = common + ["recipe=keye_tiny_vl_dsa_warmup", f"train.checkpoint.init_from={one_root / 'runs' / 'dense'}",
                     "train.checkpoint.enabled=false"]
    one = run_layouts_all(1, {"dense": common + ["recipe=keye_tiny"], "warm": warm}, one_root)
    cp2 = run_layouts_all(2, {"warm_cp2": warm + ["parallel.cp=2", "parallel.cp_split=sequence"]},
                          tmp_path_factory.mktemp("cp2"))
    for step in (1, 2):
        ref, got = one["extras"]["warm"][step]["indexer_kl"], cp2["extras"]["warm_cp2"][step]["indexer_kl"]
        assert ref > 0 and abs(got - ref) <= 1e-5 * ref, (step, got, ref)
        ref, got = one["losses"]["warm"][step], cp2["losses"]["warm_cp2"][step]
        assert abs(got - ref) <= 2e-6 * ref, (step, got, ref)


def test_sparse_stage_trains(runs):
    losses, _, _ = runs
    curve = losses["sparse"]
    assert curve[8] < curve[1] - 0.3, curve


def test_sparse_tp2_matches_single_process(runs, tmp_path):
    losses, _, _ = runs
    # the steps compared (1-3) of the same 8-step schedule: train.stop_after=3
    tp2 = run_layouts(2, {"tp2": COMMON + ["recipe=keye_tiny_dsa_sparse", "train.steps=8", "train.lr=3e-3",
                                           "train.min_lr=3e-4", "train.checkpoint.enabled=false",
                                           "parallel.tp=2", "train.stop_after=3"]}, tmp_path)["tp2"]
    assert sorted(tp2) == [1, 2, 3]
    for step in (1, 2, 3):  # fp32 reduction order only, see test_layout_parity.py
        assert abs(tp2[step] - losses["sparse"][step]) <= 2e-5 * losses["sparse"][step]


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_the_step_reports_the_indexer_kl_of_all_its_micro_batches(runs, stage):
    """A step's indexer_kl is the mean of its micro-batches' KLs weighed by their tokens (each a per-token mean), so
    4 micro-batches of 2 sequences report what one micro-batch of the 8 does at step 1. Relative 1e-5: the same fp32
    KL per token, summed in another order (one mean of 1,024 tokens against a mean of four means of 256). The
    warm-up's KL comes from each layer's forward, the sparse stage's from the attention's backward
    (kernels/dsa/fused.py). The last micro-batch's KL alone differs from it by far more."""
    _, _, extras = runs
    four, one = extras[stage][1]["indexer_kl"], extras[f"{stage}_one_mb"][1]["indexer_kl"]
    assert four > 0 and abs(four - one) <= 1e-5 * one, (four, one)
