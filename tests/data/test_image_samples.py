"""Image samples in the video data path: an annotation record with an `image` (or several `images`, placed at
the "<image>" markers of its text) is verified at ingest (bad files rejected with a reason), planned as one frame
of [min_image_tokens, max_image_tokens] merged tokens per image, laid out with <image_pad> placeholders, decoded
upright (EXIF orientation) and resumed exactly.
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
from .test_loader import assert_resumes_exactly, take

N_VIDEOS, N_IMAGES, N_SETS, N_TEXT = 3, 9, 4, 3


@pytest.fixture(scope="module")
def with_images(tmp_path_factory):
    """3 videos, 9 images (PNG, PNG with alpha, JPEG with EXIF orientation 6), 4 interleaved records of 2-3
    images, 3 text-only records and 4 bad image records, ingested into small shards."""
    out = tmp_path_factory.mktemp("images")
    vids, ann = make_synthetic_videos(out, N_VIDEOS, seed=2, max_seconds=2.5, n_images=N_IMAGES, n_text=N_TEXT,
                                      n_image_sets=N_SETS)
    good = (vids / "img_00000.png").read_bytes()
    (vids / "bad_truncated.png").write_bytes(good[:len(good) // 2])
    (vids / "bad_not_an_image.jpg").write_bytes(b"this is text, not a JPEG\n" * 20)
    with open(ann, "a") as f:
        for name in ("bad_truncated.png", "bad_not_an_image.jpg", "bad_missing.png"):
            f.write(json.dumps({"image": name, "caption": "broken"}) + "\n")
        # a set whose second image does not decode: the whole record is rejected, naming that image
        f.write(json.dumps({"images": ["img_00000.png", "bad_truncated.png"], "text": "a <image> b <image>"}) + "\n")
    summary = ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(out / "shards"),
                                   shard_size_mb=0.03, workers=2, progress=False))
    return out, summary


def test_ingest_keeps_good_images_and_rejects_bad_ones(with_images):
    out, summary = with_images
    r = summary["this_run"]
    assert (r["accepted"], r["image_samples"], r["text_samples"]) == (N_VIDEOS, N_IMAGES + N_SETS, N_TEXT)
    assert r["image_files"] == N_IMAGES + sum(2 + j % 2 for j in range(N_SETS))
    rejects = {x["image"]: (x["reason"], x["detail"]) for x in read_jsonl(out / "shards" / "rejects.jsonl")}
    assert {k: v[0] for k, v in rejects.items()} == {
        "bad_truncated.png": "decode_error", "bad_not_an_image.jpg": "decode_error", "bad_missing.png": "missing_file",
        "img_00000.png+bad_truncated.png": "decode_error"}
    assert rejects["img_00000.png+bad_truncated.png"][1].startswith("bad_truncated.png: ")
    cat = load_catalog(str(out / "shards"))
    assert sorted(c.kind for c in cat) == sorted(["video"] * N_VIDEOS + ["image"] * (N_IMAGES + N_SETS)
                                                 + ["text"] * N_TEXT)
    for c in cat:
        if c.is_image and "image" in c.annotation:
            ann, meta = c.annotation, c.images[0]
            rotated = ann["image"].endswith(".jpg")
            assert meta["exif_orientation"] == (6 if rotated else 1)
            # the size as displayed: the synthetic image's drawn size, whatever orientation it is stored in
            assert f"({meta['width']}x{meta['height']})" in ann["caption"]
            stored = (meta["stored_width"], meta["stored_height"])
            assert stored == ((meta["height"], meta["width"]) if rotated else (meta["width"], meta["height"]))
        elif c.is_image:
            assert len(c.images) == len(c.image_members) == len(c.annotation["images"]) in (2, 3)
    again = ingest(IngestOptions(videos=str(out / "videos"), annotations=str(out / "annotations.jsonl"),
                                 out=str(out / "shards"), shard_size_mb=0.03, workers=1, progress=False))
    assert again["this_run"]["processed"] == 0                          # rerun: all done or rejected before
    # without our index the shard (one holding a set: members <key>.<i>.<ext>) is scanned, same samples
    shard = next(c.shard for c in cat if c.is_image and len(c.images) > 1)
    os.rename(index_path(shard), index_path(shard) + ".moved")
    try:
        scanned = load_catalog(shard)
    finally:
        os.rename(index_path(shard) + ".moved", index_path(shard))
    assert [(c.key, c.kind, c.images, c.image_members) for c in scanned] == \
        [(c.key, c.kind, c.images, c.image_members) for c in cat if c.shard == shard]


def test_image_records_in_annotations(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"image": "a.png"}, {"image": "a.png"}, {"image": 5}, {"image": "b.png", "video": "b.mp4"},
        {"images": ["a.png", "c.png"], "text": "x <image> y <image>"}, {"images": ["c.png", "d.png"], "text": "<image>"},
        {"images": ["e.png", "e.png"]}, {"images": []}, {"images": ["f.png", "g.png"], "caption": "no markers"}]) + "\n")
    a = read_annotations(str(p))
    assert list(a.images) == ["a.png", "a.png+c.png", "f.png+g.png"] and not a.videos and not a.texts
    assert a.images["a.png+c.png"][1] == ["a.png", "c.png"]
    assert [x.split(": ", 1)[1] for x in a.problems] == [
        "second record for 'a.png' ignored (a sample keeps its first)", "field 'image' is int, not a string",
        "'video' and 'image': a sample is a video, an image or a list of images",
        "2 image(s) but 1 '<image>' markers in the text (one per image, or none to place the images first)",
        "an image is listed twice in ['e.png', 'e.png']", "field 'images' must be a non-empty list of paths"]


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
    d = plan_document(uid=0, key="s/i", video=None, images=[{"width": 140, "height": 84}], annotation=ann, cfg=CFG,
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


def test_interleaved_images_take_the_places_of_their_markers():
    ims = [{"width": 56, "height": 56}, {"width": 112, "height": 28}]    # 2 x 2 and 1 x 4 merged tokens
    ann = {"text": "A<image>B<image>C"}
    d = plan_document(uid=0, key="s/i", video=None, images=ims, annotation=ann, cfg=CFG, tokenizer=TOK, seed=0, epoch=0)
    a = build_document(d, None, CFG, TOK)
    vs, ve, ip = TOK.vision_start_id, TOK.vision_end_id, TOK.image_pad_id
    A, B, C = (TOK.encode(x) for x in "ABC")
    want = [TOK.bos_id] + A + [vs] + [ip] * 4 + [ve] + B + [vs] + [ip] * 4 + [ve] + C + [TOK.eos_id]
    assert a.tokens.tolist() == want and d.num_frames == 2
    # positions: A at 1; image 0 (2x2) t = 3, rows / cols 3-4; <vision_end> at 3 + 2 = 5; B 6; <vision_start> 7;
    # image 1 (1x4) t = 8, cols 8-11; <vision_end> at 8 + 4 = 12; C 13; <eos> 14
    assert a.pos[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 5, 6, 7, 8, 8, 8, 8, 12, 13, 14]
    assert a.pos[1].tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 8, 8, 8, 8, 12, 13, 14]
    assert a.pos[2].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert a.grid.tolist() == [[1, 4, 4], [1, 2, 8]]
    # the supervised text A, B, C and the <eos> are predicted (from the token before each); no image token is
    assert [int(x) for x in np.nonzero(a.loss_mask)[0]] == [0, 7, 14, 15]
    none = plan_document(uid=0, key="s/i", video=None, images=ims, annotation={"text": "D"}, cfg=CFG,
                         tokenizer=TOK, seed=0, epoch=0)                   # no markers: the images first
    assert build_document(none, None, CFG, TOK).tokens.tolist()[:3] == [TOK.bos_id, vs, ip]
    with pytest.raises(PlanError, match="markers"):
        plan_document(uid=0, key="s/i", video=None, images=ims, annotation={"text": "one <image> only"}, cfg=CFG,
                      tokenizer=TOK, seed=0, epoch=0)


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
                want = rec.annotation.get("image_numbers") or [rec.annotation["image_number"]]
                assert [read_counter(frames[f + k], 10) for k in range(doc.num_frames)] == want, key
                assert all(fp.tokens_per_frame <= 24 for fp in doc.images)
                seg = p.tokens[int(p.cu_seqlens[d]):int(p.cu_seqlens[d + 1])]
                assert int((seg == loader.tokenizer.image_pad_id).sum()) == sum(fp.tokens_per_frame for fp in doc.images)
                assert int((seg == loader.tokenizer.vision_start_id).sum()) == len(want)
                assert not bool((seg == loader.tokenizer.video_pad_id).any())
                if "text" in rec.annotation and len(want) > 1:     # interleaved: each number after its picture
                    t = loader.tokenizer.decode(seg.tolist())
                    for k, x in enumerate(want):
                        assert f"Picture {k + 1}: <vision_start>" in t and f"<vision_end> shows {x}." in t
            f += doc.num_frames
        assert f == len(frames)
    assert n_img == N_IMAGES + N_SETS == loader.stats["samples_image"]
    assert sorted(k for p in packs for k in p.sample_keys) == sorted(cat)
    # the plan's fingerprint names the image fields (they change the plan), exact resume over images
    assert "max_image_tokens" in loader.state_dict()["plan_config"]
    cfg2 = small_cfg(out / "shards", tmp_path, seq_len=768, max_image_tokens=24)
    assert_resumes_exactly(cfg2, 6, 2, 3)
    a = VideoPackedLoader(cfg2, seed=6)
    take(a, 2)
    c = VideoPackedLoader(small_cfg(out / "shards", tmp_path, seq_len=768, max_image_tokens=20), seed=6)
    with pytest.raises(ValueError, match="max_image_tokens"):
        c.load_state_dict(a.state_dict())


def test_fingerprint_without_images_has_no_image_fields(shard_dir, tmp_path):
    # a video-only run keeps the loader state it saved before image samples existed
    loader = VideoPackedLoader(small_cfg(shard_dir, tmp_path), seed=1)
    assert not any("image" in k for k in loader.state_dict()["plan_config"])


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_image_corrupted_after_ingest_is_quarantined(with_images, tmp_path, isolation):
    """A stored image whose bytes go bad after ingest (a disk, a copy): that sample is left out of its pack and
    quarantined with the reason; every other sample of the epoch still arrives. The reason is corrupt_member (its
    CRC32 is not the index's); from an index that records no CRC32s (written before they were), the decoder's."""
    import json
    import shutil

    from data.video.shards import index_path

    out, _ = with_images
    shards = tmp_path / "shards"
    shutil.copytree(out / "shards", shards)
    cat = load_catalog(str(shards))
    victim = next(c for c in cat if c.is_image and len(c.images) > 1)      # a set: its second image
    offset, size = victim.image_members[1]
    with open(victim.shard, "r+b") as f:
        f.seek(offset + 16)
        f.write(b"\0" * (size - 16))
    name = f"{os.path.basename(victim.shard)}/{victim.key}"
    for reason in ("corrupt_member", "decode_error"):
        if reason == "decode_error":    # the index as written before members' CRC32s were recorded
            idx = json.loads(open(index_path(victim.shard)).read())
            for m in (m for s in idx["samples"] for m in s.get("image_members") or ()):
                del m["crc32"]
            open(index_path(victim.shard), "w").write(json.dumps(idx))
        cfg = small_cfg(shards, tmp_path / reason, seq_len=768, num_epochs=1, max_image_tokens=24,
                        decode_isolation=isolation)
        loader = VideoPackedLoader(cfg, seed=6)
        got = sorted(k for p in loader for k in p.sample_keys)
        assert got == sorted(f"{os.path.basename(c.shard)}/{c.key}" for c in cat if c.key != victim.key)
        q = read_jsonl(cfg.quarantine_path)
        assert [(f"{r['shard']}/{r['key']}", r["reason"], r["stage"]) for r in q] == [(name, reason, "decode")]
        assert "image 1" in q[0]["detail"]


@pytest.mark.parametrize("rotated", [False, True])
def test_jpeg_draft_decode_matches_the_full_decode(tmp_path, rotated):
    """A JPEG twice the planned size or more is decoded at a reduced DCT scale, then resized: against decoding
    it in full (draft=False), the picture read back is the same, pixel values within the tolerance below."""
    from PIL import Image

    from data.video.synthetic import draw_frame

    shown = draw_frame(777, 1512, 2016, bits=10, seed=3)               # 2016 x 1512 as displayed
    img = Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1)) if rotated else shown)
    exif = Image.Exif()
    if rotated:
        exif[0x0112] = 6
    path = tmp_path / "big.jpg"
    img.save(path, quality=90, exif=exif)
    meta = inspect_image(str(path))
    assert (meta["width"], meta["height"]) == (2016, 1512)
    fp = plan_image(meta, VideoDataConfig(max_image_tokens=256))             # about a quarter of each side
    data = path.read_bytes()
    fast = decode_image(data, fp.height, fp.width)
    full = decode_image(data, fp.height, fp.width, draft=False)
    assert fast.shape == full.shape == (1, 3, fp.height, fp.width)
    assert read_counter(fast[0].transpose(1, 2, 0), 10) == read_counter(full[0].transpose(1, 2, 0), 10) == 777
    # Tolerance: both are low-pass downscalings of one picture that differ only in the filter (the DCT scaling's
    # average, then bicubic, against bicubic alone); measured at 4032x3024 -> 1148x868 a mean difference of
    # 0.04 levels on such flat synthetic content and 0.79 with photo-like noise, 99th percentile <= 3.
    d = np.abs(fast.astype(np.int16) - full.astype(np.int16))
    assert d.mean() < 1.5 and np.percentile(d, 99) <= 4, (d.mean(), np.percentile(d, 99))
    assert not np.array_equal(fast, full)          # the reduced scale really was used


def test_webdataset_reads_every_kind_of_sample(with_images):
    """The webdataset library (the independent reader) groups our members into the samples our catalog lists:
    a video's json + mp4, an image's json + jpg/png, a set's json + 0.<ext>, 1.<ext>..., a text's json alone."""
    import webdataset as wds

    out, _ = with_images
    cat = load_catalog(str(out / "shards"))
    urls = sorted({c.shard for c in cat})
    got = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        got[s["__key__"]] = sorted(k for k in s if not k.startswith("__"))
    want = {}
    for c in cat:
        if c.kind == "text":
            want[c.key] = ["json"]
        elif c.kind == "video":
            want[c.key] = sorted(["json", c.video_ext])
        elif len(c.images) == 1:
            want[c.key] = sorted(["json", c.annotation["image"].rsplit(".", 1)[1]])
        else:
            want[c.key] = sorted(["json"] + [f"{i}.{p.rsplit('.', 1)[1]}" for i, p in enumerate(c.annotation["images"])])
    assert got == want


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_image_decoder_crash_or_hang_costs_one_sample(with_images, tmp_path, monkeypatch, fault):
    """With decode_isolation "process" images decode in the guarded child, as videos do: a decoder that
    segfaults or hangs on one image costs that sample (quarantined: crashed / timeout), not the run."""
    out, _ = with_images
    cat = load_catalog(str(out / "shards"))
    victim = next(c for c in cat if c.is_image and len(c.images) == 1)
    monkeypatch.setenv("KEYE_DECODE_FAULT", f"{fault}:{victim.key} image 0")
    cfg = small_cfg(out / "shards", tmp_path, seq_len=768, num_epochs=1, max_image_tokens=24, num_workers=1,
                    decode_isolation="process", sample_timeout_s=3.0)
    loader = VideoPackedLoader(cfg, seed=6)
    got = sorted(k for p in loader for k in p.sample_keys)
    loader.close()
    assert got == sorted(f"{os.path.basename(c.shard)}/{c.key}" for c in cat if c.key != victim.key)
    q = read_jsonl(cfg.quarantine_path)
    assert [(r["key"], r["reason"]) for r in q] == [(victim.key, "crashed" if fault == "crash" else "timeout")]


def test_image_member_names_take_the_basename_extension_or_the_format(tmp_path):
    """An image file without an extension in a dotted folder ('v1.2/photo') was stored as member '<key>.2/photo'
    (the path's text after its last dot), which no reader groups with its json; the tar itself is the reference."""
    import tarfile

    from data.video.shards import scan_shard
    (tmp_path / "v1.2").mkdir()
    write_image(tmp_path / "v1.2" / "photo", 0)                   # image 0: a plain PNG, here without an extension
    os.rename(tmp_path / "v1.2" / "photo.png", tmp_path / "v1.2" / "photo")
    write_image(tmp_path / "v1.2" / "shot", 1)                    # image 1: a JPEG, renamed upper case
    os.rename(tmp_path / "v1.2" / "shot.jpg", tmp_path / "v1.2" / "SHOT.JPG")
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps({"image": "v1.2/photo", "caption": "c"}) + "\n"
                   + json.dumps({"images": ["v1.2/SHOT.JPG", "v1.2/photo"], "caption": "two"}) + "\n")
    summary = ingest(IngestOptions(videos=str(tmp_path), annotations=str(ann), out=str(tmp_path / "o"), workers=1,
                                   progress=False))
    assert summary["this_run"]["image_samples"] == 2 and summary["num_rejected"] == 0
    shard = str(tmp_path / "o" / "shard-000000.tar")
    with tarfile.open(shard) as t:
        names = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
    photo = (tmp_path / "v1.2" / "photo").read_bytes()
    keys = sorted({n.split(".", 1)[0] for n in names})
    assert all("/" not in n for n in names) and len(keys) == 2
    one, two = sorted(keys, key=lambda k: "photo" not in k or "SHOT" in k)
    assert names[f"{one}.png"] == photo
    assert names[f"{two}.0.jpg"] == (tmp_path / "v1.2" / "SHOT.JPG").read_bytes() and names[f"{two}.1.png"] == photo
    assert len(names) == 5
    assert sorted((s["key"], len(s["image_members"])) for s in scan_shard(shard)["samples"]) == sorted(
        [(one, 1), (two, 2)])


def test_a_16_bit_png_decodes_as_its_ramp_not_white(tmp_path):
    """Pillow's convert("RGB") clips a 16-bit grey PNG's values over 255 instead of scaling them: a ramp from black
    to white decoded almost all white. The reference is the ramp computed here, scaled by 255 / 65535."""
    from PIL import Image
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))     # [8, 256], black to white
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")                                   # stored as 16 bits
    meta = inspect_image(str(path))
    got = decode_image(path.read_bytes(), meta["height"], meta["width"], draft=False)
    want = np.round(ramp.astype(np.float64) * 255 / 65535)
    assert got.shape == (1, 3, 8, 256) and (got[0] == got[0, :1]).all()           # grey: three equal channels
    # 1 level: the decoder keeps the high byte (v >> 8), which is at most 1 below the rounded v * 255 / 65535
    assert np.abs(got[0, 0].astype(np.float64) - want).max() <= 1


