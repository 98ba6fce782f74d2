"""Layout-invariant parameter initialisation.

Every parameter is drawn from a generator seeded by (seed, its global checkpoint key, its layer /
expert index), as a full unsharded tensor, and each rank keeps the slice it owns. The same seed then
gives bit-identical weights at any TP / PP / EP layout, which megatron's own initialisation does not
(its CPU path draws experts and pipeline stages from one running RNG, so EP2 or PP2 start from other
weights than EP1 / PP1). The global key and offsets come from megatron's sharded state dict, i.e. from
the same description the checkpoints use.

Distribution (Qwen3 / Megatron convention): N(0, std) for projections and embeddings, N(0, std /
sqrt(2 * num_layers)) for the output projections of each residual branch (attention out, expert down
projection), ones for norm weights, zeros for the routers' expert biases (model.lm.moe_expert_bias: a buffer, not a
parameter; a zero bias routes as a router without one).
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def _seed_for(seed: int, key: str, index: tuple[int, ...]) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _iter_sharded_tensors(sharded_sd):
    for value in sharded_sd.values():
        if isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            items = built.values() if isinstance(built, dict) else (built if isinstance(built, (list, tuple)) else [built])
            for item in items:
                if isinstance(item, ShardedTensor):
                    yield item
        elif isinstance(value, dict):
            yield from _iter_sharded_tensors(value)


def _std_for(key: str, std: float, num_layers: int) -> float | None:
    name = key.rsplit(".", 1)[0]
    if "norm" in name:
        return None  # ones
    if name.endswith("linear_proj") or name.endswith("linear_fc2"):
        return std / math.sqrt(2.0 * num_layers)
    return std


@torch.no_grad()
def init_layout_invariant(model_chunks, *, seed: int, std: float, num_layers: int) -> int:
    """Re-initialises every parameter of the model chunks; returns the number of elements written."""
    written = 0
    seen: set[int] = set()
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        for sh in _iter_sharded_tensors(module.sharded_state_dict()):
            if sh.flattened_range is not None:
                raise ValueError(f"{sh.key}: flattened shards cannot be initialised here")
            pre = sh.prepend_axis_num
            index = tuple(sh.global_offset[:pre])
            full_shape = tuple(sh.global_shape[pre:])
            local_shape = tuple(sh.data.shape)
            gen = torch.Generator(device="cpu").manual_seed(_seed_for(seed, sh.key, index))
            s = _std_for(sh.key, std, num_layers)
            if sh.key.endswith("router.expert_bias"):   # N(0, std) here started training with random routing biases
                full = torch.zeros(full_shape)
            else:
                full = torch.ones(full_shape) if s is None else torch.randn(full_shape, generator=gen) * s
            sl = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[pre:], local_shape))
            sh.data.copy_(full[sl].to(sh.data.dtype))
            written += sh.data.numel()
            seen.add(sh.data.untyped_storage().data_ptr())
        missing = [n for n, p in module.named_parameters() if p.untyped_storage().data_ptr() not in seen]
        if missing:
            raise RuntimeError(f"parameters not covered by the sharded state dict: {missing[:5]}")
    return written
