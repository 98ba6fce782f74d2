"""Loader: frame-accurate packs, exact resume mid-epoch with 2 DataLoader workers, resume with a
different number of DP ranks (2 -> 1, 1 -> 2) without repeats or skips, resume without replay."""
import hashlib
import pickle
import time

import numpy as np
import pytest

from data.sample_position import counters_of_rank
from data.video.loader import LoaderStateMismatch, VideoPackedLoader, epoch_order, merge_rank_states
from data.video.packing import unpatchify
from data.video.synthetic import read_counter

from .conftest import small_cfg


def signature(p) -> tuple:
    h = hashlib.sha1()
    for t in (p.tokens, p.labels, p.loss_mask, p.position_ids, p.cu_seqlens, p.pixel_values, p.grid_thw,
              p.visual_pos):
        h.update(t.numpy().tobytes())
    return (p.epoch, p.pack_index, tuple(p.sample_keys), h.hexdigest())


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_resumes_exactly(cfg, seed: int, before: int, after: int) -> None:
    """`before` packs, a new loader from the state, `after` more: the same packs as one loader straight through."""
    ref = [signature(p) for p in take(VideoPackedLoader(cfg, seed=seed), before + after)]
    a = VideoPackedLoader(cfg, seed=seed)
    first = [signature(p) for p in take(a, before)]
    b = VideoPackedLoader(cfg, seed=seed)
    b.load_state_dict(a.state_dict())
    assert first + [signature(p) for p in take(b, after)] == ref


def documents(loader):
    """Every document of every pack `loader` yields, each pack validated first: (pack, the document's index in it,
    its catalog record, its DocPlan, its frames unpatchified [H, W, 3] each, its text as the tokenizer reads it)."""
    cat = {f"{c.shard.rsplit('/', 1)[1]}/{c.key}": c for c in loader.catalog}
    cfg = loader.cfg
    for p in loader:
        p.validate(cfg, loader.tokenizer)
        frames = unpatchify(p.pixel_values, p.grid_thw, cfg.patch_size, cfg.merge_size)
        f = 0
        for d, key in enumerate(p.sample_keys):
            rec = cat[key]
            doc = loader.planner.doc(rec.uid, p.epoch)
            text = loader.tokenizer.decode(p.tokens[int(p.cu_seqlens[d]):int(p.cu_seqlens[d + 1])].tolist())
            yield p, d, rec, doc, frames[f:f + doc.num_frames], text
            f += doc.num_frames
        assert f == len(frames)


def epoch_keys(planner, e):
    return sorted(planner.key(u) for pk in planner.epoch(e).packs for u in pk)


def test_packs_are_frame_accurate_and_valid(shard_dir, counter_bits, tmp_path):
    cfg = small_cfg(shard_dir, tmp_path, num_workers=2, num_epochs=1)
    loader = VideoPackedLoader(cfg, seed=11)
    packs = list(loader)
    assert loader.stats["samples_ok"] == 16 and not loader.stats.get("samples_failed")
    for p in packs:
        p.validate(cfg, loader.tokenizer)
        assert p.seq_len == cfg.seq_len
        frames = unpatchify(p.pixel_values, p.grid_thw, 14, 2)
        f = 0
        for d, key in enumerate(p.sample_keys):
            uid = next(r.uid for r in loader.catalog if f"{r.shard.rsplit('/', 1)[1]}/{r.key}" == key)
            doc = loader.planner.doc(uid, p.epoch)
            bits = counter_bits[key.split("/")[1]]
            got = [read_counter(frames[f + i], bits) for i in range(doc.frames.num_frames)]
            assert got == list(doc.frames.indices), key            # frame i really is frame i
            assert np.allclose(p.frame_timestamps[f:f + len(got)].numpy(), doc.frames.timestamps)
            f += len(got)
        assert f == len(frames)
    assert sorted(k for p in packs for k in p.sample_keys) == epoch_keys(loader.planner, 0)


def test_exact_resume_mid_epoch_two_workers(shard_dir, tmp_path):
    cfg = small_cfg(shard_dir, tmp_path, num_workers=2)
    ref_loader = VideoPackedLoader(cfg, seed=5)
    n_epoch = ref_loader.planner.num_packs(0)
    total = n_epoch + 2                                   # run across the epoch boundary
    ref = [signature(p) for p in take(ref_loader, total)]
    ref_loader.close()
    assert ref[n_epoch][0] == 1 and ref[n_epoch - 1][0] == 0

    a = VideoPackedLoader(cfg, seed=5)
    k = 3
    first = [signature(p) for p in take(a, k)]
    state = pickle.loads(pickle.dumps(a.state_dict()))
    assert len(pickle.dumps(state)) < 8192
    more = [signature(p) for p in take(a, 2)]              # keep going after the snapshot ...
    a.close()
    b = VideoPackedLoader(cfg, seed=5)
    b.load_state_dict(state)                               # ... the resumed one restarts at the snapshot
    rest = [signature(p) for p in take(b, total - k)]
    b.close()
    assert first + rest == ref
    assert more == ref[k:k + 2]


