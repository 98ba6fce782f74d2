"""Two data folders with the same shard file names and keys (launch/ingest.py numbers every folder's shards from
shard-000000.tar and keys samples by their source files' names): each sample keeps a key of its own, in packs,
data.exclude, the quarantine records and messages (data/video/shards.shard_names).

References: the folders' own paths (which folder's sample a key names), and a loader over one folder alone, whose
shard names are not ambiguous (the plans, frame jitter included, must be its).
"""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.exclude import read_exclude
from data.video.loader import VideoPackedLoader
from data.video.shards import ShardWriter, load_catalog

from .conftest import read_jsonl, small_cfg


def test_a_shard_is_named_by_its_folder_only_where_another_folder_has_its_file_name():
    from data.video.shards import shard_names

    assert shard_names(["/d/webvid/shard-000000.tar", "/d/webvid/shard-000001.tar", "/d/howto/shard-000000.tar",
                        "/d/other/extra.tar"]) == \
        ["webvid/shard-000000.tar", "webvid/shard-000001.tar", "howto/shard-000000.tar", "extra.tar"]
    # folders that end alike: as much of the path as tells them apart
    assert shard_names(["/a/v1/shards/s.tar", "/b/v1/shards/s.tar", "/b/v2/shards/s.tar"]) == \
        ["a/v1/shards/s.tar", "b/v1/shards/s.tar", "v2/shards/s.tar"]
    assert shard_names(["/d/a/s.tar", "/d/a/t.tar"]) == ["s.tar", "t.tar"] and shard_names([]) == []


@pytest.mark.timeout(10)
def test_shards_at_the_root_or_on_object_storage_are_named_apart():
    """A shard in the root folder ("/s.tar", a container's mount) beside another folder's s.tar looped forever
    (its folder's trailing part "" read as not yet named). URL shards are named as files are: by file name, with as
    much of host and path as tells apart two folders that share it."""
    from data.video.shards import shard_names

    assert shard_names(["/s.tar", "/d/s.tar"]) == ["/s.tar", "d/s.tar"]
    assert shard_names(["https://h1/d/s.tar", "https://h2/d/s.tar", "/data/d/s.tar", "https://h1/d/t.tar"]) == \
        ["h1/d/s.tar", "h2/d/s.tar", "data/d/s.tar", "h1/d/t.tar"]      # every shard of a folder that clashes
    assert shard_names(["https://h1/s.tar", "/s.tar", "https://h1/d/s.tar"]) == ["h1/s.tar", "/s.tar", "d/s.tar"]


def test_a_folder_named_twice_through_a_link_stops_the_loader(shard_dir, tmp_path):
    """A glob matching a folder and a link to it (/data/*/shards/*.tar with /data/latest -> v3) named every shard
    twice: each sample was read twice an epoch."""
    (tmp_path / "v3" / "shards").mkdir(parents=True)
    for ext in (".tar", ".idx.json"):
        shutil.copy(shard_dir / f"shard-000000{ext}", tmp_path / "v3" / "shards" / f"shard-000000{ext}")
    (tmp_path / "latest").symlink_to(tmp_path / "v3")
    with pytest.raises(ValueError, match=r"VideoDataConfig.shards = '.*/\*/shards/\*.tar': 1 shard file\(s\) are named "
                                         r"twice, through a link \(.*latest/shards/shard-000000.tar and "
                                         r".*v3/shards/shard-000000.tar, \.\.\.\)"):
        load_catalog(str(tmp_path / "*" / "shards" / "*.tar"))


