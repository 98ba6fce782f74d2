"""train.eval: the held-out loss during training.

References:
- the training loss itself: the held-out loss at step 0 equals the step-1 training loss of a run whose training
  data IS that held-out data (the same weights, the same sequences; one path runs forward only without
  gradients, the other trains), for synthetic text and for video through the vision tower, and in KSA
  distillation also the logit KL and attention MSE against the teacher;
- a single process: the video model's held-out losses at CP2 and PP2 (the ViT spread) and a checkpoint scored at TP2
  equal the single process's; the LM's at TP2, PP2 (interleaved too), EP2 and DP2 are checked against one process in
  tests/dist/test_layout_parity.py, beside its training-loss parity (the same runs);
- a run without evaluation: evaluating changes nothing in training (the same losses, bit for bit).

Tolerances: relative 2e-5, as in test_layout_parity.py (layouts differ only in the order of fp32 reductions,
measured <= 3e-6 there, amplified by Adam's early sign-like updates at the later steps). At step 0 against the
training loss: relative 1e-6; the two paths run the same fp32 operations except that the video path's ViT
encodes the frames in chunks without gradients (parallel/vit_layout.encode_chunked) where training encodes
them in one call, which reorders no reduction over the batch of frames, but a matmul's blocking may differ.
"""

import json
import math
import re
from pathlib import Path

import pytest

from tests.launch_util import run_layouts, run_layouts_all

pytestmark = pytest.mark.slow

LM = ["recipe=keye_tiny_lm", "train.steps=3", "train.checkpoint.enabled=false", "train.global_batch_size=8",
      "train.micro_batch_size=2", "train.seq_length=128", "parallel=single"]
EVAL = ["train.eval.interval=2", "train.eval.batches=2"]
VL = ["recipe=keye_tiny", "parallel=single", "train.steps=2", "train.global_batch_size=2",
      "train.checkpoint.enabled=false", "data.synthetic_videos=12"]
KSA = ["recipe=keye_tiny_ksa_distill", "train.steps=2", "train.checkpoint.enabled=false", "parallel=single",
       "train.global_batch_size=4", "train.micro_batch_size=2"]  # held-out: one global batch (the default)
RTOL = 2e-5


