"""Activation offload (parallel/offload.py, `parallel.offload=activations`): values, movement, config, estimate.

One process, gloo world of 1, the tiny dense MoE LM (3 layers, fp32, CPU). On the CPU the hooks run the same
pack/unpack path as on a GPU with synchronous copies into separate CPU tensors (no pinned memory, no streams).

(a) Offload on vs off gives bitwise-identical losses and gradients, with recompute full and none: the copies
    keep dtype, shape and (for dense tensors) strides, so every backward kernel sees the same values in the
    same layout. No tolerance.
(b) The saved tensors really leave: after the forward, the layers' input hidden states are overwritten
    through `.data` (the storage autograd would read back without offload). Without offload that changes
    the gradients (checked, so the test can fail); with offload the gradients equal the clean ones,
    because backward reads the separate copies. With full recompute the offloaded layer inputs are freed
    right after the forward (weak references die), and the hooks' counters give exactly one [s, b, h]
    input per offloaded layer, prefetched one layer ahead.
(c) A wrong `parallel.offload` / `parallel.offload_layers` stops config validation naming the key.
(d) parallel/memory.py predicts less memory per rank with offload than without, for the 256K recipe.
The trainer path (train/trainer.py attaches the same hooks) is not run here, to keep these tests at a few
seconds; checked by hand, 2 steps each, per-step losses bit-identical to parallel.offload=none:
    torchrun --nproc_per_node 1 launch/pretrain.py recipe=keye_tiny_lm parallel=single \
        parallel.recompute=full parallel.offload=activations train.steps=2 train.checkpoint.enabled=false
and likewise recompute=selective; recompute=none with keye_tiny_dsa_sparse and keye_tiny_ksa; 2 processes
with parallel.pp=2 (recompute full) and with parallel.cp=2 (keye_tiny_ksa, recompute full).
"""

import re

import pytest
import torch

from tests.launch_util import tiny_lm_pair

SEED = 5
S, B = 32, 2
LAYERS = 3


@pytest.fixture(scope="module")
def tiny():
    """(lm config, {recompute: model}) with identical weights."""
    yield from tiny_lm_pair(SEED, LAYERS)


def _step(lm, model, *, poison: bool = False):
    """One forward + backward of a fixed batch; returns (loss, {name: grad}). poison: overwrite every
    layer's input hidden state with 3.0 after the forward (through .data, invisible to autograd)."""
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, lm.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, lm.vocab_size, (B, S), generator=g)
    pos = torch.arange(S).expand(3, B, S)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
             for layer in model.decoder.layers] if poison else []
    model.zero_grad(set_to_none=True)
    loss = model(tokens, pos, None, labels=labels).sum()
    for h in hooks:
        h.remove()
    for x in inputs:
        x.data.fill_(3.0)
    loss.backward()
    return loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def clean(tiny):
    """The reference step (no offload) of each model."""
    lm, models = tiny
    return {r: _step(lm, m) for r, m in models.items()}


def _same(a, b) -> None:
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb), (la.item(), lb.item())
    assert ga.keys() == gb.keys()
    diff = [n for n in ga if not torch.equal(ga[n], gb[n])]
    assert not diff, f"gradients differ: {diff}"


@pytest.mark.parametrize("recompute", ["full", "none"])
@pytest.mark.parametrize("layers", [-1, LAYERS])
def test_offload_is_bitwise_identical(tiny, clean, recompute, layers):
    from parallel.offload import attach_activation_offload

    lm, models = tiny
    model = models[recompute]
    ref = clean[recompute]
    (off,) = attach_activation_offload([model], num_layers=layers)
    try:
        got = _step(lm, model)
    finally:
        off.remove()
    _same(ref, got)
    st = off.stats
    assert st.offloaded > 0 and st.unpacked >= st.offloaded
    if recompute == "full":  # a checkpoint keeps only its layer's input; rotary table and masks stay
        n = LAYERS - 1 if layers == -1 else LAYERS
        assert st.offloaded == n and st.offloaded_bytes == n * S * B * lm.hidden_size * 4
        # each is prefetched while the layer above runs its backward; with every layer offloaded, the first
        # one backward meets (the last layer's) is fetched on demand
        assert st.fetched == n and st.prefetched == (n if layers == -1 else n - 1)
    else:  # everything a layer saves: norms, q/k/v, attention output, router, experts
        assert st.offloaded >= 10 * (LAYERS - 1 if layers == -1 else LAYERS)
        # a few saved tensors are never read back (their node's backward does not run: no gradient flows
        # there, e.g. through the router's top-k indices); they are simply dropped with the graph
        assert 0.9 * st.offloaded <= st.fetched <= st.offloaded


