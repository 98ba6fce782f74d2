"""Packing: capacity never exceeded, documents never split, labels/mask/positions/patches consistent."""
import numpy as np
import pytest
import torch

from data.video.config import VideoDataConfig
from data.video.packing import (annotation_segments, assemble_pack, build_document, pack_greedy,
                                patchify, plan_document, unpatchify)
from data.video.sampling import PlanError
from data.video.timeline import encode_runs
from data.video.tokenizer import ByteTokenizer

from .test_sampling import meta


@pytest.mark.parametrize("lookahead", [1, 4, 64])
def test_pack_greedy_capacity_and_coverage(lookahead):
    rng = np.random.default_rng(lookahead)
    seq = 4096
    lengths = rng.integers(1, seq + 1, 500).tolist() + [seq, 1, seq // 2, seq // 2]
    bins = pack_greedy(lengths, seq, lookahead)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))            # every item exactly once
    assert all(sum(lengths[i] for i in b) <= seq for b in bins)  # never over capacity
    assert all(b == sorted(b) for b in bins)                     # order kept inside a bin
    if lookahead == 1:                                           # plain sequential greedy
        assert flat == list(range(len(lengths)))
    fill = sum(lengths) / (len(bins) * seq)
    assert fill > (0.5 if lookahead == 1 else 0.8)


def test_pack_greedy_rejects_oversized():
    with pytest.raises(ValueError):
        pack_greedy([10, 11], 10)


CFG = VideoDataConfig(seq_len=2048, min_frames=2, min_frame_tokens=4, max_frame_tokens=16,
                      min_video_tokens=16, video_tokens_per_second=24.0, max_text_tokens=300)
TOK = ByteTokenizer()
ANN = {"caption": "a red square", "events": [{"start": 0.0, "end": 1.0, "text": "moves"}],
       "qa": [{"question": "color?", "answer": "red"}], "prompt": "Describe."}


def _doc(uid, duration, w=96, h=64, fps=12.0, ann=ANN):
    m = meta(duration, fps=fps, width=w, height=h, tb=12288)
    d = plan_document(uid=uid, key=f"s/{uid}", video=m, annotation=ann, cfg=CFG, tokenizer=TOK, seed=0, epoch=0)
    fp = d.frames
    frames = np.random.default_rng(uid).integers(0, 256, (fp.num_frames, fp.height, fp.width, 3), dtype=np.uint8)
    return d, frames


def test_document_layout_labels_and_positions():
    d, frames = _doc(1, 3.0)
    a = build_document(d, frames, CFG, TOK)
    L = d.length
    assert a.tokens.shape == (L,) and a.pos.shape == (3, L)         # planned length == built length
    text = TOK.decode(a.tokens.tolist())
    assert text.startswith("<bos><0.2s><vision_start><video_pad>") and text.endswith("red\n<eos>")
    assert "Caption: a red square\n" in text and "Q: color?\nA: red\n" in text
    # labels: next token where supervised; never on video pads, timestamps or question text
    sup = a.loss_mask > 0
    assert np.array_equal(a.labels[sup], a.tokens[1:][sup[:-1]])
    assert np.all(a.labels[~sup] == CFG.label_ignore_index) and not sup[-1]
    targets = a.tokens[1:][sup[:-1]]
    assert TOK.video_pad_id not in targets and TOK.vision_start_id not in targets
    assert TOK.decode(targets.tolist()).startswith("a red square\n")
    assert targets[-1] == TOK.eos_id
    # positions: text tokens have equal t/h/w and advance by 1; frames by the rule in packing.py
    vis = a.tokens == TOK.video_pad_id
    txt = ~vis
    assert np.all(a.pos[0, txt] == a.pos[1, txt]) and np.all(a.pos[0, txt] == a.pos[2, txt])
    assert np.all(np.diff(a.pos[0, txt]) >= 1)
    rows, cols = d.frames.grid(CFG.patch_size, CFG.merge_size)
    per = rows * cols
    starts = np.nonzero(vis & ~np.r_[False, vis[:-1]])[0]
    assert len(starts) == d.frames.num_frames
    t_k = a.pos[0, starts]
    for s, t in zip(starts, t_k):
        blk = a.pos[:, s:s + per]
        assert np.all(blk[0] == t)
        assert np.array_equal(blk[1] - t, np.repeat(np.arange(rows), cols))
        assert np.array_equal(blk[2] - t, np.tile(np.arange(cols), rows))
        assert a.pos[0, s - 1] < t                                  # never goes backwards
        assert a.pos[0, s + per] == t + max(rows, cols)             # vision_end follows the frame
    # temporal axis is linear in the timestamp (uniform frames -> uniform steps, up to rounding)
    ts = np.array(d.frames.timestamps)
    rate = np.diff(t_k) / np.diff(ts)
    assert np.all(np.abs(rate - rate.mean()) <= 1.0 / np.diff(ts).min() + 1e-6)
    # patches
    assert a.pixels.shape == (d.frames.num_frames * per * 4, 588) and a.pixels.dtype == np.uint8
    assert np.all(a.grid == [1, rows * 2, cols * 2])


