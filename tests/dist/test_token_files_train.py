"""The language model alone on token files (data.kind=tokens, data/token_files.py) through the trainer.

References: one process (every layout's loss curve, as in test_layout_parity.py: relative 2e-5 per step, the fp32
reduction order of TP / CP / PP / DP), and the uninterrupted run (a stop and resume repeats it bit for bit: the
stream's position is one integer).
"""
import math

import pytest

from tests.launch_util import run_layouts_all

pytestmark = pytest.mark.slow

RTOL = 2e-5
# the multimodal model's fourth step: its replicated vision tower's gradient takes the LM's TP-split backward's
# rounding (the ViT gradient norm 3e-4 relative apart between one process and TP2 at step 4 here), which three Adam
# updates carry into the loss: 3.0e-5 relative at step 4 (within 2e-5 in earlier runs: the drift follows the data's
# values). Steps 1-3 agree within 4e-8 and are held to RTOL; a layout fault (a missing reduction) moves step 1.
VL_STEP4_RTOL = 1e-4
SMALL_ROWS = 14   # 64-token rows in the 4 synthetic documents of seed 18 (checked in the fixture)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data.token_files import TokenCorpus, ensure_synthetic_token_files

    d = tmp_path_factory.mktemp("tokens")
    train = ensure_synthetic_token_files(d, 300, 11, rank=0, vocab_size=512)
    held = ensure_synthetic_token_files(d, 40, 12, rank=0, vocab_size=512)
    held2 = ensure_synthetic_token_files(d, 40, 14, rank=0, vocab_size=512)
    small = ensure_synthetic_token_files(d, 4, 18, rank=0, vocab_size=512)
    assert TokenCorpus(small, seq_length=64, seed=0).sources[0].per_epoch == SMALL_ROWS
    # 64-token rows over documents of 80-1,000 bytes: rows hold one to several documents, and documents run over rows
    common = ["recipe=keye_tiny_lm", "data=tokens", f"data.tokens.paths={train}", "train.micro_batch_size=1",
              "train.seq_length=64", "train.global_batch_size=4", "train.steps=4", "parallel=single",
              "train.checkpoint.enabled=false"]
    ckpt = ["train.checkpoint.enabled=true", "train.checkpoint.save_interval=2"]
    whole = [f"data.tokens.eval_paths={small}", "train.eval.interval=2", "train.eval.batches=0"]
    # the reference for a set scored whole: at step 0 (the same initial weights) one row per global batch, as many
    # batches as the set has rows, none of them filler. Read at step 0 alone: it stops after step 1
    # (train.stop_after), before its step-2 evaluation
    one_row = [o for o in common if not o.startswith(("train.global_batch_size", "train.steps"))] + [
        "train.global_batch_size=1", "train.steps=2", f"data.tokens.eval_paths={small}", "train.eval.interval=2",
        f"train.eval.batches={SMALL_ROWS}", "train.stop_after=1"]
    one = run_layouts_all(1, {
        "single": common + [f"data.tokens.eval_paths={held}", "train.eval.interval=2", "train.eval.batches=1"],
        # two named held-out sets, each scored on its own, the second over 3 global batches (its own count);
        # the second alone as its reference
        "sets": common + [f"data.tokens.eval_paths='first={held},second={held2}'", "train.eval.interval=2",
                          "train.eval.batches=1", "train.eval.set_batches='second=3'"],
        "second": common + [f"data.tokens.eval_paths={held2}", "train.eval.interval=2", "train.eval.batches=3"],
        "stopped": common + ckpt + ["train.stop_after=2", "run_dir=s"],
        "resumed": common + ckpt + ["run_dir=s"],
        # Megatron's rows: attention across the documents of a row, two rows per micro-batch
        "plain": common + ["data.tokens.document_bounds=false", "train.micro_batch_size=2"],
        # the attention variants' language-model stages: KSA's summaries per document of the row, DSA's selection
        "ksa": ["recipe=keye_tiny_ksa"] + common[1:],
        "dsa": ["recipe=keye_tiny_dsa_sparse", "train.checkpoint.init_from="] + common[1:],
        # the small set whole, once: 14 rows in 4 global batches of 4, the last filled up with 2 rows of the next epoch
        "whole": common + whole,
        "one_row": one_row,
        "dsa_whole": ["recipe=keye_tiny_dsa_sparse", "train.checkpoint.init_from="] + common[1:] + whole,
        "dsa_one_row": ["recipe=keye_tiny_dsa_sparse", "train.checkpoint.init_from="] + one_row[1:],
    }, tmp_path_factory.mktemp("one"))
    # data.exclude: a document in rank 1's rows of step 1 (global samples 2, 3) alone, one in rank 0's of step 4
    # (12, 13) alone, so that each rank's count of left-out pieces differs, before a stop after step 2 and after it
    corpus, rows_of = TokenCorpus(train, seq_length=64, seed=1234), {}   # data=tokens' seed
    for j in range(16):
        for doc in corpus.documents([j]):
            rows_of.setdefault(doc, set()).add(j)
    left_out = [next(doc for doc, js in rows_of.items() if js <= rows) for rows in ({2, 3}, {12, 13})]
    (d / "exclude.txt").write_text("".join(f"{prefix}#{n}\n" for prefix, n in left_out))
    exclude = [f"data.exclude={d / 'exclude.txt'}"]
    two = run_layouts_all(2, {
        "tp2": common + ["parallel.tp=2", f"data.tokens.eval_paths={held}", "train.eval.interval=2",
                         "train.eval.batches=1"],
        "cp2": common + ["parallel.cp=2"],
        "pp2": common + ["parallel.pp=2"],
        "dp2": common,
        "dp2_whole": common + whole,
        "dp2_excluded": common + exclude,
        "dp2_excluded_stopped": common + exclude + ckpt + ["train.stop_after=2", "run_dir=ex"],
        "dp2_excluded_resumed": common + exclude + ckpt + ["run_dir=ex"],
    }, tmp_path_factory.mktemp("two"))
    return one, two["losses"], two["evals"], two["extras"]