def test_a_32_bit_integer_image_beyond_16_bits_is_rejected_not_clipped(tmp_path):
    """A 32-bit integer image (Pillow mode I, here a TIFF ramp of 20 bits) was read as 16-bit grey, its values
    clipped to 65535: the ramp decoded 93% white. Ingest now rejects it as `unsupported_mode`, naming its range, and
    the decoder refuses it too (a shard written before); one whose values fit 16 bits still decodes as 16-bit grey
    (the reference: the ramp scaled by 255 / 65535 here)."""
    from PIL import Image
    wide = np.tile(np.linspace(0, 921300, 256).round().astype(np.int32), (8, 1))
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    assert Image.open(tmp_path / "wide.tif").mode == "I"
    for read in (lambda: inspect_image(str(tmp_path / "wide.tif")),
                 lambda: decode_image((tmp_path / "wide.tif").read_bytes(), 8, 256, "wide.tif")):
        with pytest.raises(ImageError, match=r"wide.tif: integer samples \(Pillow mode I\) from 0 to 921300, "
                                             r"outside 0..65535") as e:
            read()
        assert e.value.reason == "unsupported_mode"
    # a signed 16-bit TIFF opens as mode I too: its message names its range, not 32 bits it does not have
    Image.fromarray(np.array([[-5, 300]], np.int16)).save(tmp_path / "signed.tif")
    with pytest.raises(ImageError, match=r"signed.tif: integer samples \(Pillow mode I\) from -5 to 300, outside "):
        inspect_image(str(tmp_path / "signed.tif"))
    fits = np.tile(np.linspace(0, 65535, 256).round().astype(np.int32), (8, 1))
    Image.fromarray(fits).save(tmp_path / "fits.tif")
    meta = inspect_image(str(tmp_path / "fits.tif"))
    got = decode_image((tmp_path / "fits.tif").read_bytes(), meta["height"], meta["width"])
    # 1 level: the high byte (v >> 8) is at most 1 below the rounded v * 255 / 65535
    assert np.abs(got[0, 0].astype(np.float64) - np.round(fits * 255 / 65535)).max() <= 1


