"""Autograd-correct collectives over the context-parallel (CP) group, in the megatron [s, b, h, d]
layout. Every function takes the group as an argument (no global state).

* `seq_to_head_a2a` / `head_to_seq_a2a` (Ulysses): the all-to-all that trades a sequence shard of
  all heads for all tokens of a head shard, and its inverse. Each is the other's backward, because
  an all-to-all is a permutation of data across ranks: its adjoint is the inverse permutation.
* `all_gather_seq`: every rank gets the whole sequence (rank-concatenated order); the backward is a
  reduce-scatter (sum), because every rank's loss depends on every rank's copy of the gathered
  tensor: d(sum_r L_r)/dx_local = sum over ranks of their gradient w.r.t. this rank's slice.

gloo (CPU) supports `all_to_all_single` with equal splits, `all_gather_into_tensor` and
`reduce_scatter_tensor` (checked with torch 2.13), so the same code runs in CPU tests and on NCCL.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["seq_to_head_a2a", "head_to_seq_a2a", "all_gather_seq", "group_size_rank"]

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of the CP group; (1, 0) when group is None or torch.distributed is not initialised."""
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _seq_to_head(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[n, b, h, d] (my tokens, all heads) -> [cp * n, b, h / cp, d] (all tokens, my heads)."""
    cp = dist.get_world_size(group)
    n, b, h, d = x.shape
    send = x.reshape(n, b, cp, h // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # [cp, n, b, h/cp, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = rank j's tokens of my head slice
    return recv.reshape(cp * n, b, h // cp, d)


def _head_to_seq(y: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[cp * n, b, h', d] (all tokens, my heads) -> [n, b, cp * h', d] (my tokens, all heads)."""
    cp = dist.get_world_size(group)
    s, b, hh, d = y.shape
    send = y.reshape(cp, s // cp, b, hh, d).contiguous()  # send[j] = rank j's tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] = my tokens of rank i's head slice
    return recv.permute(1, 2, 0, 3, 4).reshape(s // cp, b, cp * hh, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _head_to_seq(g, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _head_to_seq(y, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _seq_to_head(g, ctx.group), None


def seq_to_head_a2a(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Ulysses all-to-all: [n, b, h, d] sequence shard -> [cp*n, b, h/cp, d] head shard.

    The output's token order is rank-concatenated (rank 0's tokens, then rank 1's, ...): reorder with
    `split.rank_concat_to_natural` before attention that needs natural order. Raises if h % cp != 0.
    """
    cp = dist.get_world_size(group)
    if x.dim() != 4:
        raise ValueError(f"expected [s, b, heads, d], got shape {tuple(x.shape)}")
    if x.shape[2] % cp:
        raise ValueError(f"{x.shape[2]} heads cannot be split over cp = {cp} ranks")
    return _SeqToHead.apply(x, group)


def head_to_seq_a2a(y: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of `seq_to_head_a2a`: [cp*n, b, h', d] -> [n, b, cp*h', d]."""
    cp = dist.get_world_size(group)
    if y.dim() != 4 or y.shape[0] % cp:
        raise ValueError(f"expected [cp*n, b, heads, d] with cp = {cp}, got shape {tuple(y.shape)}")
    return _HeadToSeq.apply(y, group)


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        cp = dist.get_world_size(group)
        xt = x.movedim(dim, 0).contiguous()
        out = torch.empty((cp * xt.shape[0], *xt.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather(out, xt, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cp = dist.get_world_size(ctx.group)
        gt = g.movedim(ctx.dim, 0).contiguous()
        out = torch.empty((gt.shape[0] // cp, *gt.shape[1:]), dtype=g.dtype, device=g.device)
        _reduce_scatter(out, gt, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None


def all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup, *, dim: int) -> torch.Tensor:
    """All-gather along `dim` (rank-concatenated order); backward = reduce-scatter of the gradient."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllGatherSeq.apply(x, dim % x.dim(), group)