def _by_step(evals: list[dict]) -> dict[int, float]:
    return {e["step"]: e["val_loss"] for e in evals}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data.video_stream import ensure_synthetic_shards

    videos = ensure_synthetic_shards(tmp_path_factory.mktemp("videos"), 12, 1234, rank=0)
    held_out = ensure_synthetic_shards(tmp_path_factory.mktemp("held_out"), 4, 99, rank=0)
    held_out2 = ensure_synthetic_shards(tmp_path_factory.mktemp("held_out2"), 4, 98, rank=0)
    vl = VL + [f"data.video.shards={videos}"]
    saved_vl = [o for o in vl if o != "train.checkpoint.enabled=false"]  # its checkpoint at the last step
    # held_out scored whole (train.eval.batches=0) in global batches that do not divide its packs, against a run
    # that trains one step on all of them
    packs = _packs_in_first_epoch(held_out, tmp_path_factory.mktemp("plan"))
    gbs = next(g for g in (3, 2, 4, 5) if packs % g)
    vl_no_gbs = [o for o in VL if not o.startswith("train.global_batch_size")]
    # the references read at step 1 alone (a first training step's loss and terms; a step-0 evaluation) stop after it:
    # train.steps and so the learning-rate schedule stay as they were, and steps 1 and 0 are what they were
    first = ["train.stop_after=1"]
    one = tmp_path_factory.mktemp("one")
    one_job = run_layouts_all(1, {
        # a checkpoint at every step (all kept)
        "lm": [o for o in LM if o != "train.checkpoint.enabled=false"] + EVAL + [
            "run_dir=lm_ck", "train.checkpoint.save_interval=1", "train.checkpoint.keep_last=3"],
        # its checkpoints' weights scored alone (train.eval.only): the newest from its run directory, and every one
        # as another run's init_from
        "lm_eval_only": [o for o in LM if o != "train.checkpoint.enabled=false"] + [
            "train.eval.only=true", "train.eval.batches=2", "run_dir=lm_ck"],
        "lm_eval_init": LM + ["train.eval.only=true", "train.eval.batches=2", "train.checkpoint.init_from={root}/lm_ck",
                              "train.eval.checkpoints=all"],
        "lm_no_eval": LM,
        "lm_one_batch": LM + ["train.eval.interval=3"] + first,  # one held-out batch: what one training step sees
        # trains on the held-out text: the synthetic chain's samples under seed + 1 (the recipe's seed is 1234)
        "lm_on_held_out": LM + ["data.sample_seed=1235"] + first,
        "vl": saved_vl + ["train.eval.interval=1", f"data.video.eval_shards={held_out}", "run_dir=vl_ck"],
        "vl_eval_only": saved_vl + ["train.eval.only=true", f"data.video.eval_shards={held_out}", "run_dir=vl_ck"],
        "vl_no_eval": vl,
        "vl_on_held_out": VL + [f"data.video.shards={held_out}"] + first,
        # two named held-out sets, each scored on its own: "clips" is vl's set, "more" what vl_on_more trains on
        "vl_sets": vl + ["train.eval.interval=2", f"data.video.eval_shards='clips={held_out},more={held_out2}'"],
        "vl_on_more": VL + [f"data.video.shards={held_out2}"] + first,
        # with one epoch of training data: the held-out stream does not inherit it (its filler packs are the set's
        # next epoch; inherited, the evaluation stopped with StopIteration)
        "vl_whole": vl_no_gbs + [f"train.global_batch_size={gbs}", f"data.video.shards={videos}",
                                 "train.eval.interval=2", f"data.video.eval_shards={held_out}", "train.eval.batches=0",
                                 "data.video.num_epochs=1"],
        "vl_whole_ref": vl_no_gbs + [f"train.global_batch_size={packs}", f"data.video.shards={held_out}"] + first,
        # a run on its own synthetic videos makes its own held-out set
        "vl_own_videos": VL + ["train.eval.interval=2"],
        "dsa_sparse": ["recipe=keye_tiny_dsa_sparse", "train.steps=2", "train.checkpoint.enabled=false",
                       "parallel=single", "train.eval.interval=2"],
        "ksa_distill": KSA + ["train.eval.interval=2"],
        "ksa_distill_on_held_out": KSA + ["data.sample_seed=1235"] + first,  # trains on what ksa_distill evaluates
    }, one)
    one_losses, one_evals, extras = one_job["losses"], one_job["evals"], one_job["extras"]
    # the LM's layouts' held-out losses: test_layout_parity.py
    two_losses, two = run_layouts(2, {
        # the one-process run's checkpoint scored at TP 2 (its weights resharded as init_from's are)
        "tp2_eval_only": LM + ["parallel.tp=2", "train.eval.only=true", "train.eval.batches=2",
                               f"train.checkpoint.init_from={one / 'runs' / 'lm_ck'}"],
        "vl_cp2": vl + ["train.eval.interval=1", f"data.video.eval_shards={held_out}", "parallel.cp=2",
                        "parallel.vit.layout=spread"],
        "vl_pp2": vl + ["train.eval.interval=1", f"data.video.eval_shards={held_out}", "parallel.pp=2",
                        "parallel.vit.layout=spread"],
    }, tmp_path_factory.mktemp("two"), evals=True)
    return ({**one_losses, **two_losses}, {**one_evals, **two}, {**extras, "packs": packs, "whole_gbs": gbs,
                                                                 "runs": one / "runs", "held": one_job["held"],
                                                                 "open_fds": one_job["open_fds"]})


def test_a_process_that_builds_trainers_in_turn_holds_no_more_descriptors(runs):
    """The one-process job builds 18 trainers in turn (text, video, DSA, KSA, eval-only): the descriptors open after
    each stay within 20 of the first's (measured 108-118: the kinds of run differ in what they keep open, such as a
    video run's guarded decode child). Before parallel/groups.py collected a dropped trainer's reference cycles,
    its process groups stayed open in them, about 60 descriptors per trainer until the collector happened to run:
    690 after the last trainer in one such run."""
    fds = list(runs[2]["open_fds"].values())
    assert len(fds) == 18 and max(fds) - fds[0] <= 20, fds


