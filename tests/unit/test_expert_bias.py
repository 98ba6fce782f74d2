"""Auxiliary-loss-free balancing (model.lm.moe_expert_bias; models/moe/router.py, train/moe_stats.py) against plain
PyTorch.

One process, gloo world of 1, the tiny MoE LM (2 layers, fp32, CPU) with a random bias set on every router. The
reference captures each router's input, computes softmax(x W^T) in fp32, chooses top-k of (probabilities + bias)
and takes the gates from the unbiased probabilities (renormalised over the chosen with norm_topk_prob); the update is
bias + rate * sign(mean count - count) over the counts of all the step's micro-batches. Routing maps and updated
biases must be equal (the same fp32 arithmetic); gates agree to 1e-6 relative (fp32 sums in another order).
"""

import pytest
import torch

from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron

SEED = 11
S, B, MICRO, LAYERS = 16, 2, 2, 2
RATE = 1e-3


@pytest.fixture(scope="module")
def models():
    """{norm_topk_prob: model} with a random bias on each router (large enough to move the choice)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from models.config import LMConfig, ModelParallelSizes
    from models.lm import build_lm, transformer_config

    pgs = init_one_process_megatron(SEED)
    get_moe_layer_wise_logging_tracker().clear()
    out = {}
    g = torch.Generator().manual_seed(SEED)
    for norm in (True, False):
        lm = LMConfig(num_layers=LAYERS, loss_chunk_tokens=0, moe_expert_bias=True, moe_norm_topk_prob=norm,
                      moe_bias_update_rate=RATE)
        cfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True)
        model = build_lm(lm, cfg, pg_collection=pgs, pp_rank=0, pp_size=1).train()
        for r in _routers(model):
            r.expert_bias.copy_(0.3 * torch.randn(lm.num_experts, generator=g))
        out[norm] = (lm, model)
    try:
        yield out
    finally:
        get_moe_layer_wise_logging_tracker().clear()
        destroy_one_process_megatron()


def _routers(model):
    from models.moe.router import BiasedTopKRouter

    routers = [m for m in model.modules() if isinstance(m, BiasedTopKRouter)]
    assert len(routers) == LAYERS
    return routers


def _run(lm, model, *, capture: list):
    """MICRO forward + backward passes; capture: (layer, router input, router output) triples."""
    hooks = [r.register_forward_hook(lambda m, a, o: capture.append((m.layer_number, a[0].detach().clone(),
                                                                        [t.detach().clone() for t in o])))
             for r in _routers(model)]
    g = torch.Generator().manual_seed(SEED)
    pos = torch.arange(S).expand(3, B, S)
    try:
        for _ in range(MICRO):
            tokens, labels = (torch.randint(0, lm.vocab_size, (B, S), generator=g) for _ in range(2))
            model(tokens, pos, None, labels=labels).sum().backward()
    finally:
        for h in hooks:
            h.remove()


def _naive_routing(x, weight, bias, k, norm):
    probs = (x.reshape(-1, x.shape[-1]).float() @ weight.float().t()).softmax(dim=-1)
    chosen = (probs + bias).topk(k, dim=-1).indices
    gates = probs.gather(1, chosen)
    if norm:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, chosen, gates), torch.zeros_like(probs, dtype=torch.bool).scatter(
        1, chosen, True), probs.topk(k, dim=-1).indices


@pytest.mark.parametrize("norm", [True, False])
def test_routing_and_update_match_plain_torch(models, norm):
    from train.metrics import sum_over_world
    from train.moe_stats import RouterStats

    lm, model = models[norm]
    routers = {r.layer_number: r for r in _routers(model)}
    bias0 = {l: r.expert_bias.clone() for l, r in routers.items()}
    stats = RouterStats([model], num_layers=LAYERS, num_experts=lm.num_experts, dp_size=1, device=torch.device("cpu"))
    captured = []
    try:
        _run(lm, model, capture=captured)
        (flat,) = sum_over_world([stats.step_vector()], torch.device("cpu"))
        metrics = stats.metrics_from(flat, MICRO)
        stats.update_biases(flat, lm.moe_bias_update_rate)
    finally:
        stats.remove()
    counts = torch.zeros(LAYERS, lm.num_experts, dtype=torch.int64)
    moved = 0
    for layer, x, (probs, routing_map) in captured:
        ref_probs, ref_map, unbiased = _naive_routing(x, routers[layer].weight.detach(), bias0[layer], lm.moe_topk,
                                                      norm)
        assert torch.equal(routing_map, ref_map)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)   # fp32 softmax sums in another order
        moved += int((ref_map != torch.zeros_like(ref_map).scatter(1, unbiased, True)).any(dim=1).sum())
        counts[layer - 1] += ref_map.sum(dim=0)
    assert moved > 0, "the bias moved no token's choice: the test would not see a bias left out"
    for layer, r in routers.items():
        c = counts[layer - 1].double()
        want = bias0[layer] + RATE * torch.sign(c.mean() - c).float()
        assert torch.equal(r.expert_bias, want), (layer, r.expert_bias, want)
        assert r.expert_bias.dtype == torch.float32 and not r.expert_bias.requires_grad
    assert metrics["moe_bias_min"] == pytest.approx(min(float(b.min()) for b in bias0.values()), abs=0)
    assert metrics["moe_bias_max"] == pytest.approx(max(float(b.max()) for b in bias0.values()), abs=0)


def test_bias_is_a_saved_buffer_not_a_parameter(models):
    lm, model = models[True]
    assert not any("expert_bias" in n for n, _ in model.named_parameters())   # no optimizer, no weight decay
    sd = model.state_dict()
    keys = [k for k in sd if k.endswith("router.expert_bias")]
    assert len(keys) == LAYERS
    sharded = model.sharded_state_dict()
    assert [k for k in sharded if k.endswith("router.expert_bias")], "not in the distributed checkpoint"


@pytest.mark.parametrize("kwargs, message", [
    (dict(moe_expert_bias=True, moe_bias_update_rate=0.0), "moe_bias_update_rate must be > 0"),
    (dict(moe_expert_bias=True, moe_bias_update_rate=-1e-3), "moe_bias_update_rate must be > 0"),
    (dict(moe_expert_bias=True, moe_bias_update_rate=float("nan")), "moe_bias_update_rate must be a finite"),
])
def test_settings_errors(kwargs, message):
    from models.config import LMConfig

    with pytest.raises(ValueError, match=message):
        LMConfig(**kwargs)


def test_layout_invariant_init_starts_the_bias_at_zero(models):
    """models/init.py re-draws every tensor of the sharded state dict; the bias is one of them, and was drawn as a
    weight (N(0, init_std): moe_bias_min -0.054 at the tiny LM's first step) before."""
    from models.init import init_layout_invariant

    lm, model = models[False]
    saved = {n: b.clone() for n, b in model.named_buffers() if n.endswith("router.expert_bias")}
    try:
        init_layout_invariant([model], seed=SEED, std=lm.init_std, num_layers=lm.num_layers)
        biases = {n: b for n, b in model.named_buffers() if n.endswith("router.expert_bias")}
        assert len(biases) == LAYERS and all(not b.any() for b in biases.values())
        assert model.decoder.layers[0].mlp.router.weight.std() > 0   # the weights are drawn
    finally:
        for n, b in model.named_buffers():
            if n in saved:
                b.copy_(saved[n])


def test_a_rate_without_the_bias_is_named_as_ignored():
    from models.config import LMConfig

    with pytest.warns(UserWarning, match=r"model\.lm\.moe_bias_update_rate=0\.01 is ignored: the routers have no "
                                         r"expert bias"):
        LMConfig(moe_bias_update_rate=0.01)
