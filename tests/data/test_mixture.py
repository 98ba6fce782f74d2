"""Long:short data mixture (`long_shards` + `long_fraction`, the long-context curriculum): the realized
ratio, determinism, disjoint ranks, exact resume mid-stream (also with another DP size, merged states and
a changed fraction), the end of a finite mixture, config errors, and fractions 0 and 1 reproducing the
one-source streams.

The short source is the session's 16 synthetic clips (1.5-4 s); the long one is 6 clips of 5-8 s, so
its documents are longer. Tests that only check which packs come where use blank frames instead of
decoding (`no_decode`); the exact-resume and degenerate-fraction tests decode for real.
"""
import glob
import math
import pickle
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from data.video.loader import LoaderStateMismatch, VideoPackedLoader, merge_rank_states
from data.video.streams import SourceStream
from data.video.synthetic import make_synthetic_shards
from data.video_stream import VideoBatchStream

from .conftest import small_cfg
from .test_loader import signature, take


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    return make_synthetic_shards(out, n_videos=6, seed=21, shard_size_mb=0.04, workers=1,
                                 min_seconds=5.0, max_seconds=8.0)


@pytest.fixture
def no_decode(monkeypatch):
    """Blank frames of the planned size instead of decoding."""
    import data.video.loader as L

    monkeypatch.setattr(L.FrameSource, "frames", lambda self, rec, doc: [
        np.zeros((k - k0, 3, h, w), np.uint8) for k0, k, h, w in doc.frames.runs()])


def mix_cfg(shard_dir, long_dir, tmp_path=None, fraction=0.25, **kw):
    kw.setdefault("decode_isolation", "inline")
    return small_cfg(shard_dir, tmp_path, long_shards=str(long_dir), long_fraction=fraction, **kw)


def where(p) -> tuple:
    return (p.source, p.epoch, p.pack_index)


def own_order(planner, n):
    """The first n packs (epoch, pack) of one source read on its own."""
    return [(x.epoch, x.pack) for x in SourceStream(planner, None).iter((0, 0), frozenset(), start=0, stride=1, stop=n)]


@pytest.mark.parametrize("fraction", [0.25, 1 / 3, 0.5])
def test_realized_ratio_matches_long_fraction(shard_dir, long_dir, fraction):
    # Tolerance: the draws are independent Bernoulli(f), so over N positions the long share has standard
    # deviation sqrt(f (1 - f) / N) (0.0035 at f = 0.5, N = 20,000); we allow 4.5 of them (a fair
    # draw fails this with probability ~7e-6 per seed), for each of 5 seeds.
    N = 20_000
    tol = 4.5 * math.sqrt(fraction * (1 - fraction) / N)
    for seed in range(5):
        ld = VideoPackedLoader(mix_cfg(shard_dir, long_dir, fraction=fraction), seed=seed)
        share = float(np.mean(ld.stream.draws(0, N) == 1))
        assert abs(share - fraction) <= tol, (seed, share, fraction, tol)
    # what ranks iterate follows the draws, and each source is read in its own order, epoch after epoch
    items = list(ld.stream.iter(ld.stream.start(), frozenset(), start=0, stride=1, stop=2000))
    assert [it.source for it in items] == ld.stream.draws(0, 2000).tolist()
    for s, planner in enumerate(ld.planners):
        got = [(it.epoch, it.pack) for it in items if it.source == s]
        assert got == own_order(planner, len(got)) and got[-1][0] > 3      # many epochs of each source


