"""Text-only samples in the video data path: an annotation record with no video is ingested as a
`<key>.json`-only sample, planned and packed as a document with no frames beside the videos, and
resumed exactly. The references are independent of the code under test: the tokenizer applied to the
record's own text, the burned-in frame counters of the synthetic videos, and an uninterrupted loader."""
import dataclasses
import json
import os

import numpy as np
import pytest

from data.video.config import VideoDataConfig
from data.video.ingest import IngestOptions, ingest, interleave, read_annotations, text_sample_id
from data.video.loader import VideoPackedLoader
from data.video.packing import build_document, plan_document
from data.video.sampling import PlanError
from data.video.shards import index_path, load_catalog
from data.video.synthetic import make_synthetic_videos, read_counter, text_record
from data.video.packing import unpatchify
from data.video.tokenizer import ByteTokenizer

from .conftest import read_jsonl, small_cfg
from .test_loader import assert_resumes_exactly

N_VIDEOS, N_TEXT = 6, 14


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """6 synthetic videos + 14 text-only records, ingested into small shards."""
    out = tmp_path_factory.mktemp("mixed")
    vids, ann = make_synthetic_videos(out, N_VIDEOS, seed=3, max_seconds=2.5, n_text=N_TEXT)
    summary = ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(out / "shards"),
                                   shard_size_mb=0.03, workers=2, progress=False))
    return out, summary


def test_interleave_spreads_evenly_and_keeps_order():
    a, b = list("abcdef"), [1, 2, 3]
    m = interleave(a, b)
    assert [x for x in m if isinstance(x, str)] == a and [x for x in m if isinstance(x, int)] == b
    assert m == ["a", 1, "b", "c", 2, "d", "e", 3, "f"]
    assert interleave([], b) == b and interleave(a, []) == a


def test_read_annotations_sorts_records(tmp_path):
    p = tmp_path / "a.jsonl"
    recs = [{"video": "x.mp4", "caption": "c"}, {"text": "plain text"}, {"qa": [{"q": "1+1?", "a": "2"}]},
            {"text": "plain text"}, {"caption": "a caption but no video"}, {"video": 3}, [1, 2], {"text": "  "}]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a = read_annotations(str(p))
    videos, texts, problems = a.videos, a.texts, a.problems
    assert list(videos) == ["x.mp4"] and not a.images
    assert [(t[0], t[2]) for t in texts] == [(text_sample_id(recs[1]), 2), (text_sample_id(recs[2]), 3)]
    assert texts[0][0].startswith("text-") and len(texts[0][0]) == 21
    assert len(problems) == 5, problems
    assert "line 2" in problems[0] and ":4:" in problems[0]                  # the duplicate names its first line
    assert ":5: no string field 'video' or 'image', and no text" in problems[1]         # neither a video nor a text sample
    assert ":6: field 'video' is int" in problems[2] and ":7: not a JSON object" in problems[3]
    assert ":8: no string field 'video' or 'image'" in problems[4]                       # blank text is no text


def test_a_record_holding_an_unpaired_surrogate_is_reported_not_fatal(tmp_path):
    """Cut web text holds JSON escapes of half a UTF-16 pair ("\\ud83d" without its pair): json reads them, but no
    UTF-8 text holds one, and ingest stopped with a UnicodeEncodeError naming no line. Such a record is reported by
    line and field, and its video rejected rather than ingested without its text; the other records go on."""
    p = tmp_path / "a.jsonl"
    recs = [{"text": "fine text"}, {"text": "cut emoji \ud83d here"},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok \udc00"}]},
            {"video": "v.mp4", "caption": "a \ud800 b"}, {"text": "after them"}]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")      # json.dumps writes the lone halves as escapes
    assert "\\ud83d" in p.read_text()
    a = read_annotations(str(p))
    assert [t[2] for t in a.texts] == [1, 5] and not a.videos
    assert len(a.problems) == 3, a.problems
    assert a.problems[0].startswith(f"{p}:2: 'text' holds an unpaired surrogate '\\ud83d' at character 10")
    assert a.problems[1].startswith(f"{p}:3: 'conversations'[1]['value'] holds an unpaired surrogate '\\udc00'")
    assert a.problems[2].startswith(f"{p}:4: 'caption' holds") and "v.mp4" in a.bad_videos


