"""Image samples in the video data path: an annotation record with an `image` is verified at ingest (bad
files rejected with a reason), planned as one frame of [min_image_tokens, max_image_tokens] merged tokens,
laid out with <image_pad> placeholders, decoded upright (EXIF orientation) and resumed exactly.
References independent of the code under test: the number burned into each synthetic image (read back
from the decoded pixels), the tokenizer on the record's own text, and positions computed here by hand."""
import json
import os

import numpy as np
import pytest

from data.video.config import VideoDataConfig
from data.video.images import ImageError, decode_image, inspect_image
from data.video.ingest import IngestOptions, ingest, read_annotations
from data.video.loader import VideoPackedLoader
from data.video.packing import build_document, plan_document, unpatchify
from data.video.sampling import PlanError, plan_image
from data.video.shards import index_path, load_catalog
from data.video.synthetic import make_synthetic_videos, read_counter, write_image
from data.video.tokenizer import ByteTokenizer

from .conftest import read_jsonl, small_cfg
from .test_loader import signature, take

N_VIDEOS, N_IMAGES, N_TEXT = 3, 9, 3


@pytest.fixture(scope="module")
def with_images(tmp_path_factory):
    """3 videos, 9 images (PNG, PNG with alpha, JPEG with EXIF orientation 6), 3 text-only records and 3 bad
    image records, ingested into small shards."""
    out = tmp_path_factory.mktemp("images")
    vids, ann = make_synthetic_videos(out, N_VIDEOS, seed=2, max_seconds=2.5, n_images=N_IMAGES, n_text=N_TEXT)
    good = (vids / "img_00000.png").read_bytes()
    (vids / "bad_truncated.png").write_bytes(good[:len(good) // 2])
    (vids / "bad_not_an_image.jpg").write_bytes(b"this is text, not a JPEG\n" * 20)
    with open(ann, "a") as f:
        for name in ("bad_truncated.png", "bad_not_an_image.jpg", "bad_missing.png"):
            f.write(json.dumps({"image": name, "caption": "broken"}) + "\n")
    summary = ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(out / "shards"),
                                   shard_size_mb=0.03, workers=2, progress=False))
    return out, summary


def test_ingest_keeps_good_images_and_rejects_bad_ones(with_images):
    out, summary = with_images
    r = summary["this_run"]
    assert (r["accepted"], r["image_samples"], r["text_samples"]) == (N_VIDEOS, N_IMAGES, N_TEXT)
    rejects = {x["image"]: x["reason"] for x in read_jsonl(out / "shards" / "rejects.jsonl")}
    assert rejects == {"bad_truncated.png": "decode_error", "bad_not_an_image.jpg": "decode_error",
                       "bad_missing.png": "missing_file"}
    cat = load_catalog(str(out / "shards"))
    assert sorted(c.kind for c in cat) == sorted(["video"] * N_VIDEOS + ["image"] * N_IMAGES + ["text"] * N_TEXT)
    for c in cat:
        if c.is_image:
            ann = c.annotation
            rotated = ann["image"].endswith(".jpg")
            assert c.image["exif_orientation"] == (6 if rotated else 1)
            # the size as displayed: the synthetic image's drawn size, whatever orientation it is stored in
            assert f"({c.image['width']}x{c.image['height']})" in ann["caption"]
            stored = (c.image["stored_width"], c.image["stored_height"])
            assert stored == ((c.image["height"], c.image["width"]) if rotated else (c.image["width"], c.image["height"]))
    again = ingest(IngestOptions(videos=str(out / "videos"), annotations=str(out / "annotations.jsonl"),
                                 out=str(out / "shards"), shard_size_mb=0.03, workers=1, progress=False))
    assert again["this_run"]["processed"] == 0                          # rerun: all done or rejected before
    # without our index the shard is scanned and gives the same samples
    shard = cat[0].shard
    os.rename(index_path(shard), index_path(shard) + ".moved")
    try:
        scanned = load_catalog(shard)
    finally:
        os.rename(index_path(shard) + ".moved", index_path(shard))
    assert [(c.key, c.kind, c.image, c.video_offset) for c in scanned] == \
        [(c.key, c.kind, c.image, c.video_offset) for c in cat if c.shard == shard]


def test_image_records_in_annotations(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"image": "a.png"}, {"image": "a.png"}, {"image": 5},
                                                  {"image": "b.png", "video": "b.mp4"}]) + "\n")
    a = read_annotations(str(p))
    assert list(a.images) == ["a.png"] and not a.videos and not a.texts
    assert [x.split(": ", 1)[1] for x in a.problems] == [
        "second record for 'a.png' ignored", "field 'image' is int, not a string",
        "both 'video' and 'image': one sample is one or the other"]


def test_inspect_and_decode(tmp_path):
    with pytest.raises(ImageError, match="missing_file"):
        inspect_image(str(tmp_path / "none.png"))
    rec = write_image(tmp_path / "x", 1, seed=4)                   # the JPEG stored rotated
    path = tmp_path / rec["image"]
    meta = inspect_image(str(path))
    arr = decode_image(path.read_bytes(), meta["height"], meta["width"])
    assert arr.shape == (1, 3, meta["height"], meta["width"]) and arr.dtype == np.uint8
    assert read_counter(arr[0].transpose(1, 2, 0), 10) == rec["image_number"]   # upright, number readable
    small = decode_image(path.read_bytes(), 56, 84)                  # resized on decode
    assert small.shape == (1, 3, 56, 84) and read_counter(small[0].transpose(1, 2, 0), 10) == rec["image_number"]
    with pytest.raises(ImageError, match="decode_error"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 28, 28)


