"""A bad sample met in training is recorded once in the run directory's quarantine (train/trainer.py _video_stream,
data/video/loader.py _quarantine): the tensor, context and pipeline ranks of a data-parallel replica read the same
packs and meet the same bad samples, and only the replica's first rank writes them; a loader that meets again
samples its quarantine file holds (each evaluation of a held-out set; a resumed run's packs trained again and its
epoch's plan rejects) writes them no second time.

Reference: the bad members written into the shards (videos whose catalog record is a good video's, as if the
file broke after ingest), and the loader's own count of the samples that failed.
"""
import json
import shutil
from collections import Counter

import pytest

from tests.launch_util import run_layouts_all

pytestmark = pytest.mark.slow

BAD = ["zero_byte.mp4", "truncated_in_middle.mp4", "not_a_video.mp4"]


def _shards_with_bad_members(tmp, name: str, n_good: int, seed: int) -> tuple:
    from data.video.shards import ShardWriter, load_catalog
    from data.video.synthetic import make_bad_videos
    from data.video_stream import ensure_synthetic_shards

    good = ensure_synthetic_shards(tmp / f"{name}_synthetic", n_good, seed, rank=0)
    out = tmp / name
    shutil.copytree(good, out)
    donor = load_catalog(str(good))[0]
    cases = make_bad_videos(tmp / "bad_src", seed=1)
    index = max(int(p.name.split("-")[1].split(".")[0]) for p in out.glob("shard-*.tar")) + 1
    w = ShardWriter(out, index)
    keys = []
    for name in BAD:
        keys.append("bad_" + name.split(".")[0])
        w.add_sample(keys[-1], cases[name]["path"], "mp4", {"video": donor.video, "annotation": donor.annotation})
    w.close()
    return out, keys


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quarantine")
    shards, keys = _shards_with_bad_members(tmp, "train", 8, 1234)
    held_out, eval_keys = _shards_with_bad_members(tmp, "held_out", 4, 99)
    # TP 2 over the 2 ranks: one data-parallel replica; 3 steps, stopped after 2 with a checkpoint, then resumed;
    # the held-out set scored at steps 0, 1, 2 and 3 (the same packs each time)
    common = ["recipe=keye_tiny", "parallel=single", "parallel.tp=2", "train.steps=3", "train.global_batch_size=4",
              f"data.video.shards={shards}", "train.checkpoint.save_interval=1", f"data.video.eval_shards={held_out}",
              "train.eval.interval=1", "train.eval.batches=2", "run_dir=q"]
    # the same 2 steps with every rank decoding every pack itself (parallel.vit.decode_once=false; by default the
    # replica's first rank decodes them and tells the other which samples failed), no evaluation, no checkpoint
    each = [o for o in common if not o.startswith(("train.eval", "data.video.eval", "train.checkpoint", "run_dir"))]
    data = run_layouts_all(2, {"stopped": common + ["train.stop_after=2"], "resumed": common,
                               "each": each + ["train.steps=2", "train.checkpoint.enabled=false",
                                               "parallel.vit.decode_once=false"]}, tmp)
    return data, tmp / "runs" / "q", keys, eval_keys


def _records(path) -> tuple[list[dict], Counter]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return recs, Counter((r["shard"], r["key"], r["stage"], r["epoch"], r.get("pack")) for r in recs)


def test_a_bad_sample_is_recorded_once_by_a_replica_and_a_resumed_run(run):
    data, run_dir, keys, eval_keys = run
    assert sorted(data["losses"]["stopped"]) == [1, 2] and sorted(data["losses"]["resumed"]) == [3]
    files = sorted(p.name for p in run_dir.glob("quarantine*.jsonl"))
    assert files == ["quarantine.rank0.jsonl", "quarantine_eval.rank0.jsonl"], files
    recs, ident = _records(run_dir / files[0])
    assert ident and max(ident.values()) == 1, ident     # once each: not per TP rank, not again on resume
    assert {r["key"] for r in recs} <= set(keys) and all(r["stage"] == "decode" for r in recs)
    failed = {name: max(e.get("data_samples_failed", 0) for e in data["extras"][name].values())
              for name in ("stopped", "resumed")}
    # the resumed run counts its own meetings (the checkpoint keeps the count); each met sample is in the file
    assert failed["resumed"] >= failed["stopped"] > 0 and len(recs) <= failed["resumed"], (failed, len(recs))
    # the held-out set, scored 4 times over the same packs: each bad sample it met once in its file
    recs, ident = _records(run_dir / files[1])
    assert {r["key"] for r in recs} == set(eval_keys) and max(ident.values()) == 1, ident
    assert len(data["evals"]["stopped"]) == 3 and len(data["evals"]["resumed"]) == 1


def test_decoding_once_meets_the_bad_samples_as_every_rank_did(run):
    """With the bad samples decoded by one rank of the replica only, the other rank leaves out the same samples (the
    losses are bit-identical to every rank decoding every pack), counts the same failures, and decodes nothing."""
    data = run[0]
    assert data["losses"]["each"] == data["losses"]["stopped"], (data["losses"]["each"], data["losses"]["stopped"])
    ex = data["extras"]
    assert [ex["each"][s]["data_samples_failed"] for s in (1, 2)] == \
        [ex["stopped"][s]["data_samples_failed"] for s in (1, 2)]
    # the world's decoded frames: rank 0's alone, where each rank decoded them itself twice as many
    assert [ex["each"][s]["data_frames_decoded"] for s in (1, 2)] == \
        [2 * ex["stopped"][s]["data_frames_decoded"] for s in (1, 2)]
