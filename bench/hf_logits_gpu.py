"""Peak memory and time of a KSA export's prefill through transformers (models/hf/modeling_qwen3_moe_ksa.py) with
the logits of every prompt token (logits_to_keep=0: what generate()'s prefill built before the KSA code took the
argument, the baseline) against the last token's alone (logits_to_keep=1: what generate() passes now), in the same
process, and generate() itself (2 new tokens) for the record.

The model is the tiny random KSA checkpoint of models/hf/tiny.py (2 layers of width 64, KSA on both: chunks of 8,
1 summary, windows of 4 and 64 chunks) with Qwen3's vocabulary of 151,936 tokens, so the logits weigh what they
weigh for the 30B model while the layers cost little. bf16 on a GPU; on a CPU a dry run at small sizes.

    python3 bench/hf_logits_gpu.py > $OUT/hf_logits.jsonl      (one JSON line per prompt length)"""
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, ".")
from models.hf.tiny import add_tiny_ksa, save_tiny_qwen3_moe  # noqa: E402

CUDA = torch.cuda.is_available()
DEV, DTYPE, LENGTHS = ("cuda", torch.bfloat16, (8192, 32768)) if CUDA else ("cpu", torch.float32, (256,))
VOCAB = 151936  # Qwen3's


def measured(fn):
    """(seconds, peak bytes above what was allocated before, result) of fn() on the GPU; on the CPU, peak None."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if CUDA:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, (torch.cuda.max_memory_allocated() - base) if CUDA else None, out


def repeated(fn, times: int) -> tuple[dict, object]:
    """({least and most seconds, most peak GiB above what was allocated before, the warm-up's seconds}, the last
    result) of `times` calls of fn() after a warm-up (allocator, kernels); on the CPU, peak None."""
    first = measured(fn)[0]
    runs = [measured(fn) for _ in range(times)]
    return ({"s_min": round(min(r[0] for r in runs), 4), "s_max": round(max(r[0] for r in runs), 4),
             "s_first": round(first, 4),
             "peak_gib": None if runs[0][1] is None else round(max(r[1] for r in runs) / 2.0 ** 30, 3)}, runs[-1][2])


def top_kernels(model, ids: torch.Tensor, n: int = 8) -> dict:
    """The GPU time of one prefill call and the n kernels that take most of it: [name, ms, launches]."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
        events = prof.key_averages()
        ms = {e.key: e.self_device_time_total / 1e3 for e in events}
        top = sorted(events, key=lambda e: ms[e.key], reverse=True)[:n]
        return {"gpu_ms": round(sum(ms.values()), 2),
                "top": [[e.key[:100], round(ms[e.key], 2), e.count] for e in top]}
    except Exception as e:  # the profile is an aside: the timings stand without it
        return {"error": repr(e)}


def main():
    from transformers import AutoModelForCausalLM

    from bench.cli import parser
    parser(__doc__).parse_args()
    d = os.path.join(tempfile.mkdtemp(), "ksa_hf")
    save_tiny_qwen3_moe(d, vocab_size=VOCAB, max_position_embeddings=max(LENGTHS) + 64)
    add_tiny_ksa(d, [0, 1], chunk=8, num_summary=1, windows=[4, 64])
    m = AutoModelForCausalLM.from_pretrained(d, dtype=DTYPE, trust_remote_code=True).to(DEV).eval()
    gib = 2.0 ** 30
    for n in LENGTHS:
        ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)).to(DEV)
        m(input_ids=ids[:, :64], use_cache=False)  # warm-up
        rec = {"prompt": n, "vocab": VOCAB, "dtype": str(DTYPE), "device": torch.cuda.get_device_name() if CUDA else "cpu"}
        for name, keep in (("all_logits", 0), ("last_logits", 1)):
            s, peak, out = measured(lambda: m(input_ids=ids, use_cache=True, logits_to_keep=keep))
            rec[name] = {"s": round(s, 3), "peak_gib": None if peak is None else round(peak / gib, 3),
                         "logits_shape": list(out.logits.shape)}
            last = out.logits[0, -1].float()
            rec[name + "_last_row"] = last
            del out
        rec["last_row_max_abs_diff"] = (rec.pop("all_logits_last_row") - rec.pop("last_logits_last_row")).abs().max().item()
        s, peak, out = measured(lambda: m.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False))
        rec["generate_2"] = {"s": round(s, 3), "peak_gib": None if peak is None else round(peak / gib, 3)}
        del out
        if rec["all_logits"]["peak_gib"]:
            rec["peak_ratio_all_over_last"] = round(rec["all_logits"]["peak_gib"] / rec["last_logits"]["peak_gib"], 2)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
