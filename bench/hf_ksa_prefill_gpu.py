"""A KSA export's prefill through its transformers code (models/hf/modeling_qwen3_moe_ksa.py): this version, whose
KSA layers attend through torch's scaled_dot_product_attention in the model's dtype (the KSA mask as its
attn_mask), against the version before it (the baseline: fp32 einsum logits, masked, softmax, einsum), loaded from
the same checkpoint in one process, each directory with its own code.

Models (random weights, models/hf/tiny.py; chunks of 8, 1 summary), as in bench/hf_ksa_batch_gpu.py: 2 layers
with the 30B's attention shapes (KSA then dense, Qwen3's vocabulary) and the tiny recipe's 4 KSA layers of width
128. One row, bf16, with the cache and logits_to_keep=1 (as generate()'s prefill): time (a warm-up, then REPEAT
calls: least and most) and peak memory above the weights, per prompt length; the last token's logits of both (max
difference, same argmax); and in fp32 at FP32_PROMPT tokens, the max difference of every token's logits. On a CPU,
a dry run at small sizes.

    python3 bench/hf_ksa_prefill_gpu.py OLD_MODELING_FILE > $OUT/ksa_prefill.jsonl"""
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, ".")
from models.hf.tiny import add_tiny_ksa, save_tiny_qwen3_moe  # noqa: E402

CUDA = torch.cuda.is_available()
DEV, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
LENGTHS, REPEAT, FP32_PROMPT = ((8192, 32768, 65536), 2, 2048) if CUDA else ((128, 256), 1, 64)
SHAPE = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768,
             max_position_embeddings=max(LENGTHS) + 256)
if not CUDA:
    SHAPE.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 moe_intermediate_size=32, vocab_size=512)
TINY_KSA = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                max_position_embeddings=max(LENGTHS) + 256)
MODELS = {"attn30b_2layers": (SHAPE, [0], [4]), "tiny_recipe": (TINY_KSA, [0, 1, 2, 3], [4, 4, 4, 64])}


def measured(fn):
    """(seconds, peak bytes above what was allocated before, result) of fn(); on the CPU, peak None."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) if CUDA else None, out


def load(d: str, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype, trust_remote_code=True).to(DEV).eval()


def main():
    old_file = sys.argv[1]
    root = tempfile.mkdtemp()
    gib = 2.0 ** 30
    for shape_name, (shape, layers, windows) in MODELS.items():
        dirs = {"sdpa": os.path.join(root, shape_name, "new"), "einsum_fp32": os.path.join(root, shape_name, "old")}
        save_tiny_qwen3_moe(dirs["sdpa"], dtype=DTYPE, **shape)
        add_tiny_ksa(dirs["sdpa"], layers, chunk=8, num_summary=1, windows=windows)
        shutil.copytree(dirs["sdpa"], dirs["einsum_fp32"])
        shutil.copy(old_file, os.path.join(dirs["einsum_fp32"], "modeling_qwen3_moe_ksa.py"))
        models = {name: load(d, DTYPE) for name, d in dirs.items()}
        for n in LENGTHS:
            ids = torch.randint(0, shape["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n)).to(DEV)
            rec = {"model": shape_name, "prompt": n, "dtype": str(DTYPE),
                   "device": torch.cuda.get_device_name() if CUDA else "cpu"}
            last = {}
            for name, m in models.items():
                call = lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1].float()  # noqa: E731
                measured(call)  # warm-up
                runs = [measured(call) for _ in range(REPEAT)]
                last[name] = runs[-1][2]
                rec[name] = {"s_min": round(min(r[0] for r in runs), 3), "s_max": round(max(r[0] for r in runs), 3),
                             "peak_gib": None if runs[0][1] is None else round(max(r[1] for r in runs) / gib, 3)}
            rec["speedup"] = round(rec["einsum_fp32"]["s_min"] / rec["sdpa"]["s_min"], 2)
            if CUDA:
                rec["peak_ratio"] = round(rec["sdpa"]["peak_gib"] / rec["einsum_fp32"]["peak_gib"], 2)
            rec["last_logits_max_abs_diff"] = (last["sdpa"] - last["einsum_fp32"]).abs().max().item()
            rec["last_logits_max_abs"] = last["einsum_fp32"].abs().max().item()
            rec["same_argmax"] = bool(last["sdpa"].argmax() == last["einsum_fp32"].argmax())
            print(json.dumps(rec), flush=True)
        del models
        fp32 = {name: load(d, torch.float32) for name, d in dirs.items()}
        ids = torch.randint(0, shape["vocab_size"], (1, FP32_PROMPT), generator=torch.Generator().manual_seed(1)).to(DEV)
        with torch.no_grad():
            logits = {name: m(input_ids=ids, use_cache=False).logits for name, m in fp32.items()}
        print(json.dumps({"model": shape_name, "fp32_prompt": FP32_PROMPT,
                          "logits_max_abs_diff": (logits["sdpa"] - logits["einsum_fp32"]).abs().max().item(),
                          "logits_max_abs": logits["einsum_fp32"].abs().max().item()}), flush=True)
        del fp32, logits


if __name__ == "__main__":
    main()
