"""GPU, context parallelism: the padding at a packed row's end, named against not, on 2 ranks (parallel.cp=2).

    python bench/bench_padding_tail_cp.py --out $OUT/padding_tail_cp.json       # 2 GPUs, bf16, the 30B's shapes
    python bench/bench_padding_tail_cp.py --smoke --out /tmp/padding_cp.json    # CPU, gloo, tiny shapes

bench_padding_tail.py's comparison under CP 2, in the trainer's default token layout (parallel.cp_split=document:
every document's chunks r and 2cp-1-r, so each rank holds about half the padding segment). The row's packed params
come from the trainer's own calls (train/trainer.py packed_params, then parallel/context/batch.py split_batch_for_cp,
which tells each rank the padding that ends its share); the modules get parallel/context's functions as the trainer
injects them. Per rank, forward+backward of:
  dense  SDPACoreAttention under CP (Ulysses all-to-all), documents of 8,192 tokens, then the padding
  dsa    DSACoreAttention, sparse stage under CP (gathered index keys and K / V), top-2048, index 16 x 64, the KL in
         the attention's backward as training runs it: one document, then the padding
  loss   the chunked cross-entropy of the rank's tokens before its share of the padding (ChunkedLossMixin's cut)
with the padding named (PackedSeqDocuments.pad_tail, pad_tail_local) against not named (the code before: the dense
attention attended it as one more document, DSA selected, attended and took the KL of every local row, the loss
computed every local row's logits). Checks on every rank: the documents' outputs and input gradients agree, named
against not (relative RMSE), and the padding's outputs are 0 when named. Times: the median of a fixed number of
calls (the same on both ranks: the calls meet in collectives), CUDA events, after two; a rank's time includes its
waits for the other, so the slower rank's is the step's. This script starts torchrun itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.bench_padding_tail import event_ms, rel_rmse  # noqa: E402
from bench.cli import require_gpus  # noqa: E402

HQ, HKV, D, HI, DI, TOPK, HIDDEN, VOCAB = 32, 4, 128, 16, 64, 2048, 2048, 151936
# (module, row tokens, padding tokens, document tokens or None for one document, timed calls)
CASES = [("dense", 131072, 16384, 8192, 20), ("dense", 131072, 32768, 8192, 20),
         ("dsa", 65536, 8192, None, 10), ("dsa", 65536, 16384, None, 10),
         ("dsa", 131072, 16384, None, 7), ("dsa", 131072, 32768, None, 7),
         ("loss", 65536, 8192, None, 20), ("loss", 65536, 16384, None, 20)]
SMOKE = dict(HQ=4, HKV=2, D=16, HI=2, DI=8, TOPK=8, HIDDEN=32, VOCAB=64)
SMOKE_CASES = [("dense", 96, 24, 24, 2), ("dsa", 96, 24, None, 2), ("dsa", 96, 60, None, 2), ("loss", 96, 24, None, 2)]


def _row(s: int, pad: int, doc: int | None, named: bool, group, device):
    """The trainer's packed params of a row (documents of `doc` tokens, then `pad` of padding: document -1), as this
    CP rank gets them: split_batch_for_cp's (pad_tail_local) with the documents of its share."""
    from parallel.context.batch import cp_share, split_batch_for_cp
    from train.trainer import packed_params, trailing_padding

    real = s - pad
    bounds = list(range(0, real, doc or real)) + [real, s]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    padding = [False] * (len(lengths) - 1) + [True]
    kwargs = {"packed_seq_params": packed_params(cu, tail=trailing_padding(lengths, padding if named else None))}
    tokens = torch.zeros(1, s, dtype=torch.long, device=device)
    pos = torch.arange(s, device=device).expand(3, 1, s)
    *_, kwargs = split_batch_for_cp(tokens, tokens, tokens, pos, kwargs, group, split="document")
    docs = torch.repeat_interleave(torch.arange(len(lengths), device=device), cu[1:] - cu[:-1])
    docs[real:] = -1
    docs = cp_share(docs.view(1, -1), kwargs, group, split="document")
    packed = dataclasses.replace(kwargs["packed_seq_params"], documents=docs, num_documents=len(lengths))
    return packed, docs.view(-1) >= 0


def _config(k, cp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=k["HQ"] * k["D"], num_attention_heads=k["HQ"],
                             num_query_groups=k["HKV"], kv_channels=k["D"], attention_dropout=0.0,
                             context_parallel_size=cp, use_cpu_initialization=True, params_dtype=torch.bfloat16,
                             bf16=True)


