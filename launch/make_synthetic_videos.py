"""Write small synthetic videos (burned-in frame counters) + annotations, and optionally shards.

    python launch/make_synthetic_videos.py --out DIR --n 32 [--seed 0] [--text 16] [--images 8] [--image-sets 2] [--shards] [--shard-size-mb 1]

DIR/synthetic_settings.json records the settings that decide the content (--n, --seed, --text, --images,
--image-sets, --scenes, --min-seconds, --max-seconds). A DIR that holds a set made with other settings, or one with
no such record, is refused: ingest resumes by file name, so the old shards would stay beside the new annotations.
The same settings again remake the same set (and add shards with --shards).
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.video.synthetic import make_synthetic_shards, make_synthetic_videos  # noqa: E402

SETTINGS_FILE = "synthetic_settings.json"
# what make_synthetic_videos writes into --out (and ingest, with --shards)
MADE = ("annotations.jsonl", "videos", "shards")


def _flags(settings: dict, keys) -> str:
    return " ".join(f"--{k.replace('_', '-')} {settings.get(k, '?')}" for k in keys)


def _check_out(p: argparse.ArgumentParser, out: str, settings: dict) -> None:
    """Refuses (exit 2) an --out that holds a set made with other settings, or one without a record of them."""
    record = Path(out) / SETTINGS_FILE
    if record.exists():
        try:
            found = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            p.error(f"--out {out}: {record} cannot be read ({e}); remove {out} to make a new set there, or choose "
                    f"another --out")
        if not isinstance(found, dict):
            found = {}
        differ = [k for k in settings if found.get(k) != settings[k]]
        if differ:
            p.error(f"--out {out}: holds a synthetic set made with {_flags(found, differ)}, not the "
                    f"{_flags(settings, differ)} asked; its videos, annotations and shards would be mixed with the new "
                    f"ones (ingest keeps the shards of the files it has seen by name). Choose another --out, or "
                    f"remove {out} first")
        return
    made = [name for name in MADE if (Path(out) / name).exists()]
    if made:
        p.error(f"--out {out}: holds {', '.join(made)} but no {SETTINGS_FILE} saying what settings made them (an "
                f"earlier version's set, or another tool's); they could be mixed with the new ones. Choose another "
                f"--out, or remove {out} first")


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
    settings = {"n": a.n, "seed": a.seed, "text": a.text, "images": a.images, "image_sets": a.image_sets,
                "scenes": a.scenes, "min_seconds": a.min_seconds, "max_seconds": a.max_seconds}
    _check_out(p, a.out, settings)
    os.makedirs(a.out, exist_ok=True)
    # before the set is made: an interrupted run is known by its settings too
    (Path(a.out) / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    made = f"{a.n} videos, {a.images} images, {a.image_sets} image sets and {a.text} text-only records"
    if a.shards:
        d = make_synthetic_shards(a.out, a.n, a.seed, shard_size_mb=a.shard_size_mb, workers=a.workers,
                                  min_seconds=a.min_seconds, max_seconds=a.max_seconds, n_text=a.text, n_images=a.images,
                                  n_image_sets=a.image_sets, scenes=a.scenes)
        print(f"wrote {made}, and their shards under {d}")
    else:
        v, ann = make_synthetic_videos(a.out, a.n, a.seed, min_seconds=a.min_seconds, max_seconds=a.max_seconds,
                                       n_text=a.text, n_images=a.images, n_image_sets=a.image_sets, scenes=a.scenes)
        print(f"wrote {made}: the files under {v}, the annotations in {ann}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
