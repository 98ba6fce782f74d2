"""The paths ingest meets: file names that are not UTF-8, records naming their file by an absolute path, a path out
of --videos or an empty one, linked folders (into --videos or out of it, and a loop), a link to nothing, and a copy of
an MP4 cut off within its index. Each is ingested with its record or rejected with the reason that fits, and the
rest of the folder is ingested: before, a name that was not UTF-8 stopped the whole ingest with a traceback, an
absolute path stored its video without its caption and rejected the record as an unsupported '.mp4', a linked folder
was not listed, and a link to nothing was rejected as an `exception`."""
import json
import os

from data.video.ingest import IngestOptions, ingest
from data.video.shards import load_catalog, make_key
from data.video.synthetic import VideoSpec, write_video

from .conftest import read_jsonl


def _clip(path, seed=0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, VideoSpec(n_frames=12, width=48, height=32, fps=12, seed=seed, **kw))


def _run(vids, out, records=None):
    ann = None
    if records is not None:
        ann = out.parent / f"{out.name}.jsonl"
        ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = ingest(IngestOptions(videos=str(vids), annotations=None if ann is None else str(ann), out=str(out),
                                   workers=1, progress=False))
    keys = {make_key(rel): rel for rel in _files(vids)}
    samples = {keys[r.key]: r.annotation for r in load_catalog(str(out))} if list(out.glob("*.tar")) else {}
    rejects = {r["video"]: r for r in read_jsonl(out / "rejects.jsonl")} if (out / "rejects.jsonl").exists() else {}
    return summary, samples, rejects


def _files(vids):
    """Every relative path under `vids`, through links (the names a sample's key may be made from)."""
    out = []
    for dirpath, dirs, files in os.walk(vids, followlinks=True):
        dirs[:] = [d for d in dirs if d != "loop"]
        out += [os.path.relpath(os.path.join(dirpath, f), vids) for f in files if f.isprintable()]
    return out


def test_a_file_whose_name_is_not_utf8_is_rejected_and_the_folder_ingested(tmp_path):
    vids = tmp_path / "videos"
    _clip(vids / "ok.mp4")
    bad = os.fsencode(str(vids)) + b"/caf\xe9.mp4"          # a Latin-1 name, as old archives and unzip leave them
    with open(bad, "wb") as f:
        f.write((vids / "ok.mp4").read_bytes())
    summary, samples, rejects = _run(vids, tmp_path / "out")
    assert set(samples) == {"ok.mp4"}
    name = os.fsdecode(b"caf\xe9.mp4")
    assert rejects[name]["reason"] == "bad_file_name"
    assert rejects[name]["detail"].startswith("caf\\xe9.mp4: its name is not UTF-8")
    assert summary["this_run"]["accepted"] == 1
    # a rerun finds it done (one reject line), and once renamed it is ingested
    _run(vids, tmp_path / "out")
    assert len(read_jsonl(tmp_path / "out" / "rejects.jsonl")) == 1
    os.rename(bad, vids / "cafe.mp4")
    _, samples, _ = _run(vids, tmp_path / "out2")
    assert set(samples) == {"ok.mp4", "cafe.mp4"}


def test_record_paths_and_linked_folders(tmp_path):
    vids, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    for i, rel in enumerate(["a.mp4", "sub/e.mp4"]):
        _clip(vids / rel, seed=i)
    for i, name in enumerate(["c.mp4", "d.mp4", "f.mp4"]):
        _clip(elsewhere / name, seed=10 + i)
    os.symlink(elsewhere, vids / "linked")           # a folder linked in from outside: listed
    os.symlink(vids / "sub", vids / "alias")         # a link to a folder inside: its files are listed as sub/...
    os.symlink(vids, vids / "sub" / "loop")          # a loop
    os.symlink(tmp_path / "nothing.mp4", vids / "dangling.mp4")
    records = [{"video": str(vids / "a.mp4"), "caption": "absolute, inside"},
               {"video": "linked/c.mp4", "caption": "through a folder linked in"},
               {"video": "alias/e.mp4", "caption": "through a link into the folder"},
               {"video": "../elsewhere/f.mp4", "caption": "out of the folder"},
               {"video": str(elsewhere / "f.mp4"), "caption": "absolute, outside"},
               {"video": "", "caption": "no path"}]
    summary, samples, rejects = _run(vids, tmp_path / "out", records)
    assert set(samples) == {"a.mp4", "sub/e.mp4", "linked/c.mp4", "linked/d.mp4", "linked/f.mp4"}
    assert samples["a.mp4"] == {"video": "a.mp4", "caption": "absolute, inside"}   # stored by its place in --videos
    assert samples["linked/c.mp4"]["caption"] == "through a folder linked in"
    assert "caption" not in samples["sub/e.mp4"]
    assert {k: r["reason"] for k, r in rejects.items()} == {
        "alias/e.mp4": "bad_annotation", "../elsewhere/f.mp4": "bad_annotation",
        str(elsewhere / "f.mp4"): "bad_annotation", "": "bad_annotation", "dangling.mp4": "missing_file"}
    assert rejects["alias/e.mp4"]["detail"].endswith("through a linked folder, whose files ingest lists by their own "
                                                     "paths: name it 'sub/e.mp4'")
    assert "a path out of --videos" in rejects["../elsewhere/f.mp4"]["detail"]
    assert f"not under --videos {vids}" in rejects[str(elsewhere / "f.mp4")]["detail"]
    assert rejects[""]["detail"].endswith(":6: field 'video' '': an empty path")
    assert rejects["dangling.mp4"]["detail"] == f"a link to {str(tmp_path / 'nothing.mp4')!r}, which does not exist"


def test_an_mp4_cut_within_its_index_is_an_open_failure(tmp_path):
    """A download or copy cut short of an MP4 whose moov atom follows its media (a camera's, ffmpeg's default), cut
    within that atom, opens with no stream at all: it was `no_video_stream` ('streams: []'), an audio file's reason."""
    vids = tmp_path / "videos"
    whole = _clip(tmp_path / "whole.mp4", faststart=False)
    data = (tmp_path / "whole.mp4").read_bytes()
    assert whole and data.find(b"moov") > data.find(b"mdat") > 0
    vids.mkdir()
    (vids / "cut.mp4").write_bytes(data[: data.find(b"moov") + 100])      # the media whole, its index (moov) cut
    _, _, rejects = _run(vids, tmp_path / "out")
    assert rejects["cut.mp4"]["reason"] == "open_failed"
    assert "cut off within its moov atom" in rejects["cut.mp4"]["detail"]
