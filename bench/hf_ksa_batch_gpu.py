"""Batched generate() from left-padded prompts through a KSA export's transformers code
(models/hf/modeling_qwen3_moe_ksa.py): this version, which runs a padded batch as one batch (rows left-aligned by
holes), against the version before it (the baseline), which ran a padded batch's rows one after another, each
with its own cache. Both load the same checkpoint, each from its own directory with its own code, in one process.

Two models, random weights (models/hf/tiny.py), chunks of 8 and 1 summary: 2 layers with the 30B's attention shapes
(hidden 2048, 32 query / 4 KV heads of 128), 8 experts of 768 (top 2), Qwen3's vocabulary, layer 0 KSA (a window of
4 chunks) and layer 1 dense, so both kinds of layer meet the holes; and the tiny recipe's 4 KSA layers of width
128, whose steps cost little, so that what a call costs beside its layers shows. bf16 on a GPU. Per batch:
GEN_NEW greedy tokens after prompts of GEN_PROMPT, 3/4, 1/2, 1/4 of it (repeated for 8 rows), left-padded; and one
unpadded row. For each: the time of generate() (one warm-up before, then REPEAT timed calls, the least and the
most), the peak memory above the weights, and whether both versions give the same tokens; then both in fp32
(fp32_check). On a CPU, a dry run at small sizes.

    python3 bench/hf_ksa_batch_gpu.py OLD_MODELING_FILE > $OUT/ksa_batch.jsonl
    (OLD_MODELING_FILE: the baseline's models/hf/modeling_qwen3_moe_ksa.py, e.g. from `git show 273f03f:...`)"""
import functools
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, ".")
from bench.hf_logits_gpu import repeated  # noqa: E402  (seconds and peak memory of calls)
from models.hf.tiny import add_tiny_ksa, save_tiny_qwen3_moe  # noqa: E402

CUDA = torch.cuda.is_available()
DEV, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
GEN_PROMPT, GEN_NEW, REPEAT = (8192, 32, 2) if CUDA else (96, 6, 1)
FP32_PROMPT, FP32_NEW = (1024, 16) if CUDA else (48, 4)


def attn_30b(positions: int) -> dict:
    """The 30B's attention shapes (32 query / 4 KV heads of 128, hidden 2048), 8 experts of 768 (top 2), Qwen3's
    vocabulary, for `positions` tokens; on a CPU, small."""
    shape = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768,
                 max_position_embeddings=positions)
    if not CUDA:
        shape.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     moe_intermediate_size=32, vocab_size=512)
    return shape


def tiny_recipe(positions: int) -> dict:
    """The tiny recipe's model (recipes/model/keye_tiny_ksa.yaml): 4 layers of width 128, for `positions` tokens;
    its steps cost little, so what a call costs beside its layers shows."""
    return dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                max_position_embeddings=positions)


KSA_CODE = "modeling_qwen3_moe_ksa.py"  # the modeling file ksa_writer's directories carry


def ksa_writer(windows: list[int]):
    """two_exports' `add` for KSA: chunks of 8 with 1 summary, as the recipes, and these windows."""
    return functools.partial(add_tiny_ksa, chunk=8, num_summary=1, windows=windows)


def two_exports(root: str, shape: dict, layers: list[int], old_file: str, add, *,
                code: str) -> tuple[str, str]:
    """A random checkpoint with this version's code under root/new, and the same checkpoint with `old_file` as its
    code under root/old: add(directory, layers) writes the variant's tensors and code (ksa_writer, or
    models/hf/tiny.py's add_tiny_dsa_indexers), `code` names the modeling file it writes."""
    new_dir, old_dir = os.path.join(root, "new"), os.path.join(root, "old")
    save_tiny_qwen3_moe(new_dir, dtype=DTYPE, **shape)
    add(new_dir, layers)
    shutil.copytree(new_dir, old_dir)
    shutil.copy(old_file, os.path.join(old_dir, code))
    return new_dir, old_dir


