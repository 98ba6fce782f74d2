"""megatron's top-k router with the balancing variants of model.lm: the level the balancing loss counts the experts'
load at (`BalancedTopKRouter`, model.lm.moe_balance), and auxiliary-loss-free balancing (DeepSeek-V3) by a per-expert
routing bias (`BiasedTopKRouter`, model.lm.moe_expert_bias).

Legend: T tokens, E experts, k = top-k, p = softmax(logits) [T, E] (the unbiased top-k gives the counts c [E]).

Balancing loss per layer and micro-batch, E * sum_e f_e * P_e (1.0 at a perfect balance), P_e = mean_t p_te over the
micro-batch's tokens of this data-parallel replica (its whole sequences: every TP x CP rank's), and f_e the expert's
share of the routed slots (c_e / sum c) counted at the level `balance` names:

    micro_batch   this micro-batch of this replica (megatron's aux_loss; the default)
    global_batch  the step's micro-batches so far (this one included) of every data-parallel replica: the counts of
                  all TP x DP x CP ranks, summed over the step (Qwen3's global-batch balancing, as megatron's
                  global_aux_loss and Qwen's code count them; the step's later micro-batches are not known when a
                  micro-batch's backward runs); zeroed at each step's end by train/moe_stats.py (`reset_balance`)
    sequence      each document on its own (DeepSeek-V3's complementary sequence-wise loss): f_d and P_d over the
                  document's T_d tokens (over every TP x CP rank holding some), the loss their mean weighted by
                  tokens, sum_d (T_d / T) E sum_e f_de P_de, T = sum_d T_d. The documents are those of a packed row
                  where the layer is given them (`PackedSeqDocuments`, set by the trainer: padding belongs to none),
                  else each row is one (megatron's seq_aux_loss)

All three are weighted and logged alike (parallel/megatron_compat.py fix 2, train/moe_stats.py `moe_lb_loss`).
The tokens of a packed row that belong to no document (its padding: the trainer gives them document -1) are routed
to no expert (no dispatch, no expert compute, the layer's output 0 there) and, at every level, left out of the
counts, of the probabilities' mean and of the token count T (megatron's `padding_mask`, built from the documents in
`BalancedTopKRouter.routing`). The tiny recipe's video packs are 30% padding (launch/preview.py's summary.json);
counted, padding (one token id repeated) would be that share of every count the balance is taken from.

    scores  = softmax(logits)                     [T, E] fp32 (the router's own probabilities)
    chosen  = topk(scores + expert_bias, k)        the bias moves the choice only
    gates   = scores[chosen] (/ their sum with norm_topk_prob)   unbiased, as without a bias

megatron-core 0.16.1 offers its expert bias for the sigmoid score function only (its config refuses softmax, which
Qwen3 routes with); here the bias is added to the softmax probabilities, the scores the gates are taken from, as
DeepSeek-V3 adds it to its sigmoid scores. The choice is made through the one hook megatron's routing has for the
top-k choice (`router_replay`, built for replaying recorded choices; routing replay itself stays off), so the
rest of the routing (balancing loss, logging) is megatron's, unchanged.

The bias is a persistent fp32 buffer (`expert_bias`, [E]): saved with the model, never seen by the optimizer. It is
updated between steps by `updated_expert_bias` from the step's token counts of the whole world (train/moe_stats.py):

    bias += rate * sign(mean_e(count) - count)
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.moe.moe_utils import (get_tokens_per_expert_and_token_count,
                                                     switch_load_balancing_loss_func)
from megatron.core.transformer.moe.router import TopKRouter

from models.config import MOE_BALANCES as BALANCES


def updated_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """`bias` [E] (fp32) after one step that routed `counts` [E] tokens to each expert (the step's whole count):
    raised by `rate` for an expert below the mean load, lowered above it, unchanged at it."""
    counts = counts.to(torch.float64)   # counts exact to 2^53; the sign of (mean - count) then exact too
    step = torch.sign(counts.mean() - counts).to(torch.float32) * rate
    return (bias + step.to(bias.device)).to(torch.float32)


@dataclass
class PackedSeqDocuments(PackedSeqParams):
    """megatron's PackedSeqParams of a packed row with the document of each token this rank holds (the routers'
    padding mask and balancing per document, the DSA indexer's rows): `documents` [b, s] int64, in the layout of the
    tokens given to the model on this context-parallel rank (before sequence parallelism splits them), each token's
    segment of the row's cu_seqlens_q (0 .. `num_documents` - 1), -1 for padding (no document's).

    `pad_tail` tokens in the last `pad_tail_segments` segments of cu_seqlens_q are padding (Python ints, known without
    a device sync; under context parallelism, of the whole row): the core attentions run on the row without them and
    give them a zero output (models/attention/dense.py documents_part; under CP the dense and KSA ones, through the
    context-parallel functions). `max_seqlen_q` is then the longest segment before them. `pad_tail_local`: how many
    of them end the tokens this rank holds under context parallelism (a rank holds its tokens in ascending order of
    their places in the row, so the row's trailing padding is a trailing run of each rank's share; parallel/context
    batch.py sets it, 0 where the share would be all padding; models/attention/dense.py local_documents)."""

    documents: torch.Tensor | None = None
    num_documents: int = 0
    pad_tail: int = 0
    pad_tail_segments: int = 0
    pad_tail_local: int | None = None


class _BiasedChoice:
    """The top-k choice with the router's bias, in the place of megatron's routing replay (the callable megatron's
    `topk_routing_with_score_function` asks for the top-k of `scores`: the logits when the top-k probabilities are
    renormalised, else the softmax probabilities)."""

    def __init__(self, router: BiasedTopKRouter):
        self.router = weakref.ref(router)   # no reference cycle: the model is freed with its trainer

    def get_replay_topk(self, scores, topk, num_groups, group_topk, compute_topk):
        router = self.router()
        probs = scores.float() if router.config.moe_router_pre_softmax else torch.softmax(scores.float(), dim=-1)
        _, chosen = torch.topk(probs + router.expert_bias, k=topk, dim=1)
        return torch.gather(scores, 1, chosen), chosen


class BalancedTopKRouter(TopKRouter):
    """megatron's TopKRouter whose balancing loss counts the load at the level `balance` (module docstring); the
    loss is attached and logged under megatron's aux_loss name, so its weighting and logging are unchanged."""

    def __init__(self, config, pg_collection=None, *, balance: str = "micro_batch"):
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        super().__init__(config=config, pg_collection=pg_collection)
        self.balance = balance
        # the routing in progress: its tokens' documents and their count (_token_documents), where it needs them
        self.routed: tuple[torch.Tensor, int] | None = None
        # sequence: the documents of the routing in progress (PackedSeqDocuments), set by its layer for the call
        self.documents: PackedSeqDocuments | None = None
        # global_batch: the step's routed slots per expert so far, summed over every TP x DP x CP rank (fp64: exact)
        self.register_buffer("step_counts", torch.zeros(config.num_moe_experts, dtype=torch.float64,
                                                        device=self.weight.device), persistent=False)

    def reset_balance(self) -> None:
        """A new step begins (global_batch: its counts start at zero)."""
        self.step_counts.zero_()

    def routing(self, logits, padding_mask=None):
        """megatron's routing, with the padding of a packed row (its tokens whose document is -1: a video pack's
        padding segment, a KSA row's, a document data.exclude blanks) as megatron's padding_mask, so that it is
        left out of the balancing loss (its counts and mean probabilities), then routed to no expert: the
        dispatchers send it nowhere, the layer's output there is 0 (the residual stream passes), and the expert
        load train/moe_stats.py counts (the expert bias's update, `moe_load_max`) holds none of it."""
        rows = tuple(logits.shape[:2])
        given = self.documents is not None and self.documents.documents is not None
        self.routed = self._token_documents(rows) if given or self.balance == "sequence" else None
        try:
            if padding_mask is None and given:   # megatron's mask: True for padding
                padding_mask = (self.routed[0] < 0).view(rows)
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        finally:
            self.routed = None
        if padding_mask is not None:
            keep = ~padding_mask.reshape(-1, 1)
            probs, routing_map = probs * keep, routing_map & keep
        return probs, routing_map

    def _token_documents(self, rows: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """The document of each of this rank's routed tokens, in the routing's order ([s, b] flattened), -1
        for padding, and the number of documents: those of `documents` where given, else each row's tokens one."""
        s, b = rows
        docs = self.documents
        if docs is None or docs.documents is None:
            return torch.arange(b, device=self.weight.device).repeat(s), b
        ids = docs.documents.to(self.weight.device, torch.int64).transpose(0, 1)   # [s of this CP rank, b]
        tp = self.tp_group.size() if self.config.sequence_parallel else 1
        if ids.shape != (s * tp, b):
            raise ValueError(f"the documents of a packed row cover {tuple(ids.shape[::-1])} tokens [b, s]; this rank "
                             f"routes {(b, s)} (x {tp} sequence-parallel ranks)")
        if tp > 1:   # sequence parallelism: this TP rank's slice of the sequence
            ids = ids[self.tp_group.rank() * s:(self.tp_group.rank() + 1) * s]
        return ids.reshape(-1), docs.num_documents

    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff == 0 or (self.balance == "micro_batch" and not with_padding_mask):
            return super()._apply_aux_loss(probs, scores_for_aux_loss, routing_map, with_padding_mask)
        E, k = self.config.num_moe_experts, self.topk
        local_tokens = routing_map.shape[0]
        if self.balance == "micro_batch":   # megatron's, padding left out (its rows of the routing map and scores
            # are zero); a micro-batch of padding alone gives a loss of 0, where megatron's would be 0 / 0
            counts, local_tokens, tokens = get_tokens_per_expert_and_token_count(
                routing_map, self.tp_cp_group, topk=k, with_padding_mask=True)
            loss = switch_load_balancing_loss_func(scores_for_aux_loss, counts, tokens.clamp_min(1), k, E, coeff)
        elif self.balance == "sequence":
            ids, num = self.routed
            # padding's rows of the routing map and scores are zero (megatron's padding mask): added to document 0,
            # they add nothing
            ids = ids.clamp_min(0)
            # [documents, E] counts of every TP x CP rank's tokens, in one all-reduce; each token has k slots
            counts = torch.zeros(num, E, dtype=torch.float64, device=routing_map.device).index_add_(
                0, ids, routing_map.to(torch.float64))
            if self.tp_cp_group.size() > 1:
                torch.distributed.all_reduce(counts, group=self.tp_cp_group)
            doc_tokens = counts.sum(dim=1, keepdim=True) / k                          # T_d
            # sum_d (T_d / T) E sum_e f_de P_de = E sum_de c_de / (k T_d T) * (this rank's sum of p over d)
            weight = (counts / (k * doc_tokens.clamp_min(1) * doc_tokens.sum().clamp_min(1))).to(
                scores_for_aux_loss.dtype)
            prob_sums = torch.zeros(num, E, dtype=scores_for_aux_loss.dtype, device=routing_map.device).index_add(
                0, ids, scores_for_aux_loss)
            loss = coeff * E * (weight * prob_sums).sum()
        else:
            if with_padding_mask:   # padding's rows are zero: the replica's other tokens are counted over TP x CP
                _, local_tokens, tokens = get_tokens_per_expert_and_token_count(
                    routing_map, self.tp_cp_group, topk=k, with_padding_mask=True)
                tokens = tokens.clamp_min(1)   # all padding: a loss of 0, not 0 / 0
            else:
                tokens = local_tokens * self.tp_cp_group.size()
            # the E counts of every TP x DP x CP rank in one all-reduce (a sum over TP x CP first added nothing)
            counts = routing_map.sum(dim=0).to(torch.float64)
            if self.tp_dp_cp_group.size() > 1:
                torch.distributed.all_reduce(counts, group=self.tp_dp_cp_group)
            self.step_counts += counts
            # f_e = step_counts_e / sum: given as this micro-batch's tokens x k x f, megatron's formula is E sum f P
            share = (self.step_counts / self.step_counts.sum().clamp_min(1)).to(scores_for_aux_loss.dtype)
            loss = switch_load_balancing_loss_func(scores_for_aux_loss, share * (k * tokens), tokens, k, E, coeff)
        return self.attach_and_log_load_balancing_loss(probs, coeff, loss, "load_balancing_loss", self.tp_cp_group,
                                                       valid_token_count=local_tokens)


class BiasedTopKRouter(BalancedTopKRouter):
    """megatron's TopKRouter (softmax scores) whose top-k choice adds `expert_bias` to the scores; the gate weights
    and the balancing loss are computed from the unbiased scores. Same parameters as TopKRouter; `expert_bias`
    starts at zero (a zero bias chooses as TopKRouter does: softmax keeps the order of the logits, up to logits so
    close that their fp32 probabilities tie)."""

    def __init__(self, config, pg_collection=None, *, balance: str = "micro_batch"):
        if config.moe_router_score_function != "softmax" or config.moe_router_num_groups:
            raise ValueError("BiasedTopKRouter: softmax scores without expert groups only (model.lm routes so)")
        super().__init__(config=config, pg_collection=pg_collection, balance=balance)
        assert self.router_replay is None, "routing replay and the expert bias share megatron's top-k hook"
        del self.expert_bias   # TopKRouter's plain attribute (None: its own bias is off)
        self.register_buffer("expert_bias", torch.zeros(config.num_moe_experts, dtype=torch.float32,
                                                        device=self.weight.device))
        self.router_replay = _BiasedChoice(self)
