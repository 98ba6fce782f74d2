"""The packed loader's catalog and epoch plans kept as files a node's processes map (data.video.index_dir) against
each process reading and planning its own, on many short text samples.

    git worktree add -f /tmp/prev <commit before the columnar catalog>
    python bench/bench_catalog.py --docs 200000 --procs 8 --baseline-tree /tmp/prev --out /tmp/bench_catalog.json

The data: `--docs` text-only samples (~0.9 KB of JSONL each, bench_token_files.write_synthetic_jsonl) ingested into
tar shards with their index (kept in `--work` and reused). `--procs` processes start together, as the ranks (or a
rank's loader workers) of a node do; each builds a VideoPackedLoader (8K sequences, byte tokenizer, no workers) and
takes `--rows` packs. Each reports its private resident memory (RssAnon after the rows minus before the loader was
built; its modules imported before that), its mapped file pages (RssFile) and the seconds from nothing to its first
pack. Runs, in this order, in one invocation:
- baseline: the loader of `--baseline-tree` (the commit before), each process holding the catalog as a list of
  records and planning every document itself;
- columns: this tree without index_dir: each process reads the catalog into columns and plans its own;
- index, cold: a fresh index directory: the first process to ask reads the catalog and plans each epoch under a
  file lock and writes them; the others wait, then map them;
- index, warm: the same directory again (a restart, or the next run with the same data and settings).
Ratios are baseline / this in the same run: the node's private memory summed over the processes, and the slowest
process's start. Each process's packs are compared across the runs (their sample keys, hashed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.bench_token_files import _status_mb  # noqa: E402  (stdlib only: the tree a child measures comes first)


def child(tree: str, shards: str, index_dir: str, seq: int, rows: int) -> dict:
    sys.path.insert(0, tree)                      # the loader of that tree
    from train.noise import silence_known_warnings
    silence_known_warnings()
    import torch  # noqa: F401

    from data.video.config import VideoDataConfig
    from data.video.loader import VideoPackedLoader
    base = _status_mb()
    t0 = time.perf_counter()
    kw = dict(index_dir=index_dir) if index_dir else {}
    cfg = VideoDataConfig(shards=shards, seq_len=seq, num_workers=0, quarantine_path="", vocab_size=512,
                          min_frames=2, min_frame_tokens=4, min_video_tokens=16, **kw)
    it = iter(VideoPackedLoader(cfg, seed=0))
    keys = hashlib.sha1()
    keys.update("|".join(next(it).sample_keys).encode())
    start_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(rows):
        keys.update("|".join(next(it).sample_keys).encode())
    dt = time.perf_counter() - t1
    end = _status_mb()
    return {"start_s": start_s, "rows_per_s": rows / dt, "memory_mb": end["RssAnon"] - base["RssAnon"],
            "file_pages_mb": end["RssFile"] - base["RssFile"], "peak_mb": end["VmHWM"] - base["VmRSS"],
            "packs_sha": keys.hexdigest()[:16]}


def node(tree: str, shards: str, index_dir: str, procs: int, seq: int, rows: int) -> dict:
    """`procs` loader processes started together; their reports and totals."""
    t0 = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, __file__, "--child", tree, shards, index_dir, str(seq), str(rows)],
                           stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [p.communicate()[0] for p in ps]
    if any(p.returncode for p in ps):
        raise RuntimeError(f"a loader process failed in {tree} (index_dir {index_dir!r})")
    each = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {"wall_s": time.perf_counter() - t0, "private_mb_sum": sum(r["memory_mb"] for r in each),
            "file_pages_mb_max": max(r["file_pages_mb"] for r in each),
            "slowest_start_s": max(r["start_s"] for r in each),
            "rows_per_s_mean": sum(r["rows_per_s"] for r in each) / len(each),
            "packs_sha": sorted({r["packs_sha"] for r in each}), "procs": each}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200000)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--baseline-tree", required=False, default="",
                    help="a checkout of the commit before (git worktree add); empty: no baseline run")
    ap.add_argument("--work", default=None, help="where the shards are made (reused when there)")
    ap.add_argument("--out", default="bench_catalog.json")
    ap.add_argument("--child", nargs=5, metavar=("TREE", "SHARDS", "INDEX_DIR", "SEQ", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        t, s, i, q, r = a.child
        print(json.dumps(child(t, s, i, int(q), int(r))))
        return 0

    from bench.bench_token_files import write_synthetic_jsonl
    from data.video.ingest import IngestOptions, ingest
    from train.noise import silence_known_warnings
    silence_known_warnings()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_catalog_"))
    shards = work / "shards"
    if not (shards / "dataset.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        jsonl = write_synthetic_jsonl(work / "docs.jsonl", a.docs)
        ingest(IngestOptions(videos=None, annotations=str(jsonl), out=str(shards), progress=False, workers=1))
    n_tars = len(list(shards.glob("*.tar")))
    out = {"docs": a.docs, "procs": a.procs, "seq": a.seq, "rows": a.rows, "shards": n_tars,
           "shard_mb": sum(f.stat().st_size for f in shards.glob("*")) / 2**20, "machine": f"{os.cpu_count()} cores",
           "baseline_tree": a.baseline_tree}
    index = work / "index"
    shutil.rmtree(index, ignore_errors=True)
    runs = ([("baseline", a.baseline_tree, "")] if a.baseline_tree else []) + [
        ("columns", ROOT, ""), ("index_cold", ROOT, str(index)), ("index_warm", ROOT, str(index))]
    for name, tree, idx in runs:
        out[name] = node(tree, str(shards), idx, a.procs, a.seq, a.rows)
        print(name, {k: v for k, v in out[name].items() if k != "procs"}, flush=True)
    out["index_mb"] = sum(f.stat().st_size for f in index.rglob("*") if f.is_file()) / 2**20
    out["same_packs"] = len({s for name, *_ in runs for s in out[name]["packs_sha"]}) == 1
    if a.baseline_tree:
        b = out["baseline"]
        out["ratios_baseline_over"] = {
            name: {"private_memory": b["private_mb_sum"] / max(out[name]["private_mb_sum"], 1e-3),
                   "slowest_start": b["slowest_start_s"] / out[name]["slowest_start_s"]}
            for name in ("columns", "index_cold", "index_warm")}
        print(json.dumps(out["ratios_baseline_over"], indent=1))
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
