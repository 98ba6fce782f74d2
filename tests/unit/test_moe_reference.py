"""The language model's MoE layer, as models/lm.py configures it, against a plain-PyTorch Qwen3-MoE block written
here from the same weights: the router (softmax over the experts, top-k, and with norm_topk_prob the top-k
probabilities renormalised to sum to 1, as Qwen3-30B-A3B does; without it they stay as the softmax gave them), the
SwiGLU experts (every `model.lm.experts_impl`), and the load-balancing loss's gradient into the router.

The reference objective is sum(y * dy) + coeff * T * switch, with switch = E / (k T^2) * sum_e count_e *
sum_t softmax_te (the Switch / megatron formula, 1.0 at a perfect balance): the trainer's per-token loss
(megatron's calculate_per_token_loss) divides every gradient by the step's loss tokens, so the router multiplies its
balancing loss by the micro-batch's loss tokens for it to act with weight coeff: a layer run on its own, outside the
trainer's step, takes its T routed tokens for them (parallel/megatron_compat.py fix 2; the trainer's weighting is
checked in tests/dist/test_balancing_strength.py).

Tolerance: relative RMSE 1e-5 per tensor. The layer runs in fp32 and the reference in float64 on the same values:
fp32 rounding only (measured <= 4e-7). The router weights are drawn large enough (std 0.3) that no token has two
experts within 1e-5 of each other at the top-k boundary (the smallest gap is 6e-4; fp32 moves a probability by
~1e-7), so both sides pick the same experts.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import assert_close
from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron

SEED = 11
T, E, K, H, FFN = 37, 8, 2, 64, 32
COEFF = 0.01
RTOL = 1e-5
IMPLS = ["sequential", "loop", "torch_grouped_mm", "triton", "auto"]


@pytest.fixture(scope="module")
def pgs():
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    pgs = init_one_process_megatron(SEED)
    get_moe_layer_wise_logging_tracker().clear()
    yield pgs
    get_moe_layer_wise_logging_tracker().clear()
    destroy_one_process_megatron()


def _layer(pgs, impl: str, norm_topk_prob: bool):
    """The MoE block of a decoder layer of models/lm.py (its TransformerConfig and its layer spec), weights drawn."""
    from megatron.core.transformer.spec_utils import build_module

    from models.config import LMConfig, ModelParallelSizes
    from models.lm import layer_spec, transformer_config

    lm = LMConfig(num_layers=1, hidden_size=H, num_experts=E, moe_topk=K, moe_ffn_hidden_size=FFN,
                  experts_impl=impl, moe_norm_topk_prob=norm_topk_prob, moe_aux_loss_coeff=COEFF)
    cfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True)
    torch.manual_seed(SEED)
    layer = build_module(layer_spec(lm, "dense", 0).submodules.mlp, config=cfg, pg_collection=pgs).train()
    layer.router.set_layer_number(1)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3, generator=g)
    return layer


def _expert_weights(layer):
    """(w_gate_up [E, 2F, H], w_down [E, H, F]) as parameters, whatever the implementation stores."""
    ex = layer.experts
    if hasattr(ex, "w13"):
        return [ex.w13], [ex.w2]
    return ([e.linear_fc1.weight for e in ex.local_experts], [e.linear_fc2.weight for e in ex.local_experts])


def _stacked_grad(params):
    return torch.cat([p.grad for p in params]) if len(params) == 1 else torch.stack([p.grad for p in params])


def _reference(x, wr, w13, w2, dy, norm_topk_prob: bool):
    """Qwen3's sparse MoE block and the switch loss, float64, token by token; returns y and the gradients of
    sum(y * dy) + COEFF * T * switch with respect to x, the router weight, w13 and w2."""
    x, wr, w13, w2 = (t.detach().double().requires_grad_() for t in (x, wr, w13, w2))
    probs = (x @ wr.t()).softmax(dim=-1)  # [T, E]
    top_p, top_i = probs.topk(K, dim=-1)
    if norm_topk_prob:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros(H, dtype=torch.float64)
        for j in range(K):
            e = int(top_i[t, j])
            gate_up = w13[e] @ x[t]
            out = out + top_p[t, j] * (w2[e] @ (F.silu(gate_up[:FFN]) * gate_up[FFN:]))
        rows.append(out)
    y = torch.stack(rows)
    counts = torch.bincount(top_i.flatten(), minlength=E).double()
    switch = E / (K * T * T) * (counts * probs.sum(dim=0)).sum()
    ((y * dy.double()).sum() + COEFF * T * switch).backward()
    return y.detach(), x.grad, wr.grad, w13.grad, w2.grad, float(switch), top_i


@pytest.mark.parametrize("norm_topk_prob", [True, False], ids=["norm_topk", "raw_topk"])
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_layer_matches_a_plain_qwen3_moe_block(pgs, impl, norm_topk_prob):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from train.moe_stats import LB_LOSS

    layer = _layer(pgs, impl, norm_topk_prob)
    fc1, fc2 = _expert_weights(layer)
    g = torch.Generator().manual_seed(SEED + 1)
    x, dy = torch.randn(T, 1, H, generator=g), torch.randn(T, 1, H, generator=g)
    ref = _reference(x[:, 0], layer.router.weight, torch.stack([p.detach() for p in fc1]).view(E, 2 * FFN, H),
                     torch.stack([p.detach() for p in fc2]).view(E, H, FFN), dy[:, 0], norm_topk_prob)
    # the reference routes every token decisively: its k-th and (k+1)-th probabilities are apart
    probs = (x[:, 0].double() @ layer.router.weight.detach().double().t()).softmax(-1).sort(-1, descending=True).values
    gap = float((probs[:, K - 1] - probs[:, K]).min())
    assert gap > 1e-5, gap

    get_moe_layer_wise_logging_tracker().clear()
    xi = x.clone().requires_grad_()
    y, _ = layer(xi)
    y.backward(dy)
    tracked = float(get_moe_layer_wise_logging_tracker()[LB_LOSS]["values"][0])
    assert_close(f"{impl} output", ref[0], y[:, 0].double(), RTOL)
    assert_close(f"{impl} d_input", ref[1], xi.grad[:, 0].double(), RTOL)
    assert_close(f"{impl} d_router", ref[2], layer.router.weight.grad.double(), RTOL)
    assert_close(f"{impl} d_w13", ref[3], _stacked_grad(fc1).view(E, 2 * FFN, H).double(), RTOL)
    assert_close(f"{impl} d_w2", ref[4], _stacked_grad(fc2).view(E, H, FFN).double(), RTOL)
    # the balancing loss megatron logs (moe_lb_loss's source) is the switch loss itself
    assert tracked == pytest.approx(ref[5], rel=1e-6)


def test_routing_is_deterministic_and_ties_are_broken_alike(pgs):
    """Same tokens, same experts, run after run; with two experts' router rows equal (every token's logits for them
    tie exactly) each token still gets k distinct experts, the same ones every run."""
    layer = _layer(pgs, "loop", True)
    with torch.no_grad():
        layer.router.weight[1].copy_(layer.router.weight[0])
    x = torch.randn(T, 1, H, generator=torch.Generator().manual_seed(SEED + 2))
    maps = []
    with torch.no_grad():
        for _ in range(3):
            probs, routing_map = layer.router(x)
            maps.append((probs.clone(), routing_map.clone()))
    for probs, routing_map in maps[1:]:
        assert torch.equal(routing_map, maps[0][1]) and torch.equal(probs, maps[0][0])
    assert (maps[0][1].sum(dim=1) == K).all()
    # some token's top-k reached the tied pair, so a tie was actually broken
    assert (maps[0][1][:, 0] | maps[0][1][:, 1]).any()