@pytest.mark.parametrize("recompute", ["full", "none"])
def test_backward_reads_the_host_copies(tiny, clean, recompute):
    from parallel.offload import attach_activation_offload

    lm, models = tiny
    model = models[recompute]
    ref = clean[recompute]
    _, grads = _step(lm, model, poison=True)  # control: without offload the poison reaches the gradients
    assert any(not torch.equal(g, ref[1][n]) for n, g in grads.items())
    (off,) = attach_activation_offload([model], num_layers=LAYERS)  # every layer, so every poisoned input
    try:
        got = _step(lm, model, poison=True)
    finally:
        off.remove()
    _same(ref, got)


def test_offloaded_layer_inputs_are_freed_after_the_forward(tiny):
    """Full recompute: after the forward, the only holder of a layer's input is its checkpoint. Without
    offload the inputs stay alive until backward; with offload nothing on the model's device holds them."""
    import gc
    import weakref

    from parallel.offload import attach_activation_offload

    lm, models = tiny
    model = models["full"]

    def forward_inputs_alive():
        refs = []
        hooks = [layer.register_forward_pre_hook(lambda m, a, kw: refs.append(weakref.ref(kw["hidden_states"])),
                                                 with_kwargs=True) for layer in model.decoder.layers]
        tokens = torch.zeros(B, S, dtype=torch.long)
        loss = model(tokens, torch.arange(S).expand(3, B, S), None, labels=tokens).sum()
        for h in hooks:
            h.remove()
        gc.collect()
        alive = [r() is not None for r in refs[1:]]  # layer 0's input is the embedding output: skip it
        loss.backward()
        return alive

    assert all(forward_inputs_alive())
    (off,) = attach_activation_offload([model], num_layers=LAYERS)
    try:
        assert not any(forward_inputs_alive())
    finally:
        off.remove()


def test_copies_in_flight_are_capped(tiny, clean, monkeypatch):
    """On a GPU the copies to the host run on a side stream and each layer's device tensors live until its copy is
    done; a GPU that computes layers faster than the copies drain would pile them up. Here the copies are made to
    look slow (their events done only when waited for): at each layer's start at most LAYERS_IN_FLIGHT - 1 earlier
    layers' saved tensors are still on the device (the starting layer's own make the last), the forward waits for
    the oldest layer first, and the backward starts by letting the rest go. Values unchanged (bitwise)."""
    import gc
    import weakref

    from parallel.offload import LAYERS_IN_FLIGHT, attach_activation_offload

    lm, models = tiny
    model = models["full"]
    (off,) = attach_activation_offload([model], num_layers=LAYERS)
    layer = [-1]
    sources: dict[int, list] = {}  # layer -> weak references to its device tensors being copied
    waited = []

    class SlowCopy:  # a CUDA event whose copy finishes only when the host waits for it
        def __init__(self, index):
            self.index, self.done = index, False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True
            waited.append(self.index)

    def copy_out(host, t):
        host.copy_(t)
        sources.setdefault(layer[0], []).append(weakref.ref(t))
        return SlowCopy(layer[0])

    def on_device():  # layer 0's input, the embedding's output, is held outside the layers too: not counted
        gc.collect()
        return [i for i, refs in sorted(sources.items()) if i and any(r() is not None for r in refs)]

    seen = []  # (layer, earlier layers with tensors on the device) at each layer's start, after offload's hook

    def start(i):
        seen.append((i, on_device()))
        layer[0] = i

    monkeypatch.setattr(off, "_copy_out", copy_out)
    mods = [*model.decoder.layers, model.decoder.final_layernorm]  # the final norm's start ends the layers' forward
    hooks = [m.register_forward_pre_hook(lambda *_, i=i: start(i)) for i, m in enumerate(mods)]
    try:
        got = _step(lm, model)
    finally:
        for h in hooks:
            h.remove()
        off.remove()
    assert sorted(sources) == list(range(LAYERS))  # every layer offloaded its checkpointed input
    forward = seen[:LAYERS + 1]  # then the backward's recomputed forwards, which offload leaves alone
    assert [i for i, _ in forward] == list(range(LAYERS + 1))
    assert all(len(held) <= LAYERS_IN_FLIGHT - 1 for _, held in forward), forward
    assert forward[-1][1] == [LAYERS - 1], forward  # the oldest went first
    assert waited == list(range(LAYERS)) and off.stats.copy_waits == LAYERS
    assert on_device() == []
    _same(clean["full"], got)