def _packs_in_first_epoch(shards, tmp) -> int:
    """The packed sequences of the first epoch of `shards` as the tiny recipe packs them (its data config and
    sequence length)."""
    from dataclasses import replace

    from data.video.loader import VideoPackedLoader
    from train.launch import compose_config, validate

    cfg = validate(compose_config(["recipe=keye_tiny", "parallel=single", f"run_dir={tmp}",
                                   f"data.video.shards={shards}"]))[0]
    v = replace(cfg.data.video, seq_len=cfg.train.seq_length, index_dir="", quarantine_path="")
    return VideoPackedLoader(v, seed=cfg.data.seed).planner.num_packs(0)


def test_evaluations_at_start_interval_and_end(runs):
    _, evals, _ = runs
    assert sorted(_by_step(evals["lm"])) == [0, 2, 3]
    assert sorted(_by_step(evals["vl"])) == [0, 1, 2]
    assert evals["lm_no_eval"] == [] and evals["vl_no_eval"] == []
    for e in evals["lm"] + evals["vl"]:
        assert e["val_loss"] > 0 and e["val_seconds"] > 0
    lm = _by_step(evals["lm"])
    assert lm[0] != lm[2] != lm[3]  # the same sequences each time, scored by the weights of that step


def test_eval_only_scores_a_checkpoint_as_its_run_did(runs):
    """train.eval.only: the newest checkpoint's weights, scored once, give the held-out values the run logged at
    that step (the same process count, data and weights: equal), for the LM from its run directory and as another
    run's init_from (logged at step 0), and for the multimodal model (its vision tower from the checkpoint too).
    Nothing trains, nothing is held for training (no gradient buffer or optimizer state), and nothing is written but
    the evaluation's line."""
    losses, evals, extras = runs

    def values(e: dict) -> dict:
        return {k: v for k, v in e.items() if k != "val_seconds"}

    for name, ref, step in (("lm_eval_only", "lm", 3), ("vl_eval_only", "vl", 2)):
        (got,) = evals[name]
        want = next(e for e in evals[ref] if e["step"] == step)
        assert values(got) == values(want) and losses[name] == {}, name
    # every checkpoint of another run directory, oldest first, each at its step
    every = evals["lm_eval_init"]
    assert [e["step"] for e in every] == [1, 2, 3] and losses["lm_eval_init"] == {}
    assert [values(e) for e in every[1:]] == [values(e) for e in evals["lm"] if e["step"] in (2, 3)]
    assert every[0]["val_loss"] not in {e["val_loss"] for e in evals["lm"]}  # step 1's weights: no run scored them
    # at TP 2 the same weights, resharded: equal to the order of the fp32 reductions (RTOL, module docstring)
    (tp2,) = evals["tp2_eval_only"]
    want = _by_step(evals["lm"])[3]
    assert tp2["step"] == 3 and abs(tp2["val_loss"] - want) <= RTOL * want, (tp2, want)
    # nothing trains, so nothing is held for training: no gradient buffer, no parameter in an optimizer (the runs
    # that trained the same models held both)
    held = extras["held"]
    for name in ("lm_eval_only", "lm_eval_init", "vl_eval_only"):
        assert held[name] == {"grad_elements": 0, "optimizer_params": 0, "vision_optimizer_params": 0}, name
    assert min(held["lm"]["grad_elements"], held["lm"]["optimizer_params"], held["vl"]["vision_optimizer_params"]) > 0
    for run, kept, steps in (("lm_ck", [1, 2, 3], [0, 2, 3, 3]), ("vl_ck", [2], [0, 1, 2, 2])):
        assert sorted(p.name for p in (extras["runs"] / run / "checkpoints").glob("step_*")) == \
            [f"step_{s:06d}" for s in kept]
        lines = [json.loads(line) for line in (extras["runs"] / run / "eval.jsonl").read_text().splitlines()]
        assert [e["step"] for e in lines] == steps
        assert [e.get("eval_only", False) for e in lines] == [False] * (len(steps) - 1) + [True]  # the last scored it
    # a step the directory does not hold stops the run before it starts, naming the ones it holds
    from train.launch import compose_config, validate

    with pytest.raises(ValueError, match=r"train.eval.checkpoints='7,2': .*lm_ck holds no complete checkpoint of "
                                         r"step 7; its complete checkpoints are of steps 1, 2, 3$"):
        validate(compose_config(["recipe=keye_tiny_lm", "parallel=single", "train.eval.only=true",
                                 "train.eval.checkpoints='7,2'", f"run_dir={extras['runs'] / 'lm_ck'}"]))


