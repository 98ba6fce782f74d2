"""Write small synthetic videos (burned-in frame counters) + annotations, and optionally shards.

    python launch/make_synthetic_videos.py --out DIR --n 32 [--seed 0] [--text 16] [--images 8] [--image-sets 2] [--shards] [--shard-size-mb 1]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.video.synthetic import make_synthetic_shards, make_synthetic_videos  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=32, help="number of videos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", type=int, default=0, help="number of text-only records (no video) to add")
    p.add_argument("--images", type=int, default=0, help="number of images (with counters) to add")
    p.add_argument("--image-sets", type=int, default=0,
                   help="number of interleaved records of 2-3 images (at <image> markers of their text) to add")
    p.add_argument("--scenes", type=int, default=0,
                   help="make each video this many still scenes (only the counter moves in one): slow and fast frames")
    p.add_argument("--min-seconds", type=float, default=1.5)
    p.add_argument("--max-seconds", type=float, default=4.0)
    p.add_argument("--shards", action="store_true", help="also ingest them into OUT/shards")
    p.add_argument("--shard-size-mb", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    if a.n < 0 or a.n + a.text + a.images + a.image_sets == 0:
        p.error("--n must be >= 0, and --n, --text, --images, --image-sets not all 0")
    if min(a.text, a.images, a.image_sets, a.scenes) < 0:
        p.error("--text, --images, --image-sets and --scenes must be >= 0")
    if not 0 < a.min_seconds <= a.max_seconds:
        p.error(f"--min-seconds ({a.min_seconds}) must be > 0 and at most --max-seconds ({a.max_seconds})")
    if a.shards and (a.workers < 1 or a.shard_size_mb <= 0):
        p.error(f"--workers ({a.workers}) must be >= 1 and --shard-size-mb ({a.shard_size_mb}) > 0")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out}: exists and is not a directory")
    if a.shards:
        d = make_synthetic_shards(a.out, a.n, a.seed, shard_size_mb=a.shard_size_mb, workers=a.workers,
                                  min_seconds=a.min_seconds, max_seconds=a.max_seconds, n_text=a.text, n_images=a.images,
                                  n_image_sets=a.image_sets, scenes=a.scenes)
        print(f"wrote {a.n} videos, {a.images} images, {a.image_sets} image sets, {a.text} text-only records and shards under {d}")
    else:
        v, ann = make_synthetic_videos(a.out, a.n, a.seed, min_seconds=a.min_seconds, max_seconds=a.max_seconds,
                                       n_text=a.text, n_images=a.images, n_image_sets=a.image_sets, scenes=a.scenes)
        print(f"wrote {a.n} videos and {a.images} images under {v} and annotations {ann} ({a.text} text-only "
              f"records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