# the 30B's attention shapes in 2 layers, KSA on layer 0 (windows of 4 chunks); the tiny recipe's 4 KSA layers
SHAPE = attn_30b(GEN_PROMPT + 256)
MODELS = {"attn30b_2layers": (SHAPE, [0], [4]),
          "tiny_recipe": (tiny_recipe(GEN_PROMPT + 256), [0, 1, 2, 3], [4, 4, 4, 64])}

def prompts(rows: int, vocab: int, length: int = GEN_PROMPT):
    """`rows` left-padded prompts of `length`, 3/4, 1/2 and 1/4 of it (repeated), and their mask."""
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, :length - length * (4 - r % 4) // 4] = 0
    ids[mask == 0] = 0
    return ids.to(DEV), mask.to(DEV)


def main():
    from transformers import AutoModelForCausalLM

    from bench.cli import existing_file, parser
    ap = parser(__doc__)
    ap.add_argument("old_modeling_file", type=existing_file, help="the baseline's modeling_qwen3_moe_ksa.py")
    old_file = ap.parse_args().old_modeling_file
    root = tempfile.mkdtemp()
    for shape_name, (shape, layers, windows) in MODELS.items():
        new_dir, old_dir = two_exports(os.path.join(root, shape_name), shape, layers, old_file, ksa_writer(windows),
                                       code=KSA_CODE)
        models = {name: AutoModelForCausalLM.from_pretrained(d, dtype=DTYPE, trust_remote_code=True).to(DEV).eval()
                  for name, d in (("batched", new_dir), ("row_by_row", old_dir))}
        for rows in (1, 4, 8):
            timed(shape_name, shape["vocab_size"], models, rows)
        del models
        if shape is SHAPE:
            fp32_check(new_dir, old_dir)


def timed(shape_name: str, vocab: int, models: dict, rows: int):
    ids, mask = prompts(rows, vocab)
    rec = {"model": shape_name, "rows": rows, "prompt": GEN_PROMPT, "new": GEN_NEW, "real_tokens": mask.sum(1).tolist(),
           "dtype": str(DTYPE), "device": torch.cuda.get_device_name() if CUDA else "cpu"}
    kw = dict(attention_mask=mask if rows > 1 else None, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
              do_sample=False)
    tokens = {}
    for name, m in models.items():
        rec[name], out = repeated(lambda: m.generate(ids, **kw), REPEAT)  # noqa: B023
        tokens[name] = out[:, GEN_PROMPT:]
        del out
    rec["same_tokens"] = (tokens["batched"] == tokens["row_by_row"]).float().mean().item()
    rec["speedup"] = round(rec["row_by_row"]["s_min"] / rec["batched"]["s_min"], 2)
    if CUDA:
        rec["peak_ratio_batched_over_row_by_row"] = round(rec["batched"]["peak_gib"] / rec["row_by_row"]["peak_gib"], 2)
    print(json.dumps(rec), flush=True)


def fp32_check(new_dir: str, old_dir: str):
    """Both versions in fp32 on 4 left-padded prompts of FP32_PROMPT, 3/4, 1/2, 1/4 of it: the logits of every
    step of FP32_NEW greedy tokens (max difference) and the tokens. bf16 rounds a batch's products otherwise than
    a row's, so greedy tokens may part there; in fp32 the two are the same computation."""
    from transformers import AutoModelForCausalLM

    ids, mask = prompts(4, SHAPE["vocab_size"], FP32_PROMPT)
    outs = {}
    for name, d in (("batched", new_dir), ("row_by_row", old_dir)):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, trust_remote_code=True).to(DEV).eval()
        with torch.no_grad():
            outs[name] = m.generate(ids, attention_mask=mask, max_new_tokens=FP32_NEW, min_new_tokens=FP32_NEW,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
        del m
    a, b = outs["batched"], outs["row_by_row"]
    diff = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))
    scale = max(y.abs().max().item() for y in b.logits)
    print(json.dumps({"fp32_rows": 4, "prompt": FP32_PROMPT, "new": FP32_NEW, "real_tokens": mask.sum(1).tolist(),
                      "same_tokens": (a.sequences == b.sequences).float().mean().item(),
                      "logits_max_abs_diff": diff, "logits_max_abs": scale}), flush=True)


if __name__ == "__main__":
    main()