@pytest.mark.parametrize("recompute", ["full", "none"])
@pytest.mark.parametrize("layer, offloaded", [(1, True), (LAYERS - 1, False)])
def test_a_saved_tensor_changed_in_place_is_an_error_as_without_offload(tiny, recompute, layer, offloaded):
    """A layer's input hidden state (saved by its norm, or by its checkpoint under full recompute) multiplied in
    place after the forward: autograd's version check stops the backward without offload, and skips that check
    for tensors that went through saved-tensor hooks. With offload the backward read the copy from before the
    change and ran on. Checked for an offloaded layer and for the last one, whose tensors stay (num_layers=-1)."""
    from parallel.offload import attach_activation_offload

    lm, models = tiny
    model = models[recompute]

    def backward_after_changing_input():
        inputs = []
        hook = model.decoder.layers[layer].register_forward_pre_hook(
            lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
        tokens = torch.zeros(B, S, dtype=torch.long)
        try:
            loss = model(tokens, torch.arange(S).expand(3, B, S), None, labels=tokens).sum()
        finally:
            hook.remove()
        with torch.no_grad():
            inputs[0].mul_(2)
        loss.backward()

    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # the reference: no offload
        backward_after_changing_input()
    (off,) = attach_activation_offload([model], num_layers=LAYERS if offloaded else -1)
    try:
        with pytest.raises(RuntimeError, match=r"modified by an inplace operation: .* is at version 1; expected "
                                               rf"version 0 instead \(saved in decoder layer {layer} "):
            backward_after_changing_input()
        assert off.layers_to_offload > layer if offloaded else off.layers_to_offload == layer
    finally:
        off.remove()
        model.zero_grad(set_to_none=True)


def test_hooks_only_act_inside_the_layers_and_detach(tiny):
    """Outside a training forward (no_grad, eval) nothing is packed; remove() restores the plain model."""
    from parallel.offload import attach_activation_offload

    lm, models = tiny
    model = models["full"]
    (off,) = attach_activation_offload([model])
    try:
        with torch.no_grad():
            model(torch.zeros(B, S, dtype=torch.long), torch.arange(S).expand(3, B, S), None)
        model.eval()
        model(torch.zeros(B, S, dtype=torch.long), torch.arange(S).expand(3, B, S), None)
        assert off.stats.packed == 0
    finally:
        model.train()
        off.remove()
    _step(lm, model)
    assert off.stats.packed == 0


def test_wrong_offload_settings_name_the_key():
    from parallel.layout import ParallelConfig

    with pytest.raises(ValueError, match=r"parallel.offload must be one of \('none', 'activations'\), got 'disk'"):
        ParallelConfig(offload="disk")
    with pytest.raises(ValueError, match="parallel.offload_layers must be -1"):
        ParallelConfig(offload="activations", offload_layers=-2)
    with pytest.warns(UserWarning, match="parallel.offload_layers=4 is ignored"):
        ParallelConfig(offload_layers=4)


def test_wrong_offload_value_stops_the_recipe(monkeypatch):
    from train.launch import compose_config, validate

    def check(*overrides):
        return validate(compose_config(["recipe=keye_tiny_lm", *overrides]))

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="parallel.offload must be one of"):
        check("parallel.offload=gpu")
    _, layout = check("parallel.offload=activations", "parallel.offload_layers=2")
    assert (layout.offload, layout.offload_layers) == ("activations", 2)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.offload_layers=0"], r"parallel.offload_layers=0 offloads no layer"),
    # 4 layers over pp 2 x vpp 2: one layer per model chunk, which -1 (all but the chunk's last) keeps
    (["parallel.pp=2", "parallel.vpp=2"],
     r"parallel.offload=activations with parallel.offload_layers=-1 .* offloads no layer: a model chunk has 1 layer "
     r"\(model.lm.num_layers 4 / \(parallel.pp 2 \* parallel.vpp 2\)\); set parallel.offload_layers=1"),
])
def test_offload_that_would_offload_nothing_stops_the_launch(monkeypatch, capsys, overrides, message):
    """parallel.offload=activations with a layer count that offloads no layer ran a whole training without offload
    (its log: 'the first 0 of each model chunk's 4 layers ...'): the launch stops before any process group, exit 2."""
    import train.launch
    from train.launch import compose_config, run

    def past_validation(*args, **kwargs):  # a launch that got past validate() would go on to train: fail here
        raise AssertionError("the config passed validation")

    monkeypatch.setattr(train.launch, "check_device", past_validation)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as stop:
        run(compose_config(["recipe=keye_tiny_lm", "parallel.offload=activations", *overrides]))
    assert stop.value.code == 2
    assert re.search("config error: " + message, capsys.readouterr().err)


