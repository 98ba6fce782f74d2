"""Ingest: every bad file type is rejected with a reason or accepted with correct metadata; the
shards are readable with the index; an interrupted ingest resumes; proxies are frame-correct."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import pytest

from data.video.ingest import IngestOptions, ingest
from data.video.shards import load_catalog, read_member
from data.video.synthetic import (VideoSpec, annotation_for, make_bad_videos, make_synthetic_videos,
                                  read_counter, write_video)

from .conftest import read_jsonl

EXPECTED_REASONS = {
    "zero_byte.mp4": {"empty_file"},
    "truncated_in_header.mp4": {"open_failed"},
    "truncated_after_header.mp4": {"decode_error", "no_frames"},
    "truncated_in_middle.mp4": {"decode_error", "truncated"},
    "garbage_in_middle.mp4": {"decode_error", "corrupt_frames"},
    "not_a_video.mp4": {"open_failed"},
    "audio_only.mp4": {"no_video_stream"},
    "ghost.mp4": {"missing_file"},
}


@pytest.fixture(scope="module")
def bad_ingest(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    vids = root / "videos"
    cases = make_bad_videos(vids, seed=3)
    good = write_video(vids / "good.mp4", VideoSpec(n_frames=36, width=96, height=64, fps=12, seed=9))
    ann = [annotation_for("good.mp4", good), {"video": "ghost.mp4", "caption": "no such file"},
           {"video": "rotated_90.mp4", "caption": "rotated"}]
    (root / "ann.jsonl").write_text("".join(json.dumps(a) + "\n" for a in ann) + "not json\n")
    summary = ingest(IngestOptions(videos=str(vids), annotations=str(root / "ann.jsonl"), out=str(root / "out"),
                                   shard_size_mb=0.02, workers=2, progress=False))
    return root, cases, summary


def test_bad_files_rejected_with_reason(bad_ingest):
    root, cases, summary = bad_ingest
    rejects = {r["video"]: r for r in read_jsonl(root / "out" / "rejects.jsonl")}
    assert set(rejects) == set(EXPECTED_REASONS)
    for name, allowed in EXPECTED_REASONS.items():
        assert rejects[name]["reason"] in allowed, (name, rejects[name])
        assert rejects[name]["detail"] or rejects[name]["reason"] == "empty_file"
    assert summary["num_rejected"] == len(EXPECTED_REASONS)


def test_accepted_files_have_verified_metadata(bad_ingest):
    root, cases, summary = bad_ingest
    cat = {r.annotation["video"]: r for r in load_catalog(str(root / "out"))}
    accepted = {n for n, c in cases.items() if c["expect"] == "accept"} | {"good.mp4"}
    assert set(cat) == accepted and summary["num_samples"] == len(accepted)
    for name in accepted - {"good.mp4"}:
        c, v = cases[name], cat[name].video
        assert v["num_frames"] == c["n_frames"], name
        assert (v["width"], v["height"]) == (c["width"], c["height"]), name      # after rotation
        assert v["rotation"] == c["rotation"]
        assert v["duration_s"] == pytest.approx(c["duration"] if c["rotation"] or "variable" not in name
                                                else c["times"][-1] + (c["times"][-1] - c["times"][-2]), abs=0.2)
        assert v["keyframe_interval_s"]["max"] > 0 and v["codec"] in ("h264", "mpeg4")
    assert cat["variable_frame_rate.mp4"].video["vfr"] is True
    assert cat["good.mp4"].video["vfr"] is False
    assert cat["odd_resolution.mp4"].video["decord_seek_ok"] is False          # mpeg4 + B-frames
    assert cat["rotated_90.mp4"].annotation["caption"] == "rotated"
    assert cat["odd_resolution.mp4"].annotation == {"video": "odd_resolution.mp4"}  # unannotated: kept


def test_shards_are_plain_webdataset_tars(bad_ingest):
    root, _, _ = bad_ingest
    r = next(iter(load_catalog(str(root / "out"))))
    with tarfile.open(r.shard) as tar:
        names = tar.getnames()
        m = tar.getmember(f"{r.key}.{r.video_ext}")
        assert m.offset_data == r.video_offset and m.size == r.video_size
        rec = json.loads(tar.extractfile(f"{r.key}.json").read())
    assert names.index(f"{r.key}.json") + 1 == names.index(f"{r.key}.{r.video_ext}")
    assert rec["video"] == r.video and rec["key"] == r.key
    blob = read_member(r.shard, r.video_offset, r.video_size)
    assert blob[4:8] == b"ftyp"


def test_synthetic_videos_are_reproducible(tmp_path):
    """The same seed writes the same files, byte for byte: training runs that the tests compare
    each make their own synthetic videos (with x264's SIMD routines on, the PyAV 17 / 18 wheels
    encoded the same frames differently from run to run). Eight videos: the sizes and frame
    counts that differed then."""
    a, _ = make_synthetic_videos(tmp_path / "a", 8, seed=0)
    b, _ = make_synthetic_videos(tmp_path / "b", 8, seed=0)
    names = sorted(p.name for p in a.iterdir())
    assert len(names) == 8 and names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_ingest_writes_the_listing_order_whatever_order_workers_finish(tmp_path, monkeypatch):
    """The same videos make the same shards: samples are written in the listing's (sorted) order even when the
    workers finish in another. The first video's job waits until every other job has finished (an event, not a
    sleep: under a loaded machine sleeps did not order them); the control is a one-worker ingest. Before, results
    were written as they finished, so two ingests of the same videos gave different shards and a training run on
    them different batches."""
    import threading
    from data.video import ingest as ingest_mod

    vids, ann = make_synthetic_videos(tmp_path, 6, seed=5, max_seconds=2.0)
    names = sorted(p.name for p in vids.iterdir())
    job = ingest_mod._job
    finished: list[str] = []
    others_done = threading.Event()
    lock = threading.Lock()

    def slowed(pool, opts, root, rel, tmp):
        if rel == names[0]:      # the first in the listing finishes last
            assert others_done.wait(timeout=300), "the other jobs did not finish"
        r = job(pool, opts, root, rel, tmp)
        with lock:
            finished.append(rel)
            if len(finished) == len(names) - 1 and names[0] not in finished:
                others_done.set()
        return r

    def shards(out: Path, workers: int) -> list[list[str]]:
        ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(out), shard_size_mb=0.015,
                             workers=workers, progress=False))
        return [json.loads(line)["videos"] for line in (out / "ingest_manifest.jsonl").read_text().splitlines()]

    one = shards(tmp_path / "one", 1)
    monkeypatch.setattr(ingest_mod, "_job", slowed)
    many = shards(tmp_path / "many", 6)
    assert finished[0] != names[0] and finished[-1] == names[0]  # the workers did finish out of order
    assert [v for s in one for v in s] == names
    assert many == one
    keys = lambda out: [r.key for r in load_catalog(str(out))]  # noqa: E731
    assert keys(tmp_path / "many") == keys(tmp_path / "one")


def test_ingest_resumes_after_interruption(tmp_path):
    vids, ann = make_synthetic_videos(tmp_path, 6, seed=5, max_seconds=2.0)
    out = tmp_path / "out"
    opts = dict(videos=str(vids), annotations=str(ann), out=str(out), shard_size_mb=0.015, workers=2,
                progress=False)
    s1 = ingest(IngestOptions(**opts))
    assert s1["num_samples"] == 6 and len(s1["shards"]) >= 2
    keys_full = sorted(r.key for r in load_catalog(str(out)))
    # simulate a crash while the last shard was being written: its manifest line is missing and a
    # half-written tmp file is left behind
    lines = (out / "ingest_manifest.jsonl").read_text().splitlines()
    lost = json.loads(lines[-1])
    (out / "ingest_manifest.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (out / "shard-000099.tar.tmp").write_bytes(b"partial")
    s2 = ingest(IngestOptions(**opts))
    assert s2["this_run"]["processed"] == len(lost["videos"])
    assert s2["this_run"]["skipped_already_done"] == 6 - len(lost["videos"])
    assert sorted(r.key for r in load_catalog(str(out))) == keys_full        # no loss, no duplicate
    assert not list(out.glob("*.tmp"))
    s3 = ingest(IngestOptions(**opts))                                       # nothing left to do
    assert s3["this_run"]["processed"] == 0 and s3["num_samples"] == 6


def test_proxy_is_2fps_small_and_frame_correct(tmp_path):
    vids = tmp_path / "v"
    vids.mkdir()
    truth = write_video(vids / "a.mp4", VideoSpec(n_frames=60, width=160, height=120, fps=12, seed=2))
    s = ingest(IngestOptions(videos=str(vids), out=str(tmp_path / "o"), proxy=True, proxy_short_side=56,
                             shard_size_mb=1, workers=1, progress=False))
    assert s["num_samples"] == 1
    r = load_catalog(str(tmp_path / "o"))[0]
    v, src = r.video, json.loads(read_member(r.shard, *_json_member(r)))["source"]
    assert src["num_frames"] == 60 and src["width"] == 160
    assert v["num_frames"] == 10 and v["fps"] == pytest.approx(2.0) and min(v["width"], v["height"]) <= 56
    assert v["keyframe_interval_s"]["max"] <= 1.0 + 1e-6
    p = tmp_path / "proxy.mp4"
    p.write_bytes(read_member(r.shard, r.video_offset, r.video_size))
    with av.open(str(p)) as c:
        got = [read_counter(f.to_ndarray(format="rgb24"), truth["counter_bits"]) for f in c.decode(video=0)]
    assert got == [6 * k for k in range(10)]          # proxy frame k = source frame at k/2 s


def _json_member(r):
    import json as _j
    idx = _j.loads(Path(r.shard[:-4] + ".idx.json").read_text())
    s = next(x for x in idx["samples"] if x["key"] == r.key)
    return s["json_offset"], s["json_size"]


def test_cli(tmp_path):
    vids = tmp_path / "v"
    vids.mkdir()
    write_video(vids / "a.mp4", VideoSpec(n_frames=12, width=64, height=48, fps=8, seed=1))
    (vids / "broken.mp4").write_bytes(b"")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, str(root / "launch" / "ingest.py"), "--videos", str(vids), "--out",
                        str(tmp_path / "o"), "--shard-size-mb", "1", "--workers", "1", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 videos accepted, 1 rejected" in r.stdout
    assert "0 text-only samples" in r.stdout
    r = subprocess.run([sys.executable, str(root / "launch" / "ingest.py"), "--videos", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "videos" in r.stderr
    shutil.rmtree(tmp_path / "o")


def test_cli_counts_rejected_images_apart_from_videos(tmp_path):
    """The summary line counted every reject under "videos accepted, N rejected", images too: a run whose only
    rejects were two images read "1 videos accepted, 2 rejected". Each kind now has its own count (here one broken
    video, one undecodable image, one image not found), and dataset.json keeps the total beside them."""
    vids, ann = make_synthetic_videos(tmp_path, 1, seed=2, max_seconds=2.5, n_images=1)
    (vids / "broken.mp4").write_bytes(b"")
    (vids / "bad.png").write_bytes(b"not a png\n" * 10)
    with open(ann, "a") as f:
        f.write(json.dumps({"image": "bad.png", "caption": "broken"}) + "\n")
        f.write(json.dumps({"image": "gone.png", "caption": "missing"}) + "\n")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "launch" / "ingest.py"), "--videos", str(vids), "--annotations",
                        str(ann), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(root)), timeout=120)
    assert r.returncode == 0, r.stderr
    rejects = read_jsonl(tmp_path / "o" / "rejects.jsonl")
    by_kind = {kind: {x["reason"] for x in rejects if kind in x} for kind in ("video", "image")}
    assert by_kind == {"video": {"empty_file"}, "image": {"decode_error", "missing_file"}}, rejects
    line = re.fullmatch(r"ingest: 1 videos accepted, 1 rejected \{'empty_file': 1\}, 1 image samples \(1 files\), "
                        r"2 rejected (\{.*\}), 0 text-only samples, .*", r.stdout.strip())
    assert line and ast.literal_eval(line[1]) == {"decode_error": 1, "missing_file": 1}, r.stdout
    run = json.loads((tmp_path / "o" / "dataset.json").read_text())["this_run"]
    assert (run["rejected"], run["videos_rejected"], run["images_rejected"]) == (3, 1, 2)
    assert run["rejected_by_reason"] == {"empty_file": 1, "decode_error": 1, "missing_file": 1}


def test_cli_refuses_an_empty_input_and_a_file_as_output(tmp_path):
    """An empty --videos folder (or one holding no video file) used to end with exit 0 and a dataset.json of 0
    shards, and an --out that is a file with FileExistsError's traceback; each is a clear error (exit 2) now, and
    nothing is written."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))

    def cli(*args):
        return subprocess.run([sys.executable, str(root / "launch" / "ingest.py"), *map(str, args), "--no-progress"],
                              capture_output=True, text=True, env=env, timeout=60)

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not a video")
    r = cli("--videos", empty, "--out", tmp_path / "o")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"ingest: nothing to ingest: no video file under --videos {empty} (searched recursively for mp4" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    (tmp_path / "ann.jsonl").write_text(json.dumps({"text": 5}) + "\n")    # its one record malformed
    r = cli("--videos", empty, "--annotations", tmp_path / "ann.jsonl", "--out", tmp_path / "o")
    assert r.returncode == 2 and f"and no usable record in --annotations {tmp_path / 'ann.jsonl'}" in r.stderr
    assert "field 'text' is int, not a string" in r.stderr and not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("")
    vids = tmp_path / "v"
    vids.mkdir()
    write_video(vids / "a.mp4", VideoSpec(n_frames=4, width=32, height=32, fps=4, seed=1))
    r = cli("--videos", vids, "--out", tmp_path / "afile")
    assert r.returncode == 2 and f"ingest: IngestOptions.out = '{tmp_path / 'afile'}': exists and is not a directory" \
        in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # an endless deadline: OverflowError's traceback at the first file (the guarded child's wait cannot be infinite)
    r = cli("--videos", vids, "--out", tmp_path / "o", "--timeout-s", "inf")
    assert r.returncode == 2 and "ingest: IngestOptions.timeout_s = inf: must be a finite number of seconds > 0" \
        in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("record,problem", [
    ({"text": 5, "qa": [{"q": "2+3?", "a": "5"}]}, "field 'text' is int, not a string"),
    ({"video": "a.mp4", "qa": {"question": "What tool?", "answer": "a screwdriver"}}, "field 'qa' is dict, not a list"),
    ({"video": "a.mp4", "caption": ["A person", "assembles a shelf"]}, "field 'caption' is list, not a string"),
    ({"video": "a.mp4", "prompt": 3}, "field 'prompt' is int, not a string"),
    ({"video": "a.mp4", "events": [{"start": "00:00:12", "end": "00:00:30", "text": "unpacks"}]},
     "'events'[0] = {\"start\": \"00:00:12\""),
    ({"video": "a.mp4", "events": [{"start": 1, "end": 2}]}, "'events'[0] = {\"start\": 1, \"end\": 2} is not"),
    ({"video": "a.mp4", "events": {"start": 1, "end": 2, "text": "one event"}}, "field 'events' is dict, not a list"),
    ({"video": "a.mp4", "events": 5}, "field 'events' is int, not a list"),
    ({"video": "a.mp4", "qa": [{"question": "What tool?", "answer": None}]}, "'qa'[0] = {\"question\": \"What tool?\""),
    ({"qa": [{"question": "only a question"}]}, "'qa'[0] = {\"question\": \"only a question\"} is not"),
    ({"images": ["a.png"], "qa": [{"q": "x?", "a": 4}]}, "'qa'[0] = {\"q\": \"x?\", \"a\": 4} is not"),
])
def test_wrong_typed_annotation_fields_are_reported_by_file_line_and_field(tmp_path, record, problem):
    """Each of these records used to be stored with the wrong-typed field (or part of it) silently dropped from its
    text, or (text 5) crashed the ingest; the text segments of the record are the reference for what was lost."""
    from data.video.ingest import read_annotations
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    got = read_annotations(str(ann))
    assert len(got.problems) == 1 and got.problems[0].startswith(f"{ann}:2: ") and problem in got.problems[0], \
        got.problems
    assert not got.videos and not got.images and [n for _, _, n in got.texts] == [1]
    assert list(got.bad_videos) == (["a.mp4"] if "video" in record else [])