def test_held_out_loss_is_the_training_loss_on_that_data(runs):
    losses, evals, _ = runs
    for run, reference in (("lm_one_batch", "lm_on_held_out"), ("vl", "vl_on_held_out")):
        got, want = _by_step(evals[run])[0], losses[reference][1]
        assert abs(got - want) <= 1e-6 * abs(want), (run, got, want)
    # and not the training data's: the held-out sequences are others
    assert abs(_by_step(evals["lm"])[0] - runs[0]["lm"][1]) > 1e-3


def test_named_held_out_video_sets_are_scored_each_as_alone(runs):
    """data.video.eval_shards='clips=A,more=B': val_loss/clips equals vl's val_loss on A alone at the same steps,
    bit for bit (the same weights, the same packs of A); val_loss/more at step 0 is the first training step's loss
    of a run on B (1e-6, as above); val_loss is over both sets' tokens, between the two."""
    losses, evals, _ = runs
    sets, alone = evals["vl_sets"], _by_step(evals["vl"])
    assert [e["step"] for e in sets] == [0, 2] and losses["vl_sets"] == losses["vl"]
    for e in sets:
        assert e["val_loss/clips"] == alone[e["step"]], (e, alone)
        assert min(e["val_loss/clips"], e["val_loss/more"]) < e["val_loss"] < max(e["val_loss/clips"],
                                                                                e["val_loss/more"])
    want = losses["vl_on_more"][1]
    assert abs(sets[0]["val_loss/more"] - want) <= 1e-6 * abs(want), (sets[0], want)


def test_a_held_out_video_set_is_scored_whole_once(runs):
    """train.eval.batches=0 on video: every pack of the set's first epoch once, in global batches that do not divide
    them (the last filled up with packs of the next epoch that count for nothing). At step 0 val_loss is the first
    training step's loss of a run whose one global batch is all of those packs (1e-6, as above)."""
    losses, evals, extras = runs
    packs, gbs = extras["packs"], extras["whole_gbs"]
    assert packs % gbs
    whole = evals["vl_whole"]
    assert [e["step"] for e in whole] == [0, 2] and all(e["val_sequences"] == packs for e in whole)
    want = losses["vl_whole_ref"][1]
    assert abs(whole[0]["val_loss"] - want) <= 1e-6 * abs(want), (whole[0], want)


def test_evaluating_changes_no_training_step(runs):
    losses, _, _ = runs
    assert losses["lm"] == losses["lm_no_eval"]
    assert losses["vl"] == losses["vl_no_eval"]


@pytest.mark.parametrize("name", ["vl_cp2", "vl_pp2"])
def test_video_layouts_give_the_single_process_held_out_loss(runs, name):
    _, evals, _ = runs
    ref, got = _by_step(evals["vl"]), _by_step(evals[name])
    assert sorted(got) == sorted(ref) == [0, 1, 2]
    for step in ref:
        assert abs(got[step] - ref[step]) <= RTOL * abs(ref[step]), (name, step, got[step], ref[step])


