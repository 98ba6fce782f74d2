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
are averaged (not summed), so the weight means the same at any depth. The MSE is over the text positions of a
packed row's documents: its padding (document -1; the loss mask already leaves it out of CE and KL) is in no mean,
and the teacher, given the row's documents, routes it to no expert (models/moe/router.py).

Losses follow megatron's per-token convention (sum over tokens + token count; the trainer divides by
the global count): the per-micro-batch attention term is multiplied by the micro-batch's token count. That term is
attached to each KSA layer's output in the layer's forward (AttentionMatch), so that it reaches the parameters under
full recomputation too; the loss the step returns holds the LM and KL terms.
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
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

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


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference (fp32) of two layer outputs [s, b, h] over the positions `real` [b, s] marks (all
    when None); 0 when it marks none."""
    diff = (student.float() - teacher.float()).pow(2)
    if real is None:
        return diff.mean()
    keep = real.transpose(0, 1).unsqueeze(-1).to(diff.dtype)
    return (diff * keep).sum() / (keep.sum() * diff.shape[-1]).clamp_min(1)


class AttentionMatch:
    """The attention-output term, computed in each KSA layer's forward and attached to its output there.

    A forward hook on every KSA layer: in the teacher pass it keeps the layer's output (gathered over the sequence
    under sequence parallelism); in the student pass it takes the layer's clamped MSE against it at the text
    positions and attaches weight * tokens / layers times it to the output with megatron's MoEAuxLossAutoScaler (the
    gradient the schedule's backward gives the main loss, scaled as that loss is). The hooks stay armed for the
    student until the next teacher pass, so that under parallel.recompute=full the layers' rerun inside the backward
    attaches the term: the first forward runs without gradients there, and a term summed into the loss from it
    reached no parameter (the tiny recipe's first gradient norm 0.4989 against 0.5016 without recomputation).
    Each layer's value is taken from its first forward in the pass.

    In eval mode an output without autograd history is copied in the teacher pass: megatron's bias-dropout-add then
    adds the residual into it in place (fused_bias_dropout: `inplace` when not training and nothing requires grad),
    so evaluation's attention MSE compared each layer's output plus its residual (2.6x the training value at step 0
    in tests/dist/test_eval.py). The student's value is taken in the hook, before that add."""

    def __init__(self, chunks, *, tp_group, sequence_parallel: bool):
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.layers = [m for c in chunks for m in c.modules() if isinstance(m, KSASelfAttention)]
        self.mode = None  # "teacher", "student" or None
        self.teacher_out: dict = {}   # layer -> the teacher pass's output [s, b, h]
        self.values: dict = {}        # layer -> the student pass's clamped MSE (no gradient)
        self.text_index = None
        self.real = None              # [b, s_text] bool: the text positions the MSE is taken over (None: all)
        self.scale = 0.0
        self.clamp = 0.0
        for m in self.layers:
            m.register_forward_hook(self._hook)

    def _whole(self, a: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            # every TP rank computes the same loss from the gathered sequence: the backward takes this rank's slice
            # of the gradient (no reduce-scatter, which would count it tp times)
            return gather_from_sequence_parallel_region(a, tensor_parallel_output_grad=False, group=self.tp_group)
        return a

    def _hook(self, mod, args, out):
        a = out[0]
        if self.mode == "teacher":
            self.teacher_out[mod] = self._whole(a if mod.training or a.requires_grad else a.clone())
            return None
        if self.mode != "student" or mod not in self.teacher_out:
            return None
        a_s = self._whole(a).index_select(0, self.text_index)
        mse = torch.clamp(masked_mse(a_s, self.teacher_out[mod], self.real), 0.0, self.clamp)
        self.values.setdefault(mod, mse.detach())
        if not a.requires_grad:
            return None
        return (MoEAuxLossAutoScaler.apply(a, mse * self.scale), *out[1:])

    @contextlib.contextmanager
    def teacher(self):
        """The teacher pass: keeps each layer's output; disarms the student's hooks of the micro-batch before."""
        self.mode, self.teacher_out, self.values = "teacher", {}, {}
        try:
            yield
        finally:
            self.mode = None

    def arm_student(self, text_index: torch.Tensor, *, weight_per_layer: torch.Tensor, clamp: float,
                    real: torch.Tensor | None = None) -> None:
        """From now until the next teacher pass, each layer's forward attaches weight_per_layer x its clamped MSE,
        over the text positions `real` [b, s_text] marks (all when None: a packed row's padding is not)."""
        self.mode, self.text_index, self.scale, self.clamp = "student", text_index, weight_per_layer, clamp
        self.real = real

    def mean(self, like: torch.Tensor) -> torch.Tensor:
        """The student pass's MSE, the mean over the layers (no gradient)."""
        vals = [self.values[m] for m in self.layers if m in self.values]
        return torch.stack(vals).mean() if vals else like.new_zeros(())


def distill_losses(model, batch: dict, teacher: tuple, student: tuple, text_index: torch.Tensor, cfg: DistillConfig,
                   match: AttentionMatch, *, tp_group, text_documents: torch.Tensor | None = None):
    """Returns (loss_sum over text tokens, number of text tokens, report dict). `teacher` and `student` are the
    model's (tokens, position_ids, keyword arguments) for the text row and for the row with summary slots (packed
    documents' bounds, the visual embeddings and their positions in each); `text_index` maps the text row's
    positions into the student's; labels and loss mask are the text row's (`batch`). The attention term's gradient
    reaches the model through `match` (attached in the layers); loss_sum holds the LM and KL terms.
    `text_documents` [b, s_text]: each text token's document in a packed row, -1 for padding, which the attention
    term leaves out (the LM and KL terms read the loss mask, 0 there)."""
    with torch.no_grad(), ksa_teacher_mode(model), match.teacher():
        logits_t = model(teacher[0], teacher[1], None, **teacher[2])
    mask = batch["loss_mask"].float()
    n_tokens = mask.sum()
    match.arm_student(text_index, weight_per_layer=cfg.attn_weight * n_tokens.detach() / max(len(match.teacher_out), 1),
                      clamp=cfg.attn_clamp, real=None if text_documents is None else text_documents >= 0)
    logits_s = model(student[0], student[1], None, **student[2])
    logits_s = logits_s.index_select(1, text_index)  # [b, s_text, V/tp]
    logp_s = vocab_parallel_log_softmax(logits_s, tp_group)
    logp_t = vocab_parallel_log_softmax(logits_t, tp_group)
    ce = -target_logprob(logp_s, batch["labels"], tp_group)
    kl = _vocab_sum(logp_t.exp() * (logp_t - logp_s), tp_group)
    per_token = cfg.lm_weight * ce + cfg.kl_weight * kl
    loss_sum = (per_token * mask).sum()
    attn = match.mean(loss_sum)
    report = torch.stack([(ce * mask).sum().detach().double(), n_tokens.detach().double(),
                          (kl * mask).sum().detach().double(), attn.detach().double() * n_tokens.detach().double()])
    return loss_sum, n_tokens.to(torch.int), report
