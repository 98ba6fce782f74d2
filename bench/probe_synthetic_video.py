"""Are the synthetic videos reproducible? One clip encoded many times in parallel processes, beside a busy one.

    python bench/probe_synthetic_video.py --n 1800 --out /tmp/probe_video.json     # CPU, a few minutes on 2 cores

`data/video/synthetic.write_video` must write the same bytes for the same spec on every run: tests compare
training runs on videos the project makes, and the ingest records files by content. Each encoding writes the
clip to its own file and is counted by its MD5; the busy process (a Python loop for the whole run) makes the
scheduling uneven, which is when differences showed. Both encoder settings run in the same call: one encoder
thread (VideoSpec's default) and the codec's own choice (`encoder_threads=0`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.video.synthetic import VideoSpec, write_video  # noqa: E402


def _encode(args: tuple[str, int]) -> str:
    tmp, threads = args
    fd, path = tempfile.mkstemp(suffix=".mp4", dir=tmp)
    os.close(fd)
    write_video(path, VideoSpec(n_frames=60, width=160, height=120, fps=12, seed=7, encoder_threads=threads))
    digest = hashlib.md5(Path(path).read_bytes()).hexdigest()
    os.unlink(path)
    return digest


def _busy(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        sum(i * i for i in range(10000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1800, help="encodings per setting")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (1, 0):
            busy = mp.Process(target=_busy, args=(3600.0,), daemon=True)
            busy.start()
            t0 = time.time()
            with ProcessPoolExecutor(args.workers) as ex:
                counts = Counter(ex.map(_encode, [(tmp, threads)] * args.n))
            busy.terminate()
            common = counts.most_common(1)[0][1]
            results[f"encoder_threads={threads}"] = {"encodings": args.n, "distinct_files": len(counts),
                                                      "differing_from_the_most_common": args.n - common,
                                                      "seconds": round(time.time() - t0, 1)}
            print(f"encoder_threads={threads}: {args.n - common} of {args.n} differ from the most common file "
                  f"({len(counts)} distinct)", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
