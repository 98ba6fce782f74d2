"""Token files (data.kind=tokens) against the packed loader's text-only samples (data=text) on the same documents.

    python bench/bench_token_files.py --docs 50000 --seq 8192 --out /tmp/bench_tokens.json

Both read the same N synthetic documents (JSONL, ~0.9 KB each, byte tokenizer). Measured, each reader in a fresh process (so that
its resident memory is its own):
- preparation: launch/tokenize_text.py's tokenize_jsonl (JSONL -> PREFIX.bin/.idx) against launch/ingest.py
  (JSONL -> tar shards with their index), wall seconds; and tokenize_jsonl with a byte-level BPE of the tokenizers
  library (a small one trained on the synthetic captions: the library's rate here, not Qwen's vocabulary's);
- start: from nothing to the first training row (the token corpus: map the index, order the first epoch; the
  packed loader: read the shard indexes, tokenize and plan every text, pack the epoch), seconds;
- memory: the process's private resident memory (RssAnon) after the rows minus before the reader was built (the
  packed loader's workers each hold another copy of its catalog; here it runs with num_workers=0, so this is one
  copy); also the peak (VmHWM minus the start) and the token files' mapped pages (RssFile: page cache, shared by the
  node's processes and reclaimable);
- rows: the next `--rows` rows of `--seq` tokens, rows per second (one data-parallel rank, micro-batch 1).
Ratios are packed / tokens in the same run.
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


def _status_mb() -> dict:
    """This process's resident memory (MB): VmRSS, VmHWM (its peak), RssAnon (private) and RssFile (mapped file pages:
    the page cache of the memory-mapped token files, shared by every process of the node and reclaimable)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def write_synthetic_jsonl(path: Path, docs: int) -> Path:
    """`docs` JSONL lines, each three of data/token_files.synthetic_documents joined (~0.9 KB): the benches' text."""
    from data.token_files import synthetic_documents

    texts = list(synthetic_documents(docs * 3, seed=0))
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": " ".join(texts[3 * i:3 * i + 3])}) + "\n")
    return path


def child(kind: str, source: str, seq: int, rows: int) -> dict:
    import importlib

    from train.noise import silence_known_warnings
    silence_known_warnings()
    # both readers' modules before the baseline, whichever is measured: the difference is the reader's data alone
    for module in ("torch", "megatron.core.datasets.indexed_dataset", "data.token_files", "data.video.loader"):
        importlib.import_module(module)
    base = _status_mb()
    t0 = time.perf_counter()
    if kind == "tokens":
        from data.token_files import TokenCorpus, TokenFileStream
        corpus = TokenCorpus(source, seq_length=seq, seed=0)
        it = TokenFileStream(corpus, document_bounds=True, micro_batch_size=1, global_batch_size=1, dp_rank=0,
                             dp_size=1)
        first = next(it)
        ntok = lambda b: int(b["loss_mask"].numel())  # noqa: E731
    else:
        from data.video.config import VideoDataConfig
        from data.video.loader import VideoPackedLoader
        cfg = VideoDataConfig(shards=source, seq_len=seq, num_workers=0, quarantine_path="", vocab_size=512,
                              min_frames=2, min_frame_tokens=4, min_video_tokens=16)
        it = iter(VideoPackedLoader(cfg, seed=0))
        first = next(it)
        ntok = lambda p: int(p.cu_seqlens[p.num_docs])  # noqa: E731
    start_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tokens = ntok(first)
    for _ in range(rows):
        tokens += ntok(next(it))
    dt = time.perf_counter() - t1
    end = _status_mb()
    return {"start_s": start_s, "rows_per_s": rows / dt, "tokens_per_s": tokens / dt,
            "memory_mb": end["RssAnon"] - base["RssAnon"], "file_pages_mb": end["RssFile"] - base["RssFile"],
            "peak_mb": end["VmHWM"] - base["VmRSS"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=50000)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--out", default="bench_token_files.json")
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", nargs=4, metavar=("KIND", "SOURCE", "SEQ", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))))
        return 0

    from data.token_files import tokenize_jsonl
    from data.video.ingest import IngestOptions, ingest
    from data.video.tokenizer import ByteTokenizer
    from train.noise import silence_known_warnings
    silence_known_warnings()

    work = Path(a.work or tempfile.mkdtemp(prefix="bench_tokens_"))
    work.mkdir(parents=True, exist_ok=True)
    jsonl = write_synthetic_jsonl(work / "docs.jsonl", a.docs)
    out = {"docs": a.docs, "seq": a.seq, "rows": a.rows, "jsonl_mb": jsonl.stat().st_size / 2**20,
           "machine": f"{os.cpu_count()} cores"}

    import importlib
    importlib.import_module("megatron.core.datasets.indexed_dataset")   # its import, ~3 s once, is not the tokenizer's
    t0 = time.perf_counter()
    info = tokenize_jsonl([str(jsonl)], work / "tok" / "docs", ByteTokenizer())
    out["prepare_tokens_s"] = time.perf_counter() - t0
    out["corpus_tokens"] = info["tokens"]
    # the same text through a byte-level BPE (the tokenizers library, as a Qwen tokenizer is run): a small one
    # trained on the synthetic captions, so this is the library's rate on these 2 cores, not Qwen's vocabulary's
    from data.video.synthetic import make_synthetic_hf_tokenizer
    from data.video.tokenizer import HFTokenizer
    bpe = HFTokenizer(make_synthetic_hf_tokenizer(work / "bpe"))
    t0 = time.perf_counter()
    info = tokenize_jsonl([str(jsonl)], work / "tok_bpe" / "docs", bpe)
    out["prepare_bpe"] = {"seconds": time.perf_counter() - t0, "tokens": info["tokens"],
                          "mb_per_s": out["jsonl_mb"] / (time.perf_counter() - t0)}
    t0 = time.perf_counter()
    ingest(IngestOptions(videos=None, annotations=str(jsonl), out=str(work / "shards"), progress=False, workers=1))
    out["prepare_packed_s"] = time.perf_counter() - t0

    for kind, source in (("tokens", str(work / "tok" / "docs")), ("packed", str(work / "shards"))):
        r = subprocess.run([sys.executable, __file__, "--child", kind, source, str(a.seq), str(a.rows)],
                           capture_output=True, text=True, check=True)
        out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        print(kind, out[kind], flush=True)
    t, p = out["tokens"], out["packed"]
    out["ratios_packed_over_tokens"] = {
        "prepare": out["prepare_packed_s"] / out["prepare_tokens_s"], "start": p["start_s"] / t["start_s"],
        "memory": p["memory_mb"] / max(t["memory_mb"], 1e-3), "rows_per_s": p["rows_per_s"] / t["rows_per_s"]}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["ratios_packed_over_tokens"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