def test_mixture_is_deterministic_and_ranks_get_disjoint_parts(shard_dir, long_dir, tmp_path, no_decode):
    cfg = mix_cfg(shard_dir, long_dir, tmp_path, fraction=0.5)
    a = [signature(p) + (p.source,) for p in take(VideoPackedLoader(cfg, seed=8), 16)]
    b = [signature(p) + (p.source,) for p in take(VideoPackedLoader(cfg, seed=8), 16)]
    assert a == b and {x[-1] for x in a} == {"short", "long"}
    other = [p.source for p in take(VideoPackedLoader(cfg, seed=9), 16)]
    assert other != [x[-1] for x in a]                   # the draws depend on the seed
    # 3 ranks in lockstep: rank r gets mixed positions r, r+3, ...; in step order they are the 1-rank stream
    W, steps = 3, 8
    ranks = [VideoPackedLoader(cfg, dp_rank=r, dp_world=W, seed=8) for r in range(W)]
    got = [[where(next(ld)) for ld in ranks] for _ in range(steps)]
    flat = [x for step in got for x in step]
    assert flat == [where(p) for p in take(VideoPackedLoader(cfg, seed=8), W * steps)]
    per_rank = [{x for step in got for x in [step[r]]} for r in range(W)]
    for r in range(W):
        for q in range(r + 1, W):
            assert not per_rank[r] & per_rank[q]         # disjoint parts of each source
    assert all({x[0] for x in part} == {"short", "long"} for part in per_rank)


def test_exact_resume_mid_stream_with_mixture_two_workers(shard_dir, long_dir, tmp_path):
    cfg = mix_cfg(shard_dir, long_dir, tmp_path, fraction=0.5, num_workers=2)
    ref_loader = VideoPackedLoader(cfg, seed=5)
    total, k = 10, 4
    ref_packs = take(ref_loader, total)
    ref = [signature(p) + (p.source,) for p in ref_packs]
    ref_stats = ref_loader.stats["sources"]
    ref_loader.close()
    assert any(p.source == "long" and p.epoch == 1 for p in ref_packs)     # crosses a long-source epoch

    a = VideoPackedLoader(cfg, seed=5)
    first = [signature(p) + (p.source,) for p in take(a, k)]
    state = pickle.loads(pickle.dumps(a.state_dict()))
    assert len(pickle.dumps(state)) < 8192
    more = [signature(p) + (p.source,) for p in take(a, 2)]    # keep going after the snapshot ...
    a.close()
    b = VideoPackedLoader(cfg, seed=5)
    b.load_state_dict(state)                                     # ... the resumed one restarts at it
    rest = [signature(p) + (p.source,) for p in take(b, total - k)]
    b.close()
    assert first + rest == ref and more == ref[k:k + 2]
    # per-source accounting: what the packs say, carried through the resume
    assert b.stats["sources"] == ref_stats
    for name in ("short", "long"):
        mine = [p for p in ref_packs if p.source == name]
        assert ref_stats[name]["packs"] == len(mine)
        assert ref_stats[name]["tokens"] == sum(p.seq_len - p.num_pad for p in mine)
        assert ref_stats[name]["samples"] == sum(len(p.sample_keys) for p in mine)
    assert ref_stats["long"]["pack_share"] == pytest.approx(sum(p.source == "long" for p in ref_packs) / total)


