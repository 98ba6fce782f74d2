"""GroupedExperts against megatron's SequentialMLP (same weights): forward and backward, every backend, experts
with zero tokens, a whole MoE layer, the sharded state dict, a dist_checkpointing round trip both ways, and the
layout-invariant init.

Tolerance (fp32, CPU): relative RMSE 1e-5 per tensor (`assert_close`). Both sides compute the same math in
fp32; they differ only in summation order (per-expert torch.mm vs torch._grouped_mm's fallback vs Triton
tiles under the interpreter) and in the activation (SequentialMLP: silu(g) * u, then * p in separate ops;
GroupedExperts: one fused fp32 expression). Measured: <= 3e-7 relative.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.kernels.helpers import assert_close
from tests.launch_util import free_port

RTOL = 1e-5
SEED = 42
E, H, FFN, TOPK = 4, 32, 16, 2
IMPLS = ["loop", "torch_grouped_mm", "triton"]


def check(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float = RTOL) -> None:
    assert_close(name, ref, got, tol)


@pytest.fixture(scope="module")
def pgs():
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from parallel.groups import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    init_distributed()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(SEED)
    yield ProcessGroupCollection.use_mpu_process_groups()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def tconfig(**over):
    from megatron.core.transformer import TransformerConfig

    kw = dict(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
              num_moe_experts=E, moe_router_topk=TOPK, add_bias_linear=False, gated_linear_unit=True,
              activation_func=F.silu, use_cpu_initialization=True, moe_token_dispatcher_type="alltoall",
              moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, params_dtype=torch.float32,
              bias_activation_fusion=False, gradient_accumulation_fusion=False, hidden_dropout=0.0)
    kw.update(over)
    return TransformerConfig(**kw)


def sequential_mlp(config, pgs):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False).submodules.experts
    return build_module(spec, E, config, pg_collection=pgs)


def grouped(config, pgs, impl="loop"):
    from models.moe.grouped_experts import GroupedExperts

    return GroupedExperts(E, config, pg_collection=pgs, impl=impl)


@torch.no_grad()
def copy_sequential_into_grouped(seq, grp) -> None:
    for i, expert in enumerate(seq.local_experts):
        grp.w13[i].copy_(expert.linear_fc1.weight)
        grp.w2[i].copy_(expert.linear_fc2.weight)


def run_experts(module, x, counts, probs, dy):
    x = x.detach().clone().requires_grad_()
    probs = probs.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y, bias = module(x, counts.clone(), probs)
    assert bias is None
    y.backward(dy)
    return y.detach(), x.grad, probs.grad


def expert_grads(module):
    if hasattr(module, "w13"):
        return module.w13.grad, module.w2.grad
    return (torch.stack([e.linear_fc1.weight.grad for e in module.local_experts]),
            torch.stack([e.linear_fc2.weight.grad for e in module.local_experts]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts", [[7, 0, 12, 5], [0, 0, 9, 0]], ids=["one_empty", "three_empty"])
def test_matches_sequential_mlp(pgs, impl, counts):
    cfg = tconfig()
    seq, grp = sequential_mlp(cfg, pgs), grouped(cfg, pgs, impl)
    copy_sequential_into_grouped(seq, grp)
    counts = torch.tensor(counts)
    t = int(counts.sum())
    g = torch.Generator().manual_seed(SEED)
    x, probs, dy = torch.randn(t, H, generator=g), torch.rand(t, generator=g), torch.randn(t, H, generator=g)
    ref = run_experts(seq, x, counts, probs, dy)
    got = run_experts(grp, x, counts, probs, dy)
    for name, r, o in zip(("output", "d_input", "d_probs"), ref, got):
        check(f"{impl} {name}", r, o)
    for name, r, o in zip(("d_w13", "d_w2"), expert_grads(seq), expert_grads(grp)):
        check(f"{impl} {name}", r, o)
    empty = counts == 0  # experts without tokens get exactly zero gradients
    assert (grp.w13.grad[empty] == 0).all() and (grp.w2.grad[empty] == 0).all()


def test_probs_on_input_top1_matches_sequential(pgs):
    """moe_apply_probs_on_input (top-1): the probability scales the input, as SequentialMLP does."""
    cfg = tconfig(moe_router_topk=1, moe_apply_probs_on_input=True, moe_router_pre_softmax=True)
    seq, grp = sequential_mlp(cfg, pgs), grouped(cfg, pgs, "torch_grouped_mm")
    copy_sequential_into_grouped(seq, grp)
    counts = torch.tensor([4, 9, 0, 6])
    g = torch.Generator().manual_seed(SEED)
    x, probs, dy = torch.randn(19, H, generator=g), torch.rand(19, generator=g), torch.randn(19, H, generator=g)
    for name, r, o in zip(("output", "d_input", "d_probs"), run_experts(seq, x, counts, probs, dy),
                          run_experts(grp, x, counts, probs, dy)):
        check(f"probs on input {name}", r, o)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tokens_at_all(pgs, impl):
    grp = grouped(tconfig(), pgs, impl)
    x = torch.zeros(0, H, requires_grad=True)
    probs = torch.zeros(0, requires_grad=True)
    y, _ = grp(x, torch.zeros(E, dtype=torch.long), probs)
    assert y.shape == (0, H)
    y.sum().backward()
    assert grp.w13.grad is not None and (grp.w13.grad == 0).all() and (grp.w2.grad == 0).all()


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_weight_grad_with_counts_only_on_device(backend):
    """The masked path used when tokens_per_expert lives on the device (no host copy of the counts)."""
    from models.moe import grouped_gemm as gg

    counts = torch.tensor([3, 0, 6, 0, 7])
    a, b = torch.randn(16, 8), torch.randn(16, 12)
    layout = gg.GroupLayout(ends=torch.cumsum(counts, 0).to(torch.int32), counts_host=None, num_rows=16)
    out = gg.mm_tn(a, b, layout, backend)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            check(f"dW[{e}]", a[start:start + n].t() @ b[start:start + n], out[e])
        else:
            assert (out[e] == 0).all()
        start += n


def test_moe_layer_with_grouped_experts_matches_sequential(pgs):
    """A whole megatron MoELayer (router, alltoall dispatcher at EP1, experts), same weights, both specs."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from models.moe.spec import moe_module_spec

    cfg = tconfig()
    torch.manual_seed(SEED)
    ref_layer = build_module(get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False),
                             config=cfg, pg_collection=pgs)
    layer = build_module(moe_module_spec(num_experts=E, experts_impl="torch_grouped_mm"), config=cfg,
                         pg_collection=pgs)
    with torch.no_grad():
        layer.router.weight.copy_(ref_layer.router.weight)
    copy_sequential_into_grouped(ref_layer.experts, layer.experts)
    g = torch.Generator().manual_seed(SEED)
    x, dy = torch.randn(11, 2, H, generator=g), torch.randn(11, 2, H, generator=g)
    outs = []
    for m in (ref_layer, layer):
        xi = x.clone().requires_grad_()
        y, _ = m(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, m.router.weight.grad, *expert_grads(m.experts)))
    for name, r, o in zip(("output", "d_input", "d_router", "d_w13", "d_w2"), *outs):
        check(f"moe layer {name}", r, o)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", [7, 24], ids=["seven_of_24", "all"])
