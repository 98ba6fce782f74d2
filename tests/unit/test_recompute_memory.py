"""Full recompute frees each layer's activations as backward goes (parallel/megatron_compat.py fix 3).

One process, gloo world of 1, the tiny MoE LM (4 layers, fp32, CPU), with megatron's alltoall and allgather token
dispatchers. Under full recompute a layer's backward runs its forward again on a detached copy of its saved input;
once that backward ends, the copy and its gradient are garbage. megatron-core 0.16.1's dispatchers kept the recomputed
routing probabilities (and with them the graph back to that detached input, its AccumulateGrad node holding the input
and its gradient) until the layer's next forward: two [s, b, h] tensors per MoE layer piled up through the backward.

(a) At the lowest layer's backward no higher layer's recomputed input is alive (weak references), nor any after the
    backward; and the bytes of live tensors there are lower than at the top layer's backward (each layer's saved
    input is freed as its backward ends), where they grew by two [s, b, h] tensors per layer before.
(b) The values are those of the dispatchers without the fix (megatron's own combine_postprocess): loss and every
    gradient bitwise equal, as the fix only drops a reference after its last use. The control run also shows that
    the weak-reference probe of (a) sees the held inputs there, so the check of (a) can fail.
"""

import gc
import weakref

import pytest
import torch

SEED = 7
S, B = 64, 1
LAYERS = 4
DISPATCHERS = ("alltoall", "allgather")


@pytest.fixture(scope="module")
def models():
    """{dispatcher: (lm config, model with full recompute)}, identical weights."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from models.config import LMConfig, ModelParallelSizes
    from models.lm import build_lm, transformer_config
    from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron

    pgs = init_one_process_megatron(SEED)
    get_moe_layer_wise_logging_tracker().clear()
    lm = LMConfig(num_layers=LAYERS, loss_chunk_tokens=0)
    built = {}
    for d in DISPATCHERS:
        cfg = transformer_config(lm, ModelParallelSizes(moe_dispatcher=d), bf16=False, use_cpu_initialization=True,
                                 recompute="full")
        built[d] = (lm, build_lm(lm, cfg, pg_collection=pgs, pp_rank=0, pp_size=1).train())
    built["allgather"][1].load_state_dict(built["alltoall"][1].state_dict())
    try:
        yield built
    finally:
        get_moe_layer_wise_logging_tracker().clear()
        destroy_one_process_megatron()


def _live_bytes(skip: set, *, rng_states: bool = True) -> int:
    """Bytes of the distinct storages of the live tensors Python holds objects of (what only autograd's C++ side
    keeps is not counted; the detached inputs and their gradients are Python objects), less those in `skip`
    (parameters and their gradients). Tensors of earlier tests are counted alike at every layer; those without data
    (a fake or meta tensor an earlier compiled test left in the same process) are not counted. rng_states=False
    leaves out the RNG states megatron's checkpoint saves for its recompute (CPU byte tensors, host memory on a
    GPU: the CUDA generator's state is one of them only on the CPU here)."""
    gc.collect()
    seen, total = set(), 0
    rng = torch.get_rng_state().numel()
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            try:
                st = o.untyped_storage()
                ptr = st.data_ptr()
            except (RuntimeError, NotImplementedError):   # no data to hold: "Cannot access data pointer of Tensor"
                continue
            if not rng_states and o.dtype == torch.uint8 and st.nbytes() == rng:
                continue
            if ptr not in seen and ptr not in skip:
                seen.add(ptr)
                total += st.nbytes()
    return total