def test_resume_mixture_with_other_dp_world_and_merged_states(shard_dir, long_dir, tmp_path, no_decode):
    cfg = mix_cfg(shard_dir, long_dir, tmp_path, fraction=0.5)
    ref = [where(p) for p in take(VideoPackedLoader(cfg, seed=6), 2 * 3 + 3 * 4)]
    before = [VideoPackedLoader(cfg, dp_rank=r, dp_world=2, seed=6) for r in range(2)]
    seen = [where(next(ld)) for _ in range(3) for ld in before]
    state = before[1].state_dict()
    after = [VideoPackedLoader(cfg, dp_rank=r, dp_world=3, seed=6) for r in range(3)]
    for ld in after:
        ld.load_state_dict(state)
    seen += [where(next(ld)) for _ in range(4) for ld in after]
    assert seen == ref                                    # 2 -> 3 ranks: nothing repeated or skipped

    # ranks out of lockstep (rank 0 three packs ahead of rank 1's one): merged, then one rank goes on
    r0, r1 = (VideoPackedLoader(cfg, dp_rank=r, dp_world=2, seed=6) for r in range(2))
    seen = [where(p) for p in take(r0, 3)] + [where(p) for p in take(r1, 1)]
    c = VideoPackedLoader(cfg, seed=6)
    c.load_state_dict(merge_rank_states([r0.state_dict(), r1.state_dict()]))
    seen += [where(p) for p in take(c, 8)]
    assert len(seen) == len(set(seen)) and set(seen) == set(ref[:12])

    # the trainer's VideoBatchStream: state through the stream, per-source stats exposed
    kw = dict(seq_length=cfg.seq_len, micro_batch_size=1, global_batch_size=2, dp_rank=0, dp_size=1, seed=6)
    s1 = VideoBatchStream(cfg, **kw)
    [next(s1) for _ in range(3)]
    st = s1.state_dict()
    s2 = VideoBatchStream(cfg, **kw)
    s2.load_state_dict(st)
    after = [next(s1)["tokens"] for _ in range(3)]
    assert all(next(s2)["tokens"].equal(t) for t in after)
    s3 = VideoBatchStream(cfg, **{**kw, "global_batch_size": 3})   # a batch-size ramp: the next packs
    s3.load_state_dict(st)
    assert all(next(s3)["tokens"].equal(t) for t in after)
    # the packs' length is train.seq_length's (the stream sets data.video.seq_len to it): the error names it (it named
    # seq_len and data.video's settings, where data.video.seq_len is replaced)
    with pytest.raises(LoaderStateMismatch) as e:
        VideoBatchStream(cfg, **{**kw, "seq_length": 2 * cfg.seq_len}).load_state_dict(st)
    assert e.value.detail.endswith(f"(seq_len is train.seq_length: {cfg.seq_len} when the state was saved, "
                                   f"{2 * cfg.seq_len} now)") and e.value.settings.startswith("train.seq_length and ")
    assert s2.stats["sources"] == s1.stats["sources"] and sum(v["packs"] for v in s2.stats["sources"].values()) == 6
    # what the trainer logs each step (console line and wandb): the realized shares, from the same counts
    m = s2.step_metrics()
    src = s2.stats["sources"]
    assert m["data_long_seq_share"] == src["long"]["packs"] / 6
    assert m["data_short_seq_share"] + m["data_long_seq_share"] == pytest.approx(1.0)
    assert m["data_long_token_share"] == src["long"]["token_share"] and m["data_samples_failed"] == 0.0
    # train.batch_rampup sets a step's global batch between steps: the next step's 3 packs are the next 3 (those the
    # stream at its old batch gives), and a message about the step names those 3 (it named the last 2)
    s1.set_global_batch_size(3)
    step = [next(s1)["tokens"] for _ in range(s1.num_microbatches)]
    assert len(step) == 3 and all(next(s2)["tokens"].equal(t) for t in step)
    assert len(s1.step_record()["packs"]) == 3


