"""The multimodal model's loss curve does not depend on where the ViT runs.

The ViT's frames are spread over every rank that shares an LM sequence (TP x CP x PP of one data-parallel
replica, parallel.vit.layout=spread) and the merged embeddings exchanged to the LM-input ranks; or every
LM-input rank encodes all frames itself (replicated, the usual layout); or one process does everything.
Same seed, the same synthetic videos (made once here and read by every run), 3 steps of the tiny recipe (ViT + projector +
MoE LM all training), so every step's loss depends on the previous steps' ViT gradients and updates.

Tolerance: relative 2e-5 per step, as in test_layout_parity.py: the layouts differ in the order of fp32
reductions (the LM's TP / PP differences, measured <= 3e-6 there; here also the ViT gradient sum over
ranks that each encoded different frames).
"""

import pytest

from tests.launch_util import run_layouts, run_layouts_all

pytestmark = pytest.mark.slow

COMMON = ["recipe=keye_tiny", "parallel=single", "train.steps=3", "train.warmup_steps=1",
          "train.global_batch_size=2", "train.checkpoint.enabled=false", "data.synthetic_videos=12"]
KSA = ["recipe=keye_tiny_vl_ksa"] + COMMON[1:]
RTOL = 2e-5


def _close(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) == [1, 2, 3] and all(abs(a[s] - b[s]) <= RTOL * abs(b[s]) for s in a)


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    # one set of videos for every run: encoding them again is not bit-identical on every run
    # (tests/integration/test_tiny_recipe.py), and a few bytes of another video move a loss by more than RTOL
    from data.video_stream import ensure_synthetic_shards
    shards = ensure_synthetic_shards(tmp_path_factory.mktemp("videos"), 12, 1234, rank=0)
    common, ksa = (c + [f"data.video.shards={shards}"] for c in (COMMON, KSA))
    # parallel.vit.group=1: each step's 2 micro-batches in two rounds of ViT forward, LM forward + backward, ViT
    # backward, the LM's gradients reduced once after both (against the same step in one round)
    grouped = ["parallel.vit.group=1"]
    saved = [o for o in common if o != "train.checkpoint.enabled=false"] + ["run_dir=vit_resume"]
    unpadded = ["data.video.pad_to_seq_len=false"]
    one = run_layouts(1, {"single": common, "ksa_single": ksa, "single_grouped": common + grouped,
                          "single_unpadded": common + unpadded}, tmp_path_factory.mktemp("one"))
    single = one["single"]
    data = run_layouts_all(2, {
        "tp2_spread": common + ["parallel.tp=2", "parallel.vit.layout=spread"],
        # every rank of the replica decodes every pack itself (the spread layout's default decodes once, on rank 0)
        "tp2_decode_each": common + ["parallel.tp=2", "parallel.vit.layout=spread", "parallel.vit.decode_once=false"],
        "tp2_replicated": common + ["parallel.tp=2", "parallel.vit.layout=replicated"],
        "pp2_spread": common + ["parallel.pp=2", "parallel.vit.layout=spread"],
        # context parallelism: each CP rank asks the exchange for only the visual tokens of its chunks
        "cp2_spread": common + ["parallel.cp=2", "parallel.vit.layout=spread"],
        # projector alignment stage: ViT and LM frozen; the same run with lr 0 shows the LM untouched
        "align": common + ["parallel.tp=2", "train.trainable=projector"],
        "align_lr0": common + ["parallel.tp=2", "train.trainable=projector", "train.lr=0", "train.min_lr=0"],
        # KSA: summary slots are inserted per packed document and the row padded to its fixed length; the
        # visual tokens follow them, also into each CP rank's chunks and through the pipeline
        "ksa_cp2": ksa + ["parallel.cp=2", "parallel.vit.layout=spread"],
        "ksa_pp2": ksa + ["parallel.pp=2", "parallel.vit.layout=spread"],
        "pp2_grouped": common + ["parallel.pp=2", "parallel.vit.layout=spread"] + grouped,
        # packs left short of train.seq_length: the trainer pads each row only as far as the layout needs (pp: the
        # whole length; cp: 2 * cp chunks; tp: sequence parallelism's split); before, pp2 and cp2 stopped in step 1
        "tp2_unpadded": common + ["parallel.tp=2"] + unpadded,
        "pp2_unpadded": common + ["parallel.pp=2", "parallel.vit.layout=spread"] + unpadded,
        "cp2_unpadded": common + ["parallel.cp=2", "parallel.vit.layout=spread"] + unpadded,
        "tp2_grouped_recompute": common + ["parallel.tp=2", "parallel.vit.recompute=true"] + grouped,
        # a checkpoint of the spread layout resumed in the replicated one, recomputing, in rounds: the tower's weights
        # and AdamW moments are the same tensors whatever the layout (train/vision.py sharded_state)
        "vit_stopped": saved + ["parallel.tp=2", "train.stop_after=2", "train.checkpoint.save_interval=2"],
        "vit_resumed_replicated": saved + ["parallel.tp=2", "parallel.vit.layout=replicated",
                                           "parallel.vit.recompute=true"] + grouped,
    }, tmp_path_factory.mktemp("two"))
    two = data["losses"]
    two["_digests"], two["_extras"] = data["digests"], data["extras"]
    two["ksa_single"] = one["ksa_single"]
    two["single_grouped"] = one["single_grouped"]
    two["single_unpadded"] = one["single_unpadded"]
    return single, two