def test_a_32_bit_float_image_is_rejected_not_read_black(tmp_path):
    """A float TIFF (Pillow mode F) of values 0..1 was accepted at ingest and decoded black: convert("RGB") clips
    float samples to 0..255 and drops their fractions. Float samples have no one 8-bit reading (0..1 by one
    convention, 0..255 by another), so ingest rejects the file as `unsupported_mode`, naming it and its range, and
    the decoder refuses one stored before. The reference: the values written here."""
    from PIL import Image
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 1))
    Image.fromarray(ramp, "F").save(tmp_path / "depth.tif")
    assert Image.open(tmp_path / "depth.tif").mode == "F"
    for read in (lambda: inspect_image(str(tmp_path / "depth.tif")),
                 lambda: decode_image((tmp_path / "depth.tif").read_bytes(), 8, 64, "depth.tif")):
        with pytest.raises(ImageError, match=r"depth.tif: 32-bit float samples \(Pillow mode F\) from 0 to 1: ") as e:
            read()
        assert e.value.reason == "unsupported_mode"


def test_an_animation_or_multi_page_file_is_its_first_frame(tmp_path):
    """An animated GIF or PNG, or a multi-page TIFF, given as an image is its first frame (the one a still viewer
    shows, and what transformers' load_image gives a model), at that frame's size, for ingest's metadata and the
    decode alike. The reference: the colour and size of the first frame written here (a TIFF's later pages larger;
    an animation's frames share its canvas)."""
    from PIL import Image
    colours = ((200, 30, 10), (0, 255, 0), (0, 0, 255))
    for name, opts in (("anim.gif", {"duration": 100, "loop": 0}), ("anim.png", {"duration": 100}), ("pages.tif", {})):
        grow = 30 * name.endswith(".tif")
        frames = [Image.new("RGB", (50 + grow * k, 40 + grow * k), c) for k, c in enumerate(colours)]
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **opts)
        assert Image.open(tmp_path / name).n_frames == 3
        meta = inspect_image(str(tmp_path / name))
        assert (meta["width"], meta["height"]) == (50, 40), name
        got = decode_image((tmp_path / name).read_bytes(), 40, 50, name)
        # GIF's palette holds the colour exactly; 0 levels for all three
        assert (got[0].reshape(3, -1).T == (200, 30, 10)).all(), name