def test_text_only_records_without_an_answer_are_not_stored(tmp_path):
    """The planner rejects a text-only sample without supervised text (`no_text`); ingest uses the same rule, so
    such records are reported at ingest and not stored."""
    from data.video.annotations import has_text
    from data.video.ingest import read_annotations
    recs = [{"qa": [{"q": "a question", "a": ""}]}, {"text": "   ", "prompt": "p"},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
            {"qa": [{"q": "2+2?", "a": "4"}]}]
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = read_annotations(str(ann))
    assert [n for _, _, n in got.texts] == [4] and [has_text(r) for r in recs] == [False, False, False, True]
    assert [p.split(": ", 1)[0] for p in got.problems] == [f"{ann}:{n}" for n in (1, 2, 3)]
    assert all("no text for a text-only sample" in p for p in got.problems)


def test_a_video_whose_record_is_malformed_is_rejected_not_ingested_bare(tmp_path):
    vids = tmp_path / "v"
    vids.mkdir()
    write_video(vids / "a.mp4", VideoSpec(n_frames=12, width=64, height=48, fps=12, seed=1))
    write_video(vids / "b.mp4", VideoSpec(n_frames=12, width=64, height=48, fps=12, seed=2))
    write_video(vids / "c.mp4", VideoSpec(n_frames=12, width=64, height=48, fps=12, seed=3))
    recs = [{"video": "a.mp4", "caption": "fine"},
            {"video": "b.mp4", "conversations": [{"from": "Human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
            {"video": "c.mp4", "qa": [{"question": "What?", "answer": None}]},
            {"text": 5, "qa": [{"q": "2+3?", "a": "5"}]}, {"text": "a text-only sample"}]
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = ingest(IngestOptions(videos=str(vids), annotations=str(tmp_path / "ann.jsonl"), out=str(tmp_path / "o"),
                                   workers=1, progress=False))
    rejects = {r["video"]: r for r in read_jsonl(tmp_path / "o" / "rejects.jsonl")}
    assert sorted(rejects) == ["b.mp4", "c.mp4"] and {r["reason"] for r in rejects.values()} == {"bad_annotation"}
    assert rejects["b.mp4"]["detail"].startswith(f"{tmp_path / 'ann.jsonl'}:2: 'conversations'[0]: from 'Human'")
    assert rejects["c.mp4"]["detail"].startswith(f"{tmp_path / 'ann.jsonl'}:3: 'qa'[0]")
    cat = load_catalog(str(tmp_path / "o"))
    assert sorted((c.key.startswith("text-"), c.annotation.get("video"), c.annotation.get("text")) for c in cat) == [
        (False, "a.mp4", None), (True, None, "a text-only sample")]
    r = summary["this_run"]
    assert (r["accepted"], r["rejected"], r["text_samples"], r["skipped_already_done"]) == (1, 2, 1, 0)


def test_annotations_as_a_json_array_with_a_bom_or_a_line_not_utf8(tmp_path):
    """A LLaVA-style .json (one array of records) used to give a 'not JSON' warning per line and the videos stored
    bare; a UTF-8 BOM dropped the first record; a latin-1 line aborted the ingest naming neither file nor line."""
    from data.video.ingest import AnnotationsError, read_annotations
    recs = [{"video": "a.mp4", "caption": "cap a"}, {"text": "un café"}, [1], {"video": "b.mp4", "caption": "cap b"}]
    arr = tmp_path / "arr.json"                 # item k on line k + 2: the lines the problems must name
    arr.write_text("\ufeff [\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n]\n",
                   encoding="utf-8")
    got = read_annotations(str(arr))
    assert got.videos == {"a.mp4": recs[0], "b.mp4": recs[3]} and [(r, n) for _, r, n in got.texts] == [(recs[1], 3)]
    assert got.problems == [f"{arr}:4: not a JSON object"]
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps([recs[0], recs[1]], indent=2))
    got = read_annotations(str(pretty))
    assert list(got.videos) == ["a.mp4"] and [n for _, _, n in got.texts] == [6] and not got.problems
    for text, line in (("[\n" + json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n]", 3),   # a comma missing
                       ("[" + json.dumps(recs[0]) + ",\n", 2), ("[1]\n[2]\n", 2)):
        arr.write_text(text)
        with pytest.raises(AnnotationsError, match=f"^{arr}:{line}: a JSON array of records .*but not valid JSON"):
            read_annotations(str(arr))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs[0]).encode() + b"\n"
                      + '{"text": "un café"}\n'.encode("latin-1") + json.dumps(recs[3]).encode() + b"\n")
    got = read_annotations(str(jsonl))
    assert list(got.videos) == ["a.mp4", "b.mp4"] and not got.texts and len(got.problems) == 1
    assert got.problems[0].startswith(f"{jsonl}:2: not UTF-8")