# Through the trainer: replicated under TP2 (every LM-input rank encodes everything, whatever the LM layout),
# spread under TP2, PP2 and CP2. The exchange at 4 ranks (TP2 x PP2, TP2 x CP2) and ViT recomputation are
# checked phase by phase in test_vit_layout.py and test_vision.py, at a fraction of the cost of 4 trainers.
@pytest.mark.parametrize("name", ["tp2_spread", "tp2_replicated", "pp2_spread", "cp2_spread", "single_grouped",
                                  "pp2_grouped", "tp2_grouped_recompute"])
def test_vit_layout_matches_single_process(curves, name):
    single, runs = curves
    assert _close(runs[name], single), (name, runs[name], single)


@pytest.mark.parametrize("name", ["single_unpadded", "tp2_unpadded", "pp2_unpadded", "cp2_unpadded"])
def test_packs_left_short_train_as_padded_ones_on_every_layout(curves, name):
    """data.video.pad_to_seq_len=false: the same documents without the padding segment give the padded run's curve,
    in one process and under TP2, PP2 and CP2 (parallel/layout.py ParallelLayout.row_length)."""
    single, runs = curves
    assert _close(runs[name], single), (name, runs[name], single)


@pytest.mark.parametrize("name", ["ksa_cp2", "ksa_pp2"])
def test_vision_with_ksa_matches_single_process(curves, name):
    _, runs = curves
    assert _close(runs[name], runs["ksa_single"]), (name, runs[name], runs["ksa_single"])
    assert runs["ksa_single"][3] < runs["ksa_single"][1], runs["ksa_single"]


def test_resume_in_another_vit_layout_continues_the_curve(curves):
    single, runs = curves
    assert sorted(runs["vit_stopped"]) == [1, 2] and sorted(runs["vit_resumed_replicated"]) == [3], runs
    assert _close({**runs["vit_stopped"], **runs["vit_resumed_replicated"]}, single), (runs["vit_stopped"],
                                                                                     runs["vit_resumed_replicated"])


def test_decoding_once_per_replica_changes_only_who_decodes(curves):
    """parallel.vit.decode_once (the spread layout's default): rank 0 of the TP2 replica decodes every pack and sends
    rank 1 the pixels of its ViT share. The same pixels reach the same ViT ranks as when each rank decodes them itself,
    so the loss curve is bit-identical; the world's loaders decode each frame once instead of twice (the frames of the
    packs drawn so far: workers' prefetch is not counted)."""
    _, runs = curves
    assert runs["tp2_spread"] == runs["tp2_decode_each"], (runs["tp2_spread"], runs["tp2_decode_each"])
    ex = runs["_extras"]
    once = [ex["tp2_spread"][s]["data_frames_decoded"] for s in (1, 2, 3)]
    each = [ex["tp2_decode_each"][s]["data_frames_decoded"] for s in (1, 2, 3)]
    assert 0 < once[0] < once[2] and each == [2 * n for n in once], (once, each)


def test_loss_moves(curves):
    single, _ = curves
    assert single[3] < single[1], single  # the run trains (ViT gradients flow through the exchange)


def test_projector_alignment_trains_only_the_projector(curves):
    _, runs = curves
    assert runs["align"][3] < runs["align"][1] - 1e-3, runs["align"]  # the projector learns
    # after 3 alignment steps the LM's and the ViT's parameters are exactly those of the same run at lr 0
    # (untouched), and the projector's are not
    d = runs["_digests"]
    moved = {n for n in d["align"] if d["align"][n] != d["align_lr0"][n]}
    assert moved and all(n.startswith("vision.") and not n.startswith("vision.vit.") for n in moved), moved


