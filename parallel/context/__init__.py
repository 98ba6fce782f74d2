"""Context parallelism (CP) for the language model's attention: the load-balanced sequence split
("sequence" or per-"document" layout) and CP-aware dense (Ulysses or all-gather KV), DSA and KSA attention.
Every function takes the CP process group as an argument; nothing reads global state. The model gets the
attention functions injected as a `ContextParallelAttention` object (models/ never imports this package).
See README.md.
"""
from parallel.context.attention import (check_cp_heads, dense_cp_attention, expand_kv_heads_for_cp,
                                        ksa_cp_attention, ksa_summary_mask_for_cp, ulysses_attention)
from parallel.context.comm import all_gather_seq, group_size_rank, head_to_seq_a2a, seq_to_head_a2a
from parallel.context.dsa import DSACPOutput, cp_topk_indices, dsa_cp_attention, gather_index_keys
from parallel.context.ops import ContextParallelAttention
from parallel.context.split import (CP_SPLITS, CPSplit, causal_pairs_per_rank, check_cp_seq_len, cp_chunk_bounds,
                                    cp_global_indices, cp_rank_concat_indices, natural_to_rank_concat,
                                    rank_concat_to_natural, split_for_cp, unsplit_from_cp)

__all__ = [
    "split_for_cp", "unsplit_from_cp", "cp_global_indices", "cp_chunk_bounds", "cp_rank_concat_indices",
    "check_cp_seq_len", "rank_concat_to_natural", "natural_to_rank_concat", "causal_pairs_per_rank",
    "CPSplit", "CP_SPLITS",
    "seq_to_head_a2a", "head_to_seq_a2a", "all_gather_seq", "group_size_rank",
    "check_cp_heads", "expand_kv_heads_for_cp", "ulysses_attention", "dense_cp_attention", "ksa_cp_attention",
    "ksa_summary_mask_for_cp", "DSACPOutput", "dsa_cp_attention", "cp_topk_indices", "gather_index_keys",
    "ContextParallelAttention",
]