def test_videos_without_a_record_are_named_in_the_summary(tmp_path, capsys):
    """A user holding videos out (a held-out set) by leaving them out of --annotations, in the same --videos folder:
    they were ingested as samples without text and the summary said only '2 videos accepted'. It now names them."""
    from data.video.ingest import main
    vids = tmp_path / "v"
    vids.mkdir()
    for name, seed in (("train.mp4", 1), ("held_out.mp4", 2)):
        write_video(vids / name, VideoSpec(n_frames=8, width=64, height=48, fps=8, seed=seed))
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    (tmp_path / "ann.jsonl").write_text(json.dumps({"video": "train.mp4", "conversations": conv}) + "\n")
    assert main(["--videos", str(vids), "--annotations", str(tmp_path / "ann.jsonl"), "--out", str(tmp_path / "o"),
                 "--workers", "1", "--no-progress", "--scene-fps", "0", "--no-decord-check"]) == 0
    out = capsys.readouterr().out
    assert "ingest: 2 videos accepted" in out
    assert (f"ingest: 1 of the videos under {vids} have no record in {tmp_path / 'ann.jsonl'} (e.g. held_out.mp4): "
            f"they are samples without text") in out
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["this_run"]["unannotated_first"] == \
        ["held_out.mp4"]


def test_several_records_for_one_video_make_a_sample_each_and_repeats_are_counted(tmp_path, capsys):
    """A video's further records used to be dropped with a warning (a sample kept its first); each is now a sample of
    its own. A record that repeats one exactly is reported and counted, as are the further records of an image set
    (an image sample keeps its first)."""
    from data.video.ingest import main
    from data.video.shards import make_key
    vids = tmp_path / "v"
    vids.mkdir()
    write_video(vids / "a.mp4", VideoSpec(n_frames=12, width=64, height=48, fps=12, seed=1))
    shutil.copy(vids / "a.mp4", vids / "b.png")            # never decoded: its second record is left out first
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    recs = [{"video": "a.mp4", "conversations": conv}, {"video": "a.mp4", "caption": "second"},
            {"video": "./a.mp4", "caption": "third"}, "not a record", {"video": "./a.mp4", "conversations": conv},
            {"image": "b.png", "caption": "x"}, {"image": "b.png", "caption": "y"}]
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["--videos", str(vids), "--annotations", str(tmp_path / "ann.jsonl"), "--out", str(tmp_path / "o"),
                 "--workers", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "ingest: 1 videos accepted (+2 samples of their further annotation records)" in out
    assert ("ingest: 3 annotation problems, warned above (their records left out): 2 of them records their sample "
            "had already") in out
    assert f"{tmp_path / 'ann.jsonl'}:5: the same record for 'a.mp4' as line 1, ignored" in err
    assert ":7: second record for 'b.png' ignored" in err
    s = json.loads((tmp_path / "o" / "dataset.json").read_text())["this_run"]
    assert (s["annotation_problems"], s["records_ignored_extra"], s["extra_record_samples"], s["accepted"]) == \
        (3, 2, 2, 1)
    got = {c.key: c.annotation for c in load_catalog(str(tmp_path / "o")) if c.kind == "video"}
    k = make_key("a.mp4")
    assert got == {k: recs[0], f"{k}-r1": recs[1], f"{k}-r2": recs[2]}


def _multi_record_videos(root: Path) -> tuple[Path, Path, list[dict], dict]:
    """Two videos: b.mp4 with three records (different QA) and one exact repeat of its first, a.mp4 with one record;
    (videos, annotations, records, each video's ground truth)."""
    vids = root / "v"
    vids.mkdir()
    truth = {"a.mp4": write_video(vids / "a.mp4", VideoSpec(n_frames=24, width=64, height=48, fps=12, seed=1)),
             "b.mp4": write_video(vids / "b.mp4", VideoSpec(n_frames=30, width=80, height=64, fps=10, seed=2))}
    qa = lambda q, a: {"qa": [{"question": q, "answer": a}], "counter_bits": truth["b.mp4"]["counter_bits"]}  # noqa
    recs = [{"video": "b.mp4", **qa("What moves?", "A square.")},
            {"video": "a.mp4", "caption": "one record", "counter_bits": truth["a.mp4"]["counter_bits"]},
            {"video": "b.mp4", **qa("What colour is it?", "Blue.")},
            {"video": "b.mp4", **qa("What moves?", "A square.")},             # the first again: reported, ignored
            {"video": "b.mp4", **qa("How long is it?", "Three seconds.")}]
    ann = root / "ann.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return vids, ann, recs, truth


def test_a_video_with_several_records_is_stored_once_and_read_by_each_sample(tmp_path):
    """Each record of a video is a sample (keys `<key>`, `<key>-r1`, `<key>-r2` in file order) whose index entry points
    at the one stored copy of the video; the tar itself (read with tarfile) is the reference for what is stored, the
    source file for the bytes, and scan_shard of the tar without its index gives the same samples."""
    from data.video.shards import index_path, make_key, scan_shard
    vids, ann, recs, _ = _multi_record_videos(tmp_path)
    out = tmp_path / "o"
    s = ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(out), workers=1, progress=False))
    cat = list(load_catalog(str(out)))
    kb = make_key("b.mp4")
    assert [c.key for c in cat] == [make_key("a.mp4"), kb, kb + "-r1", kb + "-r2"]
    assert [c.annotation for c in cat] == [recs[1], recs[0], recs[2], recs[4]]
    r = s["this_run"]
    assert (s["num_samples"], r["accepted"], r["extra_record_samples"], r["records_ignored_extra"]) == (4, 2, 2, 1)
    source = {n: (vids / n).read_bytes() for n in ("a.mp4", "b.mp4")}
    for c in cat:
        assert read_member(c.shard, c.video_offset, c.video_size) == source[c.annotation["video"]], c.key
        assert c.video == cat[1 if c.key.startswith(kb) else 0].video and c.video_ext == "mp4"
    (shard,) = {c.shard for c in cat}
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert sorted(members) == sorted([f"{make_key('a.mp4')}.json", f"{make_key('a.mp4')}.mp4", f"{kb}.json",
                                      f"{kb}.mp4", f"{kb}-r1.json", f"{kb}-r2.json"])
    assert [n for n, b in members.items() if b == source["b.mp4"]] == [f"{kb}.mp4"]      # the video's bytes once
    for i in (1, 2):
        rec = json.loads(members[f"{kb}-r{i}.json"])
        assert rec["key"] == f"{kb}-r{i}" and rec["video_member"] == f"{kb}.mp4" and rec["source_path"] == "b.mp4"
        assert rec["annotation"] == recs[2 * i] and rec["video"] == cat[1].video
    fields = ("key", "video_member", "video_offset", "video_size", "video", "annotation", "source_path")
    written = [{f: e[f] for f in fields} for e in json.loads(Path(index_path(shard)).read_text())["samples"]]
    os.rename(index_path(shard), str(tmp_path / "idx.json"))
    assert [{f: e[f] for f in fields} for e in scan_shard(shard)["samples"]] == written
    rescanned = list(load_catalog(str(out)))
    assert [(c.key, c.video_offset, c.video_size, c.annotation) for c in rescanned] == \
        [(c.key, c.video_offset, c.video_size, c.annotation) for c in cat]


