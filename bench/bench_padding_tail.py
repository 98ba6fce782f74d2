"""GPU: what the padding at a packed row's end costs the model, named (PackedSeqDocuments.pad_tail) against not.

    python bench/bench_padding_tail.py --out $OUT/padding_tail.json       # one GPU, bf16, the 30B's shapes
    python bench/bench_padding_tail.py --smoke --out /tmp/padding.json    # CPU, tiny shapes: checks the script

A packed row ends with padding: a video pack's padding segment, a KSA row's padding to the model's length (the tiny
recipe's packs are 30% padding). The trainer names it (train/trainer.py trailing_padding) and the core attentions
and the chunked loss leave it out (models/attention/dense.py documents_part). This times, in the same run, the
forward+backward of each module on one row with the padding named against the same module with it not named (the
code before: the padding attended as one more document and given logits), by the padding's share:
  dense  SDPACoreAttention, 32 q / 4 kv heads, head dim 128: documents of 4,096 tokens, then the padding
  dsa    DSACoreAttention, sparse stage, top-2048, index 16 x 64 (the indexer's KL in its backward, as training
         runs it): one document, then the padding
  ksa    KSACoreAttention, chunk 8, one summary, window 128 chunks: documents of 4,096 tokens, then the padding
  loss   the chunked cross-entropy (hidden 2,048, vocabulary 151,936, 4,096-token chunks) on the documents' tokens
         against the row's (what ChunkedLossMixin._postprocess now hands it)
and checks that the documents' outputs agree (relative RMSE, named against not) and that the padding's are 0.
Times: medians of CUDA-event times (ms), 7 to 100 calls after two. The layers' projections and experts are the
same either way (the experts already compute no padding: bench_moe.py's padding section).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

HQ, HKV, D, HI, DI, TOPK, HIDDEN, VOCAB = 32, 4, 128, 16, 64, 2048, 2048, 151936
# (module, row tokens, padding tokens, document tokens): each module at 1/8 and 1/4 of padding, DSA at 128K too
CASES = [("dense", 32768, 4096, 4096), ("dense", 32768, 8192, 4096), ("dense", 131072, 32768, 8192),
         ("dsa", 32768, 4096, None), ("dsa", 32768, 8192, None), ("dsa", 131072, 16384, None),
         ("dsa", 131072, 32768, None), ("ksa", 32768, 4096, 4096), ("ksa", 32768, 8192, 4096),
         ("loss", 32768, 4096, None), ("loss", 32768, 8192, None)]
SMOKE = dict(HQ=4, HKV=2, D=16, HI=2, DI=8, TOPK=8, HIDDEN=32, VOCAB=64)
SMOKE_CASES = [("dense", 96, 24, 24), ("dsa", 96, 24, None), ("ksa", 96, 24, 24), ("loss", 96, 24, None)]


def _bounds(s: int, pad: int, doc: int | None) -> list[int]:
    """Segment bounds of a row of s tokens: documents of `doc` tokens (one when None) over s - pad, then the padding."""
    real = s - pad
    cuts = list(range(0, real, doc or real)) + [real]
    return cuts + [s] if pad else cuts


def _packed(bounds, device, named: bool):
    """The trainer's packed params of the row (train/trainer.py packed_params): its last segment padding
    (document -1), named at the row's end or not (as before the trainer named it)."""
    from train.trainer import packed_params, trailing_padding

    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    docs = torch.repeat_interleave(torch.arange(len(lengths), device=device), cu[1:] - cu[:-1])
    docs[bounds[-2]:] = -1
    padding = [False] * (len(lengths) - 1) + [True]
    return packed_params(cu, docs.view(1, -1), tail=trailing_padding(lengths, padding if named else None))


def _config(k):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=k["HQ"] * k["D"], num_attention_heads=k["HQ"],
                             num_query_groups=k["HKV"], kv_channels=k["D"], attention_dropout=0.0,
                             use_cpu_initialization=True, params_dtype=torch.bfloat16, bf16=True)


def _attention_step(kind: str, s: int, k: dict, device, dtype):
    """(step(packed) -> (output [s, ...], input gradients), the core attention) for one module on random inputs."""
    from models.attention.dense import SDPACoreAttention
    from models.attention.dsa import DSACoreAttention
    from models.attention.ksa import KSACoreAttention

    common = dict(layer_number=1, attn_mask_type=None, attention_type="self", softmax_scale=k["D"] ** -0.5)
    backend = "triton" if device.type == "cuda" else "naive"
    if kind == "dense":
        core = SDPACoreAttention(_config(k), **common)
    elif kind == "dsa":
        core = DSACoreAttention(_config(k), **common, topk=k["TOPK"], stage="sparse", backend=backend)
    else:
        core = KSACoreAttention(_config(k), **common, chunk=8, num_summary=1, window=128, backend=backend)
    core = core.to(device).train()
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(True)

    q, kk, v = rnd(s, 1, k["HQ"], k["D"]), rnd(s, 1, k["HKV"], k["D"]), rnd(s, 1, k["HKV"], k["D"])
    leaves = [q, kk, v]
    if kind == "dsa":
        idx = (rnd(1, s, k["HI"], k["DI"]), rnd(1, s, k["HI"], scale=(k["HI"] * k["DI"]) ** -0.5),
               rnd(1, s, k["DI"]))
        leaves += list(idx)
    dout = torch.randn(s, 1, k["HQ"] * k["D"], generator=g).to(device, dtype)

    def step(packed):
        for t in leaves:
            t.grad = None
        if kind == "dsa":
            core.indexer_out = idx
        out = core(q, kk, v, None, packed_seq_params=packed)
        out.backward(dout)
        return out.detach(), [t.grad for t in leaves]

    return step


