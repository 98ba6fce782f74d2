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