def test_attention_variants_evaluate(runs):
    _, evals, _ = runs
    dsa = evals["dsa_sparse"]
    # the DSA layers report their indexer KL on the held-out data too (a KL: finite and >= 0)
    assert [e["step"] for e in dsa] == [0, 2]
    assert all("val_indexer_kl" in e and math.isfinite(e["val_indexer_kl"]) and e["val_indexer_kl"] >= 0 for e in dsa)
    ksa = evals["ksa_distill"]  # the teacher runs in evaluation too: the stage's own terms on held-out data
    assert [e["step"] for e in ksa] == [0, 2]
    assert set(ksa[0]) == {"step", "val_loss", "val_kl", "val_attn_mse", "val_seconds", "val_sequences"}
    assert [e["step"] for e in evals["vl_own_videos"]] == [0, 2]


def test_distillation_terms_held_out_are_the_training_terms_on_that_data(runs):
    """KSA distillation at step 0: the held-out LM loss, logit KL and attention MSE equal the first training step's
    on the same sequences (the same weights; forward only against forward + backward), and the terms are not
    zero (the summary tokens change the student's attention; a KL and an MSE >= 0)."""
    losses, evals, extras = runs
    held_out, trained = evals["ksa_distill"][0], extras["ksa_distill_on_held_out"][1]
    assert abs(held_out["val_loss"] - losses["ksa_distill_on_held_out"][1]) <= 1e-6 * losses["ksa_distill_on_held_out"][1]
    for name in ("kl", "attn_mse"):
        got, want = held_out[f"val_{name}"], trained[name]
        assert want > 0 and abs(got - want) <= 1e-6 * want, (name, got, want)
    # and not the training data's
    assert abs(held_out["val_kl"] - extras["ksa_distill"][1]["kl"]) > 1e-6 * held_out["val_kl"]


def test_config_refuses_evaluation_without_held_out_data(tmp_path):
    from train.launch import compose_config, validate

    with pytest.raises(ValueError, match="needs held-out data: set data.video.eval_shards"):
        validate(compose_config(["recipe=keye_tiny", "parallel=single", f"data.video.shards={tmp_path}",
                                 "train.eval.interval=5"]))
    with pytest.raises(ValueError, match="eval_shards.*names the same shards as `shards`"):
        validate(compose_config(["recipe=keye_tiny", "parallel=single", f"data.video.shards={tmp_path}",
                                 f"data.video.eval_shards={tmp_path}", "train.eval.interval=5"]))
    with pytest.raises(ValueError, match=r"train.eval.only=true scores existing weights, and run_dir=.* holds no "
                                         r"complete checkpoint"):
        validate(compose_config(["recipe=keye_tiny_lm", "parallel=single", "train.eval.only=true",
                                 f"run_dir={tmp_path / 'fresh'}"]))
    with pytest.raises(ValueError, match=r"train.eval.only=true needs held-out data: set data.video.eval_shards=DIR "
                                         r"\(shards not in data.video.shards='[^']*'\)$"):
        validate(compose_config(["recipe=keye_tiny", "parallel=single", f"data.video.shards={tmp_path}",
                                 "train.eval.only=true", f"train.checkpoint.init_from={tmp_path}",
                                 f"run_dir={tmp_path / 'fresh'}"]))
    with pytest.raises(ValueError, match=r"train.eval.only=true: train.checkpoint.init_from='[^']*' holds no complete "
                                         r"checkpoint$"):
        validate(compose_config(["recipe=keye_tiny_lm", "parallel=single", "train.eval.only=true",
                                 f"train.checkpoint.init_from={tmp_path}", f"run_dir={tmp_path / 'fresh'}"]))
    with pytest.raises(ValueError, match=r"train.eval.checkpoints='all' names checkpoints to score with "
                                         r"train.eval.only=true; this run trains"):
        validate(compose_config(["recipe=keye_tiny_lm", "parallel=single", "train.eval.checkpoints=all"]))
    with pytest.raises(ValueError, match=r"train.eval.checkpoints='x2': give"):
        validate(compose_config(["recipe=keye_tiny_lm", "parallel=single", "train.eval.only=true",
                                 "train.eval.checkpoints=x2"]))
    with pytest.raises(ValueError, match=r"train.eval.batches must be >= 1, or 0 for each held-out set whole"):
        validate(compose_config(["recipe=keye_tiny", "parallel=single", "train.eval.batches=-1"]))