def _loss_step(s: int, k: dict, device, dtype):
    from models.attention.dense import documents_part, with_padding_rows
    from models.moe.chunked_ce import chunked_cross_entropy

    g = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(s, 1, k["HIDDEN"], generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(k["VOCAB"], k["HIDDEN"], generator=g) * k["HIDDEN"] ** -0.5).to(device, dtype)
    weight.requires_grad_(True)
    labels = torch.randint(0, k["VOCAB"], (s, 1), generator=g).to(device)
    chunk = 4096 if device.type == "cuda" else 16

    def step(packed):
        hidden.grad = weight.grad = None
        n, _ = documents_part(s, packed)       # as ChunkedLossMixin._postprocess cuts the row
        loss = with_padding_rows(chunked_cross_entropy(hidden[:n], weight, labels[:n], chunk_tokens=chunk), s, 0)
        real = packed.documents.view(s, 1) >= 0
        (loss * real).sum().backward()          # the loss mask: the documents' tokens
        return loss.detach(), [hidden.grad, weight.grad]

    return step


def gpu_median_ms(fn) -> float:
    """The median of CUDA-event times of fn (ms): two calls to warm up, then as many as fill about half a second,
    7 to 100 (a 400 ms DSA step at 128K gets 7)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(7, min(100, int(0.5 / max(time.perf_counter() - t0, 1e-6))))
    times = [event_ms(fn) for _ in range(n)]
    return sorted(times)[n // 2]


def event_ms(fn) -> float:
    """One call of fn timed by CUDA events (ms)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def rel_rmse(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def run_case(kind, s, pad, doc, k, device, dtype, timer) -> dict:
    bounds = _bounds(s, pad, doc)
    step = _loss_step(s, k, device, dtype) if kind == "loss" else _attention_step(kind, s, k, device, dtype)
    named, plain = _packed(bounds, device, True), _packed(bounds, device, False)
    out_n, grads_n = step(named)
    out_p, grads_p = step(plain)
    real = s - pad
    # the loss's gradient into the weight sums over every token: the documents' rows only where the padding is
    # left out of the comparison are the hidden states' (and the weight's, whose padding rows give 0 either way)
    # the documents' rows of the outputs and of the inputs' gradients (the loss's weight gradient whole: the
    # padding adds nothing to it either way, its loss being masked)
    checks = {"out_rel": rel_rmse(out_n[:real], out_p[:real]),
              "grad_rel": max(rel_rmse(a[:real], b[:real]) if a.shape[0] == s else rel_rmse(a, b)
                              for a, b in zip(grads_n, grads_p)),
              "padding_out_zero": bool((out_n[real:] == 0).all()),
              "padding_out_max_not_named": float(out_p[real:].abs().amax())}
    del out_n, grads_n, out_p, grads_p
    t_named = timer(lambda: step(named))
    t_plain = timer(lambda: step(plain))
    return {"module": kind, "seq": s, "padding": pad, "padding_share": pad / s, "documents": len(bounds) - 2,
            "named_ms": t_named, "not_named_ms": t_plain, "ratio": t_named / t_plain, **checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="padding_tail.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    ap.add_argument("--only", nargs="*", default=None, help="modules to run (dense dsa ksa loss)")
    args = ap.parse_args()
    if args.smoke:
        k, cases, device, dtype = SMOKE, SMOKE_CASES, torch.device("cpu"), torch.float32

        def timer(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        require_gpus(__file__)
        k = dict(HQ=HQ, HKV=HKV, D=D, HI=HI, DI=DI, TOPK=TOPK, HIDDEN=HIDDEN, VOCAB=VOCAB)
        cases, device, dtype = CASES, torch.device("cuda"), torch.bfloat16
        timer = gpu_median_ms
    rows = []
    for kind, s, pad, doc in cases:
        if args.only and kind not in args.only:
            continue
        try:
            row = run_case(kind, s, pad, doc, k, device, dtype, timer)
        except Exception as e:  # noqa: BLE001 - one case's failure is recorded, the others still run
            row = {"module": kind, "seq": s, "padding": pad, "error": f"{type(e).__name__}: {e}"[:400]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "smoke": args.smoke}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "cases": rows}, f, indent=1)
    if any("error" in r for r in rows):
        raise SystemExit(f"{sum('error' in r for r in rows)} case(s) failed; see {args.out}")


if __name__ == "__main__":
    main()
