"""transformers running our DSA and KSA exports through their own code (models/hf/modeling_qwen3_moe_{dsa,ksa}.py)
on the GPU, beside our model from the same run's checkpoint (Triton kernels; in fp32 also the naive backend): logits
on 2 x 512 tokens in bf16 and in fp32 (each side loaded in that dtype), a 32K-token prefill in bf16 (time, peak
memory), and generation with the cache against without it: the same tokens after a short prompt (also with a
static cache, which a KSA export refuses, and with assisted decoding's prompt lookup), and the time of
GEN_NEW tokens after a GEN_PROMPT-token prompt (bf16; batch 1, and a batch of 4 left-padded prompts; the baseline
is generation without the cache, which is how a KSA export generated before it had one). One JSON line per model.
Run by bench/hf_code_gpu.sh after it trains and exports the tiny DSA and KSA recipes:
    python3 bench/hf_code_gpu.py LABEL     (LABEL names the transformers in use in the output)"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "launch")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.cli import parser  # noqa: E402

_ap = parser(__doc__)
_ap.add_argument("label", help="names the transformers in use in the output")
label = _ap.parse_args().label
CUDA = torch.cuda.is_available()
DEV, DTYPE, LONG = ("cuda", torch.bfloat16, 32768) if CUDA else ("cpu", torch.float32, 512)  # CPU: a dry run
GEN_PROMPT, GEN_NEW = (8192, 32) if CUDA else (256, 8)


def ours(v, ids, dtype, backend=None):
    import convert
    from models.hf.verify import model_logits
    from train import checkpoint as ckpt

    lm = convert.model_config(None, [], hf_dir=f"/tmp/hf_{v}")
    chunks, pgs, _ = convert.build_model(lm, dtype=dtype)
    missing = ckpt.load_model_weights(ckpt.find_latest(f"/tmp/a_{v}"), chunks, dp_cp_group=pgs.dp_cp)
    assert not missing, missing
    if backend:
        from models.attention.dsa import DSACoreAttention
        from models.attention.ksa import KSACoreAttention

        for m in chunks[0].modules():
            if isinstance(m, (DSACoreAttention, KSACoreAttention)):
                m.backend = backend
    return model_logits(chunks[0], ids, tp_group=pgs.tp)


def compare(mine, theirs):
    d = (mine - theirs).abs()
    return dict(max_abs_diff=d.max().item(), mean_abs_diff=d.mean().item(), max_abs_logit=theirs.abs().max().item(),
                argmax_agree=(mine.argmax(-1) == theirs.argmax(-1)).float().mean().item())


for v in ("dsa", "ksa"):
    rec = {"label": label, "variant": v, "transformers": transformers.__version__}
    try:
        for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)) if CUDA else (("fp32", torch.float32),):
            m = AutoModelForCausalLM.from_pretrained(f"/tmp/hf_{v}", dtype=dt, trust_remote_code=True).to(DEV).eval()
            rec["class"] = type(m).__name__
            ids = torch.randint(0, m.config.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                theirs = m(input_ids=ids.to(DEV)).logits.float().cpu()
            rec[name] = compare(ours(v, ids, dt), theirs)
            if dt == torch.float32:
                rec[name + "_naive"] = compare(ours(v, ids, dt, "naive"), theirs)
        m = AutoModelForCausalLM.from_pretrained(f"/tmp/hf_{v}", dtype=DTYPE, trust_remote_code=True).to(DEV).eval()
        n = LONG
        long_ids = torch.randint(0, m.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1)).to(DEV)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if CUDA else 0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = m(input_ids=long_ids, use_cache=False, logits_to_keep=1) if v == "dsa" else m(input_ids=long_ids)
        if CUDA:
            torch.cuda.synchronize()
        rec.update(long_tokens=n, long_s=round(time.perf_counter() - t0, 3),
                   long_peak_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 3) if CUDA else None,
                   long_finite=bool(torch.isfinite(out.logits).all()))
        del out
        prompt = ids[:, :100].to(DEV)
        with torch.no_grad():
            a = m.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True)
            b = m.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False)
        rec["generate_cache_vs_none_same_tokens"] = (a[:, 100:] == b[:, 100:]).float().mean().item()
        rec["generated"] = list(a.shape)
        # the other caches generate() builds: a preallocated one (cache_implementation="static": DSA runs it, KSA
        # refuses it naming the remedy) and assisted decoding's, cropped after each rejected guess
        try:
            with torch.no_grad():
                c = m.generate(prompt, max_new_tokens=24, do_sample=False, cache_implementation="static")
            rec["static_vs_none_same_tokens"] = (c[:, 100:] == b[:, 100:]).float().mean().item()
        except ValueError as e:
            rec["static_refused"] = str(e)[:300]
        with torch.no_grad():
            d = torch.cat([m.generate(prompt[r:r + 1], max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=5)
                           for r in range(prompt.shape[0])])   # assisted decoding takes one row at a time
        rec["assisted_vs_none_same_tokens"] = (d[:, 100:] == b[:, 100:]).float().mean().item()

        def timed_generate(prompt, mask, use_cache):
            if CUDA:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = m.generate(prompt, attention_mask=mask, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
                                 do_sample=False, use_cache=use_cache)
            if CUDA:
                torch.cuda.synchronize()
            return time.perf_counter() - t0, out[:, prompt.shape[1]:]

        # one row; then a batch of 4 left-padded rows (GEN_PROMPT, 3/4, 1/2 and 1/4 of it): KSA runs a padded
        # batch's rows one by one, each with its own cache
        one = long_ids[:, :GEN_PROMPT]
        lengths = [GEN_PROMPT * k // 4 for k in (4, 3, 2, 1)]
        padded = torch.zeros(4, GEN_PROMPT, dtype=torch.long, device=DEV)
        pmask = torch.zeros_like(padded)
        for r, n in enumerate(lengths):
            padded[r, GEN_PROMPT - n:] = long_ids[0, :n]
            pmask[r, GEN_PROMPT - n:] = 1
        for name, prompt, mask in (("gen", one, None), ("gen_padded4", padded, pmask)):
            timed_generate(prompt, mask, True)  # warm-up (kernels, allocator)
            (with_s, with_tok), (none_s, none_tok) = timed_generate(prompt, mask, True), timed_generate(prompt, mask, False)
            rec[name] = dict(prompt=list(prompt.shape), new=GEN_NEW, cache_s=round(with_s, 3),
                             no_cache_s=round(none_s, 3), speedup=round(none_s / with_s, 2),
                             same_tokens=(with_tok == none_tok).float().mean().item())
    except Exception:  # recorded, the other model still runs
        import traceback

        rec["error"] = traceback.format_exc()[-3000:]
    print(json.dumps(rec), flush=True)
