"""Auxiliary-loss-free load balancing (DeepSeek-V3): megatron's top-k router with a per-expert routing bias.

Legend: T tokens, E experts, k = top-k.

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

import torch
from megatron.core.transformer.moe.router import TopKRouter


def updated_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """`bias` [E] (fp32) after one step that routed `counts` [E] tokens to each expert (the step's whole count):
    raised by `rate` for an expert below the mean load, lowered above it, unchanged at it."""
    counts = counts.to(torch.float64)   # counts exact to 2^53; the sign of (mean - count) then exact too
    step = torch.sign(counts.mean() - counts).to(torch.float32) * rate
    return (bias + step.to(bias.device)).to(torch.float32)


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


class BiasedTopKRouter(TopKRouter):
    """megatron's TopKRouter (softmax scores) whose top-k choice adds `expert_bias` to the scores; the gate weights
    and the balancing loss are computed from the unbiased scores. Same parameters as TopKRouter; `expert_bias`
    starts at zero (a zero bias chooses as TopKRouter does: softmax keeps the order of the logits, up to logits so
    close that their fp32 probabilities tie)."""

    def __init__(self, config, pg_collection=None):
        if config.moe_router_score_function != "softmax" or config.moe_router_num_groups:
            raise ValueError("BiasedTopKRouter: softmax scores without expert groups only (model.lm routes so)")
        super().__init__(config=config, pg_collection=pg_collection)
        assert self.router_replay is None, "routing replay and the expert bias share megatron's top-k hook"
        del self.expert_bias   # TopKRouter's plain attribute (None: its own bias is off)
        self.register_buffer("expert_bias", torch.zeros(config.num_moe_experts, dtype=torch.float32,
                                                        device=self.weight.device))
        self.router_replay = _BiasedChoice(self)