def _close(a: dict, b: dict, last_rtol: float = RTOL) -> bool:
    """Every step's loss within RTOL of the reference's (the fourth within `last_rtol`)."""
    tol = {1: RTOL, 2: RTOL, 3: RTOL, 4: last_rtol}
    return sorted(a) == sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) <= tol[s] * abs(b[s]) for s in a)


def test_the_loss_falls(runs):
    one, _, _, _ = runs
    for name in ("single", "plain", "ksa", "dsa"):
        curve = one["losses"][name]
        assert all(math.isfinite(v) for v in curve.values()) and curve[4] < curve[1], (name, curve)
    # the same samples, read with attention across documents and the boundary labels trained: another curve
    assert one["losses"]["plain"][1] != one["losses"]["single"][1]


def test_every_layout_matches_one_process(runs):
    one, two, _, _ = runs
    single = one["losses"]["single"]
    for name in ("tp2", "cp2", "pp2", "dp2"):
        assert _close(two[name], single), (name, two[name], single)


def test_a_stopped_run_resumes_bit_identically(runs):
    one, _, _, _ = runs
    assert sorted(one["losses"]["stopped"]) == [1, 2] and sorted(one["losses"]["resumed"]) == [3, 4]
    full = one["losses"]["single"]
    for step in (1, 2):
        assert one["losses"]["stopped"][step] == full[step]
    for step in (3, 4):
        assert one["losses"]["resumed"][step] == full[step], step


def test_held_out_token_files_are_scored(runs):
    one, _, evals, _ = runs
    ref, tp2 = one["evals"]["single"], evals["tp2"]
    assert [e["step"] for e in ref] == [0, 2, 4] == [e["step"] for e in tp2]
    for a, b in zip(ref, tp2):
        assert math.isfinite(a["val_loss"]) and abs(a["val_loss"] - b["val_loss"]) <= RTOL * a["val_loss"]
    assert ref[-1]["val_loss"] < ref[0]["val_loss"]


def test_named_held_out_sets_are_scored_each_as_alone(runs):
    """data.tokens.eval_paths='first=A,second=B' with train.eval.set_batches='second=3': val_loss/first equals a
    run's val_loss on A alone (1 global batch) and val_loss/second one on B alone over train.eval.batches=3, bit for
    bit (the same weights: evaluating changes no training, test_eval.py; the same rows of each set); val_loss is
    over both sets' tokens, so it lies between them; val_sequences counts both sets' rows."""
    one, _, _, _ = runs
    sets, first, second = (one["evals"][name] for name in ("sets", "single", "second"))
    assert [e["step"] for e in sets] == [0, 2, 4] == [e["step"] for e in first] == [e["step"] for e in second]
    assert one["losses"]["sets"] == one["losses"]["single"]
    for s, a, b in zip(sets, first, second):
        assert s["val_loss/first"] == a["val_loss"] and s["val_loss/second"] == b["val_loss"], (s, a, b)
        assert a["val_loss"] != b["val_loss"]
        assert min(a["val_loss"], b["val_loss"]) < s["val_loss"] < max(a["val_loss"], b["val_loss"])
    assert "val_loss/first" not in first[0]     # one pool: the plain keys alone
    # global batch 4: 1 + 3 batches, 1 batch and 3 batches
    assert (sets[0]["val_sequences"], first[0]["val_sequences"], second[0]["val_sequences"]) == (16, 4, 12)


