"""Grouped-GEMM experts: a drop-in replacement for megatron-core's `SequentialMLP` in `MoESubmodules.experts`.

Legend: T tokens routed to this rank's experts (already sorted by expert by the dispatcher), E local
experts, H hidden size, F expert FFN size per expert-tensor-parallel rank (moe_ffn_hidden_size / etp).

Weights are two stacked parameters in torch's Linear layout, one slice per local expert:
    w13 [E, 2F, H]   fc1: gate rows first, then up rows (SequentialMLP's linear_fc1.weight, stacked)
    w2  [E, H, F]    fc2 (SequentialMLP's linear_fc2.weight, stacked)
The forward is one autograd.Function: h = x @ w13[e]^T (grouped) -> a = silu(h_g) * h_u * p (fused,
fp32, one rounding) -> y = a @ w2[e]^T (grouped). Its backward recomputes `a` from h and runs four more
grouped GEMMs (dA, dW2, dX, dW13); saved for backward: x, h, probs (not a).

The routing probability multiplies the activation before fc2, exactly where SequentialMLP's MLP applies
`per_token_scale`; with `moe_apply_probs_on_input` it scales the input instead (as SequentialMLP does).

Expert tensor parallelism (parallel.etp > 1) costs nothing here: each rank holds its gate and up slices
(rows [gate_r; up_r], as ColumnParallelLinear with GLU does) and its fc2 columns; the dispatcher does the
gathers and reduce-scatters, as it does for SequentialMLP.

Checkpoints: `sharded_state_dict` emits exactly SequentialMLP's keys, global shapes, offsets, replica ids
and GLU split (one ShardedTensor per expert with the expert index as a prepend axis), built with the same
megatron helpers, so checkpoints move between the two and `models.init.init_layout_invariant` draws the
same weights for both.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_object_for_checkpoint,
    make_sharded_tensors_for_checkpoint,
)

from models.moe import grouped_gemm as gg
from models.moe.swiglu import HAS_TRITON, swiglu_bwd, swiglu_fwd

log = logging.getLogger(__name__)

IMPLS = ("auto", "torch_grouped_mm", "triton", "loop")
_BACKEND = {"torch_grouped_mm": "torch", "triton": "triton", "loop": "loop"}
_LOGGED: set[str] = set()


def _warn_once(msg: str, *args) -> None:
    text = msg % args
    if text not in _LOGGED:
        _LOGGED.add(text)
        log.warning(text)


def resolve_impl(impl: str, *, device_type: str, dtype: torch.dtype) -> str:
    """The implementation actually used for `impl` on this device; warns when a request cannot be honoured."""
    if impl not in IMPLS:
        raise ValueError(f"experts impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device_type == "cuda" and gg.has_torch_grouped_mm() and dtype == torch.bfloat16:
            return "torch_grouped_mm"
        return "loop"
    if impl == "torch_grouped_mm" and not gg.has_torch_grouped_mm():
        _warn_once("experts impl torch_grouped_mm: this torch (%s) has no torch._grouped_mm; using 'loop'",
                    torch.__version__)
        return "loop"
    if impl == "torch_grouped_mm" and (device_type != "cuda" or dtype != torch.bfloat16):
        _warn_once("experts impl torch_grouped_mm on %s/%s runs torch's per-expert fallback (host sync); "
                    "the CUTLASS kernel needs CUDA sm90+ and bf16", device_type, dtype)
    if impl == "triton" and not HAS_TRITON:
        raise ValueError("experts impl 'triton' needs the triton package")
    return impl


class _GroupedSwiGLUExperts(torch.autograd.Function):
    """y = (silu(x w13_g^T) * (x w13_u^T) * p) w2^T per expert group, with a recomputing backward."""

    @staticmethod
    def forward(ctx, x, w13, w2, probs, layout: gg.GroupLayout, backend: str, triton_act: bool):
        ctx.empty = x.shape[0] == 0  # no tokens for any local expert: skip the kernels, weights get zero grads
        if ctx.empty:
            ctx.save_for_backward(x, w13, w2, probs)
            return x.new_zeros(0, w2.shape[1])
        h = gg.mm_nt(x, w13, layout, backend)  # [T, 2F]
        a = swiglu_fwd(h, probs, use_triton=triton_act)  # [T, F]
        y = gg.mm_nt(a, w2, layout, backend)  # [T, H]
        ctx.save_for_backward(x, w13, w2, probs, h)
        ctx.layout, ctx.backend, ctx.triton_act = layout, backend, triton_act
        ctx.has_probs = probs is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.empty:
            x, w13, w2, probs = ctx.saved_tensors
            dprobs = torch.zeros_like(probs) if ctx.needs_input_grad[3] else None
            return torch.zeros_like(x), torch.zeros_like(w13), torch.zeros_like(w2), dprobs, None, None, None
        x, w13, w2, probs, h = ctx.saved_tensors
        layout, backend = ctx.layout, ctx.backend
        dy = dy.contiguous()
        da = gg.mm_nn(dy, w2, layout, backend)  # [T, F]
        a, dh, dprobs = swiglu_bwd(h, probs if ctx.has_probs else None, da, use_triton=ctx.triton_act)
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        dw2 = gg.mm_tn(dy, a, layout, backend) if need_w2 else None  # [E, H, F]
        dw13 = gg.mm_tn(dh, x, layout, backend) if need_w13 else None  # [E, 2F, H]
        dx = gg.mm_nn(dh, w13, layout, backend) if need_x else None  # [T, H]
        if dprobs is not None and not ctx.needs_input_grad[3]:
            dprobs = None
        return dx, dw13, dw2, dprobs, None, None, None


def grouped_swiglu_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, probs: torch.Tensor | None,
                           tokens_per_expert, *, impl: str = "loop", triton_activation: bool | None = None):
    """Functional form: x [T, H] sorted by expert, tokens_per_expert [E] (CPU or device), probs [T] or None;
    impl is a resolved one ("torch_grouped_mm", "triton" or "loop")."""
    if impl not in _BACKEND:
        raise ValueError(f"impl must be one of {tuple(_BACKEND)} here, got {impl!r} (resolve 'auto' first)")
    backend = _BACKEND[impl]
    if triton_activation is None:
        triton_activation = HAS_TRITON and (x.is_cuda or backend == "triton")
    layout = gg.group_layout(tokens_per_expert, x.shape[0], x.device)
    if layout.num_groups != w13.shape[0]:
        raise ValueError(f"tokens_per_expert has {layout.num_groups} entries for {w13.shape[0]} local experts")
    return _GroupedSwiGLUExperts.apply(x.contiguous(), w13, w2, probs, layout, backend, triton_activation)


class GroupedExperts(MegatronModule):
    """All local experts of one MoE layer as grouped GEMMs.

    Built by megatron's MoELayer as `build_module(spec, num_local_experts, config, pg_collection=...)`,
    i.e. `ModuleSpec(module=GroupedExperts, params={"impl": ...})` in `MoESubmodules.experts`.

    Args:
        num_local_experts: experts held by this expert-parallel rank.
        config: the model's TransformerConfig (gated SiLU, no bias, no fp8).
        submodules: ignored (accepted so a SequentialMLP spec's submodules can stay in place).
        pg_collection: megatron's ProcessGroupCollection; uses .ep, .expt_tp and .expt_dp.
        impl: "auto" (torch_grouped_mm on CUDA in bf16, else loop), "torch_grouped_mm", "triton" or "loop";
            resolved at the first forward for the device and dtype the weights then have (and logged).
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules=None,
                 pg_collection=None, *, impl: str = "auto"):
        super().__init__(config=config)
        _check_config(config)
        if impl not in IMPLS:
            raise ValueError(f"experts impl must be one of {IMPLS}, got {impl!r}")
        if impl == "triton" and not HAS_TRITON:
            raise ValueError("experts impl 'triton' needs the triton package")
        if pg_collection is None:
            raise ValueError("GroupedExperts needs the process groups (pg_collection); models never read globals")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        etp = self.tp_group.size()
        ffn = config.moe_ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"moe_ffn_hidden_size ({ffn}) must be divisible by parallel.etp ({etp})")
        self.ffn_per_rank = ffn // etp
        hidden = config.hidden_size
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype
        self.w13 = torch.nn.Parameter(torch.empty(num_local_experts, 2 * self.ffn_per_rank, hidden, device=device, dtype=dtype))
        self.w2 = torch.nn.Parameter(torch.empty(num_local_experts, hidden, self.ffn_per_rank, device=device, dtype=dtype))
        if config.perform_initialization:
            self._initialize()
        # Tagged as megatron tags its expert linears: TP-sharded (over the expert TP group), and reduced over
        # the expert-data-parallel group instead of the dense data-parallel group.
        set_tensor_model_parallel_attributes(self.w13, is_parallel=True, dim=1, stride=2)
        set_tensor_model_parallel_attributes(self.w2, is_parallel=True, dim=2, stride=1)
        for p in (self.w13, self.w2):
            p.allreduce = False

        self.impl = impl
        self._resolved: dict[tuple[str, torch.dtype], str] = {}

    def resolved_impl(self, device_type: str, dtype: torch.dtype) -> str:
        """The implementation used for weights on `device_type` in `dtype` (resolved once, then logged)."""
        key = (device_type, dtype)
        if key not in self._resolved:
            impl = resolve_impl(self.impl, device_type=device_type, dtype=dtype)
            hidden = self.config.hidden_size
            if impl == "torch_grouped_mm" and device_type == "cuda" and (hidden % 8 or self.ffn_per_rank % 8):
                raise ValueError(f"torch_grouped_mm needs hidden ({hidden}) and FFN per rank ({self.ffn_per_rank}) "
                                 "to be multiples of 8 (16-byte strides in bf16)")
            msg = (f"experts: GroupedExperts impl={impl} (requested {self.impl}) on {device_type}/{dtype}, "
                   f"{self.num_local_experts} local experts")
            if msg not in _LOGGED:
                _LOGGED.add(msg)
                log.info(msg)
            self._resolved[key] = impl
        return self._resolved[key]

    @torch.no_grad()
    def _initialize(self) -> None:
        cfg = self.config

        def init_all():
            for i in range(self.num_local_experts):
                cfg.init_method(self.w13[i])
                cfg.output_layer_init_method(self.w2[i])

        if cfg.use_cpu_initialization:
            init_all()
        else:
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                init_all()

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = None
        impl = self.resolved_impl(self.w13.device.type, self.w13.dtype)
        out = grouped_swiglu_experts(x, self.w13, self.w2, probs, tokens_per_expert, impl=impl)
        return out, None

    def backward_dw(self):
        """Weight gradients are computed in the backward pass (no delayed wgrad)."""

    # ------------------------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """SequentialMLP's sharded state dict, for stacked parameters.

        One ShardedTensorFactory per stacked parameter (dict keys `{prefix}w13`, `{prefix}w2`, so the loaded
        state dict fits this module), whose build produces, per local expert, exactly the ShardedTensors that
        SequentialMLP's expert MLP would (keys `{prefix}experts.linear_fc1.weight` etc., expert index as a
        prepend axis, fc1 split into gate and up halves), as views into the parameter. Plus the
        `_extra_state` objects SequentialMLP's linears carry, so a SequentialMLP can load our checkpoints.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = bool(metadata.get("singleton_local_shards", False))
        sd = {}
        for name, linear, tp_axis in (("w13", "linear_fc1", 0), ("w2", "linear_fc2", 1)):
            key = f"{prefix}experts.{linear}.weight"
            sd[f"{prefix}{name}"] = ShardedTensorFactory(
                key, getattr(self, name),
                partial(self._build_expert_shards, linear=linear, tp_axis=tp_axis,
                        sharded_offsets=tuple(sharded_offsets), metadata=metadata, singleton=singleton),
                partial(_merge_expert_shards, glu=linear == "linear_fc1" and self.config.gated_linear_unit),
                (0, 0, self.dp_group.rank()))
        for i in range(self.num_local_experts):
            expert_prefix, offsets = self._expert_prefix_and_offsets(prefix, i, sharded_offsets, singleton)
            for linear in ("linear_fc1", "linear_fc2"):
                obj = make_sharded_object_for_checkpoint(
                    None, f"{expert_prefix}{linear}._extra_state", offsets,
                    replica_id=(0, self.tp_group.rank(), self.dp_group.rank()))
                sd[f"{prefix}local_experts.{i}.{linear}._extra_state"] = obj
        return sd

    def _expert_prefix_and_offsets(self, prefix: str, local_idx: int, sharded_offsets, singleton: bool):
        num_global = self.ep_group.size() * self.num_local_experts
        global_idx = self.ep_group.rank() * self.num_local_experts + local_idx
        if singleton:
            return f"{prefix}experts.{global_idx}.", tuple(sharded_offsets)
        return f"{prefix}experts.", (*sharded_offsets, (len(sharded_offsets), global_idx, num_global))

    @torch.no_grad()
    def _build_expert_shards(self, key, data, replica_id, flattened_range, *, linear, tp_axis, sharded_offsets,
                             metadata, singleton):
        if flattened_range is not None:
            raise NotImplementedError("GroupedExperts: flattened (fully_sharded_model_space) checkpoints are not supported")
        suffix = f"experts.{linear}.weight"
        assert key.endswith(suffix), key
        prefix = key[: -len(suffix)]  # the (possibly re-prefixed) module prefix
        dp_rank = self.dp_group.rank()
        shards = []
        for i in range(self.num_local_experts):
            expert_prefix, offsets = self._expert_prefix_and_offsets(prefix, i, sharded_offsets, singleton)
            sh = make_sharded_tensors_for_checkpoint(
                {"weight": data[i]}, f"{expert_prefix}{linear}.", {"weight": tp_axis}, offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])[f"{expert_prefix}{linear}.weight"]
            if linear == "linear_fc1" and self.config.gated_linear_unit:
                factory = apply_swiglu_sharded_factory(sh, offsets, singleton)
                factory.replica_id = (*factory.replica_id[:2], dp_rank)
                shards.extend(factory.build())
            else:
                sh.replica_id = (*sh.replica_id[:2], dp_rank)
                shards.append(sh)
        return shards

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The `_extra_state` objects emitted for SequentialMLP compatibility come back from a load: drop them.
        for k in [k for k in state_dict if k.startswith(f"{prefix}local_experts.") and k.endswith("._extra_state")]:
            state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@torch.no_grad()
def _merge_expert_shards(loaded: list, *, glu: bool) -> torch.Tensor:
    """Inverse of the build: per-expert (gate, up) halves or whole matrices -> the stacked parameter."""
    if glu:
        return torch.stack([torch.cat([loaded[2 * i], loaded[2 * i + 1]], dim=0) for i in range(len(loaded) // 2)])
    return torch.stack(list(loaded))


def _check_config(config: TransformerConfig) -> None:
    if config.add_bias_linear:
        raise ValueError("GroupedExperts has no bias: set add_bias_linear=False (Qwen3 experts have none)")
    if not config.gated_linear_unit or config.activation_func is not F.silu:
        raise ValueError("GroupedExperts implements SwiGLU only (gated_linear_unit=True, activation_func=F.silu)")
    if getattr(config, "activation_func_clamp_value", None) is not None or getattr(config, "glu_linear_offset", 0.0):
        raise ValueError("GroupedExperts does not support activation_func_clamp_value / glu_linear_offset")
    if config.fp8 or getattr(config, "fp4", None):
        raise ValueError("GroupedExperts does not support fp8/fp4")
    if getattr(config, "moe_latent_size", None):
        raise ValueError("GroupedExperts does not support moe_latent_size")
