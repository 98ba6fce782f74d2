"""KSA conversion, stage 1: self-distillation of a dense-attention model into KSA.

Per micro-batch (text, or packed video + text; the data stream is unchanged):
  teacher  the same weights in `ksa_teacher_mode` (causal attention, text projection) on the row as it came
           (its packed documents' bounds, its visual embeddings), without gradients: logits_T and every
           layer's attention output A_T[l];
  student  the model on the interleaved sequence (summaries inserted per document, models/ksa_tokens.py;
           the same embeddings at their moved positions), with gradients: logits_S and A_S[l] taken at the
           text positions.
  loss = lm_weight * CE(logits_S, labels)
       + kl_weight * KL(softmax(logits_T) || softmax(logits_S))                 (per text token)
       + attn_weight * mean_l clamp(MSE(A_S[l], A_T[l]), 0, attn_clamp)       (per micro-batch)
The released recipe uses 1.0 / 5.0 / 5.0 with the clamp at 0.1. The clamp is a plain clamp: a layer
whose error exceeds it contributes a constant (no gradient) until the error falls back under it. Layers
are averaged (not summed), so the weight means the same at any depth.

Losses follow megatron's per-token convention (sum over tokens + token count; the trainer divides by
the global count): the per-micro-batch attention term is multiplied by the micro-batch's token count.
Logits are vocab-parallel under TP; the per-token sums over the vocabulary reduce over the TP group with megatron's
reduce_from_tensor_model_parallel_region (all-reduce forward, identity backward: every TP rank computes
the same loss, so its backward must not sum the ranks' gradients again), except the softmax's normaliser, which every
rank's terms depend on: its gradient is summed over the ranks too (vocab_parallel_log_softmax). Needs pipeline size 1
(teacher and student hidden states must live on the same rank), and train.trainable=summary: the teacher is the
model's own weights, so only the summary parameters (which the teacher pass never reads) may train.
"""

from __future__ import annotations

import contextlib
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from models.attention.ksa import KSASelfAttention, ksa_teacher_mode
from train.config import DistillConfig


def vocab_parallel_log_softmax(logits: torch.Tensor, group) -> torch.Tensor:
    """log_softmax over a vocabulary split across `group` (last dim holds this rank's shard).

    The normaliser is summed over the ranks forward, and its gradient backward: each rank's log-probabilities
    (hence its share of the loss) depend on it, so every rank's shard of the logits takes the gradient that all the
    ranks' terms send it. An identity backward (reduce_from alone) gave each rank only its own terms' share: under
    TP2 the tiny distillation's first gradient norm was 1.35 against one process's 0.50, the same loss."""
    logits = logits.float()
    m = logits.detach().amax(-1, keepdim=True)
    if group is not None and group.size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sumexp = (logits - m).exp().sum(-1, keepdim=True)
    if group is not None and group.size() > 1:
        sumexp = copy_to_tensor_model_parallel_region(reduce_from_tensor_model_parallel_region(sumexp, group=group),
                                                      group=group)
    return logits - m - sumexp.log()


def _vocab_sum(x: torch.Tensor, group) -> torch.Tensor:
    s = x.sum(-1)
    if group is not None and group.size() > 1:
        s = reduce_from_tensor_model_parallel_region(s, group=group)
    return s


def target_logprob(logp: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """log p[label] for vocab-parallel log-probs [..., V/tp]; labels are global ids (-100 ignored)."""
    v_local = logp.shape[-1]
    start = (group.rank() if group is not None else 0) * v_local
    local = labels - start
    inside = (local >= 0) & (local < v_local)
    picked = logp.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1) * inside
    if group is not None and group.size() > 1:
        picked = reduce_from_tensor_model_parallel_region(picked, group=group)
    return picked


@contextlib.contextmanager
def capture_attention_outputs(model: torch.nn.Module):
    """Collects every KSA layer's attention output ([s, b, h], SP-sharded under sequence parallelism).

    In eval mode an output without autograd history is copied: megatron's bias-dropout-add then adds the residual
    into it in place (fused_bias_dropout: `inplace` when not training and nothing requires grad), so evaluation's
    attention MSE compared each layer's output plus its residual (2.6x the training value at step 0 in
    tests/dist/test_eval.py). In training mode nothing is added in place and no output is copied."""
    outputs: list[torch.Tensor] = []

    def keep(mod, args, out):
        a = out[0]
        outputs.append(a if mod.training or a.requires_grad else a.clone())

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, KSASelfAttention)]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


def distill_losses(model, batch: dict, teacher: tuple, student: tuple, text_index: torch.Tensor, cfg: DistillConfig,
                   *, tp_group, sequence_parallel: bool):
    """Returns (loss_sum over text tokens, number of text tokens, report dict). `teacher` and `student` are the
    model's (tokens, position_ids, keyword arguments) for the text row and for the row with summary slots (packed
    documents' bounds, the visual embeddings and their positions in each); `text_index` maps the text row's
    positions into the student's; labels and loss mask are the text row's (`batch`)."""
    with torch.no_grad(), ksa_teacher_mode(model), capture_attention_outputs(model) as attn_t:
        logits_t = model(teacher[0], teacher[1], None, **teacher[2])
    with capture_attention_outputs(model) as attn_s:
        logits_s = model(student[0], student[1], None, **student[2])
    logits_s = logits_s.index_select(1, text_index)  # [b, s_text, V/tp]
    logp_s = vocab_parallel_log_softmax(logits_s, tp_group)
    logp_t = vocab_parallel_log_softmax(logits_t, tp_group)
    mask = batch["loss_mask"].float()
    ce = -target_logprob(logp_s, batch["labels"], tp_group)
    kl = _vocab_sum(logp_t.exp() * (logp_t - logp_s), tp_group)
    n_tokens = mask.sum()
    per_token = cfg.lm_weight * ce + cfg.kl_weight * kl
    loss_sum = (per_token * mask).sum()
    mses = []
    for a_s, a_t in zip(attn_s, attn_t):
        if sequence_parallel:
            # every TP rank computes the same loss from the gathered sequence: the backward takes this
            # rank's slice of the gradient (no reduce-scatter, which would count it tp times)
            a_s = gather_from_sequence_parallel_region(a_s, tensor_parallel_output_grad=False, group=tp_group)
            a_t = gather_from_sequence_parallel_region(a_t, tensor_parallel_output_grad=False, group=tp_group)
        a_s = a_s.index_select(0, text_index)
        mses.append(torch.clamp((a_s.float() - a_t.float()).pow(2).mean(), 0.0, cfg.attn_clamp))
    attn = torch.stack(mses).mean() if mses else loss_sum.new_zeros(())
    loss_sum = loss_sum + cfg.attn_weight * attn * n_tokens
    report = torch.stack([(ce * mask).sum().detach().double(), n_tokens.detach().double(),
                          (kl * mask).sum().detach().double(), attn.detach().double() * n_tokens.detach().double()])
    return loss_sum, n_tokens.to(torch.int), report