def test_ingest_stores_text_samples_among_videos(mixed):
    out, summary = mixed
    r = summary["this_run"]
    assert r["accepted"] == N_VIDEOS and r["text_samples"] == N_TEXT and r["rejected"] == 0
    cat = load_catalog(str(out / "shards"))
    kinds = ["t" if c.is_text else "v" for c in cat]
    assert kinds.count("t") == N_TEXT and kinds.count("v") == N_VIDEOS
    # spread among the videos (interleave): no run of more than ceil(14/6)+1 text samples in catalog order
    assert max(len(run) for run in "".join(kinds).split("v")) <= 4, kinds
    want = {text_sample_id(text_record(i, 3)): text_record(i, 3) for i in range(N_TEXT)}
    for c in cat:
        if c.is_text:
            assert c.annotation == want[c.key] and c.video_size == 0 and c.video_ext == ""
    manifest = read_jsonl(out / "shards" / "ingest_manifest.jsonl")
    assert sorted(t for s in manifest for t in s["texts"]) == sorted(want)
    # a shard's text sample is its json member alone, readable without our index (scan fallback)
    shard = cat[0].shard
    idx = json.load(open(index_path(shard)))
    os.rename(index_path(shard), index_path(shard) + ".moved")
    try:
        scanned = [c for c in load_catalog(shard)]
    finally:
        os.rename(index_path(shard) + ".moved", index_path(shard))
    assert [(c.key, c.is_text, c.annotation) for c in scanned] == \
        [(s["key"], s["video"] is None, s["annotation"]) for s in idx["samples"]]