@pytest.fixture(scope="module")
def two_folders(shard_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The first two shards of the session's data, copied as they are into two folders: the same shard names and
    keys, the same contents."""
    root = tmp_path_factory.mktemp("two_folders")
    out = []
    for name in ("webvid", "howto"):
        (root / name).mkdir()
        for stem in ("shard-000000", "shard-000001"):
            for ext in (".tar", ".idx.json"):
                shutil.copy(shard_dir / f"{stem}{ext}", root / name / f"{stem}{ext}")
        out.append(root / name)
    return out[0], out[1]


def _epoch_keys(loader: VideoPackedLoader) -> tuple[list[str], list[str]]:
    """Every pack of the first epoch's (planned keys, keys left out by data.exclude)."""
    packs = [next(loader) for _ in range(loader.planner.num_packs(0))]
    return [k for p in packs for k in p.planned_keys], [k for p in packs for k in p.excluded]


def test_samples_of_two_folders_with_the_same_names_have_keys_of_their_own(two_folders, tmp_path, caplog):
    webvid, howto = two_folders
    cfg = small_cfg(f"{webvid},{howto}", tmp_path)
    planned, _ = _epoch_keys(VideoPackedLoader(cfg, seed=11, pixels=False))
    n = len(load_catalog(str(webvid)))
    assert len(planned) == 2 * n and len(set(planned)) == 2 * n, planned        # every sample once, by its own key
    assert {k.split("/")[0] for k in planned} == {"webvid", "howto"}
    key = next(k for k in planned if k.startswith("howto/"))
    old = key.split("/", 1)[1]                  # "shard-00000N.tar/<key>", as keys were before: both samples

    def left_out(lines: list[str]) -> VideoPackedLoader:
        (tmp_path / "x.txt").write_text("\n".join(lines) + "\n")
        return VideoPackedLoader(cfg, seed=11, exclude=read_exclude(str(tmp_path / "x.txt")), pixels=False)

    one = left_out([json.dumps({"sample": key})])     # as a nonfinite.jsonl record names it: that sample alone
    assert one.unmatched == [] and one.ambiguous == {}
    got, excluded = _epoch_keys(one)
    assert excluded == [key] and got == planned and one.stats["samples_excluded"] == 1
    # the same sample by more of its path (the shard's absolute path); a folder the data does not have
    one = left_out([f"{howto}/{old}", f"elsewhere/{old}"])
    assert one.unmatched == [f"elsewhere/{old}"] and _epoch_keys(one)[1] == [key]
    # a list written before keys named folders: still leaves out what it did (both), and says so
    both = left_out([old])
    with caplog.at_level(logging.WARNING, logger="data.video.loader"):
        assert both.unmatched == []
    assert both.ambiguous == {old: [f"howto/{old}", f"webvid/{old}"]}       # in the catalog's order (by path)
    assert f"first: {old} names howto/{old}, webvid/{old}" in caplog.text, caplog.text
    assert sorted(_epoch_keys(both)[1]) == sorted([f"webvid/{old}", key])


def test_the_long_and_short_sources_name_their_shards_apart(two_folders, tmp_path):
    webvid, howto = two_folders
    cfg = small_cfg(str(webvid), tmp_path, long_shards=str(howto), long_fraction=0.5)
    (tmp_path / "x.txt").write_text("howto/shard-000000.tar/" + load_catalog(str(howto))[0].key + "\n")
    loader = VideoPackedLoader(cfg, seed=3, exclude=read_exclude(str(tmp_path / "x.txt")), pixels=False)
    first = load_catalog(str(webvid))[0].key           # the first sample of each source: the same file and key
    assert [p.key(0) for p in loader.planners] == [f"webvid/shard-000000.tar/{first}",
                                                   f"howto/shard-000000.tar/{first}"]
    assert loader.unmatched == [] and loader.ambiguous == {}
    assert loader.exclude_keys == {"howto/shard-000000.tar/" + load_catalog(str(howto))[0].key}


def test_the_plans_stay_those_of_the_shard_file_names(two_folders):
    """Frames are jittered by "<shard file name>/<key>" as before folders were named: a run whose shard names were
    ambiguous keeps its plans, so its saved loader state resumes exactly. Reference: each folder alone (names not
    ambiguous), at the same seed."""
    webvid, howto = two_folders
    both = VideoPackedLoader(small_cfg(f"{webvid},{howto}", frame_jitter=0.9), seed=5, pixels=False)
    alone = VideoPackedLoader(small_cfg(str(webvid), frame_jitter=0.9), seed=5, pixels=False)
    plain = VideoPackedLoader(small_cfg(str(webvid)), seed=5, pixels=False)
    by_name = {alone.planner.sample_name(u): u for u in range(len(alone.catalog))}
    for u in range(len(both.catalog)):
        d = both.planner.doc(u, 0)
        ref = alone.planner.doc(by_name[d.key.split("/", 1)[1]], 0)
        assert np.array_equal(d.frames.indices, ref.frames.indices), d.key
    # the jitter moves frames (else the comparison could not tell one seeding from another)
    assert any(not np.array_equal(alone.planner.doc(u, 0).frames.indices, plain.planner.doc(u, 0).frames.indices)
               for u in range(len(alone.catalog)))


def _folder(out: Path, samples: list[tuple[str, bytes, dict, dict]]) -> Path:
    """A shard-000000.tar in `out` of (key, video bytes, its verified metadata, annotation) samples."""
    out.mkdir(parents=True)
    w = ShardWriter(out, 0)
    for i, (key, data, video, annotation) in enumerate(samples):
        (out / f"v{i}.mp4").write_bytes(data)
        w.add_sample(key, str(out / f"v{i}.mp4"), "mp4", {"video": video, "annotation": annotation})
    w.close()
    return out


def test_the_quarantine_records_name_the_folder_of_a_bad_sample(shard_dir, tmp_path):
    """howto's `clip` cannot be decoded (webvid's can), and both folders' `bad` have a text that cannot be planned:
    one record for each bad sample, naming its folder."""
    r = load_catalog(str(shard_dir))[0]
    good = Path(r.shard).read_bytes()[r.video_offset:r.video_offset + r.video_size]
    ann, two = r.annotation, {"prompt": "<video> and <video>"}      # a video's text with 2 markers: not planned
    webvid = _folder(tmp_path / "webvid", [("clip", good, r.video, ann), ("bad", good, r.video, two)])
    howto = _folder(tmp_path / "howto", [("clip", b"\0" * 4096, r.video, ann), ("bad", good, r.video, two)])
    cfg = small_cfg(f"{webvid},{howto}", tmp_path, decode_backend="pyav", decode_isolation="inline", num_epochs=1)
    loader = VideoPackedLoader(cfg, seed=0)
    packs = list(loader)
    assert sorted(k for p in packs for k in p.sample_keys) == ["webvid/shard-000000.tar/clip"]
    got = sorted((q["stage"], q["shard"], q["key"]) for q in read_jsonl(cfg.quarantine_path))
    assert got == [("decode", "howto/shard-000000.tar", "clip"), ("plan", "howto/shard-000000.tar", "bad"),
                   ("plan", "webvid/shard-000000.tar", "bad")], got


def test_a_later_piece_of_a_long_text_named_is_held(tmp_path):
    """A nonfinite.jsonl record names a later piece of a text longer than a sequence as "<shard>/<key>#<piece>": it
    is left out, and not reported as a sample the data does not hold."""
    from data.video.ingest import IngestOptions, ingest

    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "0:" + "a" * 700}) + "\n")
    ingest(IngestOptions(videos=None, annotations=str(tmp_path / "t.jsonl"), out=str(tmp_path / "s"), progress=False))
    cfg = small_cfg(tmp_path / "s", seq_len=300, num_epochs=1)
    keys = [k for p in VideoPackedLoader(cfg, seed=0) for k in p.sample_keys]
    assert len(keys) == 3 and keys[1] == keys[0] + "#1", keys          # 700 characters: 3 pieces
    (tmp_path / "x.txt").write_text(f"{keys[1]}\n{keys[0]}#7\n")        # a piece the text does not have
    loader = VideoPackedLoader(cfg, seed=0, exclude=read_exclude(str(tmp_path / "x.txt")))
    assert [k for p in loader for k in p.sample_keys] == [keys[0], keys[2]]
    assert loader.unmatched == [f"{keys[0]}#7"]


