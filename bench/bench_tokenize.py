"""launch/tokenize_text.py's rate over worker processes (`tokenize_jsonl(..., workers=N)`) against one process on the
same JSONL, in the same run.

    python bench/bench_tokenize.py --docs 100000 --out /tmp/bench_tokenize.json

The input: `--docs` synthetic documents (data/token_files.synthetic_documents, three joined per line, ~0.9 KB per
line). Tokenized with the byte tokenizer and with a byte-level BPE of the tokenizers library (a small one trained on
the synthetic captions: the library's rate on this machine, not Qwen's vocabulary's), at 1 worker and then at each
count of `--workers` (default: 2, 4, 8, ... up to the cores this process may use). Reported: seconds, MB of JSONL per
second, tokens per second, and the speed-up over 1 worker; each output is checked byte for byte against the
1-worker files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    cores = len(os.sched_getaffinity(0))
    counts = [n for n in (2, 4, 8, 16, 32, 64) if n < cores] + [cores]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--workers", type=int, nargs="*", default=counts)
    ap.add_argument("--out", default="bench_tokenize.json")
    ap.add_argument("--work", default=None)
    a = ap.parse_args(argv)

    from train.noise import silence_known_warnings
    silence_known_warnings()
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (its import, seconds, is not the tokenizer's)

    from bench.bench_token_files import write_synthetic_jsonl
    from data.token_files import tokenize_jsonl
    from data.video.synthetic import make_synthetic_hf_tokenizer
    from data.video.tokenizer import ByteTokenizer, HFTokenizer

    work = Path(a.work or tempfile.mkdtemp(prefix="bench_tokenize_"))
    work.mkdir(parents=True, exist_ok=True)
    jsonl = write_synthetic_jsonl(work / "docs.jsonl", a.docs)
    mb = jsonl.stat().st_size / 2**20
    out = {"docs": a.docs, "jsonl_mb": mb, "cores": cores, "tokenizers": {}}
    for name, tok in (("bytes", ByteTokenizer()), ("bpe", HFTokenizer(make_synthetic_hf_tokenizer(work / "bpe")))):
        runs = {}
        for w in [1] + [n for n in a.workers if n > 1]:
            prefix = work / f"{name}_w{w}"
            t0 = time.perf_counter()
            info = tokenize_jsonl([str(jsonl)], prefix, tok, workers=w)
            dt = time.perf_counter() - t0
            same = all((work / f"{name}_w1{s}").read_bytes() == Path(f"{prefix}{s}").read_bytes()
                       for s in (".bin", ".idx"))
            runs[w] = {"seconds": dt, "mb_per_s": mb / dt, "tokens_per_s": info["tokens"] / dt,
                       "speedup_over_1": runs[1]["seconds"] / dt if runs else 1.0, "same_files_as_1": same}
            print(f"{name} workers={w}: {dt:.1f} s, {mb / dt:.1f} MB/s, {info['tokens'] / dt / 1e6:.2f}M tokens/s, "
                  f"x{runs[w]['speedup_over_1']:.2f}, same files {same}", flush=True)
            if not same:
                raise SystemExit(f"{prefix}: not the 1-worker files")
        out["tokenizers"][name] = runs
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
