"""Where an attention variant's own parameters (DSA's indexer, KSA's summary QKV) sit on their checkpoint tensors'
layer axis.

megatron stacks a per-layer tensor along one axis of all the model's layers, and a checkpoint save requires every
index of it to be filled. When only some layers have a variant (model.lm.attention_per_layer), its own tensors
are stacked over those layers alone: the layer's index among them, out of their count. With the variant on every
layer nothing changes (megatron's own axis), so those checkpoints are as before.
"""

from __future__ import annotations


def variant_place(cfg, layer_index: int) -> tuple[int, int] | None:
    """(this layer's index among the layers of its attention variant, their count) when only some layers have it,
    else None. `cfg`: an LMConfig."""
    layers = cfg.layers_with(cfg.layer_attention()[layer_index])
    return None if len(layers) == cfg.num_layers else (layers.index(layer_index), len(layers))


def on_variant_axis(sharded_offsets: tuple, place: tuple[int, int] | None) -> tuple:
    """`sharded_offsets` as TransformerBlock passes them to a layer's modules ((0, layer, num_layers) first), with
    the layer axis replaced by `place`; unchanged when place is None or there is no layer axis (megatron's
    non-homogeneous layers)."""
    if place is None or not sharded_offsets:
        return sharded_offsets
    (axis, _, _), *rest = sharded_offsets
    return ((axis, *place), *rest)