def test_token_files_of_one_base_name_in_a_mixture_are_named_apart(two_folders, tmp_path, caplog):
    """data.video.text_tokens with a/web and b/web: a row's documents are "a/web#<n>" and "b/web#<n>", and a list
    naming one leaves out that one alone. Reference: each document's tokens are one id of its own (a's 1.., b's
    200..), so the ids left in the rows say which documents were left out."""
    from data.token_files import TokenPacks, write_token_files
    from data.video.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    rng = np.random.default_rng(5)
    for f, first in (("a", 1), ("b", 200)):
        (tmp_path / f).mkdir()
        write_token_files([[first + i] * int(rng.integers(1, 40)) for i in range(30)], tmp_path / f / "web",
                          vocab_size=512, meta={"tokenizer": repr(tok), "eos_id": tok.eos_id})
    spec = f"{tmp_path / 'a' / 'web'},{tmp_path / 'b' / 'web'}"
    cfg = small_cfg(two_folders[0], seq_len=48)

    def rows(lines: list[str]) -> tuple[set[int], set[str]]:
        """The ids in every row of the source's first epoch, and the keys its packs list as left out."""
        packs = TokenPacks(spec, cfg, tok, 3)
        packs.source.leave_out(read_exclude(str(_list(tmp_path, lines))))
        built = [packs.build(0, j) for j in range(packs.num_packs(0))]
        return {int(t) for p in built for t in p.tokens[p.loss_mask > 0]}, {k for p in built for k in p.excluded}

    every, _ = rows([])
    assert {5, 204} <= every
    ids, left = rows(["a/web#4"])
    assert every - ids == {5} and left == {"a/web#4"}
    ids, left = rows(["web#4"])             # by the base name alone, as before: both files' document 4
    assert every - ids == {5, 204} and left == {"a/web#4", "b/web#4"}
    loader = VideoPackedLoader(small_cfg(two_folders[0], text_tokens=spec, text_tokens_fraction=0.3,
                                         decode_isolation="inline"),
                               seed=3, exclude=read_exclude(str(_list(tmp_path, ["web#4"]))), pixels=False)
    with caplog.at_level(logging.WARNING, logger="data.video.loader"):
        assert loader.unmatched == []
    assert loader.ambiguous == {"web#4": ["a/web#4", "b/web#4"]}, loader.ambiguous
    assert "first: web#4 names a/web#4, b/web#4" in caplog.text, caplog.text


def _list(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "x.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "x.txt"