def test_pack_assembly_never_splits_and_fits():
    docs = [_doc(i, float(dur), w=w, h=h) for i, (dur, w, h) in
            enumerate([(3.0, 96, 64), (1.5, 64, 48), (4.0, 160, 120), (2.0, 80, 112), (5.0, 128, 96)])]
    bins = pack_greedy([d.length for d, _ in docs], CFG.seq_len, 4)
    seen = []
    for b in bins:
        arrays = [build_document(docs[i][0], docs[i][1], CFG, TOK) for i in b]
        p = assemble_pack(arrays, [docs[i][0].key for i in b], CFG, TOK, epoch=0, pack_index=0,
                          failures=[], planned_keys=[docs[i][0].key for i in b])
        p.validate(CFG, TOK)
        q = p.to("cpu")
        assert torch.equal(q.position_ids, p.position_ids) and q.sample_keys == p.sample_keys
        assert p.seq_len == CFG.seq_len and int(p.cu_seqlens[-1]) == CFG.seq_len
        assert p.num_docs == len(b) and len(p.cu_seqlens) == len(b) + 1 + (p.num_pad > 0)
        # every frame's merged tokens lie inside its own document's segment
        off = 0
        cu = p.cu_seqlens.tolist()
        for f in range(p.grid_thw.shape[0]):
            n_tok = int(p.grid_thw[f].prod()) // 4
            pos = p.visual_pos[off:off + n_tok]
            dd = int(p.frame_doc[f])
            assert cu[dd] <= int(pos.min()) and int(pos.max()) < cu[dd + 1]
            off += n_tok
        # whole documents: each doc's frames are all here
        for k, i in enumerate(b):
            assert int((p.frame_doc == k).sum()) == docs[i][0].frames.num_frames
        # pixel payload is the frames, in order
        frames = unpatchify(p.pixel_values, p.grid_thw, 14, 2)
        want = [f for i in b for f in docs[i][1]]
        assert all(np.array_equal(x, y) for x, y in zip(frames, want)) and len(frames) == len(want)
        assert torch.all(p.loss_mask[cu[-2]:] == 0) if p.num_pad else True
        seen += b
    assert sorted(seen) == list(range(len(docs)))


def test_patchify_roundtrip_and_merge_order():
    f = np.arange(2 * 56 * 84 * 3, dtype=np.int64).reshape(2, 56, 84, 3).astype(np.uint8)
    p = patchify(f, 14, 2)
    assert p.shape == (2 * 4 * 6, 588)
    # the first 4 patches are one 2x2 merge group: rows 0-27, cols 0-27 of frame 0
    grp = p[:4].reshape(2, 2, 3, 14, 14).transpose(0, 3, 1, 4, 2).reshape(28, 28, 3)
    assert np.array_equal(grp, f[0, :28, :28])
    back = unpatchify(p, np.array([[1, 4, 6]] * 2), 14, 2)
    assert all(np.array_equal(a, b) for a, b in zip(back, f))


def test_text_truncation_and_fit():
    long = {"caption": "x" * 5000}
    d, frames = _doc(9, 2.0, ann=long)
    assert len(d.text_ids) <= CFG.max_text_tokens and d.length <= CFG.seq_len
    assert build_document(d, frames, CFG, TOK).tokens.shape[0] == d.length
    assert annotation_segments({}) == []


