"""Vocab-parallel cross-entropy from hidden states, chunked over tokens: the logits of the whole sequence
never exist.

Legend: N tokens, H hidden, V vocabulary, V_r = V / tp rows of the output weight on this TP rank
(rank r holds vocabulary rows [r * V_r, (r + 1) * V_r), as megatron's ColumnParallelLinear does).

    loss[n] = logsumexp_v(hidden[n] . W[v]) - hidden[n] . W[label[n]]

Forward, per chunk of C tokens: logits [C, V_r] = hidden_c @ W_r^T in the compute dtype (as megatron's
output layer), then in fp32 the local max, sum of exp and target logit; after all chunks, two
all-reduces over the TP group (max, then sum of rescaled exp-sums and target logits) give the global
logsumexp. Saved for backward: hidden, W, labels and the per-token logsumexp [N] (fp32).

Backward, per chunk: recompute the logits, softmax = exp(logits - lse), subtract 1 at the label,
scale by the incoming per-token gradient, then d_hidden_c = g @ W_r and dW_r += g^T @ hidden_c
(each chunk's product rounded once to the compute dtype, summed in fp32). d_hidden is this rank's
partial sum over its vocabulary slice; the caller's TP region (sequence-parallel gather or copy) reduces
it across the TP group, exactly as for megatron's output layer.

Peak memory of the loss: about C * V_r * 6 bytes in bf16 (4 in fp32): in the forward one chunk's bf16 logits
with their fp32 copy, in the backward the fp32 softmax with its bf16 gradient (never all three at once; in
fp32 the copy and the gradient are the logits tensor itself), plus an fp32 dW accumulator [V_r, H] when
there is more than one chunk. Megatron's full-logit loss peaks at N * V_r * 6 bytes in bf16 as well (bf16
logits and their fp32 copy, which becomes the softmax in place), and keeps the N * V_r * 4 bytes of fp32
softmax from the forward to the backward; here only the logsumexp [N] is kept. Measured on the CPU
(resident-set peak per logit element, tests/unit/ce_memory_worker.py): 6.00 and 3.99 bytes, megatron's 6.00.

Labels outside every rank's vocabulary slice get loss = logsumexp and no target term, like megatron's
vocab_parallel_cross_entropy. No label smoothing (GPTModel uses none).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 4096


def _group_size_rank(group) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _ChunkedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, chunk_tokens: int):
        n = hidden.shape[0]
        v_local = weight.shape[0]
        tp, rank = _group_size_rank(tp_group)
        vocab_start = rank * v_local
        dev = hidden.device
        m = torch.empty(n, dtype=torch.float32, device=dev)
        sumexp = torch.empty(2, n, dtype=torch.float32, device=dev)  # [sum exp(l - m), target logit]
        local = labels - vocab_start
        in_range = (local >= 0) & (local < v_local)
        local = torch.where(in_range, local, torch.zeros_like(local))
        for c0 in range(0, n, chunk_tokens):
            c1 = min(n, c0 + chunk_tokens)
            lf = (hidden[c0:c1] @ weight.t()).float()  # [C, V_r] logits in the compute dtype, then fp32
            tgt = lf.gather(1, local[c0:c1, None]).squeeze(1)
            sumexp[1, c0:c1] = torch.where(in_range[c0:c1], tgt, torch.zeros_like(tgt))
            mc = lf.amax(dim=-1)
            m[c0:c1] = mc
            sumexp[0, c0:c1] = lf.sub_(mc[:, None]).exp_().sum(dim=-1)  # lf is a temporary: in place is safe
            del lf
        if tp > 1:
            gmax = m.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=tp_group)
            sumexp[0].mul_(torch.exp(m - gmax))
            dist.all_reduce(sumexp, op=dist.ReduceOp.SUM, group=tp_group)
            m = gmax
        lse = m + torch.log(sumexp[0])
        loss = lse - sumexp[1]
        ctx.save_for_backward(hidden, weight, local, in_range, lse)
        ctx.chunk_tokens = chunk_tokens
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, in_range, lse = ctx.saved_tensors
        n, c = hidden.shape[0], ctx.chunk_tokens
        grad_loss = grad_loss.float()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_h else None
        single = n <= c
        dw = None
        if need_w and not single:
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        minus_one = -in_range.to(torch.float32)
        for c0 in range(0, n, c):
            c1 = min(n, c0 + c)
            h = hidden[c0:c1]
            p = (h @ weight.t()).float()  # recomputed logits (a temporary: modified in place)
            p.sub_(lse[c0:c1, None]).exp_()  # softmax over the global vocabulary, this rank's slice
            p.scatter_add_(1, local[c0:c1, None], minus_one[c0:c1, None])  # -1 at in-range labels
            p.mul_(grad_loss[c0:c1, None])
            g = p.to(hidden.dtype)
            del p
            if need_h:
                torch.mm(g, weight.to(hidden.dtype), out=dh[c0:c1])
            if need_w:
                part = g.t() @ h
                if single:
                    dw = part
                else:
                    dw.add_(part)
            del g
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          tp_group=None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight^T` against `labels`, without materialising all logits.

    Args:
        hidden: [..., H] final hidden states (the full sequence on every TP rank, in the compute dtype).
        weight: [V_r, H] this TP rank's slice of the output layer (vocabulary split over `tp_group`).
        labels: [...] int64 target ids in the global vocabulary; same leading shape as hidden.
        tp_group: the tensor-parallel group the vocabulary is split over (None: not split).
        chunk_tokens: tokens per chunk; any positive number (the last chunk may be short).
    Returns:
        fp32 loss with the shape of `labels`.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the token dims")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != output weight's {weight.shape[1]}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    loss = _ChunkedVocabParallelCE.apply(flat_h, weight, labels.reshape(-1).to(torch.int64), tp_group, int(chunk_tokens))
    return loss.view(labels.shape)
