"""Token files' epoch orders kept as files that a node's processes map (data.tokens.index_dir) against each process
holding its own (the reader without an index directory, as before), on a corpus of many short documents.

    python bench/bench_token_index.py --docs 20000000 --procs 8 --out /tmp/bench_token_index.json

The corpus: `--docs` documents of 1 to 16 random tokens (uint16), written at once through megatron-core's
IndexedDatasetBuilder (each sequence a document, as the reader takes them). `--procs` processes start together, as
the ranks of a node do, and each builds a TokenCorpus + TokenFileStream and reads `--rows` rows of `--seq` tokens.
Each reports its private resident memory (RssAnon, after the rows, minus before the reader was built; modules
imported before that), its mapped file pages (RssFile: page cache, shared by the node and reclaimable) and the
seconds from nothing to its first row. Three runs, in this order:
- memory: no index directory, each process builds and holds its epoch orders (the baseline);
- index, cold: a fresh index directory: the first process to ask builds the orders under a file lock and writes
  them, the others wait and map them;
- index, warm: the same directory again (a restart, or another run of the corpus with the same settings).
Ratios are baseline / index in the same run: the node's private memory summed over the processes, and the slowest
process's start.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_token_files import _status_mb  # noqa: E402


def child(prefix: str, index_dir: str, seq: int, rows: int) -> dict:
    from train.noise import silence_known_warnings
    silence_known_warnings()
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    from data.token_files import TokenCorpus, TokenFileStream
    base = _status_mb()
    t0 = time.perf_counter()
    corpus = TokenCorpus(prefix, seq_length=seq, seed=0, index_dir=index_dir or None)
    it = TokenFileStream(corpus, document_bounds=True, micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1)
    next(it)
    start_s = time.perf_counter() - t0
    for _ in range(rows):
        next(it)
    end = _status_mb()
    return {"start_s": start_s, "memory_mb": end["RssAnon"] - base["RssAnon"],
            "file_pages_mb": end["RssFile"] - base["RssFile"], "peak_mb": end["VmHWM"] - base["VmRSS"],
            "index_note": corpus.sources[0].index_note}


def node(prefix: str, index_dir: str, procs: int, seq: int, rows: int) -> dict:
    """`procs` reader processes started together; their reports and totals."""
    t0 = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, __file__, "--child", prefix, index_dir, str(seq), str(rows)],
                           stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [p.communicate()[0] for p in ps]
    if any(p.returncode for p in ps):
        raise SystemExit(f"a reader process failed: {[p.returncode for p in ps]}")
    each = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {"wall_s": time.perf_counter() - t0, "memory_mb_total": sum(e["memory_mb"] for e in each),
            "start_s_max": max(e["start_s"] for e in each), "each": each}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20_000_000)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--out", default="bench_token_index.json")
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", nargs=4, metavar=("PREFIX", "INDEX_DIR", "SEQ", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))))
        return 0

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    work = Path(a.work or tempfile.mkdtemp(prefix="bench_token_index_"))
    work.mkdir(parents=True, exist_ok=True)
    prefix = str(work / "docs")
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, a.docs)
    t0 = time.perf_counter()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(torch.from_numpy(rng.integers(0, 512, int(lengths.sum()), dtype=np.uint16)),
                         lengths.tolist())
    builder.finalize(prefix + ".idx")
    out = {"docs": a.docs, "tokens": int(lengths.sum()), "procs": a.procs, "seq": a.seq, "rows": a.rows,
           "write_s": time.perf_counter() - t0, "machine": f"{os.cpu_count()} cores"}
    print(f"corpus: {a.docs} documents, {out['tokens']} tokens, {out['write_s']:.1f} s", flush=True)
    index = str(work / "index")
    for name, d in (("memory", ""), ("index_cold", index), ("index_warm", index)):
        out[name] = node(prefix, d, a.procs, a.seq, a.rows)
        r = out[name]
        print(f"{name}: private {r['memory_mb_total']:.1f} MB over {a.procs} processes, slowest start "
              f"{r['start_s_max']:.2f} s, wall {r['wall_s']:.1f} s", flush=True)
    m = out["memory"]
    out["ratios_memory_over_index"] = {
        "private_memory_cold": m["memory_mb_total"] / max(out["index_cold"]["memory_mb_total"], 1e-3),
        "private_memory_warm": m["memory_mb_total"] / max(out["index_warm"]["memory_mb_total"], 1e-3),
        "start_cold": m["start_s_max"] / out["index_cold"]["start_s_max"],
        "start_warm": m["start_s_max"] / out["index_warm"]["start_s_max"]}
    out["index_mb_on_disk"] = sum(f.stat().st_size for f in Path(index).rglob("*.npy")) / 2**20
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["ratios_memory_over_index"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
