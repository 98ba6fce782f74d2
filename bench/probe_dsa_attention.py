"""A DSA export's attention for a whole prompt (one layer's prefill of N tokens, its selection included) with the
30B's attention shapes (32 query / 4 KV heads of 128) and indexer (16 heads of 64, top 2,048), bf16: `_sparse_attention`
of this file (models/hf/modeling_qwen3_moe_dsa.py) attending densely (every key up to a chunk's last query, the
selection as a bias) and over gathered keys, both forced, and OLD_MODELING_FILE's where given (up to 65,536 tokens).
Seconds and peak memory per N: where the two ways cross sets DENSE_KEYS_PER_TOPK. Random inputs (the time does not
depend on the values); the outputs of the ways are compared.

    python3 bench/probe_dsa_attention.py [OLD_MODELING_FILE] > $OUT/dsa_attention.jsonl
(bench/RESULTS.md, "A DSA export attends densely up to 32 x its top-k, over gathered keys beyond")"""
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
OLD_UPTO = 65536


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


def timed(fn, reps: int) -> tuple[float, float | None, torch.Tensor]:
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


def main():
    old = load(sys.argv[1]) if len(sys.argv) > 1 else None
    lengths, hidden, hq, hkv, d, hi, di, topk = SHAPE
    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator(device=DEV).manual_seed(0)
    for n in lengths:
        q = torch.randn(1, hq, n, d, device=DEV, generator=g, dtype=dtype)
        k, v = (torch.randn(1, hkv, n, d, device=DEV, generator=g, dtype=dtype) for _ in range(2))
        q_idx = torch.randn(1, n, hi, di, device=DEV, generator=g, dtype=dtype)
        w_idx = torch.randn(1, n, hi, device=DEV, generator=g) * 0.1
        k_idx = torch.randn(1, n, di, device=DEV, generator=g, dtype=dtype)
        rec = {"prompt": n, "keys_per_topk": n / topk, "topk": topk, "dtype": str(dtype),
               "device": torch.cuda.get_device_name() if CUDA else "cpu"}
        outs = {}
        ways = [("dense", new, True), ("gathered", new, False)]
        if old is not None and n <= OLD_UPTO:
            ways.append(("baseline", old, None))
        for name, code, densely in ways:
            me = layer(code, hidden, hq, hkv, d, hi, di, topk, densely)
            s, peak, out = timed(lambda: me._sparse_attention(q, k, v, q_idx, w_idx, k_idx, None),
                                 reps=1 if n > 100000 else 2)
            outs[name] = out
            rec[name] = {"s": round(s, 4), "peak_gib": None if peak is None else round(peak, 3)}
        rec["dense_speedup"] = round(rec["gathered"]["s"] / rec["dense"]["s"], 2)
        diff = (outs["dense"].float() - outs["gathered"].float()).abs()
        rec["out_max_abs_diff"], rec["out_max_abs"] = diff.max().item(), outs["gathered"].float().abs().max().item()
        print(json.dumps(rec), flush=True)
        del outs, out


if __name__ == "__main__":
    main()