def test_an_empty_image_file_is_rejected_as_empty(tmp_path):
    """A 0-byte image was rejected as decode_error "cannot identify image file", which does not say what is wrong with
    it; it is `empty_file` now, as a video of 0 bytes is, naming the file."""
    (tmp_path / "blank.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"^empty_file: blank.jpg: 0 bytes$"):
        inspect_image(str(tmp_path / "blank.jpg"))


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of `arr` ([H, W, channels] uint16) written here byte by byte (Pillow writes none with alpha)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_transparent_images_decode_onto_white_as_inference_processors_show_them(tmp_path):
    """convert("RGB") dropped the alpha and kept the colour stored under it: a black logo on a transparent background
    stored over black decoded all black, and a palette's transparent entry showed its colour. Transparency is now
    composited onto white, as transformers' convert_to_rgb and Qwen-VL's and vLLM's loaders give a model at
    inference: RGBA, grey + alpha (8 and 16 bits), a palette with alpha, a palette's, an RGB PNG's and a 16-bit
    grey PNG's transparent colour (tRNS), and a transparent PNG with an EXIF orientation. The reference: colour * a + 255 * (1 - a), a =
    alpha / 255, computed here; 1 level for Pillow's integer blend against this float rounding. An alpha of 0
    everywhere (a 32-bit BMP's unused byte) is dropped, not made a white picture."""
    import struct

    from PIL import Image
    rng = np.random.default_rng(42)
    h, w = 6, 10
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[0] = 0                                                           # fully transparent, fully opaque rows
    alpha[1] = 255

    def over_white(color, a):
        a = a[..., None].astype(np.float64) / 255
        return np.round(color * a + 255 * (1 - a))

    pal = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    pal_alpha = np.array([0, 255, 128, 40, 200, 255, 7, 99], np.uint8)
    index = rng.integers(0, 8, (h, w), dtype=np.uint8)
    palette_rgba = Image.fromarray(index, "P")
    palette_rgba.putpalette(np.concatenate([pal, pal_alpha[:, None]], 1).tobytes(), "RGBA")
    palette = Image.fromarray(index, "P")
    palette.putpalette(pal.tobytes())
    key = np.where(index == 3, 255, 0).astype(np.uint8)                    # where the transparent entry / colour is
    rgb_keyed = rgb.copy()
    rgb_keyed[index == 3] = (1, 2, 3)
    logo = np.zeros((h, w, 4), np.uint8)
    logo[2:4, 3:7, 3] = 255                                                # black shape, transparent black around
    g16 = rng.integers(0, 65536, (h, w, 2), dtype=np.uint16)
    cases = {  # name: (file bytes or image + save options, reference [h, w, 3] as displayed)
        "rgba.png": ((Image.fromarray(np.dstack([rgb, alpha])), {}), over_white(rgb, alpha)),
        "logo.png": ((Image.fromarray(logo), {}), over_white(logo[..., :3], logo[..., 3])),
        "la.png": ((Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"), {}),
                   over_white(np.repeat(rgb[..., :1], 3, 2), alpha)),
        "pa.png": ((palette_rgba, {}), over_white(pal[index], pal_alpha[index])),
        "p_trns.png": ((palette, {"transparency": 3}), over_white(pal[index], 255 - key)),
        "p_trns.gif": ((palette, {"transparency": 3}), over_white(pal[index], 255 - key)),
        "rgb_trns.png": ((Image.fromarray(rgb_keyed), {"transparency": (1, 2, 3)}), over_white(rgb_keyed, 255 - key)),
        "la16.png": (_png16(g16, 4), over_white(np.repeat((g16[..., :1] >> 8).astype(np.uint8), 3, 2),
                                                (g16[..., 1] >> 8).astype(np.uint8))),
    }
    grey16 = g16[..., 0].copy()
    grey16[index == 3] = 1000                                              # a 16-bit grey PNG's transparent value
    cases["grey16_trns.png"] = ((Image.fromarray(grey16), {"transparency": 1000}),
                                over_white(np.repeat((grey16[..., None] >> 8).astype(np.uint8), 3, 2), 255 - key))
    exif = Image.Exif()
    exif[0x0112] = 6                                                       # shown turned 90 degrees clockwise
    cases["rgba_exif6.png"] = ((Image.fromarray(np.dstack([rgb, alpha])), {"exif": exif}),
                               np.rot90(over_white(rgb, alpha), -1))
    # a 32-bit BMP (56-byte header, alpha mask) whose alpha bytes are all 0: an unused byte, not an invisible picture
    bgra = np.dstack([rgb[..., ::-1], np.zeros((h, w), np.uint8)])[::-1].tobytes()    # bottom-up rows, BGRA
    dib = struct.pack("<IiiHHIIiiII", 56, w, h, 1, 32, 3, len(bgra), 2835, 2835, 0, 0) + struct.pack(
        "<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000)
    cases["zero_alpha.bmp"] = (b"BM" + struct.pack("<IHHI", 14 + len(dib) + len(bgra), 0, 0, 14 + len(dib)) + dib
                               + bgra, rgb.astype(np.float64))
    for name, (src, want) in cases.items():
        path = tmp_path / name
        if isinstance(src, bytes):
            path.write_bytes(src)
        else:
            src[0].save(path, **src[1])
        opened = Image.open(path)
        assert "A" in opened.getbands() or "transparency" in opened.info, name     # each file holds transparency
        meta = inspect_image(str(path))
        got = decode_image(path.read_bytes(), meta["height"], meta["width"], name)
        assert got.shape == (1, 3) + want.shape[:2], name
        assert np.abs(got[0].transpose(1, 2, 0).astype(np.float64) - want).max() <= 1, name


def test_a_shard_without_its_index_lists_images_of_any_format_ingest_read(tmp_path):
    """scan_shard (a tar whose index is lost) listed image members by five extensions only, so a GIF or TIFF image
    sample, which ingest stores under its own extension, was dropped from the rebuilt index; the index ingest wrote
    is the reference."""
    from PIL import Image

    from data.video.shards import index_path, scan_shard
    for name, fmt in (("anim.gif", "GIF"), ("scan.tif", "TIFF")):
        Image.new("RGB", (40, 30), (200, 40, 10)).save(tmp_path / name, format=fmt)
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps({"image": "anim.gif", "caption": "g"}) + "\n"
                   + json.dumps({"image": "scan.tif", "caption": "t"}) + "\n")
    summary = ingest(IngestOptions(videos=str(tmp_path), annotations=str(ann), out=str(tmp_path / "o"), workers=1,
                                   progress=False))
    assert summary["this_run"]["image_samples"] == 2 and summary["num_rejected"] == 0
    shard = str(tmp_path / "o" / "shard-000000.tar")
    with open(index_path(shard)) as f:
        indexed = json.load(f)["samples"]
    scanned = scan_shard(shard)["samples"]
    assert sorted((s["key"], s["image_members"][0]["member"]) for s in scanned) == sorted(
        (s["key"], s["image_members"][0]["member"]) for s in indexed)
    assert sorted(s["image_members"][0]["member"].rsplit(".", 1)[1] for s in scanned) == ["gif", "tif"]


def test_each_document_of_a_pack_has_its_kind_and_group(with_images, tmp_path):
    """PackedSample.doc_kinds and the micro-batch's doc_groups (the step's loss per kind, train/loss_groups.py)
    against the catalog's own record of each sample; the padding segment has no group."""
    from types import SimpleNamespace

    from data.video.packing import DOC_KINDS
    from data.video_stream import VideoBatchStream

    out, _ = with_images
    cfg = small_cfg(out / "shards", tmp_path, seq_len=768, num_epochs=1, max_image_tokens=24)
    loader = VideoPackedLoader(cfg, seed=6)
    cat = {f"{os.path.basename(c.shard)}/{c.key}": c for c in loader.catalog}
    seen = set()
    for p in take(loader, 4):
        want = ["image" if cat[k].is_image else "text" if cat[k].is_text else "video" for k in p.sample_keys]
        assert p.doc_kinds == want
        seen.update(want)
        groups = VideoBatchStream._doc_groups(SimpleNamespace(loader=loader), p).tolist()
        assert groups == [DOC_KINDS.index(k) for k in want] + [-1] * (p.cu_seqlens.numel() - 1 - p.num_docs)
    assert seen == set(DOC_KINDS)