def test_ingest_rerun_adds_only_new_text(mixed, tmp_path):
    out, _ = mixed
    ann = out / "annotations.jsonl"
    again = ingest(IngestOptions(videos=str(out / "videos"), annotations=str(ann), out=str(out / "shards"),
                                 shard_size_mb=0.03, workers=1, progress=False))
    assert again["this_run"]["processed"] == 0
    assert again["this_run"]["skipped_already_done"] == N_VIDEOS + N_TEXT
    # text alone (no videos folder) into a new set; a later line appended is the only new sample
    only = tmp_path / "only.jsonl"
    only.write_text("".join(json.dumps(text_record(i, 9)) + "\n" for i in range(3)))
    s1 = ingest(IngestOptions(videos=None, annotations=str(only), out=str(tmp_path / "s"), progress=False))
    with open(only, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    s2 = ingest(IngestOptions(videos=None, annotations=str(only), out=str(tmp_path / "s"), progress=False))
    assert (s1["this_run"]["text_samples"], s2["this_run"]["text_samples"], s2["num_samples"]) == (3, 1, 4)
    with pytest.raises(ValueError, match="give videos"):
        IngestOptions(videos=None, annotations=None, out=str(tmp_path / "x"))


CFG = VideoDataConfig(seq_len=256, max_text_tokens=16, min_frames=2, min_frame_tokens=4, min_video_tokens=16)
TOK = ByteTokenizer()


def test_text_document_against_the_tokenizer():
    rec = {"prompt": "Answer.", "qa": [{"question": "2+2?", "answer": "4"}], "text": "Then five."}
    d = plan_document(uid=0, key="s/t", video=None, annotation=rec, cfg=CFG, tokenizer=TOK, seed=0, epoch=0)
    a = build_document(d, None, CFG, TOK)
    unsup = TOK.encode("Answer.\n") + TOK.encode("Q: 2+2?\nA: ")
    sup = TOK.encode("4\n") + TOK.encode("Then five.")
    want = [TOK.bos_id] + unsup + sup + [TOK.eos_id]
    assert a.tokens.tolist() == want and d.length == len(want)
    assert d.truncated == 0 and d.frames is None and d.num_frames == 0   # max_text_tokens (16) does not cut it
    # every supervised token and the <eos> are predicted; the prompt and question are not
    n0 = 1 + len(unsup)
    assert a.loss_mask.tolist() == [0.0] * (n0 - 1) + [1.0] * (len(sup) + 1) + [0.0]
    assert a.labels[n0 - 1:-1].tolist() == want[n0:]
    assert (a.pos == np.arange(len(want))[None]).all()                  # text positions: (p, p, p)
    assert a.grid.shape == (0, 3) and a.pixels.shape == (0, 3 * 14 * 14) and a.timestamps.shape == (0,)


def test_text_document_cut_to_a_sequence_and_empty_text_rejected():
    long = {"text": "x" * 1000}
    cut = dataclasses.replace(CFG, text_overflow="cut")
    d = plan_document(uid=0, key="s/t", video=None, annotation=long, cfg=cut, tokenizer=TOK, seed=0, epoch=0)
    assert d.length == CFG.seq_len and d.truncated == 1000 - (CFG.seq_len - 2) and d.pieces == 1
    with pytest.raises(PlanError, match="no_text"):
        plan_document(uid=0, key="s/t", video=None, annotation={"prompt": "only a prompt"}, cfg=CFG,
                      tokenizer=TOK, seed=0, epoch=0)


@pytest.fixture(params=[64, 1], ids=["recent64", "recent1"])
def recent(request, monkeypatch):
    """The planner keeps each document's size, not its plan, and plans a pack's documents again where it builds
    the pack, keeping the last Planner.RECENT whole plans: with 1, every document of every pack (and every piece of
    a continued text) is planned again at build, and must give what its epoch was packed by."""
    from data.video.loader import Planner
    monkeypatch.setattr(Planner, "RECENT", request.param)
    return request.param


def test_mixed_packs_frame_accurate_and_resume_exactly(mixed, tmp_path, recent):
    out, _ = mixed
    cfg = small_cfg(out / "shards", tmp_path, seq_len=512, num_epochs=1)
    loader = VideoPackedLoader(cfg, seed=4)
    packs = list(loader)
    cat = {f"{os.path.basename(c.shard)}/{c.key}": c for c in loader.catalog}
    seen_text = seen_mixed = 0
    for p in packs:
        p.validate(cfg, loader.tokenizer)
        frames = unpatchify(p.pixel_values, p.grid_thw, 14, 2)
        f = 0
        text_here = 0
        for d, key in enumerate(p.sample_keys):
            rec = cat[key]
            doc = loader.planner.doc(rec.uid, p.epoch)
            seg = p.tokens[int(p.cu_seqlens[d]):int(p.cu_seqlens[d + 1])].tolist()
            if rec.is_text:
                text_here += 1
                assert not (p.frame_doc == d).any()
                a = rec.annotation                                         # the record's own text (or answer)
                body = a["text"] if "text" in a else f"A: {a['qa'][0]['answer']}\n"
                assert TOK.decode(seg).endswith(body + "<eos>"), (TOK.decode(seg), a)
                continue
            assert (p.frame_doc == d).sum() == doc.num_frames
            bits = int(rec.annotation["counter_bits"])
            assert [read_counter(frames[f + i], bits) for i in range(doc.num_frames)] == list(doc.frames.indices)
            f += doc.num_frames
        assert f == len(frames) and p.text_docs == text_here
        seen_text += text_here
        seen_mixed += 0 < text_here < p.num_docs
    assert seen_text == N_TEXT and seen_mixed >= 1 and loader.stats["samples_text"] == N_TEXT
    kept = loader.planner.sizes(0)   # what planning kept: arrays of sizes over the catalog, no token ids
    assert all(isinstance(a, np.ndarray) for a in kept) and kept[0].shape == (N_VIDEOS + N_TEXT,)
    assert sum(a.nbytes for a in kept) < 64 * (N_VIDEOS + N_TEXT)
    assert len(loader.planner._recent) <= recent
    assert sorted(k for p in packs for k in p.sample_keys) == sorted(cat)   # nothing lost
    # exact resume across the text-only samples
    assert_resumes_exactly(small_cfg(out / "shards", tmp_path, seq_len=512), 4, 2, 4)


def test_text_document_continued_in_pieces():
    """A text longer than a sequence (room for C = seq_len - 2 text tokens) becomes ceil(n / C) documents: <bos>
    and the first C tokens, then C more each, the last ending in <eos>; together exactly the text, in order."""
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    d0 = plan_document(uid=0, key="s/t", video=None, annotation={"text": text}, cfg=CFG, tokenizer=TOK, seed=0,
                       epoch=0)
    C = CFG.seq_len - 2
    assert d0.pieces == -(-1000 // C) == 4 and d0.truncated == 0
    docs = [d0] + [plan_document(uid=0, key="s/t", video=None, annotation={"text": text}, cfg=CFG, tokenizer=TOK,
                                 seed=0, epoch=0, piece=p) for p in range(1, 4)]
    assert [d.key for d in docs] == ["s/t", "s/t#1", "s/t#2", "s/t#3"]
    built = [build_document(d, None, CFG, TOK) for d in docs]
    assert all(b.tokens.shape[0] == d.length <= CFG.seq_len for b, d in zip(built, docs))
    whole = "".join(TOK.decode(b.tokens.tolist()) for b in built)
    assert whole == "<bos>" + text + "<eos>"                       # nothing lost, nothing repeated
    assert [d.length for d in docs] == [CFG.seq_len - 1, C, C, 1000 - 3 * C + 1]
    # every text token is a label but the first of each continuing piece (nothing before it predicts it); <eos> too
    assert sum(int(b.loss_mask.sum()) for b in built) == 1000 - 3 + 1
    with pytest.raises(ValueError, match="piece 4 of a text in 4 pieces"):
        plan_document(uid=0, key="s/t", video=None, annotation={"text": text}, cfg=CFG, tokenizer=TOK, seed=0,
                      epoch=0, piece=4)


def test_long_texts_are_trained_whole_and_resume_exactly(tmp_path, recent):
    """Through the loader: every piece of every long text arrives once in an epoch, and a stop inside a text's
    pieces resumes exactly."""
    ann = tmp_path / "t.jsonl"
    texts = [f"{i}:" + "".join(chr(ord("a") + (i + k) % 26) for k in range(n))
             for i, n in enumerate((700, 40, 1500, 296, 297, 90))]
    ann.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ingest(IngestOptions(videos=None, annotations=str(ann), out=str(tmp_path / "s"), progress=False))
    cfg = small_cfg(tmp_path / "s", tmp_path, seq_len=300, num_epochs=1)
    loader = VideoPackedLoader(cfg, seed=0)
    got: dict[str, dict[int, str]] = {}
    for p in loader:
        p.validate(cfg, loader.tokenizer)
        for d, key in enumerate(p.sample_keys):
            base, _, piece = key.partition("#")
            seg = p.tokens[int(p.cu_seqlens[d]):int(p.cu_seqlens[d + 1])].tolist()
            got.setdefault(base, {})[int(piece or 0)] = TOK.decode(seg)
    whole = sorted("".join(v[k] for k in sorted(v)) for v in got.values())
    assert whole == sorted("<bos>" + t + "<eos>" for t in texts)
    assert sorted(len(v) for v in got.values()) == [1, 1, 1, 2, 3, 6]   # 298 (with its "3:") + 2 fits one; 299 does not
    assert loader.stats.get("text_tokens_cut", 0) == 0 and loader.stats["text_pieces"] == 2 + 3 + 6
    # the training log's data_texts_continued: the pieces after each text's first, as the keys above counted them
    assert loader.stats["samples_text_continued"] == sum(len(v) - 1 for v in got.values()) == 1 + 2 + 5
    assert loader.state_dict()["plan_config"]["text_overflow"] == "continue"
    assert_resumes_exactly(small_cfg(tmp_path / "s", tmp_path, seq_len=300), 0, 3, 6)


def test_truncation_is_counted_and_logged(tmp_path, caplog):
    ann = tmp_path / "t.jsonl"
    ann.write_text(json.dumps({"text": "y" * 700}) + "\n" + json.dumps({"text": "short"}) + "\n")
    ingest(IngestOptions(videos=None, annotations=str(ann), out=str(tmp_path / "s"), progress=False))
    cfg = small_cfg(tmp_path / "s", tmp_path, seq_len=300, num_epochs=1, text_overflow="cut")
    loader = VideoPackedLoader(cfg, seed=0)
    with caplog.at_level("WARNING"):
        packs = list(loader)
    assert sum(p.text_docs for p in packs) == 2
    assert loader.stats["text_tokens_cut"] == 700 - (300 - 2)
    assert "1 text-only sample(s) longer than a sequence" in caplog.text


def test_the_epochs_logged_stay_few_over_many_epochs(tmp_path):
    """The loader notes the epochs whose plan it has logged (a long text's pieces counted, the plan's rejects
    quarantined) once per epoch; it kept every one, so over a long run on small data the set and every checkpoint's
    loader state grew by an entry per epoch. Only each source's newest is kept: after 40 epochs as after 2, and the
    count they feed is still added once per epoch, also across a resume in the middle of an epoch."""
    ann = tmp_path / "t.jsonl"
    ann.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a" * 400, "b" * 100, "c" * 120)))
    ingest(IngestOptions(videos=None, annotations=str(ann), out=str(tmp_path / "s"), progress=False))
    cfg = small_cfg(tmp_path / "s", tmp_path, seq_len=300)
    loader = VideoPackedLoader(cfg, seed=0)
    per_epoch = loader.planner.num_packs(0)
    assert loader.planner.epoch(0).pieces == {0: 2}         # the 400-character text: two pieces an epoch
    logged = {}
    for n in range(40 * per_epoch):
        p = next(loader)
        if n + 1 in (2 * per_epoch, 40 * per_epoch):
            logged[p.epoch] = loader.state_dict()["logged_plan_epochs"]
    assert logged == {1: [1], 39: [39]}, logged      # it was [0, 1] and [0, 1, ..., 39]
    assert loader.stats["text_pieces"] == 2 * 40
    # a resume one pack into epoch 40: that epoch is not counted again, the next one is
    next(loader)
    again = VideoPackedLoader(cfg, seed=0)
    again.load_state_dict(loader.state_dict())
    for _ in range(2 * per_epoch - 1):
        next(again)
    assert again.stats["text_pieces"] == 2 * 42 and len(again.state_dict()["logged_plan_epochs"]) == 1