# Text-only samples among the videos (docs/data.md "Text-only samples"): packs with frames and packs with
# none, so that in some step no rank encodes a frame (its ViT gradient is exactly 0) and in another one does;
# and image samples (docs/data.md "Image samples"). The layouts must still agree with one process, the same
# tolerance as above.
TEXT_LAYOUTS = {"tp2_spread": ["parallel.tp=2", "parallel.vit.layout=spread"],
                "tp2_replicated": ["parallel.tp=2", "parallel.vit.layout=replicated"],
                "cp2_spread": ["parallel.cp=2", "parallel.vit.layout=spread"],
                "pp2_spread": ["parallel.pp=2", "parallel.vit.layout=spread"]}


@pytest.fixture(scope="module")
def text_curves(tmp_path_factory):
    from data.video_stream import ensure_synthetic_shards
    from tests.launch_util import run_layouts_all
    shards = ensure_synthetic_shards(tmp_path_factory.mktemp("text"), 2, 1234, rank=0, n_text=30)
    # image samples (one frame per image, <image_pad> placeholders) with a few videos and texts: single images
    # in every step, and interleaved records of 2 and 3 images (at their text's <image> markers) in steps 1 and 2;
    # the videos are still scenes encoded with slow and fast frames (docs/data.md "Slow and fast frames"), so a
    # video's frames have two sizes in the ViT's per-frame grid
    images = ensure_synthetic_shards(tmp_path_factory.mktemp("img"), 2, 1234, rank=0, n_text=4, n_images=10,
                                     scenes=3)
    common, ksa = (c + [f"data.video.shards={shards}"] for c in (COMMON, KSA))
    img = COMMON + [f"data.video.shards={images}", "data.video.fast_frame_ratio=0.3"]
    # the language model alone on text-only shards (docs/data.md "A language model on text"), some texts longer
    # than its 64-token sequences (continued in pieces)
    texts = ensure_synthetic_shards(tmp_path_factory.mktemp("lm_text"), 0, 1234, rank=0, n_text=60)
    lm = ["recipe=keye_tiny_lm", "data=text_tiny", "train.micro_batch_size=1"] + COMMON[1:] + [
        f"data.video.shards={texts}", "train.seq_length=64"]
    one = run_layouts_all(1, {"single": common, "ksa_single": ksa, "img_single": img, "lm_text_single": lm},
                          tmp_path_factory.mktemp("text_one"))
    two = run_layouts_all(2, {**{k: common + v for k, v in TEXT_LAYOUTS.items()},
                              "ksa_cp2": ksa + ["parallel.cp=2", "parallel.vit.layout=spread"],
                              **{f"img_{k}": img + TEXT_LAYOUTS[k] for k in ("tp2_spread", "cp2_spread", "pp2_spread")},
                              "lm_text_tp2": lm + ["parallel.tp=2"], "lm_text_pp2": lm + ["parallel.pp=2"]},
                          tmp_path_factory.mktemp("text_two"))
    return one, two


def test_language_model_alone_on_text_shards_in_every_layout(text_curves):
    one, two = text_curves
    single = one["losses"]["lm_text_single"]
    assert single[3] < single[1], single
    for name in ("lm_text_tp2", "lm_text_pp2"):
        assert _close(two["losses"][name], single), (name, two["losses"][name], single)


def test_text_only_packs_in_every_vit_layout(text_curves):
    one, two = text_curves
    single, extras = one["losses"]["single"], one["extras"]["single"]
    vit = [extras[s]["vit_grad"] for s in (1, 2, 3)]
    assert min(vit) == 0.0 and max(vit) > 0.0, vit   # a step without any frame and one with frames
    assert single[3] < single[1], single
    for name in TEXT_LAYOUTS:
        assert _close(two["losses"][name], single), (name, two["losses"][name], single)
    # KSA inserts its summary slots per document, text-only documents included, also into each CP rank's chunks
    assert _close(two["losses"]["ksa_cp2"], one["losses"]["ksa_single"]), (two["losses"]["ksa_cp2"],
                                                                          one["losses"]["ksa_single"])


def test_image_samples_in_vit_layouts(text_curves):
    one, two = text_curves
    single = one["losses"]["img_single"]
    assert single[3] < single[1] and all(one["extras"]["img_single"][s]["vit_grad"] > 0 for s in (1, 2, 3)), single
    for name in ("img_tp2_spread", "img_cp2_spread", "img_pp2_spread"):
        assert _close(two["losses"][name], single), (name, two["losses"][name], single)
