"""Verify a folder of videos and write webdataset shards: see data/video/ingest.py and docs/data.md.

    python launch/ingest.py --videos DIR --annotations FILE.jsonl --out DIR --shard-size-mb 1024 \
        [--proxy] [--workers N]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.video.ingest import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