def test_an_ingest_interrupted_among_a_videos_records_resumes_writing_each_once(tmp_path, monkeypatch):
    """The done-list is per video: a run stopped after b.mp4's first sample but before its further ones left no
    completed shard for it, so the rerun writes the video and all its records, each once."""
    from data.video.shards import ShardWriter
    vids, ann, _, _ = _multi_record_videos(tmp_path)
    opts = dict(videos=str(vids), annotations=str(ann), shard_size_mb=0.001, workers=1, progress=False)
    ingest(IngestOptions(out=str(tmp_path / "ref"), **opts))
    ref = [c.key for c in load_catalog(str(tmp_path / "ref"))]
    assert len(ref) == len(set(ref)) == 4
    shared = ShardWriter.add_shared_sample
    calls = []

    def stop_at_the_second(self, *a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return shared(self, *a, **k)

    out = tmp_path / "o"
    monkeypatch.setattr(ShardWriter, "add_shared_sample", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        ingest(IngestOptions(out=str(out), **opts))
    monkeypatch.setattr(ShardWriter, "add_shared_sample", shared)
    assert [c.key for c in load_catalog(str(out))] == ref[:1]           # a.mp4's shard completed, b.mp4's not
    s = ingest(IngestOptions(out=str(out), **opts))
    assert (s["this_run"]["processed"], s["this_run"]["skipped_already_done"]) == (1, 1)
    assert s["this_run"]["extra_record_samples"] == 2 and s["num_samples"] == 4
    assert [c.key for c in load_catalog(str(out))] == ref
    s = ingest(IngestOptions(out=str(out), **opts))                     # nothing left: nothing written again
    assert s["this_run"]["processed"] == 0 and s["num_samples"] == 4 and len(s["shards"]) == 2


def test_an_unsupported_extension_is_not_a_missing_file_and_every_reject_is_counted(tmp_path):
    """A file of an extension ingest does not read (a partial download, '.part') that the annotations name was
    rejected as 'missing_file: not found under --videos' although it is there; and the run's summary left the
    missing files out of its rejected count (the reference: rejects.jsonl). An older phone's .3gp was such a file
    too ('unsupported_extension'); it is a video like the MP4 it is.
    Also the GIF and WebP cases: an animated GIF that a record names was 'unsupported_extension'; it is now a video
    sample stored as the MP4 it is converted to (tests/data/test_video_kinds.py checks its frames). A still WebP of
    the folder (a thumbnail) is rejected as 'still_image', and an animated WebP that an image record names is that
    image only, not also a video of the listing.
    And APNG and animated AVIF: neither was listed, and one that a record named was 'unsupported_extension'; now each
    is a video (`.apng`, or `.png` / `.avif` when it is animated). A still `.png` of the folder (a poster, an extracted
    frame) is not listed, so not a reject; one that a video record names is rejected as 'still_image'."""
    import numpy as np
    from PIL import Image, features

    from data.video.ingest import list_videos
    from data.video.shards import make_key, scan_shard

    from .test_video_kinds import _animation, _apng

    vids = tmp_path / "v"
    vids.mkdir()
    write_video(vids / "a.mp4", VideoSpec(n_frames=12, width=64, height=48, fps=12, seed=1))
    shutil.copy(vids / "a.mp4", vids / "clip.3gp")
    shutil.copy(vids / "a.mp4", vids / "clip.mp4.part")
    _animation(str(vids / "anim.gif"), "gif", [100, 200, 100])
    _animation(str(vids / "thumb.webp"), "webp", [100])
    _animation(str(vids / "pic.webp"), "webp", [100, 100])
    shutil.copy(vids / "a.mp4", vids / "gifv.gif")                   # an MP4 named .gif, as web sites serve them
    block = np.full((8, 8, 4), 255, np.uint8)
    _apng(str(vids / "sticker.apng"), 8, 8, [(block, 0, 0, 1, 10, 0, 0), (block // 2, 0, 0, 1, 10, 0, 0)])
    shutil.copy(vids / "sticker.apng", vids / "motion.png")
    Image.new("RGB", (8, 8)).save(vids / "poster.png")                # still PNGs: a poster that a record names,
    Image.new("RGB", (8, 8)).save(vids / "thumb.png")                 # and a thumbnail no record names
    avif = features.check("avif")
    if avif:
        _animation(str(vids / "anim.avif"), "avif", [100, 200])
    recs = [{"video": "clip.mp4.part", "caption": "c"}, {"video": "ghost.mp4", "caption": "g"},
            {"video": "clip.3gp", "caption": "an old phone's"},
            {"image": "ghost.png", "caption": "g"}, {"video": "a.mp4", "caption": "a"},
            {"video": "anim.gif", "caption": "a gif"}, {"image": "pic.webp", "caption": "its first frame"},
            {"video": "motion.png", "caption": "an APNG"}, {"video": "poster.png", "caption": "a still"}]
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    animations = ["motion.png", "sticker.apng"] + ["anim.avif"] * avif
    assert [v for v in list_videos(str(vids)) if v.endswith(("png", "avif"))] == sorted(animations)
    summary = ingest(IngestOptions(videos=str(vids), annotations=str(tmp_path / "ann.jsonl"), out=str(tmp_path / "o"),
                                   workers=1, progress=False))
    rejects = read_jsonl(tmp_path / "o" / "rejects.jsonl")
    by = {r.get("video") or r.get("image"): r for r in rejects}
    assert {k: r["reason"] for k, r in by.items()} == {
        "clip.mp4.part": "unsupported_extension", "ghost.mp4": "missing_file", "ghost.png": "missing_file",
        "thumb.webp": "still_image", "poster.png": "still_image"}
    assert "'.part' is not one ingest reads (mp4 mkv webm mov avi m4v ts" in by["clip.mp4.part"]["detail"]
    assert "a PNG of one frame is a still image" in by["poster.png"]["detail"]
    r = summary["this_run"]
    assert r["rejected"] == len(rejects) == summary["num_rejected"] == 5 and r["accepted"] == 4 + len(animations)
    assert r["rejected_by_reason"] == {"unsupported_extension": 1, "missing_file": 2, "still_image": 2}
    assert r["skipped_already_done"] == 0
    members, scanned = set(), set()
    for shard in sorted((tmp_path / "o").glob("*.tar")):
        with tarfile.open(shard) as t:
            members |= set(t.getnames())
        scanned |= {s["key"] for s in scan_shard(str(shard))["samples"]}     # an index rebuilt from the tar alone
    assert make_key("anim.gif") + ".mp4" in members and make_key("pic.webp") + ".webp" in members
    assert make_key("gifv.gif") + ".mp4" in members and make_key("clip.3gp") + ".3gp" in members
    assert {make_key(x) + ".mp4" for x in animations} <= members
    assert scanned == {make_key(x) for x in ["a.mp4", "anim.gif", "gifv.gif", "pic.webp", "clip.3gp"] + animations}


def test_retry_rejects_leaves_one_line_per_file_still_rejected(tmp_path):
    """`--retry-rejects` appended the retried files' rejects after their old lines: a file rejected again was
    counted twice in dataset.json, and a video accepted once its record was fixed stayed in rejects.jsonl and in
    `num_rejected`. The reference: the files that are rejected now, one line each."""
    vids = tmp_path / "v"
    vids.mkdir()
    write_video(vids / "a.mp4", VideoSpec(n_frames=12, width=64, height=48, fps=12, seed=1))
    (vids / "b.mp4").write_bytes(b"")
    ann = tmp_path / "ann.jsonl"
    ann.write_text(json.dumps({"video": "a.mp4", "caption": 5}) + "\n")
    opts = dict(videos=str(vids), annotations=str(ann), out=str(tmp_path / "o"), workers=1, progress=False)
    first = ingest(IngestOptions(**opts))
    assert first["rejects_by_reason"] == {"bad_annotation": 1, "empty_file": 1}
    ann.write_text(json.dumps({"video": "a.mp4", "caption": "fixed"}) + "\n")
    summary = ingest(IngestOptions(**opts, retry_rejects=True))
    assert summary["this_run"]["accepted"] == 1 and summary["this_run"]["rejected"] == 1
    rejects = read_jsonl(tmp_path / "o" / "rejects.jsonl")
    assert [(r["video"], r["reason"]) for r in rejects] == [("b.mp4", "empty_file")]
    assert summary["num_rejected"] == 1 and summary["rejects_by_reason"] == {"empty_file": 1}
    assert summary["num_samples"] == 1


def test_a_rerun_with_other_settings_for_the_stored_samples_is_refused(tmp_path):
    """A rerun over an earlier ingest resumes it: every sample already stored is skipped. With another --proxy or scene
    search it used to end with exit 0, nothing re-ingested, and dataset.json recording the new settings for shards made
    with the old ones; it stops now, naming the settings, and leaves the output as it was."""
    vids = tmp_path / "v"
    vids.mkdir()
    write_video(vids / "a.mp4", VideoSpec(n_frames=8, width=64, height=48, fps=8, seed=1))
    out = tmp_path / "o"
    ingest(IngestOptions(videos=str(vids), out=str(out), workers=1, progress=False, scene_similarity=0.8))
    before = (out / "dataset.json").read_text()
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))

    def cli(*args):
        return subprocess.run([sys.executable, str(root / "launch" / "ingest.py"), "--videos", str(vids), "--out",
                               str(out), "--workers", "1", "--no-progress", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    r = cli("--scene-similarity", "0.95")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert (f"ingest: {out} holds an ingest made with other settings (--scene-similarity 0.8 there, 0.95 here); a "
            "rerun resumes it") in r.stderr, r.stderr
    r = cli("--scene-similarity", "0.8", "--proxy")
    assert r.returncode == 2 and "(--proxy False there, True here)" in r.stderr, r.stderr
    assert (out / "dataset.json").read_text() == before
    r = cli("--scene-similarity", "0.8", "--retry-rejects")    # the same settings for what is stored: it resumes
    assert r.returncode == 0 and "1 already done" in r.stdout, r.stderr


def _ingest_cli(vids: Path, out: Path, *args) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, str(root / "launch" / "ingest.py"), "--videos", str(vids), "--out", str(out),
                           "--workers", "1", "--no-progress", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(root)), timeout=120)


def test_an_out_folder_that_holds_no_ingest_is_refused(tmp_path):
    """An --out holding shard-* files and none of an ingest's records: a resume deletes the shard-* files no manifest
    line accounts for, so a folder of someone's own shards lost them (and got ours, numbered from 0, among the rest).
    It stops now, naming the folder, and leaves it as it was; an empty folder, or one holding other files alone, is
    still written."""
    vids = tmp_path / "v"
    vids.mkdir()
    write_video(vids / "a.mp4", VideoSpec(n_frames=8, width=64, height=48, fps=8, seed=1))
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"their shard")
    (out / "notes.txt").write_text("their notes")
    r = _ingest_cli(vids, out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert (f"ingest: IngestOptions.out = {str(out)!r}: holds 1 shard-* file(s) (e.g. shard-000000.tar) "
            "and none of an ingest's records") in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-000000.tar"]
    assert (out / "shard-000000.tar").read_bytes() == b"their shard"
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _ingest_cli(vids, empty)
    assert r.returncode == 0 and "1 videos accepted" in r.stdout, r.stderr
    # a folder of other files and no shards (the source videos' own folder, say) is written among them, kept
    (out / "shard-000000.tar").unlink()
    r = _ingest_cli(vids, out)
    assert r.returncode == 0 and "1 videos accepted" in r.stdout, r.stderr
    assert (out / "notes.txt").read_text() == "their notes"


def test_an_ingest_cut_off_before_its_summary_keeps_its_settings_for_the_rerun(tmp_path, monkeypatch):
    """An ingest stopped after its first shard, before dataset.json: the rerun's settings check read dataset.json
    alone, so a rerun with --proxy resumed it (exit 0), the first shard's samples stored without a proxy and the rest
    with one. The settings are recorded before the first shard now, and the rerun stops naming them."""
    from data.video import ingest as ingest_mod

    vids, _ = make_synthetic_videos(tmp_path, 3, seed=5, max_seconds=2.0)
    out = tmp_path / "out"
    append = ingest_mod._append_jsonl

    def cut_after_first_shard(path, rec):
        append(path, rec)
        if path.endswith(ingest_mod.MANIFEST):
            raise KeyboardInterrupt   # the process stopped here (a kill, a lost node)

    monkeypatch.setattr(ingest_mod, "_append_jsonl", cut_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        ingest(IngestOptions(videos=str(vids), out=str(out), shard_size_mb=0.001, workers=1, progress=False))
    assert len((out / "ingest_manifest.jsonl").read_text().splitlines()) == 1 and not (out / "dataset.json").exists()
    r = _ingest_cli(vids, out, "--shard-size-mb", "0.001", "--proxy")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"ingest: {out} holds an ingest made with other settings (--proxy False there, True here)" in r.stderr
    assert len((out / "ingest_manifest.jsonl").read_text().splitlines()) == 1
    r = _ingest_cli(vids, out, "--shard-size-mb", "0.001")     # the same settings: it resumes
    assert r.returncode == 0 and "2 videos accepted" in r.stdout and "1 already done" in r.stdout, r.stderr


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} in a record")
    return json.loads(text, parse_constant=refuse)


def test_nan_or_infinity_in_an_annotation_is_named_and_not_stored(tmp_path):
    """Python's json reads NaN and Infinity, which JSON has not: a record holding one (a score a dataframe export wrote
    as NaN, an event ending at Infinity) was stored as read, so the shard's <key>.json and its index were not JSON for
    other readers. Such a JSONL line is a problem naming the file and line, its record left out (its video ingested
    unannotated, as for any line that is not JSON); in a JSON array file it stops the ingest, naming the line."""
    vids = tmp_path / "v"
    vids.mkdir()
    for name in ("a.mp4", "b.mp4"):
        write_video(vids / name, VideoSpec(n_frames=8, width=64, height=48, fps=8, seed=1))
    ann = tmp_path / "ann.jsonl"
    ann.write_text(json.dumps({"video": "a.mp4", "caption": "a clip"}) + "\n"
                   + '{"video": "b.mp4", "caption": "b clip", "score": NaN, "events": [{"start": 0, "end": Infinity, '
                     '"text": "x"}]}\n')
    r = _ingest_cli(vids, tmp_path / "o", "--annotations", str(ann))
    assert r.returncode == 0, r.stderr
    assert (f"{ann}:2: not JSON (NaN is not a JSON number: write null, or leave the field out); record left out"
            in r.stderr), r.stderr
    out = tmp_path / "o"
    stored = [_strict(p.read_text()) for p in out.glob("*.idx.json")]
    with tarfile.open(next(out.glob("shard-*.tar"))) as tar:
        records = [_strict(tar.extractfile(m).read().decode()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(r["annotation"].get("caption", "-") for r in records) == ["-", "a clip"], records
    assert stored
    arr = tmp_path / "ann.json"
    arr.write_text('[\n {"video": "a.mp4", "caption": "a"},\n'
                   ' {"video": "b.mp4", "caption": "b", "end": -Infinity}\n]\n')
    r = _ingest_cli(vids, tmp_path / "o2", "--annotations", str(arr))
    assert r.returncode == 2 and (f"ingest: {arr}:3: a JSON array of records (the file starts with '['), its item "
                                  "from this line not valid JSON: -Infinity is not a JSON number") in r.stderr, r.stderr
