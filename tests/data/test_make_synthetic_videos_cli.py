"""launch/make_synthetic_videos.py's command line: the clip lengths it is given are the lengths it writes, and
settings it cannot honour stop it (exit 2, naming them) before anything is written. Before, --min-seconds above
--max-seconds ended in numpy's traceback, a negative length wrote 2-frame clips without a word, and an --out that is
a file, --workers 0 or --shard-size-mb 0 ended in a traceback."""
import json

import av
import pytest

from launch.make_synthetic_videos import main


def test_clips_last_between_min_and_max_seconds(tmp_path):
    assert main(["--out", str(tmp_path / "s"), "--n", "3", "--min-seconds", "1", "--max-seconds", "1.5"]) == 0
    records = [json.loads(line) for line in (tmp_path / "s" / "annotations.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        with av.open(str(tmp_path / "s" / "videos" / r["video"])) as c:
            s = c.streams.video[0]
            n, fps = sum(1 for _ in c.decode(s)), float(s.average_rate)
        assert 1 - 0.5 / fps <= n / fps <= 1.5 + 0.5 / fps, (r["video"], n, fps)   # frames round to the nearest


@pytest.mark.parametrize("args,message", [
    (["--min-seconds", "3", "--max-seconds", "1"], "--min-seconds (3.0) must be > 0 and at most --max-seconds (1.0)"),
    (["--min-seconds", "-1"], "--min-seconds (-1.0) must be > 0 and at most --max-seconds (4.0)"),
    (["--shards", "--workers", "0"], "--workers (0) must be >= 1 and --shard-size-mb (1.0) > 0"),
    (["--shards", "--shard-size-mb", "0"], "--workers (2) must be >= 1 and --shard-size-mb (0.0) > 0"),
])
def test_bad_settings_stop_before_anything_is_written(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "s"), "--n", "2", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_an_out_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "f"), "--n", "1"])
    assert e.value.code == 2 and f"--out {tmp_path / 'f'}: exists and is not a directory" in capsys.readouterr().err


def test_more_scenes_than_a_clip_holds_are_named(tmp_path, caplog):
    """A still scene takes at least 4 frames, so a clip of n frames holds n // 4 scenes: --scenes above that was
    capped without a word. The warning names how many clips got fewer, the first one's frames and scenes, and the
    length that holds them all; the frame counts are the decoded clips'."""
    K = 5
    with caplog.at_level("WARNING", logger="data.video.synthetic"):
        assert main(["--out", str(tmp_path / "s"), "--n", "4", "--scenes", str(K), "--min-seconds", "1",
                     "--max-seconds", "1.5"]) == 0
    frames = {}
    for p in sorted((tmp_path / "s" / "videos").iterdir()):
        with av.open(str(p)) as c:
            frames[p.name] = sum(1 for _ in c.decode(c.streams.video[0]))
    short = [(name, n) for name, n in frames.items() if n < 4 * K]
    assert short, frames   # 1-1.5 s at 8-15 fps: 8 to 23 frames, 20 needed for 5 scenes
    first, n = short[0]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert (f"{K} still scenes asked (--scenes, data.synthetic_scenes), but a scene takes at least 4 frames: "
            f"{len(short)} of 4 clips are too short and have fewer ({first}: {n} frames, {n // 4} scenes") in warned[0]
    assert f"clips of at least {4 * K} frames" in warned[0]
    caplog.clear()
    assert main(["--out", str(tmp_path / "t"), "--n", "2", "--scenes", "2", "--min-seconds", "1"]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]   # 8+ frames hold 2 scenes: nothing to say


def test_synthetic_videos_that_ingest_rejects_every_one_of_stop_naming_why(tmp_path, monkeypatch):
    """When ingest takes none of the synthetic videos (here: files it cannot read), the run went on to the loader's
    "no .tar shards found", naming no cause (seen on a GPU machine with PyAV 17: backends.is_attached_picture).
    make_synthetic_shards now stops there, naming the videos, the rejects' reasons and the first reject;
    ensure_synthetic_shards then writes no marker, so a rerun tries again."""
    from data.video import synthetic
    from data.video_stream import READY, ensure_synthetic_shards

    real = synthetic.make_synthetic_videos

    def unreadable(out, n, seed, **kw):   # what such a machine's encoder and decoder amount to
        vdir, ann = real(out, n, seed, **kw)
        for f in vdir.iterdir():
            f.write_bytes(b"not a video")
        return vdir, ann

    monkeypatch.setattr(synthetic, "make_synthetic_videos", unreadable)
    with pytest.raises(RuntimeError, match=r"synthetic videos in .*: ingest accepted none of them \(rejected by "
                                           r"reason: \{'.+': 2\}, in .*rejects.jsonl; the first: \{"):
        ensure_synthetic_shards(tmp_path / "syn", 2, seed=0, rank=0)
    assert not (tmp_path / "syn" / READY).exists()


def _annotations(d):
    return (d / "annotations.jsonl").read_text()


def test_an_out_made_with_other_settings_is_refused(tmp_path, capsys):
    """--shards into an --out made with other settings kept the old shards (ingest resumes by file name) but wrote
    new annotations and said it wrote the new set: clip_00000 in the annotations was not the clip in the shards."""
    d = tmp_path / "s"
    assert main(["--out", str(d), "--n", "2", "--text", "1", "--shards"]) == 0
    before, shards = _annotations(d), sorted(p.name for p in (d / "shards").iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--out", str(d), "--n", "1", "--seed", "7", "--shards"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert (f"--out {d}: holds a synthetic set made with --n 2 --seed 0 --text 1, not the --n 1 --seed 7 --text 0 "
            "asked") in err and "Choose another --out, or remove" in err, err
    assert _annotations(d) == before and sorted(p.name for p in (d / "shards").iterdir()) == shards
    # the same settings remake the same set (here without shards: those made stay theirs)
    assert main(["--out", str(d), "--n", "2", "--text", "1"]) == 0
    assert _annotations(d) == before


def test_an_out_holding_a_set_without_a_record_of_its_settings_is_refused(tmp_path, capsys):
    d = tmp_path / "s"
    d.mkdir()
    (d / "annotations.jsonl").write_text("")
    (d / "notes.txt").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(d), "--n", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--out {d}: holds annotations.jsonl but no synthetic_settings.json" in err, err
    assert main(["--out", str(tmp_path / "other"), "--n", "1"]) == 0
    e = tmp_path / "empty"     # a directory of other files is the user's: the set is made beside them
    e.mkdir()
    (e / "notes.txt").write_text("")
    assert main(["--out", str(e), "--n", "1"]) == 0


def test_the_summary_names_every_kind_written(tmp_path, capsys):
    """Without --shards the line left out the image sets."""
    assert main(["--out", str(tmp_path / "s"), "--n", "1", "--images", "1", "--image-sets", "1", "--text", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 videos, 1 images, 1 image sets and 2 text-only records: the files under" in out, out