def _step(kind: str, n: int, k: dict, group, device, dtype):
    """step(packed) -> (output [n, ...], input gradients) of one module on this rank's n tokens."""
    from models.attention.dense import SDPACoreAttention, local_documents, with_padding_rows
    from models.attention.dsa import DSACoreAttention
    from models.moe.chunked_ce import chunked_cross_entropy
    from parallel.context import ContextParallelAttention

    g = torch.Generator(device="cpu").manual_seed(1000 + group.rank())

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(True)

    if kind == "loss":
        hidden = rnd(n, 1, k["HIDDEN"])
        weight = rnd(k["VOCAB"], k["HIDDEN"], scale=k["HIDDEN"] ** -0.5)
        labels = torch.randint(0, k["VOCAB"], (n, 1), generator=g).to(device)
        chunk = 4096 if device.type == "cuda" else 16

        def loss_step(packed, real):
            hidden.grad = weight.grad = None
            m = local_documents(n, packed, context_parallel=True)   # ChunkedLossMixin._postprocess's cut
            loss = with_padding_rows(chunked_cross_entropy(hidden[:m], weight, labels[:m], chunk_tokens=chunk), n, 0)
            (loss * real.view(n, 1)).sum().backward()   # the loss mask: the documents' tokens
            return loss.detach(), [hidden.grad]
        return loss_step
    common = dict(layer_number=1, attn_mask_type=None, attention_type="self", softmax_scale=k["D"] ** -0.5,
                  pg_collection=SimpleNamespace(cp=group), cp_ops=ContextParallelAttention(split="document"))
    if kind == "dense":
        core = SDPACoreAttention(_config(k, group.size()), **common)
    else:
        core = DSACoreAttention(_config(k, group.size()), **common, topk=k["TOPK"], stage="sparse",
                                backend="triton" if device.type == "cuda" else "naive")
    core = core.to(device).train()
    q, kk, v = rnd(n, 1, k["HQ"], k["D"]), rnd(n, 1, k["HKV"], k["D"]), rnd(n, 1, k["HKV"], k["D"])
    leaves = [q, kk, v]
    if kind == "dsa":
        idx = (rnd(1, n, k["HI"], k["DI"]), rnd(1, n, k["HI"], scale=(k["HI"] * k["DI"]) ** -0.5), rnd(1, n, k["DI"]))
        leaves += list(idx)
    dout = torch.randn(n, 1, k["HQ"] * k["D"], generator=g).to(device, dtype)

    def step(packed, real):
        for t in leaves:
            t.grad = None
        if kind == "dsa":
            core.indexer_out = idx
        out = core(q, kk, v, None, packed_seq_params=packed)
        (out * real.view(n, 1, 1)).backward(dout)    # no loss reads the padding's outputs
        return out.detach(), [t.grad for t in leaves]
    return step


def _timer(fn, calls: int, device) -> float:
    """Median ms of `calls` calls after two (the same count on every rank: the calls meet in collectives)."""
    import torch.distributed as dist

    fn()
    fn()
    dist.barrier()
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            times.append(event_ms(fn))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[calls // 2]


def worker(out: str, smoke: bool) -> None:
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not smoke
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    group = dist.group.WORLD
    k, cases, dtype = (SMOKE, SMOKE_CASES, torch.float32) if smoke else (
        dict(HQ=HQ, HKV=HKV, D=D, HI=HI, DI=DI, TOPK=TOPK, HIDDEN=HIDDEN, VOCAB=VOCAB), CASES, torch.bfloat16)
    rows = []
    for kind, s, pad, doc, calls in cases:
        n = s // group.size()
        try:
            step = _step(kind, n, k, group, device, dtype)
            named, real = _row(s, pad, doc, True, group, device)
            plain, _ = _row(s, pad, doc, False, group, device)
            out_n, grads_n = step(named, real)
            out_p, grads_p = step(plain, real)
            kept = n - (named.pad_tail_local or 0)
            row = {"module": kind, "seq": s, "padding": pad, "padding_share": pad / s, "rank": rank,
                   "local_padding": n - kept, "documents_local": int(real.sum()),
                   "out_rel": rel_rmse(out_n[real], out_p[real]),
                   "grad_rel": max(rel_rmse(a[real] if a.shape[0] == n else a[:, real], b[real] if b.shape[0] == n
                                        else b[:, real]) for a, b in zip(grads_n, grads_p)),
                   "padding_out_zero": bool((out_n[kept:] == 0).all())}
            del out_n, grads_n, out_p, grads_p
            row["named_ms"] = _timer(lambda: step(named, real), calls, device)
            row["not_named_ms"] = _timer(lambda: step(plain, real), calls, device)
            row["ratio"] = row["named_ms"] / row["not_named_ms"]
        except Exception as e:  # noqa: BLE001 - recorded; the other rank fails the same case in its collectives
            row = {"module": kind, "seq": s, "padding": pad, "rank": rank, "error": f"{type(e).__name__}: {e}"[:400]}
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
    gathered = [None] * group.size()
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "cp": 2,
                "split": "document", "smoke": smoke}
        with open(out, "w") as f:
            json.dump({"meta": meta, "cases": [r for rs in gathered for r in rs]}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="padding_tail_cp.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, gloo (checks the script)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.out, args.smoke)
    if not args.smoke:
        require_gpus(__file__, gpus=2, hint="--smoke checks the script on the CPU")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                    "--worker", "--out", os.path.abspath(args.out)] + (["--smoke"] if args.smoke else []),
                   check=True, cwd=REPO)
    with open(args.out) as f:
        rows = json.load(f)["cases"]
    for r in rows:
        print(json.dumps(r))
    if any("error" in r for r in rows):
        raise SystemExit(f"{sum('error' in r for r in rows)} case(s) failed; see {args.out}")


if __name__ == "__main__":
    main()
