"""Activation offload to host memory for the language model's decoder layers (`parallel.offload=activations`).

    offloaders = attach_activation_offload(model_chunks, num_layers=-1)   # train/trainer.py, before DDP

Mechanism: autograd's saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`) are active while a
model chunk's megatron `TransformerBlock` runs its forward. Every tensor a decoder layer hands to autograd
for backward goes through `pack`, which copies it into a separate host tensor (pinned, on a side CUDA
stream, with the source's strides) and drops the device reference; `unpack` copies it back. Tensors are
grouped per layer; when backward first touches layer i, the host->device copies of the next offloaded
layer below (i-1) are issued on a second side stream (prefetch), and layer i+1's reloaded tensors are
released. On the device, at any time, there are at most two offloaded layers' saved tensors (LAYERS_IN_FLIGHT):
in forward the layer running and the one before it, whose copies to the host may still run (the device tensors
are held until their copy is known done; a layer that starts while an older layer's copies still run waits on the
host for them, so a GPU that computes faster than the copies drain cannot pile up more), in backward the layer
being worked on and the prefetched one.

What this offloads depends on parallel.recompute:
  * full (megatron's uniform recompute, one layer per checkpoint): a layer's forward runs under no_grad
    and its checkpoint saves only its inputs, so the only per-layer tensor is the layer's input hidden
    state [s, b, h] (DeepSpeed ALST's offload of checkpointed activations). Device activation memory then
    grows with the number of layers only by what the MoE token dispatcher keeps (below).
  * none / selective: everything the layer saves (attention, MoE, norms) moves, as torch's `save_on_cpu`
    would do, layer by layer and with prefetch.
What stays on the device: parameters (and views of them), tensors on another device, the tensors every
layer receives besides its hidden state (the rotary table, masks, packed-sequence bounds: one copy serves
all layers), broadcast views, whatever is saved outside the layers (embedding, final norm, loss), and the
layers past `num_layers` (default: each chunk's last layer, whose tensors backward needs first). Nor does
offload reach what modules hold as attributes rather than save: megatron's MoE token dispatcher keeps, in
every layer, the last micro-batch's routing map (bool) and permutation indices (int64; its routing probabilities
it drops when its combine ends, parallel/megatron_compat.py fix 3), t x (E + 8 k) bytes for t tokens (192 bytes a
token at 30B-A3B sizes, against 4096 for a bf16 layer input), with any recompute; so with full recompute device
memory still grows by that much per layer.
A saved tensor changed in place after it was saved is an error, as without offload: autograd skips its own
version check for tensors that went through saved-tensor hooks, so `unpack` makes it while the offloaded device
tensor still exists (a change through a `.detach()` alias that outlives it goes unseen).
Limits: on a pipeline stage other than the first, the schedule itself keeps the received input tensor
(the first layer's input) for its gradient, so offloading that one copies without freeing anything; the
host copies of all in-flight micro-batches are held at once (`python launch/memory.py` reports them).

Why not megatron-core 0.16.1's own offload: `cpu_offloading` needs TransformerEngine (the block asserts
"CPU Offloading is enabled when TE is not present") and is rejected with any recompute or pipeline
parallelism; `fine_grained_activation_offloading` is called from inside megatron's own attention / MLP /
expert modules (our dense/DSA/KSA attention and grouped experts never call it), needs CUDA events and
streams, and offloads nothing under full recompute (the layer forward runs under no_grad).

On a CPU-only torch the same pack/unpack code runs with synchronous copies into separate CPU tensors, so
the tests exercise it; pinned memory and streams are used only for CUDA tensors. Offload never changes
a value: a step with and without it gives bitwise-identical losses and gradients
(tests/unit/test_offload.py).
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Iterable

import torch
from torch.autograd.graph import saved_tensors_hooks

# offloaded layers whose saved tensors are on the device at once: in forward the layer running and the previous one,
# whose device->host copies may still run; in backward the layer worked on and the one prefetched (parallel/memory.py)
LAYERS_IN_FLIGHT = 2


@dataclasses.dataclass
class OffloadStats:
    """Counters since construction or `reset_stats()` (summed over passes): what went through the hooks."""

    packed: int = 0  # tensors saved for backward inside decoder layers
    offloaded: int = 0  # of those, copied to host memory (a tensor saved twice in a layer is copied once)
    offloaded_bytes: int = 0
    unpacked: int = 0  # tensors handed back to autograd from offloaded layers
    fetched: int = 0  # host -> device copies issued
    prefetched: int = 0  # of those, issued ahead of the layer's backward
    copy_waits: int = 0  # times a layer's forward waited on the host for an older layer's copies (LAYERS_IN_FLIGHT)


def _dense_stride(t: torch.Tensor) -> tuple[int, ...] | None:
    """t's strides if its elements fill a dense block (any dimension order), else None (a slice of a
    larger tensor: the copy is made contiguous)."""
    if t.is_contiguous():
        return t.stride()
    expected = 1
    for d in sorted(range(t.dim()), key=lambda i: (t.stride(i), t.size(i))):
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return None
        expected *= t.size(d)
    return t.stride()


def _empty(size, stride, dtype, device, *, pin_memory: bool = False) -> torch.Tensor:
    if stride is None:
        return torch.empty(size, dtype=dtype, device=device, pin_memory=pin_memory)
    return torch.empty_strided(size, stride, dtype=dtype, device=device, pin_memory=pin_memory)


def _check_version(t: torch.Tensor | None, saved: int, group) -> None:
    """Autograd's own check, which it skips for a tensor that went through saved-tensor hooks: a saved tensor
    changed in place after it was saved (t: the tensor, or None once nothing holds it any more) is an error, as
    without the hooks, not a backward that silently reads the value from before the change."""
    if t is not None and t._version != saved:
        where = "outside the decoder layers" if group is None else f"in decoder layer {group.index} of its model chunk"
        raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an inplace "
                           f"operation: [{t.type()} {list(t.shape)}] is at version {t._version}; expected version "
                           f"{saved} instead (saved {where}; parallel.offload=activations checks it as autograd "
                           "does without offload)")


class _Kept:
    """A saved tensor left where it is (the detached tensor: holding the original would make a reference
    cycle through its grad_fn; it shares the original's version counter)."""

    __slots__ = ("group", "tensor", "version")

    def __init__(self, group, tensor: torch.Tensor):
        self.group, self.tensor, self.version = group, tensor, tensor._version


class _Stored:
    """A saved tensor copied to host memory; `host` lives until autograd drops this handle."""

    __slots__ = ("group", "host", "device", "size", "stride", "dtype", "copied", "source", "version", "__weakref__")

    def __init__(self, group, t: torch.Tensor):
        self.group, self.device, self.dtype = group, t.device, t.dtype
        # the device tensor, weakly (its memory is what offload frees), and its version, for _check_version
        self.source, self.version = weakref.ref(t), t._version
        self.size = t.size()
        self.stride = _dense_stride(t)
        self.host = _empty(self.size, self.stride, t.dtype, torch.device("cpu"), pin_memory=t.is_cuda)
        self.copied = group.owner._copy_out(self.host, t)  # CUDA event: the device->host copy is done (None: done)
        if self.copied is not None:  # t's memory must not be reused before the copy has read it: held till then
            group.leaving.append(t)
            group.last_copy = self.copied

    def fetch(self, h2d: torch.cuda.Stream | None) -> tuple[torch.Tensor, object]:
        """Issues the host->device copy; returns (device tensor, CUDA event marking it ready or None)."""
        out = _empty(self.size, self.stride, self.dtype, self.device)
        if self.device.type != "cuda":
            out.copy_(self.host)
            return out, None
        # allocated on the compute stream (its memory pool, no second pool to fragment); the copy stream waits
        # until the compute work queued so far is done, since that work may still use the block just reused
        h2d.wait_stream(torch.cuda.current_stream(self.device))
        h2d.wait_event(self.copied)
        with torch.cuda.stream(h2d):
            out.copy_(self.host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(h2d)
        out.record_stream(h2d)
        return out, ready


class _Group:
    """The tensors one decoder layer saved in one forward pass."""

    def __init__(self, owner: "ActivationOffload", pass_: "_Pass", index: int, offload: bool):
        self.owner, self.pass_, self.index, self.offload = owner, pass_, index, offload
        self.stored: list[weakref.ref] = []  # handles (weak: autograd owns them)
        self.by_tensor: dict[tuple[int, int], tuple[weakref.ref, _Stored]] = {}  # forward only: dedupe
        # id(handle) -> (reloaded tensor, its CUDA event); keyed by id, not by the handle: a handle points at
        # its group, and a cycle would keep the reloaded tensors alive until Python's cycle collector runs
        self.ready: dict[int, tuple[torch.Tensor, object]] = {}
        self.leaving: list[torch.Tensor] = []  # forward only: device tensors whose copy to the host may still run
        self.last_copy = None  # the event of the last of those copies (one stream: it marks them all done)

    def pack(self, t: torch.Tensor):
        st = self.owner.stats
        st.packed += 1
        if not self.offload or self.pass_.keeps(t):
            return _Kept(self, t.detach())
        key = (id(t), t._version)
        hit = self.by_tensor.get(key)
        if hit is not None and hit[0]() is t:
            return hit[1]
        h = _Stored(self, t)
        self.by_tensor[key] = (weakref.ref(t), h)
        self.stored.append(weakref.ref(h))
        st.offloaded += 1
        st.offloaded_bytes += t.numel() * t.element_size()
        return h

    def fetch_all(self, *, prefetch: bool) -> None:
        for ref in self.stored:
            h = ref()
            if h is not None and id(h) not in self.ready:
                self.ready[id(h)] = h.fetch(self.owner._h2d)
                self.owner.stats.fetched += 1
                self.owner.stats.prefetched += int(prefetch)

    def take(self, h: _Stored) -> torch.Tensor:
        if id(h) not in self.ready:
            self.ready[id(h)] = h.fetch(self.owner._h2d)
            self.owner.stats.fetched += 1
        out, ready = self.ready[id(h)]
        if ready is not None:
            stream = torch.cuda.current_stream(out.device)
            stream.wait_event(ready)
            out.record_stream(stream)
        self.owner.stats.unpacked += 1
        return out

    def release(self) -> None:
        self.ready.clear()


class _Pass:
    """One forward of one model chunk (one micro-batch): its layer groups, in forward order."""

    def __init__(self, owner: "ActivationOffload"):
        self.owner = owner
        self.groups: list[weakref.ref] = []  # weak: a group lives while autograd holds one of its handles
        self.current: _Group | None = None  # forward only
        self.shared: dict[int, torch.Tensor] = {}  # forward only: tensors every layer receives
        self.backward_at: int | None = None

    def keeps(self, t: torch.Tensor) -> bool:
        """Tensors that stay where they are: see the module docstring. Broadcast views (a zero stride) stay
        too: a copy would materialise the expanded tensor."""
        return (t.device != self.owner.device or t.layout != torch.strided or t.numel() == 0
                or isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
                or id(t) in self.shared or any(st == 0 and n > 1 for st, n in zip(t.stride(), t.size())))

    def start_layer(self, shared: Iterable[torch.Tensor]) -> None:
        index = len(self.groups)
        for t in shared:
            self.shared[id(t)] = t
        self.close_layer()
        self.current = _Group(self.owner, self, index, offload=index < self.owner.layers_to_offload)
        self.groups.append(weakref.ref(self.current))

    def close_layer(self) -> None:
        """The current layer's forward is over: its copies join those in flight, of which the oldest are waited for
        beyond LAYERS_IN_FLIGHT - 1 (the next layer's own tensors make the last)."""
        if self.current is not None:
            self.current.by_tensor.clear()
            self.owner._copies_started(self.current)
        self.current = None

    def end_forward(self) -> None:
        self.close_layer()
        self.shared.clear()

    def enter_backward(self, index: int) -> None:
        """Backward reached layer `index`: release the layers above, prefetch the next offloaded one below."""
        if self.backward_at == index:
            return
        if self.backward_at is None:  # the forward's copies are done by now: their device tensors go
            self.owner._wait_for_copies(0)
        self.backward_at = index
        for ref in self.groups[index + 1:]:
            g = ref()
            if g is not None:
                g.release()
        for ref in reversed(self.groups[:index]):
            g = ref()
            if g is not None and g.offload:
                g.fetch_all(prefetch=True)
                break


class ActivationOffload:
    """Saved-tensor offload for one model chunk's TransformerBlock (see the module docstring).

    num_layers: how many of the block's layers, from the first, offload what they save; -1 = all but the
    last one (backward needs it first); more than the block has = all.
    """

    def __init__(self, block: torch.nn.Module, *, num_layers: int = -1):
        if num_layers < -1:
            raise ValueError(f"num_layers must be >= -1, got {num_layers}")
        layers = list(block.layers)
        self.num_block_layers = len(layers)
        self.layers_to_offload = max(0, len(layers) - 1) if num_layers == -1 else min(num_layers, len(layers))
        self.stats = OffloadStats()
        try:
            self.device = next(block.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")
        cuda = self.device.type == "cuda"
        self._d2h = torch.cuda.Stream(self.device) if cuda else None
        self._h2d = torch.cuda.Stream(self.device) if cuda else None
        # (event, device tensors) of the layers whose copies to the host may still run, oldest first
        self._leaving: collections.deque[tuple[object, list[torch.Tensor]]] = collections.deque()
        self._active: _Pass | None = None
        self._hooks: saved_tensors_hooks | None = None
        self._handles = [block.register_forward_pre_hook(self._block_start),
                         block.register_forward_hook(self._block_end, always_call=True)]
        self._handles += [layer.register_forward_pre_hook(self._layer_start, with_kwargs=True) for layer in layers]
        final = getattr(block, "final_layernorm", None)
        if final is not None:  # what the final norm saves is needed first in backward: it stays
            self._handles.append(final.register_forward_pre_hook(self._outside_layers))

    # ---------------------------------------------------------------------------------- module hooks
    def _block_start(self, block, args):
        if not (torch.is_grad_enabled() and block.training) or self.layers_to_offload == 0:
            return
        self._active = _Pass(self)
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def _block_end(self, block, args, output):
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        if self._active is not None:
            self._active.end_forward()
            self._active = None

    def _layer_start(self, layer, args, kwargs):
        """A layer starts its forward (inside megatron's checkpoint too: its saved inputs, packed right
        after, belong to it). Every tensor argument but the hidden state is shared by all layers."""
        if self._active is None:  # backward's recomputation, or no grad
            return
        shared = [a for a in args[1:] if isinstance(a, torch.Tensor)]
        for k, v in kwargs.items():
            if k == "hidden_states":
                continue
            values = [getattr(v, f.name) for f in dataclasses.fields(v)] if dataclasses.is_dataclass(v) else (
                v if isinstance(v, (tuple, list)) else [v])
            shared += [x for x in values if isinstance(x, torch.Tensor)]
        self._active.start_layer(shared)

    def _outside_layers(self, module, args):
        if self._active is not None:
            self._active.close_layer()

    # ------------------------------------------------------------------------------- device->host copies
    def _copy_out(self, host: torch.Tensor, t: torch.Tensor):
        """Copies `t` into `host`: on a side stream for a CUDA tensor, returning the event that marks the copy done;
        synchronously otherwise (None)."""
        if not t.is_cuda:
            host.copy_(t)
            return None
        self._d2h.wait_stream(torch.cuda.current_stream(t.device))  # t is complete on the compute stream
        with torch.cuda.stream(self._d2h):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._d2h)
        return done

    def _copies_started(self, group: _Group) -> None:
        if group.leaving:
            self._leaving.append((group.last_copy, group.leaving))
            group.leaving, group.last_copy = [], None
        self._wait_for_copies(LAYERS_IN_FLIGHT - 1)

    def _wait_for_copies(self, layers: int) -> None:
        """Drops the device tensors of the layers whose copies are done, waiting (on the host) for the oldest
        until at most `layers` layers' copies remain in flight."""
        while self._leaving and (len(self._leaving) > layers or self._leaving[0][0].query()):
            done, _ = self._leaving.popleft()
            if not done.query():
                done.synchronize()
                self.stats.copy_waits += 1

    # ---------------------------------------------------------------------------- saved-tensor hooks
    def _pack(self, t: torch.Tensor):
        p = self._active
        if p is None or p.current is None:  # saved outside the layers
            return _Kept(None, t.detach())
        return p.current.pack(t)

    @staticmethod
    def _unpack(h) -> torch.Tensor:
        g = h.group
        if g is None:
            _check_version(h.tensor, h.version, None)
            return h.tensor
        g.pass_.enter_backward(g.index)
        if isinstance(h, _Kept):
            _check_version(h.tensor, h.version, g)
            return h.tensor
        _check_version(h.source(), h.version, g)
        return g.take(h)

    # ----------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = OffloadStats()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attach_activation_offload(chunks: Iterable[torch.nn.Module], *, num_layers: int = -1) -> list[ActivationOffload]:
    """One ActivationOffload per megatron TransformerBlock in the model chunks (one per chunk for our LM)."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    out = []
    for chunk in chunks:
        for m in chunk.modules():
            if isinstance(m, TransformerBlock):
                out.append(ActivationOffload(m, num_layers=num_layers))
    return out


def total_stats(offloaders: Iterable[ActivationOffload]) -> OffloadStats:
    total = OffloadStats()
    for o in offloaders:
        for f in dataclasses.fields(OffloadStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(o.stats, f.name))
    return total