def test_packed_two_videos_and_text_3d_positions_follow_the_rule():
    """3D RoPE positions of a pack holding two videos (different frame sizes, durations) and their text,
    rebuilt token by token from the rule (Qwen2-VL-style mRoPE, per document from 0): a text token at
    running position p gets (p, p, p) and advances p by 1; the merged tokens of a rows x cols frame whose
    temporal index is t get (t, t + r, t + c) in row-major order, after which p = t + max(rows, cols);
    temporal indices grow with the frame timestamps; the padding segment counts 0, 1, 2, ...."""
    docs = [_doc(11, 2.0, w=96, h=64), _doc(12, 3.0, w=64, h=112)]
    arrays = [build_document(d, f, CFG, TOK) for d, f in docs]
    p = assemble_pack(arrays, [d.key for d, _ in docs], CFG, TOK, epoch=0, pack_index=0, failures=[],
                      planned_keys=[d.key for d, _ in docs])
    tokens, got = p.tokens.numpy(), p.position_ids.numpy()
    want = np.zeros_like(got)
    cu = p.cu_seqlens.tolist()
    grids = p.grid_thw.numpy()
    frame = 0
    for d_i in range(p.num_docs + (p.num_pad > 0)):
        a, b = cu[d_i], cu[d_i + 1]
        if d_i == p.num_docs:  # padding
            want[:, a:b] = np.arange(b - a)[None]
            continue
        i, pos, last_t = a, 0, -1
        while i < b:
            if tokens[i] != TOK.video_pad_id:
                want[:, i] = pos
                pos, i = pos + 1, i + 1
                continue
            rows, cols = grids[frame, 1] // CFG.merge_size, grids[frame, 2] // CFG.merge_size
            t = got[0, i]  # the temporal index comes from the timestamp (checked for monotonicity below)
            assert t >= pos and t > last_t, (d_i, frame, t, pos)
            r, c = np.divmod(np.arange(rows * cols), cols)
            want[0, i:i + rows * cols] = t
            want[1, i:i + rows * cols] = t + r
            want[2, i:i + rows * cols] = t + c
            pos, last_t, i, frame = t + max(rows, cols), t, i + rows * cols, frame + 1
    assert frame == grids.shape[0] == sum(d.frames.num_frames for d, _ in docs)
    assert np.array_equal(got, want)
    # each document starts from 0, as if alone in its sequence
    assert all(got[:, cu[k]].tolist() == [0, 0, 0] for k in range(p.num_docs))
    assert np.array_equal(got[:, cu[1]:cu[2]], arrays[1].pos)


