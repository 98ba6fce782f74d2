"""The routers' per-step statistics (train/moe_stats.py) against a plain recomputation of the routing.

One process, gloo world of 1, the tiny MoE LM (3 layers, fp32, CPU). The reference captures each router's
input, computes its logits with a plain matmul, takes the top-k experts per token and counts them; the
balancing loss is the switch loss written out from those logits (E / (T^2 k) * sum_e counts_e * sum_t
softmax_te per micro-batch), averaged over layers and micro-batches. The expert counts must be equal (the
same fp32 logits, the same top-k); the loss agrees to 1e-6 relative (fp32 sums in another order).

The counts over the whole world and every layout are checked in tests/dist/test_layout_parity.py (each
layout's step statistics equal the single process's).
"""

import pytest
import torch

from tests.launch_util import tiny_lm_pair

SEED = 7
S, B, MICRO, LAYERS = 32, 2, 2, 3


@pytest.fixture(scope="module")
def tiny():
    """(lm config, {recompute: model}) with identical weights."""
    yield from tiny_lm_pair(SEED, LAYERS)


def _batches(lm):
    g = torch.Generator().manual_seed(SEED)
    for _ in range(MICRO):
        yield (torch.randint(0, lm.vocab_size, (B, S), generator=g), torch.randint(0, lm.vocab_size, (B, S), generator=g))


def _step_metrics(stats) -> dict:
    """What the trainer does at a step's end: the vector summed over the world (of 1), then the scalars."""
    from train.metrics import sum_over_world

    (flat,) = sum_over_world([stats.step_vector()], torch.device("cpu"))
    return stats.metrics_from(flat, MICRO)


def _run(lm, model, *, grad: bool = True, capture: list | None = None):
    """MICRO forward + backward passes (forward only without grad); capture: (layer, router input) pairs."""
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    hooks = []
    if capture is not None:
        hooks = [r.register_forward_pre_hook(lambda m, a: capture.append((m.layer_number, a[0].detach().clone())))
                 for r in routers]
    pos = torch.arange(S).expand(3, B, S)
    try:
        for tokens, labels in _batches(lm):
            with torch.set_grad_enabled(grad):
                loss = model(tokens, pos, None, labels=labels).sum()
            if grad:
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return routers


def _reference(lm, routers, captured):
    """Counts [layers, experts] and the mean switch loss / coeff, from the captured router inputs."""
    weights = {r.layer_number: r.weight.detach().float() for r in routers}
    E, k = lm.num_experts, lm.moe_topk
    counts = torch.zeros(LAYERS, E, dtype=torch.int64)
    lb = []
    for layer, x in captured:
        logits = x.reshape(-1, x.shape[-1]).float() @ weights[layer].t()
        top = logits.topk(k, dim=-1).indices
        c = torch.bincount(top.flatten(), minlength=E)
        counts[layer - 1] += c
        T = logits.shape[0]
        lb.append(float(E / (T * T * k) * (c.double() * logits.double().softmax(-1).sum(0)).sum()))
    return counts, sum(lb) / len(lb)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_counts_and_balancing_loss_match_a_plain_recomputation(tiny, recompute):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from train.moe_stats import LB_LOSS, RouterStats

    lm, models = tiny
    model = models[recompute]
    stats = RouterStats([model], num_layers=LAYERS, num_experts=lm.num_experts, dp_size=1, device=torch.device("cpu"))
    captured = []
    try:
        routers = _run(lm, model, capture=captured)
        counts = stats.counts.clone()
        got = _step_metrics(stats)
        # the step's accumulators are zeroed: the next step starts from nothing
        assert not stats.counts.any()
        assert not get_moe_layer_wise_logging_tracker()[LB_LOSS]["values"].any()
    finally:
        stats.remove()
    ref_counts, ref_lb = _reference(lm, routers, captured)
    if recompute == "full":
        # each layer's forward ran twice (without gradients, then again inside the backward), routing alike:
        # the reference saw every token twice, the statistics once
        assert len(captured) == 2 * LAYERS * MICRO
        assert not (ref_counts % 2).any()
        ref_counts = ref_counts // 2
    assert torch.equal(counts, ref_counts), (counts, ref_counts)
    # every token of every micro-batch went to k experts in each layer
    assert (counts.sum(dim=1) == MICRO * B * S * lm.moe_topk).all()
    ratio = ref_counts.max(dim=1).values.double() / ref_counts.double().mean(dim=1)
    assert got["moe_load_max"] == pytest.approx(float(ratio.max()), rel=1e-12)
    assert got["moe_load_max_layer"] == int(ratio.argmax())
    assert got["moe_idle_experts"] == int((ref_counts == 0).sum())
    assert got["moe_lb_loss"] == pytest.approx(ref_lb, rel=1e-6)


def test_no_count_without_gradients_or_in_eval_mode(tiny):
    """A KSA distillation teacher's pass (the training model under no_grad) and evaluation are not counted."""
    from train.moe_stats import RouterStats

    lm, models = tiny
    model = models["none"]
    stats = RouterStats([model], num_layers=LAYERS, num_experts=lm.num_experts, dp_size=1, device=torch.device("cpu"))
    try:
        _run(lm, model, grad=False)
        model.eval()
        try:
            _run(lm, model, grad=False)
        finally:
            model.train()
        assert not stats.counts.any()
        assert _step_metrics(stats) == {}
    finally:
        stats.remove()
