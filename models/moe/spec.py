"""The MoE layer spec with GroupedExperts in the experts slot (router, dispatcher and layer are megatron's)."""

from __future__ import annotations

from dataclasses import replace

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from models.moe.grouped_experts import IMPLS, GroupedExperts


def grouped_experts_spec(impl: str = "auto") -> ModuleSpec:
    if impl not in IMPLS:
        raise ValueError(f"experts impl must be one of {IMPLS}, got {impl!r}")
    return ModuleSpec(module=GroupedExperts, params={"impl": impl})


def moe_module_spec(*, num_experts: int, experts_impl: str = "auto") -> ModuleSpec:
    """megatron's local (no TransformerEngine) MoE spec, experts replaced by GroupedExperts(impl)."""
    spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
    return replace(spec, submodules=replace(spec.submodules, experts=grouped_experts_spec(experts_impl)))