def _rule_positions(tokens: list[int], doc, cfg: VideoDataConfig) -> np.ndarray:
    """[3, L] positions of one document from the rule as docs/data.md states it ("3D position rule"), token by
    token: a token that is not a visual placeholder takes (p, p, p), p += 1; frame k's merged tokens (rows x cols,
    row-major) take (t, t + row, t + col), then p = t + max(rows, cols), where t = p for an image and for a video
    t = max(p, A + round(ts_k * R)), R = slot / interval, slot = max over its frames of (timestamp tokens + 2 +
    max(rows, cols)), A = p - round(ts_0 * R) at its first frame."""
    if doc.images:
        grids, ts = [fp.grid(cfg.patch_size, cfg.merge_size) for fp in doc.images], None
    elif doc.frames is not None:
        fp = doc.frames
        grids, ts = [fp.grid(cfg.patch_size, cfg.merge_size, k) for k in range(fp.num_frames)], fp.timestamps
        R = max(len(doc.ts_ids[k]) + 2 + max(grids[k]) for k in range(fp.num_frames)) / fp.interval_s
    else:
        grids, ts = [], None
    out = np.zeros((3, len(tokens)), np.int64)
    p = i = k = 0
    A = None
    while i < len(tokens):
        if tokens[i] not in (TOK.video_pad_id, TOK.image_pad_id):
            out[:, i] = p
            p, i = p + 1, i + 1
            continue
        rows, cols = grids[k]
        if ts is None:
            t = p
        else:
            A = p - round(ts[0] * R) if A is None else A
            t = max(p, A + round(ts[k] * R))
        for j in range(rows * cols):
            out[:, i + j] = (t, t + j // cols, t + j % cols)
        i, p, k = i + rows * cols, t + max(rows, cols), k + 1
    assert k == len(grids)
    return out


def test_3d_positions_follow_the_documented_rule_written_out():
    """Every token's (time, height, width) position against `_rule_positions`, over randomly drawn samples: videos of
    constant and variable frame rate, sampled at 0.5-4 fps with and without jitter, with slow and fast frames (two
    frame sizes in one video), text after the frames; image samples of 1-3 images at their <image> markers; text-only
    samples; packed several to a sequence with its padding. The temporal index is computed from the timestamps here,
    not read back from the code's output."""
    rng = np.random.default_rng(7)
    checked = {"video": 0, "fast": 0, "image": 0, "text": 0}
    arrays, plans = [], []
    while min(checked.values()) < 8 or sum(checked.values()) < 120:
        kind = rng.choice(["video", "video", "image", "text"])
        cfg = VideoDataConfig(seq_len=4096, min_frames=int(rng.integers(1, 4)), max_frames=int(rng.integers(8, 64)),
                              min_frame_tokens=int(rng.integers(4, 16)), max_frame_tokens=int(rng.integers(16, 96)),
                              video_tokens_per_second=float(rng.integers(20, 200)), min_video_tokens=64,
                              max_text_tokens=200, frame_jitter=float(rng.choice([0.0, 0.4])),
                              fast_frame_ratio=float(rng.choice([0.0, 0.3])),
                              sample_fps=float(rng.choice([0.5, 1.0, 2.0, 4.0])))
        ann = {"caption": "x" * int(rng.integers(1, 40)), "qa": [{"question": "q?", "answer": "a"}]}
        try:
            if kind == "video":
                n, fps = int(rng.integers(2, 300)), float(rng.choice([8.0, 25.0, 30.0]))
                pts = np.cumsum(rng.integers(1, 4, n)) if rng.random() < 0.3 else None   # variable frame rate
                m = meta(n / fps, fps=fps, width=int(rng.integers(40, 900)), height=int(rng.integers(40, 900)),
                         tb=int(fps * 4), pts=None if pts is None else pts.tolist())
                m["scene_changes"] = {"runs": encode_runs(np.unique(rng.integers(1, m["num_frames"], 3)).tolist())}
                d = plan_document(uid=0, key="s/v", video=m, annotation=ann, cfg=cfg, tokenizer=TOK, seed=1, epoch=0)
            elif kind == "image":
                k = int(rng.integers(1, 4))
                d = plan_document(uid=0, key="s/i", video=None, annotation={"text": " <image> ".join("t" * (k + 1))},
                                  images=[{"width": int(rng.integers(28, 500)), "height": int(rng.integers(28, 500))}
                                          for _ in range(k)], cfg=cfg, tokenizer=TOK, seed=1, epoch=0)
            else:
                d = plan_document(uid=0, key="s/t", video=None, annotation=ann, cfg=cfg, tokenizer=TOK, seed=1, epoch=0)
        except PlanError:
            continue
        a = build_document(d, None, cfg, TOK)
        assert np.array_equal(a.pos, _rule_positions(a.tokens.tolist(), d, cfg)), (kind, d)
        checked["fast" if d.frames is not None and d.frames.num_fast else kind] += 1
        if len(a.tokens) <= 600 and sum(len(x.tokens) for x in arrays) + len(a.tokens) <= CFG.seq_len:
            arrays.append(a)
            plans.append(d)
    # packed: each document from 0 as when alone, the padding segment 0, 1, 2, ...
    p = assemble_pack(arrays, [d.key for d in plans], CFG, TOK, epoch=0, pack_index=0, failures=[],
                      planned_keys=[d.key for d in plans], pixel_values=torch.zeros(0, 588, dtype=torch.uint8))
    cu = p.cu_seqlens.tolist()
    assert len(arrays) > 3 and p.num_pad > 0
    for k, a in enumerate(arrays):
        assert np.array_equal(p.position_ids[:, cu[k]:cu[k + 1]].numpy(), a.pos)
    assert np.array_equal(p.position_ids[:, cu[-2]:].numpy(), np.tile(np.arange(p.num_pad), (3, 1)))