def _step(lm, model, *, measure: bool = False):
    """Two forward + backward passes of a fixed batch (the second with every gradient already allocated, so that
    only activations come and go). Returns (loss, {name: grad}, probe) where probe, of the second backward, has
    "alive_at_0": the layers whose recomputed input was alive when layer 0's recompute began, "alive_after": those
    alive once backward ended, and with `measure` "bytes": {layer: live bytes when its recompute began}."""
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, lm.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, lm.vocab_size, (B, S), generator=g)
    pos = torch.arange(S).expand(3, B, S)
    inputs, probe, in_backward = {}, {"bytes": {}}, [False]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pre(i, kw):
        if not in_backward[0]:
            return
        inputs[i] = weakref.ref(kw["hidden_states"])  # the detached copy of the layer's saved input
        if i == 0:
            probe["alive_at_0"] = [j for j, r in sorted(inputs.items()) if j and r() is not None]
        if measure:
            probe["bytes"][i] = _live_bytes(params | {p.grad.untyped_storage().data_ptr() for p in model.parameters()
                                                      if p.grad is not None})

    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: pre(i, kw), with_kwargs=True)
             for i, layer in enumerate(model.decoder.layers)]
    try:
        model.zero_grad(set_to_none=True)
        for attempt in range(2):
            loss = model(tokens, pos, None, labels=labels).sum()
            in_backward[0] = attempt == 1
            if attempt == 0:
                model.zero_grad(set_to_none=False)  # zeroed, kept: the second backward allocates no gradient
            loss.backward()
            in_backward[0] = False
    finally:
        for h in hooks:
            h.remove()
    probe["alive_after"] = [j for j, r in sorted(inputs.items()) if r() is not None]
    return loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, probe


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_recomputed_layer_inputs_are_freed_as_backward_goes(models, dispatcher):
    lm, model = models[dispatcher]
    *_, probe = _step(lm, model, measure=True)
    assert sorted(probe["bytes"]) == list(range(LAYERS))
    assert probe["alive_at_0"] == [], f"recomputed inputs of layers {probe['alive_at_0']} alive at layer 0's backward"
    assert probe["alive_after"] == [], f"recomputed inputs of layers {probe['alive_after']} alive after backward"
    # each layer's backward frees its saved input ([s, b, h]); what else comes and goes (the recomputed layer's own
    # activations, attention and router buffers) is the same at every layer, so the bytes fall by at least one
    # [s, b, h] per layer (before the fix they rose by one per layer: two held, the freed one among them)
    sbh = S * B * lm.hidden_size * 4
    top = probe["bytes"][LAYERS - 1]
    for i in range(LAYERS - 1):
        assert probe["bytes"][i] <= top - (LAYERS - 1 - i) * sbh, (i, probe["bytes"])


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_dropping_the_probabilities_changes_no_value(models, dispatcher, monkeypatch):
    from megatron.core.transformer.moe import token_dispatcher

    lm, model = models[dispatcher]
    loss, grads, _ = _step(lm, model)
    cls = {"alltoall": token_dispatcher.MoEAlltoAllTokenDispatcher,
           "allgather": token_dispatcher.MoEAllGatherTokenDispatcher}[dispatcher]
    monkeypatch.setattr(cls, "combine_postprocess", cls.combine_postprocess.__wrapped__)  # megatron's own
    ref_loss, ref_grads, ref_probe = _step(lm, model)
    assert ref_probe["alive_at_0"] == list(range(1, LAYERS))  # control: without the fix they are held
    assert torch.equal(loss, ref_loss), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    diff = [n for n in grads if not torch.equal(grads[n], ref_grads[n])]
    assert not diff, f"gradients differ: {diff}"


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_forward_keeps_per_layer_what_the_estimate_counts(models, dispatcher):
    """Under full recompute each layer's forward leaves on the device its checkpointed input ([s, b, h]) and what the
    MoE token dispatcher holds as attributes until the layer's next forward: the routing map (bool, E per token) and
    the permutation indices (int64, 8 k per token). Measured as the growth of the live storages from one layer's
    start to the next in the forward (autograd's saved tensors kept as Python objects by identity hooks), against
    parallel/memory.py's per-layer terms for full recompute: the growth from the first layer's start to the final
    norm's, per layer."""
    from parallel.memory import MemoryInputs, dispatcher_bytes

    lm, model = models[dispatcher]
    for layer in model.decoder.layers:  # an earlier backward's attributes (with megatron's own combine, in the test
        d = layer.mlp.token_dispatcher     # above, its probabilities too): replaced in the forward, not added
        d.routing_map = d.reversed_local_input_permutation_mapping = d.local_map = d.probs = d.local_probs = None
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, lm.vocab_size, (B, S), generator=g)
    pos = torch.arange(S).expand(3, B, S)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    live = []
    mods = [model.decoder.layers[0], model.decoder.final_layernorm]
    hooks = [mod.register_forward_pre_hook(lambda *_: live.append(_live_bytes(params, rng_states=False)))
             for mod in mods]
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = model(tokens, pos, None, labels=tokens).sum()
    finally:
        for h in hooks:
            h.remove()
    del loss
    m = MemoryInputs(lm=lm, seq_length=S, micro_batch_size=B, bf16=False, recompute="full")
    per_layer = S * B * lm.hidden_size * 4 + dispatcher_bytes(m, offloaded=False)
    grown = (live[1] - live[0]) / LAYERS
    # 2 %: besides these, a layer leaves only a few scalars and per-expert counts (under 100 bytes); the dispatcher's
    # attributes are 7 % of the layer's 17.7 KB here (E = 4, k = 2, h = 64), so an estimate without them fails
    assert abs(grown / per_layer - 1) <= 0.02, (grown, per_layer)
