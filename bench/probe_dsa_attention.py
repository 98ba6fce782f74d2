"""A DSA export's attention for a whole prompt (one layer's prefill of N tokens, its selection included) with the
30B's attention shapes (32 query / 4 KV heads of 128) and indexer (16 heads of 64, top 2,048), bf16: `_sparse_attention`
of this file (models/hf/modeling_qwen3_moe_dsa.py) attending densely (every key up to a chunk's last query, the
selection as a bias) and over gathered keys, both forced (dense up to 131,072 tokens), by its rule per chunk with
DENSE_KEYS_PER_TOPK set to each of PER_TOPK, and BASELINE_MODELING_FILE's by its own rule.
Seconds and peak memory per N (least of 2 calls after a warm-up; 1 call, no warm-up, above 100K). Random inputs (the
time does not depend on the values); the outputs of the ways are compared with the gathered way's.
Before them, one "chunks" record per way: each chunk's attention alone (synchronized around it) in a forced prefill
of CHUNK_PROMPT tokens, its queries and the keys its last query sees: where the per-query costs cross sets
DENSE_KEYS_PER_TOPK.

    python3 bench/probe_dsa_attention.py BASELINE_MODELING_FILE [PER_TOPK ...] > $OUT/dsa_attention.jsonl
(bench/RESULTS.md, "A DSA export's chunks attend densely up to ... x its top-k")"""
import importlib.util
import json
import sys
import time

import torch
from transformers import Qwen3MoeConfig

sys.path.insert(0, ".")
from models.hf import modeling_qwen3_moe_dsa as new  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# (prompt lengths, hidden size, heads, KV heads, head dim, index heads, index dim, top-k): the 30B's on a GPU
SHAPE = ((16384, 32768, 49152, 65536, 98304, 131072, 262144), 2048, 32, 4, 128, 16, 64, 2048) if CUDA else \
    ((256, 512, 1024), 64, 8, 2, 16, 4, 8, 32)
DENSE_UPTO = 131072
CHUNK_PROMPT = 131072 if CUDA else 1024


def load(path: str):
    spec = importlib.util.spec_from_file_location("old_dsa", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def layer(code, hidden: int, hq: int, hkv: int, d: int, hi: int, di: int, topk: int, densely: bool | None):
    """A DSA attention layer of `code` (this file or the baseline's) with these shapes, one way of attending forced
    where it has them (None: its rule); only its `_sparse_attention` runs, its projections unused."""
    config = Qwen3MoeConfig(hidden_size=hidden, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                            index_n_heads=hi, index_head_dim=di, index_topk=topk, num_hidden_layers=1)
    me = code.Qwen3MoeDSAAttention(config, 0)
    me.attend_densely = densely
    return me


def timed(fn, reps: int, warm: bool) -> tuple[float, float | None, torch.Tensor]:
    if warm:
        out = fn()
        del out
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if CUDA else 0
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if CUDA else None
    return best, peak, out


def chunk_times(me, inputs) -> list[list]:
    """[queries, keys its last query sees, seconds] of each chunk's attention in one prefill of `me`."""
    rows = []
    for way in ("_attend_densely", "_attend_gathered"):
        def clocked(q, k, v, sel, valid, *n, _f=getattr(me, way)):
            sync()
            t0 = time.perf_counter()
            o = _f(q, k, v, sel, valid, *n)
            sync()
            rows.append([q.shape[2], n[0] if n else int(sel.max()) + 1, round(time.perf_counter() - t0, 6)])
            return o
        setattr(me, way, clocked)
    me._sparse_attention(*inputs, None)
    return rows


def sync():
    if CUDA:
        torch.cuda.synchronize()


def inputs(n: int, hq: int, hkv: int, d: int, hi: int, di: int, dtype):
    g = torch.Generator(device=DEV).manual_seed(n)
    q = torch.randn(1, hq, n, d, device=DEV, generator=g, dtype=dtype)
    k, v = (torch.randn(1, hkv, n, d, device=DEV, generator=g, dtype=dtype) for _ in range(2))
    q_idx = torch.randn(1, n, hi, di, device=DEV, generator=g, dtype=dtype)
    w_idx = torch.randn(1, n, hi, device=DEV, generator=g) * 0.1
    k_idx = torch.randn(1, n, di, device=DEV, generator=g, dtype=dtype)
    return q, k, v, q_idx, w_idx, k_idx


def main():
    from bench.cli import existing_file, parser
    ap = parser(__doc__)
    ap.add_argument("baseline_modeling_file", type=existing_file, help="the baseline's modeling_qwen3_moe_dsa.py")
    ap.add_argument("per_topk", type=int, nargs="*", help=f"values of DENSE_KEYS_PER_TOPK ({new.DENSE_KEYS_PER_TOPK})")
    args = ap.parse_args()
    old = load(args.baseline_modeling_file)
    per_topk = args.per_topk or [new.DENSE_KEYS_PER_TOPK]
    default = new.DENSE_KEYS_PER_TOPK
    lengths, hidden, hq, hkv, d, hi, di, topk = SHAPE
    dtype = torch.bfloat16 if CUDA else torch.float32
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    x = inputs(CHUNK_PROMPT, hq, hkv, d, hi, di, dtype)
    for name, densely in (("dense", True), ("gathered", False)):
        me = layer(new, hidden, hq, hkv, d, hi, di, topk, densely)
        chunk_times(me, x)  # a warm-up
        print(json.dumps({"chunks": name, "prompt": CHUNK_PROMPT, "topk": topk, "device": device,
                          "queries_keys_s": chunk_times(me, x)}), flush=True)
    del x
    for n in lengths:
        x = inputs(n, hq, hkv, d, hi, di, dtype)
        rec = {"prompt": n, "keys_per_topk": n / topk, "topk": topk, "dtype": str(dtype), "device": device}
        outs = {}
        ways = [("gathered", new, False, default)] + [("dense", new, True, default)] * (n <= DENSE_UPTO)
        ways += [(f"rule_{m}", new, None, m) for m in per_topk] + [("baseline", old, None, None)]
        for name, code, densely, m in ways:
            if m is not None:
                code.DENSE_KEYS_PER_TOPK = m
            me = layer(code, hidden, hq, hkv, d, hi, di, topk, densely)
            s, peak, out = timed(lambda: me._sparse_attention(*x, None), reps=1 if n > 100000 else 2,
                                 warm=n <= 100000)
            new.DENSE_KEYS_PER_TOPK = default
            if name == "gathered":
                ref = out.float()
            else:
                rec[name + "_max_abs_diff"] = (out.float() - ref).abs().max().item()
            rec[name] = {"s": round(s, 4), "peak_gib": None if peak is None else round(peak, 3)}
            del out
        rec["out_max_abs"] = ref.abs().max().item()
        print(json.dumps(rec), flush=True)
        del ref, x


if __name__ == "__main__":
    main()