def test_offload_layers_past_a_chunk_warn_and_offload_every_layer():
    """offload_layers counts per model chunk: more than a chunk has is a warning (every layer offloads), and the
    hooks then offload each chunk's last layer too; offload_layers=1 at one layer per chunk is accepted."""
    from parallel.layout import ParallelConfig, ParallelLayout
    from train.config import to_config
    from train.launch import compose_config

    lm = to_config(compose_config(["recipe=keye_tiny_lm"])).model.lm
    cfg = ParallelConfig(offload="activations", offload_layers=6)
    with pytest.warns(UserWarning, match=r"offload_layers=6 is more than the 4 layers of a model chunk"):
        ParallelLayout.build(cfg, world_size=1, lm=lm)
    layout = ParallelLayout.build(ParallelConfig(pp=2, vpp=2, offload="activations", offload_layers=1), world_size=2,
                                  lm=lm)
    assert layout.offload_layers == 1


@pytest.mark.parametrize("recompute", ["full", "none"])
def test_estimator_predicts_less_memory_with_offload_for_256k(recompute):
    from dataclasses import replace

    from parallel.layout import ParallelLayout
    from parallel.memory import estimate, inputs_from_config
    from train.config import to_config
    from train.launch import compose_config

    cfg = to_config(compose_config(["recipe=keye_30b_a3b_ctx_256k", "model.vision.enabled=false",
                                    "data=synthetic_tokens", f"parallel.recompute={recompute}"]))
    layout = ParallelLayout.build(cfg.parallel, world_size=8, lm=cfg.model.lm)
    m = inputs_from_config(cfg, layout)
    base = estimate(m)
    off = estimate(replace(m, offload="activations"))
    assert off.total < base.total and off.host > 0 and base.host == 0
    lm = cfg.model.lm
    if recompute == "full":
        # 47 of 48 layer inputs (t = 262144 / cp 8 tokens x h x bf16) leave; one of them is in flight at a time beside
        # the last layer's, which stays. The forward and backward's peak falls by the other 46; the optimizer step's
        # (a row of its own once it is the higher, as with offload here) is the estimate's floor
        layer_input = 262144 / 8 * lm.hidden_size * 2
        step = "AdamW step's temporaries, above the forward and backward's peak"
        assert (base.total - base.rows.get(step, 0)) - (off.total - off.rows.get(step, 0)) == pytest.approx(
            (lm.num_layers - 1 - 1) * layer_input)
        assert off.host == pytest.approx((lm.num_layers - 1) * layer_input)


@pytest.mark.parametrize("overrides", [["recipe=keye_30b_a3b_dsa_warmup"],
                                       ["recipe=keye_30b_a3b_lm", "train.eval.only=true"]])
def test_estimator_counts_no_offloaded_memory_in_a_forward_only_step(overrides):
    """The DSA warm-up's indexer step and train.eval.only run the model forward only: nothing is saved for a
    backward, so offload moves nothing (the trainer attaches none to the indexer step; eval runs under no_grad).
    The estimate's header said 'recompute and offload unused' while its table reported 5.88 GiB of host memory
    for offloaded activations (the warm-up recipe); it now reports the same as without offload."""
    from dataclasses import replace

    from launch.memory import memory_inputs
    from parallel.memory import estimate

    _, _, m = memory_inputs([*overrides, "parallel.offload=activations"])
    assert m.forward_only and m.offload == "activations"
    off, base = estimate(m), estimate(replace(m, offload="none"))
    assert off.host == 0 and off.rows == base.rows