def test_a_held_out_set_smaller_than_an_evaluation_is_named_in_a_warning(tmp_path):
    """Held-out token files holding fewer rows than an evaluation scores (train.eval.batches x
    train.global_batch_size) are scored on into their next epochs, so some rows count more than once in val_loss;
    rank 0 warns once, naming the set, its rows (the reader's own count: TokenCorpus) and the count scored. Before,
    nothing said so, and the log's "16 held-out sequences" read as 16 rows of a 3-row set. A named set given its
    count by train.eval.set_batches is named with it; a set that holds enough rows is not warned about."""
    from data.token_files import TokenCorpus, ensure_synthetic_token_files

    d = tmp_path / "tokens"
    train = ensure_synthetic_token_files(d, 300, 11, rank=0, vocab_size=512)
    small = ensure_synthetic_token_files(d, 4, 18, rank=0, vocab_size=512)   # 14 rows of 64 tokens
    big = ensure_synthetic_token_files(d, 40, 12, rank=0, vocab_size=512)
    rows = TokenCorpus(small, seq_length=64, seed=0).sources[0].per_epoch
    assert TokenCorpus(big, seq_length=64, seed=0).sources[0].per_epoch >= 16 > rows
    common = ["recipe=keye_tiny_lm", "data=tokens", f"data.tokens.paths={train}", "train.micro_batch_size=1",
              "train.seq_length=64", "train.global_batch_size=4", "train.steps=2", "parallel=single",
              "train.checkpoint.enabled=false", "train.eval.interval=1"]
    out = run_layouts_all(1, {
        "pool": common + [f"data.tokens.eval_paths={small}", "train.eval.batches=4"],    # 16 of 14 rows
        "sets": common + [f"data.tokens.eval_paths='small={small},big={big}'", "train.eval.batches=4",
                          f"train.eval.set_batches='small={-(-rows // 4) - 1}'"],   # 12 of the 14 rows: enough
        "named": common + [f"data.tokens.eval_paths='small={small},big={big}'", "train.eval.set_batches='small=5'"],
    }, tmp_path)
    assert [e["step"] for e in out["evals"]["pool"]] == [0, 1, 2]

    # the job's rank-0 output, the three runs in turn: "pool" warns once though it evaluates three times, "sets"
    # not at all
    text = (tmp_path / "logs" / "rank0.log").read_text()
    pool, named = [line for line in text.splitlines() if "fewer than the" in line]
    assert (f"the held-out set ({small}) holds {rows} sequences, fewer than the 16 each evaluation scores "
            f"(train.eval.batches=4 x train.global_batch_size=4)") in pool and "train.eval.batches=0" in pool, pool
    assert (f"held-out set 'small' ({small}) holds {rows} sequences, fewer than the 20 each evaluation scores "
            f"(train.eval.set_batches small=5 x train.global_batch_size=4)") in named, named
    assert "train.eval.set_batches=small=all" in named


@pytest.fixture(scope="module")
def three_checkpoints(runs):
    """A run of LM with held-out evaluations and a checkpoint at each of its 3 steps (all kept), the module's "lm"
    run: its evaluations ({"evals": {"train": [...]}}) and its run directory, which each test copies before changing
    it (its eval.jsonl ends with lm_eval_only's line)."""
    _, evals, extras = runs
    return {"evals": {"train": evals["lm"]}}, extras["runs"] / "lm_ck"


