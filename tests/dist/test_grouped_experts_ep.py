"""A whole megatron MoELayer (router + alltoall dispatcher + experts) with GroupedExperts against the same layer
with SequentialMLP and the same weights, on 2 gloo processes: EP1 (dp 2), EP2, and TP2 with expert-TP 2 and
sequence parallelism; forward and backward (output, input gradient, router gradient, every local expert
gradient), plus the experts' sharded state dict at each layout (keys, offsets, replica ids, values). Also
the chunked loss at TP2 with sequence parallelism: models.lm.build_lm's model with and without
`enable_chunked_loss`.

This file is both the pytest test and the torchrun worker it launches (one job for all cases: starting
the two processes costs more than the cases).

Tolerance: relative RMSE 1e-5 per tensor (fp32): both layers see identical routing and dispatch; the experts
differ in summation order and in the fused activation only (see tests/unit/test_grouped_experts.py).
"""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5
LAYOUTS = {  # name -> (tp, ep, etp, sequence_parallel)
    "ep1": (1, 1, 1, False),
    "ep2": (1, 2, 1, False),
    "tp2_etp2_sp": (2, 1, 2, True),
}
IMPLS = ("torch_grouped_mm", "triton")
E, H, FFN, TOPK, SEQ, BATCH = 4, 32, 16, 2, 12, 2


# --------------------------------------------------------------------------------------------- pytest
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from launch.supervise import run_torchrun

    out = tmp_path_factory.mktemp("grouped_ep") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    proc = run_torchrun(cmd, cwd=REPO, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_layer_grouped_matches_sequential(results, layout, impl):
    errs = results["moe"][f"{layout}/{impl}"]
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, f"{layout}/{impl}: relative RMSE above {RTOL}: {bad}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_state_dict_matches_sequential(results, layout):
    assert results["sharded"][layout] == "ok", results["sharded"][layout]


def test_chunked_loss_gpt_tp2_sp_matches_gpt(results):
    errs = results["gpt_tp2_sp"]
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, f"relative RMSE above {RTOL}: {bad}"


# --------------------------------------------------------------------------------------------- worker
def _rel(ref, got) -> float:
    if ref.shape != got.shape:
        return float("inf")
    ref, got = ref.detach().double(), got.detach().double()
    if not bool(got.isfinite().all()):
        return float("inf")
    return float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def _config(tp, ep, etp, sp):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=E, moe_router_topk=TOPK, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, use_cpu_initialization=True, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, params_dtype=torch.float32,
        bias_activation_fusion=False, gradient_accumulation_fusion=False, hidden_dropout=0.0,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
        sequence_parallel=sp)


def _moe_case(tp, ep, etp, sp, pgs) -> tuple[dict, str]:
    import torch
    import torch.distributed as dist
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from models.moe.spec import moe_module_spec

    cfg = _config(tp, ep, etp, sp)
    ref = build_module(get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False), config=cfg,
                       pg_collection=pgs)
    g = torch.Generator().manual_seed(1000 + dist.get_rank())  # every rank routes different tokens
    s_local = SEQ // tp if sp else SEQ
    x, dy = torch.randn(s_local, BATCH, H, generator=g), torch.randn(s_local, BATCH, H, generator=g)

    def run(layer):
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)
        y.backward(dy)
        ex = layer.experts
        if hasattr(ex, "w13"):
            w13, w2 = ex.w13.grad, ex.w2.grad
        else:
            w13 = torch.stack([e.linear_fc1.weight.grad for e in ex.local_experts])
            w2 = torch.stack([e.linear_fc2.weight.grad for e in ex.local_experts])
        return {"output": y.detach(), "d_input": xi.grad, "d_router": layer.router.weight.grad, "d_w13": w13, "d_w2": w2}

    want = run(ref)
    errs = {}
    for impl in IMPLS:
        layer = build_module(moe_module_spec(num_experts=E, experts_impl=impl), config=cfg, pg_collection=pgs)
        with torch.no_grad():
            layer.router.weight.copy_(ref.router.weight)
            for i, e in enumerate(ref.experts.local_experts):
                layer.experts.w13[i].copy_(e.linear_fc1.weight)
                layer.experts.w2[i].copy_(e.linear_fc2.weight)
        got = run(layer)
        errs[impl] = {k: _rel(want[k], got[k]) for k in want}
    sharded = _sharded_check(ref.experts, layer.experts)
    return errs, sharded