def test_a_held_out_set_scored_whole_fills_its_last_batch_with_packs_that_count_for_nothing(shard_dir, long_dir,
                                                                                             no_decode):
    """one_epoch (train.eval.batches=0): the first epoch's packs come once each with their loss mask, as the plain
    stream gives them, over ranks; the packs of the next epoch that fill the last global batch have a zero mask and
    are marked in `padding`. A mixture has no one first epoch."""
    cfg = small_cfg(shard_dir, decode_isolation="inline")
    kw = dict(seq_length=cfg.seq_len, micro_batch_size=1, seed=6)
    plain = VideoBatchStream(cfg, global_batch_size=1, dp_rank=0, dp_size=1, **kw)
    packs = plain.samples_per_epoch
    # counted from the loader's own packs: those of epoch 0, until the first of epoch 1
    loader = VideoPackedLoader(cfg, seed=6)
    assert next(i for i, p in enumerate(loader) if p.epoch > 0) == packs > 2
    gbs = 2 if packs % 2 else 4 if packs % 4 else 3     # the last global batch is filled up
    assert packs % gbs
    batches = -(-packs // gbs)
    ref = [next(plain) for _ in range(batches * gbs)]
    ranks = [VideoBatchStream(cfg, global_batch_size=gbs, dp_rank=r, dp_size=gbs, one_epoch=True, **kw)
             for r in range(gbs)]
    for step in range(batches):
        for r, s in enumerate(ranks):
            j = step * gbs + r
            mb = next(s)
            assert torch.equal(mb["tokens"], ref[j]["tokens"])
            if j < packs:
                assert torch.equal(mb["loss_mask"], ref[j]["loss_mask"]) and mb["loss_mask"].any()
            else:
                assert not mb["loss_mask"].any()
    assert [s.padding[step] for step in range(batches) for s in ranks] == [j >= packs for j in range(batches * gbs)]
    with pytest.raises(ValueError, match="a mixture of video sources"):
        VideoBatchStream(mix_cfg(shard_dir, long_dir), global_batch_size=1, dp_rank=0, dp_size=1, one_epoch=True,
                         **kw)


def test_changing_long_fraction_on_resume_continues_each_source(shard_dir, long_dir, tmp_path, no_decode):
    a = VideoPackedLoader(mix_cfg(shard_dir, long_dir, tmp_path, fraction=0.25), seed=3)
    before = take(a, 6)
    b = VideoPackedLoader(mix_cfg(shard_dir, long_dir, tmp_path, fraction=0.75), seed=3)
    with pytest.warns(UserWarning, match="long_fraction changed on resume"):
        b.load_state_dict(a.state_dict())
    after = take(b, 12)
    for name, planner in zip(b.source_names, b.planners):      # no pack of a source repeated or skipped
        got = [(p.epoch, p.pack_index) for p in before + after if p.source == name]
        assert got == own_order(planner, len(got))
    assert [p.source for p in after] == [b.source_names[s] for s in b.stream.draws(6, 12)]   # new ratio from here


def test_finite_mixture_ends_evenly_at_the_first_used_up_source(shard_dir, long_dir, tmp_path, no_decode):
    cfg = mix_cfg(shard_dir, long_dir, tmp_path, fraction=0.5, num_epochs=1)
    one = VideoPackedLoader(cfg, seed=2)
    got = [where(p) for p in one]
    n_src = dict(zip(one.source_names, (pl.num_packs(0) for pl in one.planners)))
    counts = Counter(x[0] for x in got)
    assert len(set(got)) == len(got) and all(e == 0 for _, e, _ in got)
    assert all(counts[n] <= m for n, m in n_src.items())
    nxt = one.source_names[int(one.stream.draws(len(got), 1)[0])]
    assert counts[nxt] == n_src[nxt]                     # it ended where it drew a used-up source
    lens = [sum(1 for _ in VideoPackedLoader(cfg, dp_rank=r, dp_world=2, seed=2)) for r in range(2)]
    assert lens[0] == lens[1] == len(got) // 2           # ranks stop together


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_degenerate_fraction_equals_the_one_source_stream(shard_dir, long_dir, tmp_path, fraction):
    with pytest.warns(UserWarning, match="is ignored") if fraction == 0 else nullcontext():
        cfg = mix_cfg(shard_dir, long_dir, tmp_path, fraction=fraction)
    alone = VideoPackedLoader(small_cfg(shard_dir if fraction == 0 else long_dir, tmp_path,
                                        decode_isolation="inline"), seed=4)
    mixed = VideoPackedLoader(cfg, seed=4)
    assert mixed.mixed and not alone.mixed
    n = 2 * alone.planner.num_packs(0) + 1               # across two epoch boundaries
    got = take(mixed, n)
    # the two sources' shards have the same file names and keys (data/video/shards.shard_names): the mixture names
    # each shard with its folder, the one source by its file name alone
    folder = str(Path(shard_dir if fraction == 0 else long_dir).relative_to(Path(shard_dir).parent.parent))
    assert all(k.startswith(folder + "/shard-") for p in got for k in p.sample_keys)
    named = [(*s[:2], tuple(k[len(folder) + 1:] for k in s[2]), s[3]) for s in map(signature, got)]
    assert named == [signature(p) for p in take(alone, n)]
    assert {p.source for p in got} == {"long" if fraction else "short"}
    assert mixed.stats["sources"]["long" if fraction else "short"]["pack_share"] == 1.0


@pytest.mark.parametrize("kw,needle", [
    (dict(long_shards="L", long_fraction=1.5), "VideoDataConfig.long_fraction = 1.5: must be a number in [0, 1]"),
    (dict(long_shards="L", long_fraction=-0.1), "VideoDataConfig.long_fraction = -0.1: must be a number in [0, 1]"),
    (dict(long_shards="L", long_fraction=float("nan")), "VideoDataConfig.long_fraction = nan"),
    (dict(long_shards="L", long_fraction=True), "VideoDataConfig.long_fraction = True"),
    (dict(long_fraction=0.25), "VideoDataConfig.long_fraction = 0.25: is > 0 but there is no long source"),
    (dict(long_shards=7, long_fraction=0.5), "VideoDataConfig.long_shards = 7: must be a string"),
    (dict(long_shards="SAME", long_fraction=0.5), "names the same shards as `shards`"),
])
def test_invalid_mixture_settings_name_the_key(shard_dir, kw, needle):
    if kw.get("long_shards") == "SAME":
        kw["long_shards"] = str(shard_dir)
    with pytest.raises(ValueError) as e:
        small_cfg(shard_dir, **kw)
    assert needle in str(e.value)


def test_bad_long_source_and_mismatched_states_fail_at_once(shard_dir, long_dir, tmp_path):
    with pytest.raises(ValueError, match=r"VideoDataConfig.long_shards = '.*nowhere': no .tar shards found"):
        VideoPackedLoader(mix_cfg(shard_dir, tmp_path / "nowhere", fraction=0.5), seed=0)
    one_tar = sorted(glob.glob(str(shard_dir / "*.tar")))[0]
    with pytest.raises(ValueError, match="long and short sources must not overlap"):
        VideoPackedLoader(mix_cfg(shard_dir, one_tar, fraction=0.5), seed=0)
    (tmp_path / "link").symlink_to(shard_dir)        # the same folder through a link: the same files
    with pytest.raises(ValueError, match="long and short sources must not overlap"):
        VideoPackedLoader(mix_cfg(shard_dir, tmp_path / "link", fraction=0.5), seed=0)
    mixed = VideoPackedLoader(mix_cfg(shard_dir, long_dir, tmp_path, fraction=0.5), seed=0)
    alone = VideoPackedLoader(small_cfg(shard_dir, tmp_path), seed=0)
    with pytest.raises(ValueError, match="long_shards was removed"):
        alone.load_state_dict(mixed.state_dict())
    with pytest.raises(ValueError, match="long_shards was added"):
        mixed.load_state_dict(alone.state_dict())


def test_the_stream_reports_how_long_the_training_loop_waited_for_data(shard_dir, tmp_path, no_decode):
    """data_wait_s: the seconds spent in next() since the last step_metrics() (the trainer logs it each step)."""
    cfg = small_cfg(shard_dir, tmp_path, decode_isolation="inline")
    s = VideoBatchStream(cfg, seq_length=cfg.seq_len, micro_batch_size=1, global_batch_size=2, dp_rank=0, dp_size=1,
                         seed=6)
    next(s)
    assert s.step_metrics()["data_wait_s"] > 0.0

    def slow(it):  # a loader whose every batch takes 50 ms longer to arrive
        for x in it:
            time.sleep(0.05)
            yield x

    s._it = slow(s._it)
    next(s), next(s)
    assert s.step_metrics()["data_wait_s"] >= 0.1
    assert s.step_metrics()["data_wait_s"] == 0.0  # nothing drawn since the last step
