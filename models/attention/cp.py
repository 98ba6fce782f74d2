"""What the attention modules need from context parallelism (CP), as an injected interface.

models/ never imports parallel/ (DESIGN: kernels <- models <- parallel/data <- train). The attention
modules therefore receive the CP implementation as an object through their spec: `build_lm(...,
cp_ops=...)` -> `attention_spec(..., cp_ops=...)` -> the `cp_ops` constructor argument of
`SDPACoreAttention`, `DSACoreAttention`, `KSACoreAttention` and `KSASelfAttention`. train/ builds the
object (`parallel.context.ContextParallelAttention(split=parallel.cp_split)`) and passes it in; this
file only states what the modules call (`ContextParallelOps`). Nothing is registered globally.

Conventions of every call: the tensors are this rank's share of the (packed) sequence, in the token
layout of the split the ops object was built for (the same split the trainer applied to the batch);
`cu_seqlens` are the GLOBAL document boundaries of the whole sequence (batch 1 when packed).
Shapes (megatron layout): query [n, b, Hq, D], key / value [n, b, Hkv, D], n = S / cp.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["ContextParallelOps", "cp_group_of", "cp_ops_for", "resolve_cp_comm"]

# megatron's cp_comm_type spelling -> the ops' spelling; None (megatron's default) is Ulysses, DESIGN decision 6
_CP_COMM = {None: "a2a", "a2a": "a2a", "all_gather": "allgather", "allgather": "allgather"}


class ContextParallelOps(Protocol):
    """The context-parallel attention functions (parallel/context implements them)."""

    def check_heads(self, num_q_heads: int, num_kv_heads: int, cp_size: int) -> None:
        """ValueError when Ulysses cannot split these heads (after TP) over cp ranks."""

    def dense(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, cp_group,
              scale: float, cu_seqlens: torch.Tensor | None, dropout_p: float = 0.0,
              cp_comm: str = "a2a", pad_tail: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Causal GQA attention of the local queries over the whole sequence -> [n, b, Hq, D]. pad_tail: (tokens,
        segments) of padding at the whole sequence's end (models/attention/dense.py padding_tail), not attended: the
        output of its tokens is 0."""

    def dsa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_idx: torch.Tensor,
            w: torch.Tensor, k_idx: torch.Tensor, *, cp_group, topk: int, stage: str, scale: float,
            cu_seqlens: torch.Tensor | None, backend: str, dense_cp_comm: str, kl_grad: float | None = None,
            with_kl: bool = True, kl_in_backward: float | None = None,
            pad_tail: tuple[int, int] = (0, 0), local_tail: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DSA ("sparse" | "dense" stage) -> (out [n, b, Hq, D], mean indexer KL over the local tokens).
        pad_tail: as for dense (the dense stage's attention leaves it out). local_tail: how many of the local tokens,
        at the end of the rank's share, lie in it (models/attention/dense.py local_documents): they select nothing,
        attend nothing (output 0) and are not in the KL or its mean.
        kl_grad: the caller's d(total)/d(KL) when it back-propagates the KL in its forward; an implementation may
        back-propagate it itself and return the KL detached (the caller then has nothing left to do).
        with_kl=False: the caller will not use the KL (None is returned); every rank of the group passes the same.
        kl_in_backward: the caller's d(total)/d(KL) for a KL it would attach to the output; an implementation may
        deliver that gradient in the output's backward itself and return the KL detached, filled by that backward
        (the caller attaches only a KL that still requires grad)."""

    def ksa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, cp_group, chunk: int,
            window: int, num_summary: int, cu_seqlens: torch.Tensor | None, scale: float | None,
            backend: str, pad_tail: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """KSA over the whole interleaved sequence -> [n, b, Hq, D]; pad_tail as for dense."""

    def summary_mask(self, seq_len: int, batch: int, *, chunk: int, num_summary: int,
                     cu_seqlens: torch.Tensor | None, cp_group, device) -> torch.Tensor:
        """[n, b] bool: which local tokens are KSA summary slots (seq_len: the GLOBAL interleaved length)."""


def cp_group_of(pg_collection):
    """The context-parallel group from the layer's process groups, or None when CP is off (size 1).

    Core attention modules take their CP group from here, never from megatron's global parallel state."""
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    return group if group is not None and group.size() > 1 else None


def cp_ops_for(config, pg_collection, cp_ops: ContextParallelOps | None):
    """(cp_group, cp_ops) of a module: both None when CP is off; ValueError when CP is on and either is missing."""
    group = cp_group_of(pg_collection)
    if config.context_parallel_size > 1:
        if group is None:
            raise ValueError("context_parallel_size > 1 but the layer's pg_collection has no CP group of that size")
        if cp_ops is None:
            raise ValueError("context_parallel_size > 1 needs the context-parallel attention functions: build the "
                             "model with build_lm(..., cp_ops=parallel.context.ContextParallelAttention(split=...)) "
                             "(train/trainer.py does)")
    return (group, cp_ops) if group is not None else (None, None)


def resolve_cp_comm(cp_comm_type: str | None, *, num_q_heads: int, num_kv_heads: int, cp_size: int,
                    cp_ops: ContextParallelOps | None = None) -> str:
    """Validated CP communication for dense attention ("a2a" | "allgather"); checks Ulysses' head split
    through `cp_ops` when CP is on. num_q_heads / num_kv_heads are the heads after tensor parallelism."""
    if cp_comm_type not in _CP_COMM:
        raise ValueError(f"context-parallel communication {cp_comm_type!r} is not supported by this model's attention; "
                         "use 'a2a' (Ulysses) or 'all_gather' (all-gathered K/V)")
    comm = _CP_COMM[cp_comm_type]
    if comm == "a2a" and cp_size > 1 and cp_ops is not None:
        cp_ops.check_heads(num_q_heads, num_kv_heads, cp_size)
    return comm
