"""The synthetic videos a run makes for itself are named by what they are: a launch asking for another count or seed
gets that data. One directory for every count and seed gave a run asking for 4 videos the 24 an earlier launch in its
run directory had made (its loss the same to the last digit), and a resume that logged `data.synthetic_videos 24 ->
20` trained on the 24."""
from data.video.shards import load_catalog
from data.video_stream import ensure_synthetic_shards


def test_a_launch_asking_for_other_synthetic_videos_gets_them(tmp_path):
    base = tmp_path / "synthetic_videos"
    a = ensure_synthetic_shards(base, 3, 1, rank=0)
    made = (a.parent / "READY").stat().st_mtime_ns
    b = ensure_synthetic_shards(base, 2, 1, rank=0)
    c = ensure_synthetic_shards(base, 2, 5, rank=0)
    assert [p.parent.name for p in (a, b, c)] == ["synthetic_videos_3_seed1", "synthetic_videos_2_seed1",
                                                  "synthetic_videos_2_seed5"]
    cats = [load_catalog(str(p)) for p in (a, b, c)]
    assert [len(x) for x in cats] == [3, 2, 2]
    assert [r.annotation for r in cats[1]] != [r.annotation for r in cats[2]]      # another seed, other videos
    assert ensure_synthetic_shards(base, 3, 1, rank=0) == a and (a.parent / "READY").stat().st_mtime_ns == made