def test_a_packed_rows_padding_goes_to_no_expert(pgs, padding, impl):
    """Given a packed row's documents (padding -1, as the trainer gives them), the MoE layer dispatches the padding
    to no expert: the experts get TOPK x the documents' tokens, the padding's output and input gradient are 0, and
    the documents' tokens get the output and gradients (input, router, experts) of the same layer run on them
    alone. Before, every padding token went to TOPK experts (their work: 7 of 24 tokens here; the tiny recipe's
    video packs are 30% padding). A row of padding alone gives the experts nothing and the layer 0."""
    from megatron.core.transformer.spec_utils import build_module

    from models.moe.router import PackedSeqDocuments
    from models.moe.spec import moe_module_spec

    T, real = 24, 24 - padding
    torch.manual_seed(SEED)
    layer = build_module(moe_module_spec(num_experts=E, experts_impl=impl), config=tconfig(),
                         pg_collection=pgs)
    seen = []
    layer.experts.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    g = torch.Generator().manual_seed(SEED)
    x, dy = torch.randn(T, 1, H, generator=g), torch.randn(T, 1, H, generator=g)
    dy[real:] = 0.0                                        # padding carries no loss
    ids = torch.cat([torch.zeros(real // 2), torch.ones(real - real // 2), -torch.ones(padding)]).long()
    outs = []
    for rows, docs in ((T, PackedSeqDocuments(qkv_format="sbhd", documents=ids.view(1, -1), num_documents=3)),
                       (real, None)):
        layer.zero_grad(set_to_none=True)
        xi = x[:rows].clone().requires_grad_()
        layer.router.documents = docs                       # as its layer sets it (models/lm.py)
        y, _ = layer(xi)
        layer.router.documents = None
        y.backward(dy[:rows])
        outs.append((y.detach(), xi.grad, layer.router.weight.grad, *expert_grads(layer.experts)))
        if real == 0:
            break
    assert seen[0] == TOPK * real
    full = outs[0]
    assert torch.equal(full[0][real:], torch.zeros_like(full[0][real:]))
    assert torch.equal(full[1][real:], torch.zeros_like(full[1][real:]))
    if real == 0:
        return
    for name, r, o in zip(("output", "d_input"), outs[1][:2], full[:2]):
        check(f"padded row's documents, {name}", r, o[:real])
    for name, r, o in zip(("d_router", "d_w13", "d_w2"), outs[1][2:], full[2:]):
        check(f"padded row's documents, {name}", r, o)


def _flat(sharded_sd):
    """(key, global offset) -> (global shape, local shape, prepend axes, fragments, replica id, data) of every leaf."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out = {}
    for v in sharded_sd.values():
        items = v.build() if isinstance(v, ShardedTensorFactory) else [v]
        for it in items:
            if isinstance(it, ShardedTensor):
                out[(it.key, it.global_offset)] = (it.global_shape, it.local_shape, it.prepend_axis_num,
                                                   it.axis_fragmentations, it.replica_id, it.data.clone())
            else:
                assert isinstance(it, ShardedObject)
                out[(it.key, it.global_offset)] = (it.global_shape, None, None, None, it.replica_id, it.data)
    return out


@pytest.mark.parametrize("singleton", [False, True])
def test_sharded_state_dict_equals_sequential(pgs, singleton):
    cfg = tconfig()
    seq, grp = sequential_mlp(cfg, pgs), grouped(cfg, pgs)
    copy_sequential_into_grouped(seq, grp)
    prefix, offsets = "decoder.layers.1.mlp.experts.", ((0, 1, 2),)
    meta = {"singleton_local_shards": singleton}
    a = _flat(seq.sharded_state_dict(prefix, offsets, dict(meta)))
    b = _flat(grp.sharded_state_dict(prefix, offsets, dict(meta)))
    assert sorted(a) == sorted(b)
    for k in a:
        *meta_a, data_a = a[k]
        *meta_b, data_b = b[k]
        assert meta_a == meta_b, k
        assert (data_a is None and data_b is None) or torch.equal(data_a, data_b), k


def _save_and_load(src, dst, path):
    from megatron.core import dist_checkpointing

    prefix, offsets = "mlp.experts.", ((0, 0, 1),)
    path.mkdir()
    dist_checkpointing.save(src.sharded_state_dict(prefix, offsets), str(path))
    loaded = dist_checkpointing.load(dst.sharded_state_dict(prefix, offsets), str(path))
    dst.load_state_dict({k[len(prefix):]: v for k, v in loaded.items()}, strict=True)


def test_checkpoint_moves_between_sequential_and_grouped(pgs, tmp_path):
    cfg = tconfig()
    seq, grp = sequential_mlp(cfg, pgs), grouped(cfg, pgs)
    _save_and_load(seq, grp, tmp_path / "from_sequential")
    for i, ex in enumerate(seq.local_experts):
        assert torch.equal(grp.w13[i], ex.linear_fc1.weight) and torch.equal(grp.w2[i], ex.linear_fc2.weight)
    with torch.no_grad():
        grp.w13.mul_(-2.0)
        grp.w2.add_(1.0)
    _save_and_load(grp, seq, tmp_path / "from_grouped")
    for i, ex in enumerate(seq.local_experts):
        assert torch.equal(grp.w13[i], ex.linear_fc1.weight) and torch.equal(grp.w2[i], ex.linear_fc2.weight)


def test_layout_invariant_init_gives_sequential_weights(pgs):
    from models.init import init_layout_invariant

    cfg = tconfig()
    seq, grp = sequential_mlp(cfg, pgs), grouped(cfg, pgs)
    for m in (seq, grp):
        init_layout_invariant([m], seed=7, std=0.02, num_layers=2)
    for i, ex in enumerate(seq.local_experts):
        assert torch.equal(grp.w13[i], ex.linear_fc1.weight) and torch.equal(grp.w2[i], ex.linear_fc2.weight)


def test_params_are_tagged_as_expert_params(pgs):
    grp = grouped(tconfig(), pgs)
    for p in (grp.w13, grp.w2):
        assert p.allreduce is False and p.tensor_model_parallel is True
    assert grp.w13.shape == (E, 2 * FFN, H) and grp.w2.shape == (E, H, FFN)


@pytest.mark.parametrize("over, match", [
    (dict(add_bias_linear=True), "bias"),
    (dict(gated_linear_unit=False), "SwiGLU"),
    (dict(activation_func=F.gelu), "SwiGLU"),
])
def test_rejects_unsupported_configs(pgs, over, match):
    with pytest.raises(ValueError, match=match):
        grouped(tconfig(**over), pgs)


def test_auto_is_loop_on_cpu_and_grouped_mm_for_cuda_bf16(pgs):
    from models.moe.grouped_experts import resolve_impl

    grp = grouped(tconfig(), pgs, "auto")
    assert grp.resolved_impl("cpu", torch.float32) == "loop"
    assert resolve_impl("auto", device_type="cuda", dtype=torch.bfloat16) == "torch_grouped_mm"
    assert resolve_impl("auto", device_type="cuda", dtype=torch.float32) == "loop"


def test_rejects_unknown_impl(pgs):
    with pytest.raises(ValueError, match="impl"):
        grouped(tconfig(), pgs, impl="cutlass")