def test_a_held_out_set_is_scored_whole_once(runs):
    """train.eval.batches=0: the small set's 14 rows, once each, in 4 global batches of 4 whose last 2 rows (the
    next epoch's) count for nothing, in their loss and in the DSA indexer KL. At step 0 (the same initial weights)
    val_loss and val_indexer_kl equal those of a run that scores the 14 rows one per global batch, no filler, bit
    for bit: each row is its own micro-batch in both, and the fp64 sums add the same values in the same order
    (and zeros). At DP2 the evaluations match the single process's within RTOL (the training's reduction order).
    Scoring 4 whole batches instead would take 2 more rows and give other values."""
    one, _, evals, _ = runs
    whole, ref = one["evals"]["whole"][0], one["evals"]["one_row"][0]
    assert whole["step"] == ref["step"] == 0
    assert whole["val_loss"] == ref["val_loss"] and whole["val_sequences"] == ref["val_sequences"] == SMALL_ROWS
    dsa, dsa_ref = one["evals"]["dsa_whole"][0], one["evals"]["dsa_one_row"][0]
    assert (dsa["val_loss"], dsa["val_indexer_kl"]) == (dsa_ref["val_loss"], dsa_ref["val_indexer_kl"])
    assert dsa["val_sequences"] == SMALL_ROWS
    assert [e["step"] for e in one["evals"]["whole"]] == [0, 2, 4] == [e["step"] for e in evals["dp2_whole"]]
    for a, b in zip(one["evals"]["whole"], evals["dp2_whole"]):
        assert abs(a["val_loss"] - b["val_loss"]) <= RTOL * a["val_loss"] and b["val_sequences"] == SMALL_ROWS


def test_a_resumed_run_continues_each_ranks_data_counts(runs):
    """The pieces of documents data.exclude names that the rows held, summed over the data-parallel ranks since the
    run began (data_samples_excluded): a run stopped after step 2 and resumed logs the uninterrupted run's counts,
    each rank continuing from its own (the checkpoint keeps them per rank; a copy of the saving rank's would give
    rank 1's count to rank 0 too). The loader's wait is logged for token files as for videos."""
    _, two, _, extras = runs
    full, stopped, resumed = (extras[f"dp2_excluded{x}"] for x in ("", "_stopped", "_resumed"))
    counts = {s: full[s].get("data_samples_excluded", 0) for s in (1, 2, 3, 4)}
    assert counts[1] == counts[2] > 0 and counts[4] > counts[3], counts   # rank 1's in step 1, rank 0's in step 4
    assert {s: stopped[s].get("data_samples_excluded", 0) for s in (1, 2)} == {s: counts[s] for s in (1, 2)}
    assert {s: resumed[s].get("data_samples_excluded", 0) for s in (3, 4)} == {s: counts[s] for s in (3, 4)}
    assert two["dp2_excluded_resumed"] == {s: two["dp2_excluded"][s] for s in (3, 4)}
    assert two["dp2_excluded"][1] != two["dp2"][1]
    assert all(full[s]["data_wait_s"] >= 0 and full[s]["data_wait_rank"] in (0, 1) for s in counts)
    assert "data_samples_excluded" not in extras["dp2"][4] and "data_samples_failed" not in full[4]


@pytest.fixture(scope="module")
def vl_runs(tmp_path_factory):
    """The multimodal tiny model on synthetic videos with token-file rows as 0.4 of its packs
    (data.video.text_tokens): one process straight, stopped and resumed; TP2 and PP2."""
    from data.token_files import ensure_synthetic_token_files
    from data.video_stream import ensure_synthetic_shards

    shards = ensure_synthetic_shards(tmp_path_factory.mktemp("videos"), 8, 1234, rank=0)
    text = ensure_synthetic_token_files(tmp_path_factory.mktemp("vl_tokens"), 300, 13, rank=0, vocab_size=512)
    common = ["recipe=keye_tiny", "parallel=single", f"data.video.shards={shards}", f"data.video.text_tokens={text}",
              "data.video.text_tokens_fraction=0.4", "train.steps=4", "train.global_batch_size=2",
              "train.checkpoint.enabled=false"]
    ckpt = ["train.checkpoint.enabled=true", "train.checkpoint.save_interval=2"]
    one = run_layouts_all(1, {"single": common, "stopped": common + ckpt + ["train.stop_after=2", "run_dir=s"],
                              "resumed": common + ckpt + ["run_dir=s"]}, tmp_path_factory.mktemp("vl_one"))
    two = run_layouts_all(2, {"tp2": common + ["parallel.tp=2"], "pp2": common + ["parallel.pp=2"]},
                          tmp_path_factory.mktemp("vl_two"))
    return one, two


def test_token_rows_beside_videos_train_in_every_layout_and_resume(vl_runs):
    one, two = vl_runs
    single = one["losses"]["single"]
    assert single[4] < single[1], single
    for name in ("tp2", "pp2"):
        assert _close(two["losses"][name], single, VL_STEP4_RTOL), (name, two["losses"][name], single)
    assert one["losses"]["stopped"] == {s: single[s] for s in (1, 2)}
    assert one["losses"]["resumed"] == {s: single[s] for s in (3, 4)}
    # the steps' text-only documents: the token rows' documents among the videos' (the loader's counters)
    assert sum(one["extras"]["single"][s].get("data_samples_text", 0) for s in single) > 0