CFG = VideoDataConfig(seq_len=256, min_frames=2, min_frame_tokens=4, min_video_tokens=16, max_text_tokens=64,
                      min_image_tokens=4, max_image_tokens=40)
TOK = ByteTokenizer()


def test_plan_image_sizes():
    assert plan_image({"width": 140, "height": 84}, CFG) .height == 84        # native 3x5 = 15 tokens kept
    p = plan_image({"width": 1000, "height": 500}, CFG)                      # too big: largest grid <= 40
    assert p.tokens_per_frame <= 40 and abs(p.width / p.height - 2.0) < 0.3 and p.num_frames == 1
    assert plan_image({"width": 10, "height": 10}, CFG).tokens_per_frame == 4     # too small: up to the minimum
    assert plan_image({"width": 1000, "height": 500}, CFG, token_cap=10).tokens_per_frame <= 10
    with pytest.raises(PlanError, match="does_not_fit"):
        plan_image({"width": 100, "height": 100}, CFG, token_cap=3)


def test_image_document_layout_against_hand_computed_positions():
    ann = {"caption": "a square", "qa": [{"question": "n?", "answer": "7"}]}
    d = plan_document(uid=0, key="s/i", video=None, image={"width": 140, "height": 84}, annotation=ann, cfg=CFG,
                      tokenizer=TOK, seed=0, epoch=0)
    a = build_document(d, None, CFG, TOK)
    rows, cols = 3, 5
    text = TOK.encode("Caption: ") + TOK.encode("a square\n") + TOK.encode("Q: n?\nA: ") + TOK.encode("7\n")
    want = [TOK.bos_id, TOK.vision_start_id] + [TOK.image_pad_id] * (rows * cols) + [TOK.vision_end_id] + text \
        + [TOK.eos_id]
    assert a.tokens.tolist() == want and d.length == len(want) and d.is_image
    # <bos> 0, <vision_start> 1; the image's tokens t = 2, h = 2 + row, w = 2 + col; <vision_end> at 2 + max(3, 5)
    vis = np.arange(2, 2 + rows * cols)
    r, c = np.divmod(np.arange(rows * cols), cols)
    assert (a.pos[:, :2] == [[0, 1]] * 3).all()
    assert (a.pos[0, vis] == 2).all() and (a.pos[1, vis] == 2 + r).all() and (a.pos[2, vis] == 2 + c).all()
    after = 2 + rows * cols
    assert (a.pos[:, after:] == np.arange(7, 7 + len(want) - after)[None]).all()
    assert a.grid.tolist() == [[1, rows * 2, cols * 2]] and a.timestamps.tolist() == [0.0]
    assert (a.loss_mask[want.index(TOK.image_pad_id) - 1:after] == 0).all()   # no loss on or into the image


def test_loader_decodes_images_upright_and_resumes_exactly(with_images, tmp_path):
    out, _ = with_images
    cfg = small_cfg(out / "shards", tmp_path, seq_len=768, num_epochs=1, max_image_tokens=24)
    loader = VideoPackedLoader(cfg, seed=6)
    cat = {f"{os.path.basename(c.shard)}/{c.key}": c for c in loader.catalog}
    packs = list(loader)
    n_img = 0
    for p in packs:
        p.validate(cfg, loader.tokenizer)
        frames = unpatchify(p.pixel_values, p.grid_thw, 14, 2)
        f = 0
        for d, key in enumerate(p.sample_keys):
            rec = cat[key]
            doc = loader.planner.doc(rec.uid, p.epoch)
            if rec.is_image:
                n_img += 1
                assert doc.frames.tokens_per_frame <= 24
                assert read_counter(frames[f], 10) == rec.annotation["image_number"], key
                seg = p.tokens[int(p.cu_seqlens[d]):int(p.cu_seqlens[d + 1])]
                assert int((seg == loader.tokenizer.image_pad_id).sum()) == doc.frames.tokens_per_frame
                assert not bool((seg == loader.tokenizer.video_pad_id).any())
            f += doc.num_frames
        assert f == len(frames)
    assert n_img == N_IMAGES == loader.stats["samples_image"]
    assert sorted(k for p in packs for k in p.sample_keys) == sorted(cat)
    # the plan's fingerprint names the image fields (they change the plan), exact resume over images
    assert "max_image_tokens" in loader.state_dict()["plan_config"]
    cfg2 = small_cfg(out / "shards", tmp_path, seq_len=768, max_image_tokens=24)
    ref = [signature(p) for p in take(VideoPackedLoader(cfg2, seed=6), 5)]
    a = VideoPackedLoader(cfg2, seed=6)
    first = [signature(p) for p in take(a, 2)]
    b = VideoPackedLoader(cfg2, seed=6)
    b.load_state_dict(a.state_dict())
    assert first + [signature(p) for p in take(b, 3)] == ref
    c = VideoPackedLoader(small_cfg(out / "shards", tmp_path, seq_len=768, max_image_tokens=20), seed=6)
    with pytest.raises(ValueError, match="max_image_tokens"):
        c.load_state_dict(a.state_dict())


def test_fingerprint_without_images_has_no_image_fields(shard_dir, tmp_path):
    # a video-only run keeps the loader state it saved before image samples existed
    loader = VideoPackedLoader(small_cfg(shard_dir, tmp_path), seed=1)
    assert not any("image" in k for k in loader.state_dict()["plan_config"])
