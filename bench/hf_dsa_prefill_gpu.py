"""A DSA export's prefill and generation through its transformers code (models/hf/modeling_qwen3_moe_dsa.py): this
version against an earlier one (the baseline, OLD_MODELING_FILE), loaded from the same checkpoint in one process,
each directory with its own code; what bench/hf_ksa_prefill_gpu.py measures for KSA (prefill time and peak memory
per prompt length, a profile of this version's prefill, generation steps after a prompt in the cache, the logits of
both in bf16 and fp32), with the same lengths and repeats.

Models (random weights, models/hf/tiny.py): 4 layers with the 30B's attention shapes (hidden 2048, 32 query / 4 KV
heads of 128, Qwen3's vocabulary), all DSA with the 30B recipe's indexers (16 heads of 64, top 2048,
recipes/model/keye_30b_a3b_dsa.yaml); and the tiny recipe's 4 layers with its indexers (4 heads of 8, top 32,
recipes/model/keye_tiny_dsa.yaml). One row, bf16. On a CPU, a dry run at small sizes.

    python3 bench/hf_dsa_prefill_gpu.py OLD_MODELING_FILE [BASELINE_UPTO] > $OUT/dsa_prefill.jsonl
    (OLD_MODELING_FILE: the baseline's models/hf/modeling_qwen3_moe_dsa.py, e.g. from `git show 0123abc:...`;
    BASELINE_UPTO: the longest prompt the baseline runs, 65536 unless given)"""
import functools
import sys

sys.path.insert(0, ".")
from bench.hf_ksa_batch_gpu import attn_30b, tiny_recipe, two_exports  # noqa: E402  (the models, two versions)
from bench.hf_ksa_prefill_gpu import CUDA, LENGTHS, command_line, compare  # noqa: E402  (the comparison)
from models.hf.tiny import add_tiny_dsa_indexers  # noqa: E402

INDEX_30B = (16, 64, 2048) if CUDA else (4, 8, 32)  # index heads, index head dim, top-k
MODELS = {"attn30b_4layers": (attn_30b(max(LENGTHS) + 256), [0, 1, 2, 3], {"index": INDEX_30B}),
          "tiny_recipe": (tiny_recipe(max(LENGTHS) + 256), [0, 1, 2, 3], {"index": (4, 8, 32)})}


def dsa_exports(root: str, shape: dict, layers: list[int], info: dict, old_file: str) -> tuple[str, str]:
    heads, dim, topk = info["index"]
    add = functools.partial(add_tiny_dsa_indexers, heads=heads, dim=dim, topk=topk)
    return two_exports(root, shape, layers, old_file, add, code="modeling_qwen3_moe_dsa.py")


if __name__ == "__main__":
    compare(MODELS, dsa_exports, command_line(__doc__))