@pytest.mark.parametrize("w_before,w_after", [(2, 2), (2, 1), (1, 2), (2, 3)])
def test_resume_with_different_dp_world(shard_dir, tmp_path, w_before, w_after):
    """Neither repeats nor skips a sample; each rank's own counts (counters, which the trainer's checkpoint keeps
    per rank) come back to it at the same size, and their sums (what the metrics report) at another."""
    cfg = small_cfg(shard_dir, tmp_path, num_workers=0, decode_isolation="inline")
    before = [VideoPackedLoader(cfg, dp_rank=r, dp_world=w_before, seed=9) for r in range(w_before)]
    planner = before[0].planner
    n_epoch = planner.num_packs(0)
    steps = max(1, n_epoch // (2 * w_before))              # about half the epoch, in lockstep
    seen = []
    for _ in range(steps):
        for ld in before:
            p = next(ld)
            assert p.epoch == 0
            seen += p.planned_keys
    state = before[0].state_dict()                         # any rank's state describes the position
    saved = [ld.counters() for ld in before]
    after = [VideoPackedLoader(cfg, dp_rank=r, dp_world=w_after, seed=9) for r in range(w_after)]
    for r, ld in enumerate(after):
        ld.load_state_dict(state)
        ld.load_counters(counters_of_rank(saved, r, w_after))
    counts = ("packs", "samples_ok")
    if w_after == w_before:
        assert [ld.stats for ld in after] == [ld.stats for ld in before]
        assert before[0].stats["packs"] == before[1].stats["packs"] and \
            before[0].stats["samples_ok"] != before[1].stats["samples_ok"], "the ranks' counts are not told apart"
    else:
        assert {k: sum(ld.stats.get(k, 0) for ld in after) for k in counts} == \
            {k: sum(ld.stats[k] for ld in before) for k in counts}
        assert all(not ld.stats.get("packs") for ld in after[1:])
    live = list(after)
    while live:
        for ld in list(live):
            p = next(ld)
            if p.epoch != 0:
                live.remove(ld)
                continue
            seen += p.planned_keys
    assert len(seen) == len(set(seen)), "a sample was repeated"
    assert sorted(seen) == epoch_keys(planner, 0), "a sample was skipped"


def test_merge_states_of_ranks_out_of_lockstep(shard_dir, tmp_path):
    cfg = small_cfg(shard_dir, tmp_path, num_workers=0, decode_isolation="inline")
    r0, r1 = (VideoPackedLoader(cfg, dp_rank=r, dp_world=2, seed=2) for r in range(2))
    seen = [k for p in take(r0, 3) for k in p.planned_keys] + [k for p in take(r1, 1) for k in p.planned_keys]
    merged = merge_rank_states([r0.state_dict(), r1.state_dict()])
    c = VideoPackedLoader(cfg, seed=2)
    c.load_state_dict(merged)
    while True:
        p = next(c)
        if p.epoch:
            break
        seen += p.planned_keys
    assert len(seen) == len(set(seen)) and sorted(seen) == epoch_keys(c.planner, 0)


def test_resume_at_90_percent_does_not_replay(shard_dir, tmp_path, monkeypatch):
    cfg = small_cfg(shard_dir, tmp_path, num_workers=0, decode_isolation="inline")
    a = VideoPackedLoader(cfg, seed=4)
    n = a.planner.num_packs(0)
    k = max(1, int(0.9 * n))
    state = dict(a.state_dict(), consumed=k)                # as if k packs had been consumed
    calls = []
    import data.video.loader as L
    orig = L.FrameSource.frames
    monkeypatch.setattr(L.FrameSource, "frames", lambda self, rec, doc: calls.append(rec.uid) or orig(self, rec, doc))
    b = VideoPackedLoader(cfg, seed=4)
    t = time.perf_counter()
    b.load_state_dict(state)
    p = next(b)
    assert time.perf_counter() - t < 5.0
    assert (p.epoch, p.pack_index) == (0, k)
    assert sorted(calls) == sorted(a.planner.epoch(0).packs[k])   # decoded only the pack it yields


def test_state_mismatch_and_even_end(shard_dir, tmp_path):
    cfg = small_cfg(shard_dir, tmp_path, num_workers=0, decode_isolation="inline", num_epochs=1)
    a = VideoPackedLoader(cfg, seed=1)
    st = a.state_dict()
    with pytest.raises(LoaderStateMismatch, match="saved with data.seed 1, this loader has data.seed 2"):
        VideoPackedLoader(cfg, seed=2).load_state_dict(st)   # a run's config error (before: a plain ValueError)
    other = small_cfg(shard_dir, tmp_path, num_workers=0, seq_len=2048, num_epochs=1)
    with pytest.raises(ValueError, match="seq_len"):
        VideoPackedLoader(other, seed=1).load_state_dict(st)
    # with a finite number of epochs both ranks stop after the same number of packs
    counts = [sum(1 for _ in VideoPackedLoader(cfg, dp_rank=r, dp_world=2, seed=1)) for r in range(2)]
    assert counts[0] == counts[1] == a.planner.num_packs(0) // 2


def test_epoch_order_is_a_permutation_and_seeded():
    shard_of = np.repeat(np.arange(7), 13)
    o = epoch_order(shard_of, seed=3, epoch=0, shuffle=True, buffer=10)
    assert sorted(o.tolist()) == list(range(91))
    assert np.array_equal(o, epoch_order(shard_of, seed=3, epoch=0, shuffle=True, buffer=10))
    assert not np.array_equal(o, epoch_order(shard_of, seed=3, epoch=1, shuffle=True, buffer=10))
    assert np.array_equal(epoch_order(shard_of, seed=3, epoch=0, shuffle=False, buffer=10), np.arange(91))


def test_missing_backend_fails_at_construction(shard_dir, tmp_path):
    from data.video.backends import torchcodec_available

    if torchcodec_available():
        pytest.skip("torchcodec is installed here")
    with pytest.raises(ValueError, match="decode_backend"):
        VideoPackedLoader(small_cfg(shard_dir, tmp_path, decode_backend="torchcodec"), seed=0)


def test_the_samples_of_a_video_with_several_records_each_decode_its_frames(tmp_path):
    """Ingest stores a video with three records once, as three samples whose index entries share its bytes: the loader
    plans all three (and the one-record video) and decodes each one's planned frames, the frame counters burned into
    the synthetic video being the reference; data.exclude leaves out one of them by its own key, not its video."""
    import json

    from data.exclude import ExcludeList
    from data.video.ingest import IngestOptions, ingest
    from data.video.shards import make_key
    from data.video.synthetic import VideoSpec, write_video

    vids = tmp_path / "v"
    vids.mkdir()
    bits = {n: write_video(vids / n, VideoSpec(n_frames=36, width=96, height=64, fps=12, seed=s))["counter_bits"]
            for n, s in (("a.mp4", 1), ("b.mp4", 2))}
    recs = [{"video": "b.mp4", "qa": [{"question": q, "answer": a}]}
            for q, a in (("What moves?", "A square."), ("What colour is it?", "Blue."), ("How long?", "Three s."))]
    recs.insert(1, {"video": "a.mp4", "caption": "one record"})
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ingest(IngestOptions(videos=str(vids), annotations=str(tmp_path / "ann.jsonl"), out=str(tmp_path / "o"),
                         workers=1, progress=False))
    kb = make_key("b.mp4")
    cfg = small_cfg(tmp_path / "o", tmp_path, num_epochs=1, shuffle_buffer=1)
    loader = VideoPackedLoader(cfg, seed=3)
    assert len(loader.catalog) == 4
    got = {}
    for p, d, rec, doc, frames, text in documents(loader):
        assert [read_counter(f, bits[rec.annotation["video"]]) for f in frames] == list(doc.frames.indices), rec.key
        got[rec.key] = (text, len(frames))
    assert sorted(got) == sorted([make_key("a.mp4"), kb, f"{kb}-r1", f"{kb}-r2"])
    assert not loader.stats.get("samples_failed")
    for key, r in zip((kb, f"{kb}-r1", f"{kb}-r2"), (recs[0], recs[2], recs[3])):
        assert r["qa"][0]["answer"] in got[key][0] and got[key][1] >= 2, key     # its own text, its video's frames
    left_out = f"shard-000000.tar/{kb}-r1"
    loader = VideoPackedLoader(cfg, seed=3, exclude=ExcludeList(keys=frozenset({left_out})))
    packs = list(loader)
    assert [k for p in packs for k in p.excluded] == [left_out]
    assert sorted(k.split("/")[1] for p in packs for k in p.sample_keys) == sorted([make_key("a.mp4"), kb, f"{kb}-r2"])
