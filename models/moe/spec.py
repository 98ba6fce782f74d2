"""The MoE layer spec with GroupedExperts in the experts slot (router, dispatcher and layer are megatron's)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from models.moe.grouped_experts import IMPLS, GroupedExperts
from models.moe.router import BALANCES, BalancedTopKRouter, BiasedTopKRouter


def grouped_experts_spec(impl: str = "auto") -> ModuleSpec:
    if impl not in IMPLS:
        raise ValueError(f"experts impl must be one of {IMPLS}, got {impl!r}")
    return ModuleSpec(module=GroupedExperts, params={"impl": impl})


def moe_module_spec(*, num_experts: int, experts_impl: str = "auto", expert_bias: bool = False,
                    balance: str = "micro_batch") -> ModuleSpec:
    """megatron's local (no TransformerEngine) MoE spec, experts replaced by GroupedExperts(impl) ("sequential":
    megatron's SequentialMLP kept); `expert_bias`: the router is BiasedTopKRouter (auxiliary-loss-free balancing);
    else BalancedTopKRouter (models/moe/router.py): megatron's, with the balancing level `balance`; either routes a
    packed row's padding (its documents, from the layer) to no expert."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
    sub = spec.submodules
    if experts_impl != "sequential":
        sub = replace(sub, experts=grouped_experts_spec(experts_impl))
    if expert_bias:
        sub = replace(sub, router=partial(BiasedTopKRouter, balance=balance))
    else:
        sub = replace(sub, router=partial(BalancedTopKRouter, balance=balance))
    return replace(spec, submodules=sub)