def test_eval_only_scores_no_corrupted_checkpoint(three_checkpoints, tmp_path):
    """train.eval.only checks a checkpoint's files against the checksums its save recorded, as a resume does:
    with the newest checkpoint's shards damaged in place (sizes unchanged), the newest that verifies is scored
    instead, at its step, and its values are those the run logged there (the same weights and data: equal);
    train.eval.checkpoints=all scores the others and not the damaged one; with every one damaged the launch
    stops with CheckpointLoadError naming the files. Before, the damaged checkpoint was loaded and scored
    without a word (val_loss nan, or a wrong number when fewer bytes were hit)."""
    import shutil

    from train.checkpoint import CheckpointLoadError

    trained, source = three_checkpoints
    shutil.copytree(source, tmp_path / "one" / "runs" / "ck")
    ckpts = tmp_path / "one" / "runs" / "ck" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000001", "step_000002", "step_000003"]

    def damage(step: int) -> None:
        for shard in (ckpts / f"step_{step:06d}").glob("*.distcp"):
            with open(shard, "r+b") as f:
                f.seek(shard.stat().st_size // 2)
                f.write(b"\x7f" * 64)

    damage(3)
    every = ["train.eval.only=true", "train.eval.batches=2",
             f"train.checkpoint.init_from={tmp_path / 'one' / 'runs' / 'ck'}"]
    scored = run_layouts_all(1, {"newest": LM + every, "all": LM + every + ["train.eval.checkpoints=all"]},
                             tmp_path / "two")

    def values(e: dict) -> dict:
        return {k: v for k, v in e.items() if k != "val_seconds"}

    at_2 = next(e for e in trained["evals"]["train"] if e["step"] == 2)
    (newest,) = scored["evals"]["newest"]
    assert values(newest) == values(at_2)
    assert [e["step"] for e in scored["evals"]["all"]] == [1, 2] and values(scored["evals"]["all"][1]) == values(at_2)
    damage(1)
    damage(2)
    with pytest.raises(AssertionError):
        run_layouts_all(1, {"none": LM + every}, tmp_path / "three")
    log = (tmp_path / "three" / "logs" / "rank0.log").read_text()
    assert CheckpointLoadError.__name__ in log and "no checkpoint of" in log and "CRC32 differs" in log, log[-2000:]


def scored_while_pruned(out: str, overrides: str, which: str = "oldest") -> None:
    """train.eval.only over `overrides`, the oldest checkpoint it lists removed right after the listing (on rank 0), as
    keep_last removes it in a run training in that directory meanwhile; rank 0 writes the evaluations to `out`.
    which="newest": the listing and its verification are made with the newest checkpoint moved aside, which then
    comes back as the one listed goes (the run saved a newer one and its keep_last removed the older)."""
    import logging
    import shutil

    import torch.distributed as dist

    from parallel.groups import teardown
    from train import checkpoint as ckpt
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    listed = ckpt.eval_checkpoints

    def listing_then_pruned(cfg):
        source, refs = listed(cfg)
        if dist.get_rank() == 0:
            shutil.rmtree(refs[0].path)
        dist.barrier()
        return source, refs

    def newest_aside(cfg):
        newest = sorted(Path(cfg.run_dir, "checkpoints").glob("step_*"))[-1]
        if dist.get_rank() == 0:
            newest.rename(newest.with_name("aside"))
        dist.barrier()
        return listed(cfg)

    def verified_then_newer(source, refs):
        refs = verified(source, refs)
        if dist.get_rank() == 0:
            shutil.rmtree(refs[-1].path)
            aside = refs[-1].path.with_name("aside")
            aside.rename(aside.with_name(f"step_{refs[-1].step + 1:06d}"))
        dist.barrier()
        return refs

    logging.basicConfig(level=logging.INFO)      # the eval line, an info line, in the rank's log
    cfg, layout = validate(compose_config(overrides.split()))
    tr = Trainer(cfg, layout)
    ckpt.eval_checkpoints = listing_then_pruned if which == "oldest" else newest_aside
    if which == "newest":
        verified, tr._verified = tr._verified, verified_then_newer
    try:
        evals = tr.evaluate_only()
    finally:
        ckpt.eval_checkpoints = listed
    if tr.rank == 0:
        with open(out, "w") as f:
            json.dump(evals, f)
    tr.close()
    teardown()


def _scored_while_pruned(three_checkpoints, tmp_path, checkpoints: str, which: str):
    """scored_while_pruned on one forked rank over a copy of `three_checkpoints`' run, train.eval.checkpoints=
    `checkpoints`: (the evaluations, the run's logged ones by step, rank 0's log, the copy's run directory)."""
    import shutil

    from tests.launch_util import QUIET, run_ranks

    trained, source = three_checkpoints
    run_dir = tmp_path / "ck"
    shutil.copytree(source, run_dir)
    out = tmp_path / "evals.json"
    overrides = QUIET + LM + ["train.eval.only=true", "train.eval.batches=2", f"train.eval.checkpoints={checkpoints}",
                              f"run_dir={run_dir}"]
    run_ranks(1, "tests.dist.test_eval:scored_while_pruned", (str(out), " ".join(overrides), which), tmp_path / "logs")
    logged = {e["step"]: e for e in trained["evals"]["train"]}
    return json.loads(out.read_text()), logged, (tmp_path / "logs" / "rank0.log").read_text(), run_dir


def _without_time(e: dict) -> dict:
    return {k: v for k, v in e.items() if k != "val_seconds"}


def test_eval_only_of_a_run_that_trains_skips_a_checkpoint_its_retention_removed(three_checkpoints, tmp_path):
    """train.eval.only may score a run directory while that run trains there, and that run's keep_last removes its
    older checkpoints meanwhile. A checkpoint listed for train.eval.checkpoints=all and removed before it was read
    stopped the scoring with a traceback on every rank (FileNotFoundError of its COMPLETE.json, or megatron's
    CheckpointingException that its directory does not exist, by when it went), nothing after it scored; it is
    named in a warning and the others are scored, each with the values the run logged at its step (the same
    weights and data: equal)."""
    got, logged, log, run_dir = _scored_while_pruned(three_checkpoints, tmp_path, "all", "oldest")
    assert [e["step"] for e in got] == [2, 3]
    for e in got:
        assert _without_time(e) == _without_time(logged[e["step"]])
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_000001'} was removed before it could be scored" in log, log


def test_eval_only_that_gives_way_to_a_newer_checkpoint_logs_its_step_of_the_newest(three_checkpoints, tmp_path):
    """train.eval.only of the newest checkpoint (train.eval.checkpoints="") whose listed newest (step 2) the training
    run's keep_last removes once it saves a newer one (step 3): step 3 is scored, with the values the run logged
    there, and its eval line reads 3/3, where it read 3/2 (the newest listed at the start stood for the total)."""
    got, logged, log, _ = _scored_while_pruned(three_checkpoints, tmp_path, "", "newest")
    assert [e["step"] for e in got] == [3]
    assert _without_time(got[0]) == _without_time(logged[3])
    assert re.search(r"eval +3/3 \|", log), log


def test_a_held_out_video_set_with_nothing_to_plan_stops_the_launch(tmp_path):
    """A held-out video set none of whose samples can be planned (texts without an answer) failed at the run's first
    evaluation, after the training steps before it (a resumed run's: those to the next train.eval.interval), with a
    RuntimeError naming data.video.shards (the path shown was the held-out one). The launch now plans the held-out
    sets at start-up and stops with a config error (exit 2) naming data.video.eval_shards and the set, before a
    step."""
    from data.video.shards import ShardWriter
    from data.video_stream import ensure_synthetic_shards
    from tests.launch_util import run_launch

    videos = ensure_synthetic_shards(tmp_path / "videos", 12, 1234, rank=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    w = ShardWriter(bad, 0)
    for key in ("unanswered0", "unanswered1"):
        w.add_text_sample(key, {"kind": "text", "video": None, "annotation": {"qa": [{"question": "no answer"}]}})
    w.close()
    vl = [o for o in VL if o not in ("train.checkpoint.enabled=false", "train.steps=2")] + [
        f"data.video.shards={videos}"]
    run_dir = tmp_path / "run"
    # one launch: its only evaluation would come after its last step (old code: both steps trained, then the error)
    proc = run_launch(1, vl + ["train.steps=2", "train.eval.interval=10", f"data.video.eval_shards='qa={bad}'"],
                      run_dir, check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert ("config error: video loader: data.video.eval_shards (set 'qa'): none of the 2 samples can be planned "
            "(epoch 0), so there is nothing to score; by reason: {'no_text': 2}") in proc.stderr, proc.stderr[-4000:]
    assert f"Check the shards ({bad})" in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()   # the launch trained nothing