def _flat(sd):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for v in sd.values():
        for it in (v.build() if isinstance(v, ShardedTensorFactory) else [v]):
            data = it.data.clone() if isinstance(it, ShardedTensor) else it.data
            shape = (it.global_shape, it.local_shape, it.prepend_axis_num, it.axis_fragmentations) \
                if isinstance(it, ShardedTensor) else (it.global_shape,)
            out[(it.key, it.global_offset)] = (shape, it.replica_id, data)
    return out


def _sharded_check(seq, grp) -> str:
    import torch

    prefix, offsets = "decoder.layers.0.mlp.experts.", ((0, 0, 1),)
    a, b = _flat(seq.sharded_state_dict(prefix, offsets)), _flat(grp.sharded_state_dict(prefix, offsets))
    if sorted(a) != sorted(b):
        return f"keys differ: {sorted(set(a) ^ set(b))[:4]}"
    for k in a:
        if a[k][:2] != b[k][:2]:
            return f"{k}: {a[k][:2]} vs {b[k][:2]}"
        if (a[k][2] is None) != (b[k][2] is None) or (a[k][2] is not None and not torch.equal(a[k][2], b[k][2])):
            return f"{k}: values differ"
    return "ok"


def _gpt_case(pgs) -> dict:
    import torch

    from models.config import LMConfig, ModelParallelSizes
    from models.lm import build_lm, transformer_config
    from models.moe.chunked_loss_gpt import enable_chunked_loss

    lm = LMConfig(vocab_size=96)
    cfg = transformer_config(lm, ModelParallelSizes(tp=2, sequence_parallel=True), bf16=False,
                             use_cpu_initialization=True)
    ref = build_lm(lm, cfg, pg_collection=pgs, pp_rank=0, pp_size=1)
    chunked = build_lm(lm, cfg, pg_collection=pgs, pp_rank=0, pp_size=1)
    chunked.load_state_dict(ref.state_dict())
    enable_chunked_loss(chunked, loss_chunk_tokens=7)
    g = torch.Generator().manual_seed(7)  # the same batch on both TP ranks (one data-parallel rank)
    tokens = torch.randint(0, lm.vocab_size, (2, 18), generator=g)
    labels = torch.randint(0, lm.vocab_size, (2, 18), generator=g)
    pos = torch.arange(18).expand(3, 2, -1)  # multimodal RoPE rows
    mask = (torch.rand(2, 18, generator=g) > 0.1).float()
    outs = []
    for m in (ref, chunked):
        loss = m(tokens, pos, None, labels=labels)
        (loss * mask).sum().backward()
        outs.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (ref_loss, ref_grads), (loss, grads) = outs
    errs = {"loss": _rel(ref_loss, loss)}
    if sorted(grads) != sorted(ref_grads):
        errs["grad names"] = float("inf")
    for n in ref_grads:
        errs[f"grad {n}"] = _rel(ref_grads[n], grads.get(n, ref_grads[n] * float("nan")))
    return errs


def main() -> None:
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from parallel.groups import init_distributed, teardown

    init_distributed()
    out = {"moe": {}, "sharded": {}}

    def setup(tp, ep, etp):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                                 order="tp-cp-ep-dp-pp")
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        model_parallel_cuda_manual_seed(42, tp_rank=pgs.tp.rank(), ep_rank=pgs.ep.rank(), etp_rank=pgs.expt_tp.rank())
        torch.manual_seed(42)
        return pgs

    def worst(d: dict) -> dict:  # max over ranks
        keys = sorted(d)
        t = torch.tensor([d[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(keys, t.tolist()))

    for name, (tp, ep, etp, sp) in LAYOUTS.items():
        pgs = setup(tp, ep, etp)
        errs, sharded = _moe_case(tp, ep, etp, sp, pgs)
        for impl, e in errs.items():
            out["moe"][f"{name}/{impl}"] = worst(e)
        verdicts = [None, None]
        dist.all_gather_object(verdicts, sharded)
        out["sharded"][name] = next((v for v in verdicts if v != "ok"), "ok")
    pgs = setup(2, 1, 1)
    out["gpt_tp2_sp"] = worst(_gpt_case(pgs))
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
    teardown()


if __name__ == "__main__":
    main()
