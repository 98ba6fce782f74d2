"""parallel/memory.py against hand-computed cases and against what autograd saves in the tiny model on CPU.

Measured GPU anchors (not asserted here: they need the H200): bench/RESULTS.md, issue 3, `bench_spine.py`, one
GPU, 4 layers of Keye-30B-A3B, bf16, no recompute, grouped experts, chunked loss: peak 67.4 at 8K and 84.3 at
32K (torch max_memory_allocated, reported as "GB"). The estimator gives 64.0 / 81.9 GiB for the same
configuration: -5 % / -3 % if those numbers are GiB, +2 % / +4 % if they are 10^9 bytes (62.8 / 78.5 GiB).
bench/bench_cp.py records the prediction next to the measurement for every CP case it runs, and
bench/bench_dsa_warmup.py for the warm-up step (2026-12-01: indexer-only step 10.3 / 11.5 GB measured at 8K /
32K against 10.2 / 12.4 estimated).
"""
import dataclasses

import pytest

from models.config import DSAConfig, KSAConfig, LMConfig, lm_param_count
from kernels.dsa.indexer_loss_dense import GPU_CHUNK_BYTES as DSA_DENSE_KL_CHUNK_BYTES
from kernels.dsa.plan import PLAN_CHUNK_BYTES as DSA_PLAN_CHUNK_BYTES
from kernels.dsa.topk import TOPK_CHUNK_BYTES as DSA_TOPK_CHUNK_BYTES
from parallel.memory import (DSA_UNION_SHARE, MemoryInputs, _attention, _moe, activation_bytes,
                             estimate, model_state_bytes, param_counts, trainable_counts)

LM = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=512,
          num_experts=4, moe_topk=2, moe_ffn_hidden_size=32, mrope_section=[2, 3, 3], loss_chunk_tokens=0)


def lm(**kw) -> LMConfig:
    return LMConfig(**{**LM, **kw})


@pytest.mark.parametrize("attention", ["dense", "dsa", "ksa"])
def test_param_count_matches_model_config_count(attention):
    cfg = lm(attention=attention, dsa=DSAConfig(index_heads=2, index_dim=8, topk=4))
    dense, expert = param_counts(MemoryInputs(lm=cfg, seq_length=8), rank=0)
    assert dense + expert == lm_param_count(cfg).total


def test_param_split_by_tp_and_ep_by_hand():
    # tp 2: qkv 64*(64+64)/2 = 4096, proj 64*64/2 = 2048, qk norms 32, norms 128, router 256 -> 6560 per layer
    # x2 layers = 13120; embedding and head 512*64/2 each = 32768; final norm 64 -> dense 45952.
    # ep 2: 2 layers * 2 experts * 3*64*32 = 24576 expert elements.
    dense, expert = param_counts(MemoryInputs(lm=lm(), seq_length=8, tp=2, ep=2), rank=0)
    assert (dense, expert) == (45952, 24576)


def test_model_state_bytes_by_hand():
    m = MemoryInputs(lm=lm(), seq_length=8, tp=2, ep=2, dp=2, cp=2, edp=2, bf16=True)
    rows = model_state_bytes(m, rank=0)
    assert rows["parameters"] == (45952 + 24576) * 2
    assert rows["gradients (fp32 buffer)"] == (45952 + 24576) * 4
    # dense optimizer state sharded over dp x cp = 4, expert over edp = 2; 12 B (fp32 master + m + v)
    assert rows["optimizer (master + Adam, sharded)"] == 45952 * 12 / 4 + 24576 * 12 / 2
    plain = model_state_bytes(MemoryInputs(lm=lm(), seq_length=8, bf16=False, distributed_optimizer=False),
                              rank=0)
    total = lm_param_count(lm()).total
    assert plain == {"parameters": total * 4, "gradients (fp32 buffer)": total * 4,
                     "optimizer (master + Adam, sharded)": total * 8}


def test_dense_attention_activations_by_hand():
    # fp32 (b = 4), t = 8 tokens, h = 64, hq = 64, hkv = 32, Hq = 4:
    # input norm 8*64*(8+4) = 6144; qkv 8*128*4 = 4096; q/k norm copies 8*96*8 = 6144; roped q,k 8*96*4 = 3072;
    # output 8*64*4 = 2048; lse 8*4*4 = 128  -> 21632 kept
    kept, transient = _attention(MemoryInputs(lm=lm(), seq_length=8, bf16=False), "dense", recompute_core=False)
    assert kept == 21632
    assert transient == 2 * 8 * 128 * 4
    # selective recompute drops the core attention's own saved tensors (lse here) from what is kept
    kept_sel, _ = _attention(MemoryInputs(lm=lm(), seq_length=8, bf16=False), "dense", recompute_core=True)
    assert kept_sel == 21632 - 128


def test_moe_activations_by_hand():
    # fp32, t_sp = 8, k = 2 -> T_e = 16; norm 8*64*12 = 6144; router 8*4*9 = 288; int64 indices: top-k twice
    # 8*2*8*2 = 256 and the permutation's 16*8 = 128; expert in 16*64*4 = 4096; fc1 out 16*64*4 = 4096;
    # grouped experts (the default): + probs 16*4 = 64 -> 15072;
    # megatron's SequentialMLP also keeps swiglu 16*32*4 = 2048 and expert out + probs 16*(256+4) = 4160 -> 21216
    kept, transient = _moe(MemoryInputs(lm=lm(), seq_length=8, bf16=False))
    assert kept == 15072 and transient == 3 * 16 * 64 * 4
    kept_seq, _ = _moe(MemoryInputs(lm=lm(experts_impl="sequential"), seq_length=8, bf16=False))
    assert kept_seq == 21216


def test_context_parallel_divides_activations_and_adds_ulysses_buffers():
    base = MemoryInputs(lm=lm(), seq_length=1024)
    one = sum(activation_bytes(base, rank=0).values())
    two = MemoryInputs(lm=lm(), seq_length=1024, cp=2)
    kept_a2a, _ = _attention(two, "dense", recompute_core=False)
    kept_ag, _ = _attention(MemoryInputs(lm=lm(), seq_length=1024, cp=2, cp_comm="allgather"), "dense",
                            recompute_core=False)
    kept_1, _ = _attention(base, "dense", recompute_core=False)
    assert kept_a2a > kept_1 / 2 and kept_ag > kept_1 / 2  # whole-sequence buffers of the CP exchange
    assert sum(activation_bytes(two, rank=0).values()) < one


def test_recompute_orders_activation_memory():
    totals = {r: estimate(MemoryInputs(lm=lm(num_layers=8), seq_length=4096, recompute=r)).total
              for r in ("none", "selective", "full")}
    assert totals["full"] < totals["selective"] < totals["none"]


def test_dsa_sparse_counts_the_kernels_plan_and_backward_buffers():
    # fp32 (b = 4), t = 64 tokens, G = 2 query heads per KV group -> block_q 16 (kernels/dsa/plan.py);
    # sparse minus warm-up: indices 64*4*4 = 1024 B kept, plus the union plan, 64*4 entries * DSA_UNION_SHARE * 8 B
    # (on one rank the KL's target is summed in the attention backward: no cached P, kernels/dsa/fused.py);
    # transient: fp32 dK, dV 2*64*32*4 and a candidate chunk
    x = dict(index_heads=2, index_dim=8, topk=4)
    sparse = MemoryInputs(lm=lm(attention="dsa", dsa=DSAConfig(stage="sparse", **x)), seq_length=64, bf16=False)
    dense = MemoryInputs(lm=lm(attention="dsa", dsa=DSAConfig(stage="dense_warmup", **x)), seq_length=64, bf16=False)
    (ks, ts), (kd, td) = (_attention(m, "dsa", recompute_core=False) for m in (sparse, dense))
    # the warm-up keeps its KL's gradients (the size of q_idx, w, k_idx: 64 * (2*8 + 2 + 8) * 4 B) instead
    assert ks - kd == 64 * 4 * 4 + 64 * 4 * DSA_UNION_SHARE * 8 - 64 * (2 * 8 + 2 + 8) * 4
    # the forward's largest stage transient: at 64 tokens the plan's chunk bound, 256 MiB + ~1.5 KB (the top-k's
    # buffers are what it allocates for the shape, 33,808 B: test_topk_transient_bytes_at_the_tiny_shape);
    # the warm-up's: its KL's fp32 d (64 x 64), dk_idx (64 x 8) and lse_I partials (one segment)
    dense_kl = 64 * 64 * 4 + 64 * 8 * 4 + 64 * 4
    assert ts - td == 2 * 64 * 32 * 4 + DSA_PLAN_CHUNK_BYTES + 64 * 4 * DSA_UNION_SHARE * 8 - dense_kl
    # train.deterministic: the backward's dK / dV are int64 fixed-point sums (kernels/dsa/README.md), 8 B a value
    det = dataclasses.replace(sparse, deterministic=True)
    kt, tt = _attention(det, "dsa", recompute_core=False)
    assert kt == ks and tt - ts == 2 * 64 * 32 * 4


def test_topk_transient_bytes_at_the_tiny_shape():
    """The top-k selector's buffers on the GPU (stored scores, 16-row query blocks) at 64 tokens and top-4, worked by
    hand: cap = next_pow2(4 * 4) at least 32 = 32 candidate slots; the 4 query blocks fit one chunk, 64 rows; the
    score slab 65 lines of 64 keys fp32 = 16,640 B; candidate scores and positions 64 x 32 x 8 = 16,384 B; counts
    256 B; the rows' document starts and fallback flags 2 x 64 x 4 = 512 B; the block list 16 B: 33,808 B. The
    estimate charged the 1 GiB chunk bound instead (1.04 GiB for recipe=keye_tiny_dsa_sparse)."""
    from kernels.dsa.topk import topk_transient_bytes

    assert topk_transient_bytes(1, 64, 4) == 16640 + 16384 + 256 + 512 + 16
    # at 128K tokens and top-2048 the chunk bound holds: a chunk of 1 GiB // (16 x (128K x 4 + 8192 x 8)) = 113
    # blocks of 16 rows, its slab (1809 lines) and candidate lists, beside the starts, flags and 8,192 blocks
    t, cap = 131072, 8192
    rows = 113 * 16
    assert topk_transient_bytes(1, t, 2048) == ((rows + 1) * t * 4 + rows * cap * 8 + rows * 4 + 2 * t * 4
                                                + (t // 16) * 4)
    assert topk_transient_bytes(1, t, 2048) <= DSA_TOPK_CHUNK_BYTES + 2 * t * 4 + (t // 16) * 4 + t * 4


def test_context_parallel_top_k_counts_its_buffers_at_global_rows(monkeypatch):
    """A CP rank's top-k (parallel/context/dsa._topk_triton) scatters its queries to their global rows, so its output
    and query copies span the whole sequence whatever cp. The estimate counted the selector for the rank's rows
    alone: on an H100 at 128K tokens, cp 4 (rank 0, document split, top-2048, 16 x 64 index heads, bf16) the top-k
    peaked at 2.249 GiB where 1.245 GiB was counted (cp 2: 2.249 against 1.495); now 2.515 and 2.765 (upper bounds:
    the selector's chunks are counted at their bound). Reference: the tensors the wrapper hands the kernel, read
    from the call (the kernel stubbed: its own buffers are topk_transient_bytes', tested above)."""
    import torch

    import kernels.dsa.topk as topk_mod
    from parallel.context.dsa import _topk_triton
    from parallel.context.split import cp_global_indices
    from parallel.memory import cp_topk_rows_bytes

    S, cp, K, HI, DI = 256, 2, 8, 2, 8
    seen = {}

    def stub(q_idx, w, k_idx, start, blocks, rows, topk, cap, samples, out, chunk_bytes):
        seen.update(q_idx=q_idx, w=w, k_idx=k_idx, out=out)  # start and blocks: topk_transient_bytes counts them

    monkeypatch.setattr(topk_mod, "topk_blocks", stub)
    cu = [0, 100, 250, 256]  # the document split: rank 0 holds a piece of the last document (its row 255)
    pos = cp_global_indices(S, cp, 0, split="document", cu_seqlens=cu)
    t = pos.numel()
    _topk_triton(torch.zeros(t, HI, DI, dtype=torch.bfloat16), torch.zeros(t, HI, dtype=torch.bfloat16),
                 torch.zeros(S, DI, dtype=torch.bfloat16), pos, torch.zeros_like(pos), K)
    measured = sum(x.numel() * x.element_size() for x in seen.values())
    assert measured == cp_topk_rows_bytes(S, DSAConfig(index_heads=HI, index_dim=DI, topk=K), 2)
    # in the layer's transient at 128K (top-2048, bf16), where the top-k is the forward's largest stage: above the
    # rank's rows' share by the sequence-length buffers (1 GiB output + 256 MiB q_idx + 4 MiB w + 16 MiB keys)
    x = DSAConfig(stage="sparse", index_heads=16, index_dim=64, topk=2048)
    m = MemoryInputs(lm=lm(attention="dsa", dsa=x, head_dim=128, mrope_section=[16, 24, 24]), seq_length=131072, cp=4)
    t4, b = 131072 // 4, 2
    _, tr = _attention(m, "dsa", recompute_core=False)
    hq, hkv = 4 * 128, 2 * 128  # lm(): 4 query / 2 KV heads, here of 128 dims
    selector = topk_mod.topk_transient_bytes(1, 131072, 2048, rows=t4) + cp_topk_rows_bytes(131072, x, b)
    assert cp_topk_rows_bytes(131072, x, b) == 131072 * (2048 * 4 + (16 * 64 + 16 + 64) * 2)
    assert tr == 2 * t4 * (hq + 2 * hkv) * b + 2 * 131072 * hkv * 4 + selector


def test_ksa_counts_summary_tokens():
    m = MemoryInputs(lm=lm(attention="ksa", ksa=KSAConfig(chunk=8, num_summary=1, windows=[4])), seq_length=64)
    assert m.model_seq == 72


def test_pipeline_first_stage_holds_pp_microbatches():
    m = MemoryInputs(lm=lm(num_layers=4), seq_length=256, pp=2, num_microbatches=8)
    first = activation_bytes(m, rank=0)
    last = activation_bytes(m, rank=1)
    assert first["attention dense x2"] == 2 * last["attention dense x2"]


@pytest.mark.parametrize("pp,vpp", [(2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4)])
def test_in_flight_microbatches_are_the_forwards_megatron_runs_before_the_first_backward(pp, vpp):
    """The first stage's activations: the forwards megatron's schedule runs there before its first backward (its own
    arithmetic, get_pp_rank_microbatches on pipeline rank 0: the warm-up forwards and the first 1F1B one, at most all
    of them), a forward of one of the vpp model chunks being 1/vpp of the stage's layers. With as many micro-batches
    per run of the schedule as pipeline ranks the interleaved schedule runs them all before a backward (pp, where the
    estimate said pp + (pp - 1) / vpp); with the vision tower in rounds of parallel.vit.group a run is one round."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches
    from models.vision import tiny
    from parallel.memory import in_flight_microbatches

    p2p = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda: 0),
                          virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)

    def megatron(n):
        total, _, warmup, _ = get_pp_rank_microbatches(n, vpp, pp, p2p_communicator=p2p)
        return min(warmup + 1, total) / vpp

    for n in (pp, 2 * pp, 3 * pp, 8 * pp):
        assert in_flight_microbatches(MemoryInputs(lm=lm(num_layers=8), seq_length=64, pp=pp, vpp=vpp,
                                                   num_microbatches=n)) == megatron(n), n
    group = pp if vpp > 1 else 1   # the interleaved schedule takes a multiple of pp (train/launch.py checks it)
    rounds = MemoryInputs(lm=lm(num_layers=8), seq_length=64, pp=pp, vpp=vpp, num_microbatches=8 * pp,
                          vision=tiny(64), vit_group=group)
    assert in_flight_microbatches(rounds) == megatron(group)


@pytest.mark.parametrize("pp,vpp", [(2, 1), (2, 2), (4, 2), (2, 4)])
def test_a_pipeline_ranks_layers_are_those_the_model_builds_there(pp, vpp):
    """The layers the estimate counts on the first and the last pipeline rank (their attention variants, for a model
    that mixes them) are those models/lm.block_spec builds there: megatron's layer offset and count per model chunk.
    Under the interleaved schedule the estimate took the model's first and last L / pp layers, where each rank holds
    vpp chunks spread over the model: at pp 2 x vpp 2 it counted the first rank's dsa, dsa, ksa, ksa layers where
    that rank builds dsa, dsa, dense, dense."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from models.config import ModelParallelSizes
    from models.lm import transformer_config
    from parallel.memory import stage_layers

    kinds = ["dsa", "dsa", "ksa", "ksa", "dense", "dense", "dsa", "ksa"]
    cfg = lm(num_layers=8, attention_per_layer=kinds, dsa=DSAConfig(index_heads=2, index_dim=8, topk=4),
             ksa=KSAConfig(chunk=8, num_summary=1, windows=[4]))
    tcfg = transformer_config(cfg, ModelParallelSizes(pp=pp, vpp=vpp if vpp > 1 else None), bf16=False,
                              use_cpu_initialization=True)

    def built(rank):
        chunks = [None] if vpp == 1 else range(vpp)
        return [v for c in chunks for v in kinds[get_transformer_layer_offset(tcfg, vp_stage=c, pp_rank=rank):][
            :get_num_layers_to_build(tcfg, vp_stage=c, pp_rank=rank)]]

    m = MemoryInputs(lm=cfg, seq_length=64, pp=pp, vpp=vpp, num_microbatches=2 * pp)
    assert all(stage_layers(m, rank=r) == built(r) for r in range(pp))
    if (pp, vpp) == (2, 2):
        rows = activation_bytes(m, rank=0)
        assert [k for k in rows if k.startswith("attention")] == ["attention dense x2", "attention dsa x2"]


QWEN3_30B_A3B = dict(num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4, head_dim=128,
                     vocab_size=151936, num_experts=128, moe_topk=8, moe_ffn_hidden_size=768,
                     mrope_section=[16, 24, 24], loss_chunk_tokens=0)


def test_a_middle_pipeline_rank_heavier_than_both_ends_is_the_estimate():
    """The 30B-A3B LM with 12 dense layers then 36 DSA layers at pp 4 x tp 4, 32K tokens, 1F1B: pipeline rank p holds
    pp - p micro-batches' activations of its own 12 layers, so rank 1 keeps 3 x 12 DSA layers (their indexer and
    union plan, not split over TP, 1.6 GiB per layer and micro-batch with the MoE block) against rank 0's 4 x 12
    dense ones (1.25) and rank 3's 1 x 12 DSA ones. The estimate evaluated the first and the last rank only and
    reported rank 0's 78.05 GiB where rank 1 holds 97.0 (the memory check let through a run whose rank 1 would not
    fit); it now evaluates every rank, each with its own layers and micro-batches in flight (hand-counted here)."""
    from parallel.memory import rank_estimate

    kinds = ["dense"] * 12 + ["dsa"] * 36
    m = MemoryInputs(lm=lm(**QWEN3_30B_A3B, attention_per_layer=kinds, dsa=DSAConfig()), seq_length=32768,
                     pp=4, tp=4, ep=8, dp=2, edp=1, num_microbatches=128, recompute="selective")
    moe = _moe(m)[0]
    for rank in range(4):
        rows = activation_bytes(m, rank=rank)
        variant = "dense" if rank == 0 else "dsa"
        held = (4 - rank) * 12   # layers x micro-batches in flight
        assert rows[f"attention {variant} x12"] == held * _attention(m, variant, recompute_core=True)[0], rank
        assert rows[f"MoE x12 ({variant} layers)"] == held * moe, rank
    est = estimate(m)
    assert est.stage == 1 and est.ranks == [rank_estimate(m, rank=r).total for r in range(4)]
    assert est.total == max(est.ranks) and est.total > est.ranks[0] and est.total > est.ranks[3]
    assert est.rows["attention dsa x12"] == 3 * 12 * _attention(m, "dsa", recompute_core=True)[0]
    # abs 0.01 GiB: the two figures launch/memory.py prints for the first rank and the heaviest, rounded
    assert (est.ranks[0] / 1024 ** 3, est.total / 1024 ** 3) == (pytest.approx(78.05, abs=0.01),
                                                                pytest.approx(97.01, abs=0.01))


@pytest.mark.parametrize("pp,vpp", [(2, 1), (4, 1), (2, 2), (4, 2), (2, 4), (3, 2)])
def test_every_pipeline_ranks_in_flight_forwards_follow_megatrons_schedule(pp, vpp):
    """in_flight_forwards against megatron's own schedule: its warm-up count per rank (get_pp_rank_microbatches)
    and its order of model chunks (get_schedule_table; a backward takes the chunks in reverse, each chunk's oldest
    forward first), replayed here forward by forward with every (micro-batch, chunk) tracked, the held bytes' peak
    taken over the whole run for uniform and for random per-chunk bytes. The estimate counted the first rank's and
    took 1 for every other rank: the last rank of pp 4 x vpp 2 holds 2.5 layer-sets, a middle one 3.5 of 5.5."""
    import random
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table
    from parallel.memory import in_flight_forwards, in_flight_microbatches

    rng = random.Random(42)
    for n in (pp, 2 * pp, 3 * pp):
        m = MemoryInputs(lm=lm(num_layers=pp * vpp), seq_length=64, pp=pp, vpp=vpp, num_microbatches=n)
        table = get_schedule_table(n, vpp, pp)
        for rank in range(pp):
            p2p = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda: rank),
                                  virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
            total, _, warmup, _ = get_pp_rank_microbatches(n, vpp, pp, p2p_communicator=p2p)
            assert in_flight_microbatches(m, rank=rank) == min(warmup + 1, total) / vpp, (n, rank)
            for weights in ([1.0] * vpp, [rng.random() for _ in range(vpp)]):
                held, peak = [[] for _ in range(vpp)], 0.0
                for k in range(total):
                    mb, chunk = table[k]
                    held[chunk].append(mb)
                    peak = max(peak, sum(len(h) * w for h, w in zip(held, weights)))
                    if k >= warmup:
                        back = vpp - 1 - table[k - warmup][1]
                        assert held[back].pop(0) == table[k - warmup][0]
                counts = in_flight_forwards(m, rank=rank, weights=weights)
                # rel 1e-12: the same products summed in another order
                assert sum(c * w for c, w in zip(counts, weights)) == pytest.approx(peak, rel=1e-12), (n, rank)


def test_interleaved_ranks_hold_the_chunks_in_flight_at_their_peak():
    """pp 2 x vpp 2, 4 micro-batches, 8 layers: the last rank builds layers 2-3 (chunk 0, DSA here) and 6-7 (chunk
    1, dense). Its schedule (by hand): forwards of chunk 0 for micro-batches 0, 1, of chunk 1 for 0; then backward
    and forward in turn: (c1 b0) c1 f1 (c1 b1) c0 f2 (c0 b0) c0 f3 ...: at most 3 forwards wait, either two of chunk 0
    and one of chunk 1, or three of chunk 0; with its chunk 0 the heavier the rank holds 3 x 2 DSA layers (the
    estimate counted 1 micro-batch, 2 DSA layers, on the last rank) and no dense one."""
    from parallel.memory import in_flight_forwards, in_flight_microbatches

    kinds = ["dense", "dense", "dsa", "dsa", "dense", "dense", "dense", "dense"]
    m = MemoryInputs(lm=lm(num_layers=8, attention_per_layer=kinds, dsa=DSAConfig(index_heads=2, index_dim=8, topk=4)),
                     seq_length=64, pp=2, vpp=2, num_microbatches=4)
    assert in_flight_forwards(m, rank=1) == [2, 1] and in_flight_microbatches(m, rank=1) == 1.5
    assert in_flight_forwards(m, rank=1, weights=[2.0, 1.0]) == [3, 0]
    assert in_flight_forwards(m, rank=1, weights=[1.0, 2.0]) == [2, 1]
    assert in_flight_forwards(m, rank=0) == [3, 2]   # warm-up 4 (2 (pp - 1) + (vpp - 1) pp), then the fifth
    rows = activation_bytes(m, rank=1)
    assert rows["attention dsa x2"] == 3 * 2 * _attention(m, "dsa", recompute_core=False)[0]
    assert rows["attention dense x2"] == 0.0


def test_measured_saved_activations_of_the_tiny_model_on_cpu():
    """Per-layer bytes autograd keeps for backward (measured with saved-tensor hooks, fp32, seq 2048) against
    the estimate: attention block (input norm + dense attention) and MoE block (norm + router + grouped
    experts). Measured at seq 4096: attention 20.23 MB vs 19.53 predicted (-3.5 %), MoE 15.25 vs 15.01 (+1.6 %).
    Tolerance 10 %: the estimate ignores small per-token vectors (rotary cos/sin, RMSNorm statistics,
    dispatcher index maps) and, at this tiny width, those are a few percent; a missing or double-counted
    tensor of a layer (q, k, v, the fc1 output, a norm copy) is >= 10 % of it.
    Not checkable here: KSA (its CPU backend is the mask reference, which keeps L x L) and bf16 sizes."""
    from train.config import to_config
    from train.launch import compose_config

    seq = 2048
    measured = _measure(seq)
    cfg = to_config(compose_config(["recipe=keye_tiny_lm", "parallel=single"]))
    m = MemoryInputs(lm=cfg.model.lm, seq_length=seq, bf16=False)
    attn, _ = _attention(m, "dense", recompute_core=False)
    moe, _ = _moe(m)
    n = measured["layers"]
    assert abs(measured["attention"] / n / attn - 1) <= 0.10, (measured, attn)
    assert abs(measured["moe"] / n / moe - 1) <= 0.10, (measured, moe)


def test_dsa_sparse_transient_is_the_plan_build_at_long_sequences():
    # at 128K tokens and top-2048 the plan (t * topk * DSA_UNION_SHARE * 8 B, ~1.5 GiB) exceeds the top-k's
    # 1 GiB chunk: while its packed chunks are joined the plan exists twice, plus 256 MiB of slots
    x = dict(index_heads=2, index_dim=8, topk=2048)
    t = 131072
    sparse = MemoryInputs(lm=lm(attention="dsa", dsa=DSAConfig(stage="sparse", **x)), seq_length=t, bf16=False)
    dense = MemoryInputs(lm=lm(attention="dsa", dsa=DSAConfig(stage="dense_warmup", **x)), seq_length=t, bf16=False)
    (_, ts), (_, td) = (_attention(m, "dsa", recompute_core=False) for m in (sparse, dense))
    plan = t * 2048 * DSA_UNION_SHARE * 8
    assert plan > DSA_TOPK_CHUNK_BYTES
    dense_kl = DSA_DENSE_KL_CHUNK_BYTES + t * 8 * 4 + t * 64 * 4  # the warm-up's (lse_I: at most 64 segments)
    assert ts - td == 2 * t * 32 * 4 + DSA_PLAN_CHUNK_BYTES + plan - dense_kl


def _measure(seq: int, *args: str) -> dict:
    """tests/unit/memory_measure_worker.py in its own process (it starts a one-process group)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.launch_util import free_port

    repo = Path(__file__).resolve().parents[2]
    # below the ephemeral range: a port from bind(0) was taken by another process's outgoing connection before the
    # worker's store bound it (EADDRINUSE, once in a CI run)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, str(repo / "tests/unit/memory_measure_worker.py"), str(seq), *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _recipe_inputs(recipe: str, seq: int, **kw) -> MemoryInputs:
    from train.config import to_config
    from train.launch import compose_config

    cfg = to_config(compose_config([f"recipe={recipe}", "parallel=single"]))
    return MemoryInputs(lm=cfg.model.lm, seq_length=seq, bf16=False, trainable=cfg.train.trainable, **kw)


@pytest.mark.parametrize("recipe,trainable", [("keye_tiny_dsa_warmup", "indexer"), ("keye_tiny_ksa_distill", "summary"),
                                              ("keye_tiny_dsa_warmup", "all")])
def test_training_stage_counts_gradients_and_optimizer_of_its_trainable_parameters_only(recipe, trainable):
    """The parameters that require grad in the built tiny model, frozen by models/lm.freeze_for_stage, against
    trainable_counts; gradients and optimizer state follow them, the parameters stay whole."""
    measured = _measure(256, recipe, trainable)
    m = _recipe_inputs(recipe, 256)
    m = MemoryInputs(**{**m.__dict__, "trainable": trainable})
    dense, expert = trainable_counts(m, rank=0)
    assert dense + expert == measured["trainable_elements"]
    rows = model_state_bytes(m, rank=0)
    assert rows["gradients (fp32 buffer)"] == measured["trainable_elements"] * 4
    assert rows["optimizer (master + Adam, sharded)"] == measured["trainable_elements"] * 8  # fp32: Adam m, v
    assert rows["parameters"] == sum(param_counts(m, rank=0)) * 4


def test_indexer_step_keeps_nothing_for_backward():
    """The warm-up's indexer-only step (trainable=indexer, indexer_backward=local) runs the frozen model forward
    only: measured, no saved tensor outlives the forward (each DSA layer's KL graph is consumed in the layer)
    and the output needs no gradient; the estimate keeps nothing and counts one working set, not every layer's.
    The same forward with the KL attached to the attention output (the "model" path) keeps tensors."""
    measured = _measure(256, "keye_tiny_dsa_warmup", "indexer")
    assert measured["alive_after_forward"] == 0 and not measured["output_requires_grad"]
    assert measured["attention"] > 0  # the hooks did see the layers' KL graphs while they existed
    step = _recipe_inputs("keye_tiny_dsa_warmup", 256, indexer_step=True)
    through_model = _recipe_inputs("keye_tiny_dsa_warmup", 256)
    rows = activation_bytes(step, rank=0)
    assert rows["kept for backward"] == 0
    working = [v for k, v in rows.items() if k.startswith("largest working set")]
    assert len(working) == 1
    kept_model = sum(v for k, v in activation_bytes(through_model, rank=0).items()
                     if k.startswith(("attention", "MoE")))
    assert working[0] < kept_model  # one layer's tensors at a time, against all four layers' kept
    assert estimate(step).total < estimate(through_model).total


def test_eval_only_holds_no_training_state_and_lets_one_h200_score_the_30b():
    """train.eval.only (trainable "none"): no gradient or optimizer row, the activations of a forward with nothing
    kept for backward (the trainer holds neither: tests/dist/test_eval.py). So the 30B recipe, which trains on 8
    H200s, is predicted at 70.1 GiB on one (with its vision tower), and the launcher's check lets that start; the
    same layout training is predicted at 626.5 GiB (its optimizer step's peak: AdamW's temporaries over all 128
    experts' weights at once) and stopped."""
    from launch.memory import memory_inputs
    from parallel.memory import GIB
    from train.launch import check_memory

    def on_one(*extra):
        return memory_inputs(["recipe=keye_30b_a3b", "parallel.ep=1", "world_size=1", *extra])

    h200 = 139.8 * GIB  # the lent H200s' total_memory
    cfg, layout, m = on_one("train.eval.only=true")
    rows = estimate(m).rows
    assert m.trainable == "none" and m.forward_only
    assert rows["gradients (fp32 buffer)"] == rows["optimizer (master + Adam, sharded)"] == 0
    assert rows["kept for backward"] == 0 and "vision gradients + AdamW (fp32)" not in rows
    assert round(estimate(m).total / GIB, 1) == 70.1
    assert check_memory(cfg, layout, h200) is None
    cfg, layout, m = on_one()
    assert round(estimate(m).total / GIB, 1) == 626.5
    with pytest.raises(ValueError, match="predicted peak memory per rank is 626.5 GiB"):
        check_memory(cfg, layout, h200)


def test_vision_tower_rows_by_hand():
    """The vision tower of a multimodal recipe (parallel/memory.py vision_bytes): fp32 weights on every rank;
    gradients + AdamW for what trains; what its phase holds for the whole step while the LM schedule runs, for
    every one of the rank's sequences: its share of the frames (pixels with parallel.vit.recompute, else the ViT's
    activations) and, on the LM-input stage, the embeddings (+ their gradients when the tower trains)."""
    from models.vision import tiny
    from parallel.memory import vision_bytes, vit_saved_elements

    v = tiny(64)
    n, n_proj = v.num_params(), v.projector_params()
    m = MemoryInputs(lm=lm(), seq_length=256, num_microbatches=3, cp=2, tp=2, vision=v, vit_ranks=4,
                     vit_recompute=True)
    patches = 3 * 256 * 4 / 4                     # 3 sequences, every token visual, 2x2 patches, over 4 ranks
    assert vision_bytes(m, rank=0) == {
        "vision tower weights (fp32, on every rank)": 4 * n, "vision gradients + AdamW (fp32)": 12 * n,
        "vision frames kept for the recompute (uint8 pixels)": patches * 3 * 14 * 14,
        "visual embeddings for the LM + gradients": 3 * 256 / 2 * 64 * 2 * 2}
    kept = vision_bytes(MemoryInputs(lm=lm(), seq_length=256, num_microbatches=3, vision=v, vit_ranks=4, pp=2),
                        rank=1)
    assert kept["ViT activations kept between its phases"] == patches * (2 * vit_saved_elements(v) + 588) * 2
    assert "visual embeddings for the LM + gradients" not in kept
    # replicated: the first pipeline stage encodes every frame, a later one none (it held them all in the estimate)
    one = MemoryInputs(lm=lm(), seq_length=256, num_microbatches=3, vision=v, vit_layout="replicated", pp=2)
    assert vision_bytes(one, rank=0)["ViT activations kept between its phases"] == (
        3 * 256 * 4 * (2 * vit_saved_elements(v) + 588) * 2)
    assert vision_bytes(one, rank=1) == {"vision tower weights (fp32, on every rank)": 4 * n,
                                         "vision gradients + AdamW (fp32)": 12 * n}
    align = vision_bytes(MemoryInputs(lm=lm(), seq_length=256, vision=v, trainable="projector"), rank=0)
    assert align["vision gradients + AdamW (fp32)"] == 12 * n_proj
    frozen = vision_bytes(MemoryInputs(lm=lm(), seq_length=256, vision=v, trainable="indexer",
                                       vit_recompute=True), rank=0)
    assert frozen == {"vision tower weights (fp32, on every rank)": 4 * n, "visual embeddings for the LM": 256 * 64 * 2}
    assert vision_bytes(MemoryInputs(lm=lm(), seq_length=256), rank=0) == {}
    # parallel.vit.group=1: one of the 3 micro-batches per vision phase
    rounds = vision_bytes(MemoryInputs(lm=lm(), seq_length=256, num_microbatches=3, cp=2, tp=2, vision=v, vit_ranks=4,
                                       vit_recompute=True, vit_group=1), rank=0)
    assert rounds["visual embeddings for the LM + gradients"] == 256 / 2 * 64 * 2 * 2
    assert rounds["vision frames kept for the recompute (uint8 pixels)"] == patches / 3 * 588
    # the tower's own AdamW steps apart from the LM's (train/vision.py): the larger one's sqrt(v) is the step's
    from dataclasses import replace

    from parallel.memory import optimizer_step_bytes
    big = MemoryInputs(lm=lm(num_layers=1), seq_length=256, vision=tiny(256))
    assert tiny(256).num_params() > sum(trainable_counts(big, rank=0))
    assert optimizer_step_bytes(big, rank=0) == 4 * tiny(256).num_params()
    assert optimizer_step_bytes(replace(big, trainable="projector"), rank=0) == (
        4 * tiny(256).projector_params())


@pytest.mark.parametrize("sizes", [{}, {"hidden": 128}, {"mlp": 256}, {"heads": 8}])
def test_vit_saved_elements_per_patch_and_block_as_measured_on_cpu(sizes):
    """What one ViT block hands autograd per patch (fp32 on the CPU, counted once per storage through the
    saved-tensor hooks, parameters excluded): the difference between a 2-block and a 1-block ViT on the same
    frames, of two sizes as a packed step's are, equals parallel/memory.py's vit_saved_elements."""
    import dataclasses

    import torch

    from models.vision import VisionModel, tiny
    from parallel.memory import vit_saved_elements

    def saved_elements_per_patch(depth: int) -> float:
        cfg = dataclasses.replace(tiny(64), depth=depth, **sizes)
        model = VisionModel(cfg)
        grid = torch.tensor([[1, 6, 6]] * 3 + [[1, 4, 8]])
        pv = torch.randint(0, 255, (int(grid.prod(-1).sum()), cfg.patch_dim), dtype=torch.uint8)
        seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        total = [0]

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(pv, grid)
        return total[0] / 4 / pv.shape[0]

    cfg = dataclasses.replace(tiny(64), **sizes)
    # abs: the two totals are divided by the 140 patches, so their difference carries float rounding only
    assert saved_elements_per_patch(2) - saved_elements_per_patch(1) == pytest.approx(vit_saved_elements(cfg), abs=1e-6)


def test_the_command_explains_itself_and_stops_on_bad_input(capsys):
    """`python launch/memory.py --help` prints its usage; a misspelled key, a value of the wrong type, an impossible
    layout or a world_size that is not a number ends it with pretrain.py's message and exit 2, not a traceback."""
    from launch.memory import main

    main(["--help"])
    assert "world_size" in capsys.readouterr().out
    bad = {"train.lrr=1": "Key 'lrr' not in 'TrainConfig'",
           "train.lr=abc": "Value 'abc' of type 'str' could not be converted to Float",
           "parallel.ep=3": "parallel.ep (3) must divide model.lm.num_experts (8)",
           "world_size=x": "world_size must be a positive integer, got 'x'",
           "world_size=0": "world_size must be a positive integer, got '0'",   # was judged as a layout of dp 0
           # settings that do not fit together, as pretrain.py judges them before it reads any file
           "data=video_tiny": "video data packs one sequence per micro-batch: train.micro_batch_size must be 1",
           "model=keye_tiny_vl": "model.vision.enabled=true needs video data (data.kind=video), got data.kind=synthetic",
           "train.global_batch_size=12": "train.global_batch_size (12) must be a multiple of "
                                         "train.micro_batch_size (4) x data-parallel size (2)"}
    for override, message in bad.items():
        with pytest.raises(SystemExit) as stop:
            main(["recipe=keye_tiny_lm", override])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("launch/memory.py: ") and message in err, (override, err)
    main(["recipe=keye_tiny_lm"])
    assert "predicted peak (allocated)" in capsys.readouterr().out
    main(["recipe=keye_tiny_lm", "parallel.pp=2"])   # every pipeline rank's peak, then the heaviest's rows
    out = capsys.readouterr().out
    assert "pipeline ranks (predicted peak, GiB): 0: 0.03, 1: 0.02; the heaviest is rank 0 (of 0-1)" in out, out


def test_the_command_takes_the_fewest_ranks_the_layout_runs_on():
    """Without world_size the estimate is of the smallest world ParallelLayout.build accepts (found here by trying
    each size in turn): tp 1 x cp 3 with ep 8 runs on 24 ranks, where the command took 6 and stopped with `world
    size (6) must be divisible by parallel.etp * parallel.ep * parallel.pp (1 * 8 * 1 = 8)`."""
    import itertools

    from launch.memory import fewest_ranks
    from parallel.layout import ParallelConfig, ParallelLayout

    model = lm(num_layers=12, num_attention_heads=12, num_query_groups=6, num_experts=24, vocab_size=6 * 512,
               moe_ffn_hidden_size=24)

    def smallest(p):
        for world in itertools.count(1):
            try:
                ParallelLayout.build(p, world_size=world, lm=model)
                return world
            except ValueError as e:
                assert "world size" in str(e) or "must not exceed" in str(e), e   # only the world is wrong

    for tp, cp, pp, ep, etp in itertools.product((1, 2, 3), (1, 2, 3), (1, 2), (1, 2, 3, 4, 8), (1, 2)):
        p = ParallelConfig(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, cp_comm="allgather" if cp > 1 else "a2a")
        assert fewest_ranks(p) == smallest(p), (tp, cp, pp, ep, etp)


# Every memory figure the recipes' comments (and README) quote from launch/memory.py, with the command that gives it:
# (file, the phrase with {} where the figure stands, the command's arguments, what of the estimate it quotes, decimals).
# The comments of keye_30b_a3b_align and _ctx_8k once said 75 GiB where the estimate said 79.9, and the ViT without
# recompute "~1 TB" where it is 1214 GiB: an estimator change must bring its quoted figures along.
_LM_ALONE = ("world_size=8", "model.vision.enabled=false", "data=synthetic_tokens")
_QUOTED = [
    ("recipes/recipe/keye_30b_a3b_align.yaml", "predicted at {} GiB per", ("recipe=keye_30b_a3b_align",), "total", 1),
    ("recipes/recipe/keye_30b_a3b_align.yaml", "({} with the 10% margin", ("recipe=keye_30b_a3b_align",), "margin", 0),
    ("recipes/recipe/keye_30b_a3b_ctx_8k.yaml", "predicted at {} GiB per", ("recipe=keye_30b_a3b_ctx_8k",), "total", 1),
    ("recipes/recipe/keye_30b_a3b_ctx_8k.yaml", "({} with the 10% margin", ("recipe=keye_30b_a3b_ctx_8k",), "margin",
     0),
    ("recipes/recipe/keye_30b_a3b_dsa_sparse.yaml", "predicted {}\n# GiB per GPU", ("recipe=keye_30b_a3b_dsa_sparse",),
     "total", 1),
    ("recipes/recipe/keye_30b_a3b_dsa_sparse.yaml", "hands each GPU {} GiB of embeddings",
     ("recipe=keye_30b_a3b_dsa_sparse",), "visual embeddings for the LM + gradients/16", 2),
    ("recipes/recipe/keye_30b_a3b_dsa_sparse.yaml", "all 240 at once would take {} GiB",
     ("recipe=keye_30b_a3b_dsa_sparse", "parallel.vit.group=0"), "total", 0),
    ("recipes/recipe/keye_30b_a3b_dsa_warmup.yaml", "predicted {} GiB per GPU", ("recipe=keye_30b_a3b_dsa_warmup",),
     "total", 1),
    ("recipes/recipe/keye_30b_a3b_ksa_stage3.yaml", "stage3: {} GiB per GPU", ("recipe=keye_30b_a3b_ksa_stage3",),
     "total", 1),
    ("recipes/parallel/node8_cp2_ep8.yaml", "selective: {} GiB;",
     ("recipe=keye_30b_a3b_ctx_32k", *_LM_ALONE, "parallel.recompute=selective"), "total", 0),
    ("recipes/parallel/node8_cp2_ep8.yaml", "full: {} GiB).", ("recipe=keye_30b_a3b_ctx_32k", *_LM_ALONE), "total", 0),
    ("recipes/parallel/node8_cp2_ep8.yaml", "saving of 0.0 of {} GiB per GPU at 32K",
     ("recipe=keye_30b_a3b_ctx_32k", *_LM_ALONE), "total", 0),
    ("recipes/parallel/node8_cp2_ep8.yaml", "saving of {} of 85", ("recipe=keye_30b_a3b_ctx_32k", *_LM_ALONE),
     "offload", 1),
    ("recipes/parallel/node8_cp2_ep8.yaml", "0.0 of {} with the vision", ("recipe=keye_30b_a3b_ctx_32k",), "total", 1),
    ("recipes/parallel/node8_cp2_ep8.yaml", "and {} of 134 GiB at 256K",
     ("recipe=keye_30b_a3b_ctx_256k", "parallel=node8_cp2_ep8", *_LM_ALONE), "offload", 1),
    ("recipes/parallel/node8_cp2_ep8.yaml", "23.0 of {} GiB at 256K",
     ("recipe=keye_30b_a3b_ctx_256k", "parallel=node8_cp2_ep8", *_LM_ALONE), "total", 0),
    ("recipes/parallel/node8_cp2_ep8.yaml", "({} with it)", ("recipe=keye_30b_a3b_ctx_256k", "parallel=node8_cp2_ep8"),
     "total", 1),
    ("recipes/parallel/node8_cp4_ep8.yaml", "saving of {} of 85 GiB per GPU at 64K",
     ("recipe=keye_30b_a3b_ctx_64k", *_LM_ALONE), "offload", 1),
    ("recipes/parallel/node8_cp4_ep8.yaml", "0.0 of {} GiB per GPU at 64K", ("recipe=keye_30b_a3b_ctx_64k", *_LM_ALONE),
     "total", 0),
    ("recipes/parallel/node8_cp4_ep8.yaml", "0.0 of {} with the vision", ("recipe=keye_30b_a3b_ctx_64k",), "total", 1),
    ("recipes/parallel/node8_cp8_ep8.yaml", "saving of {} of 87 GiB per GPU at 256K",
     ("recipe=keye_30b_a3b_ctx_256k", *_LM_ALONE), "offload", 1),
    ("recipes/parallel/node8_cp8_ep8.yaml", "2.2 of {} GiB per GPU at 256K",
     ("recipe=keye_30b_a3b_ctx_256k", *_LM_ALONE), "total", 0),
    ("recipes/parallel/node8_cp8_ep8.yaml", "4.7 of {} with the vision", ("recipe=keye_30b_a3b_ctx_256k",), "total", 1),
    ("recipes/parallel/node8_ep8.yaml", "model state ({} GiB", ("recipe=keye_30b_a3b_lm",), "model state", 1),
    ("recipes/parallel/node8_ep8.yaml", "activations (about {} GiB per GPU",
     ("recipe=keye_30b_a3b_lm", "parallel.recompute=selective"), "kept activations", 0),
    ("recipes/parallel/node8_ep8.yaml", "predicted at\n# {} GiB per GPU",
     ("recipe=keye_30b_a3b_lm", "parallel.recompute=selective"), "total", 0),
    ("recipes/parallel/node8_ep8.yaml", "`; {} with the vision tower",
     ("recipe=keye_30b_a3b", "parallel.recompute=selective"), "total", 1),
    ("recipes/parallel/node8_ep8.yaml", "recompute {} GiB (", ("recipe=keye_30b_a3b_lm",), "total", 0),
    ("recipes/parallel/node8_ep8.yaml", "({} with the vision tower)", ("recipe=keye_30b_a3b",), "total", 1),
    *[(f"recipes/parallel/{f}.yaml", "~{} TiB per GPU", ("recipe=keye_30b_a3b", "parallel.vit.recompute=false"),
       "TiB", 1) for f in ("node8_ep8", "node8_cp2_ep8", "node8_cp4_ep8", "node8_cp8_ep8")],
    ("README.md", "keep ~{} TiB of ViT activations", ("recipe=keye_30b_a3b", "parallel.vit.recompute=false"), "TiB", 1),
    ("README.md", "predicted at {} GiB, where its training needs 8",
     ("recipe=keye_30b_a3b", "train.eval.only=true", "world_size=1", "parallel.ep=1"), "total", 1),
    ("README.md", "`parallel=node8_ep8`: {} GiB per H200", ("recipe=keye_30b_a3b",), "total", 0),
    ("README.md", "predicted for `keye_30b_a3b`, {}\nwith selective",
     ("recipe=keye_30b_a3b", "parallel.recompute=selective"), "total", 1),
    ("README.md", "`keye_30b_a3b_ctx_8k`: {}\nGiB with selective", ("recipe=keye_30b_a3b_ctx_8k",), "total", 1),
]


def test_the_memory_figures_recipes_quote_are_launch_memory_py_s():
    """Each figure above, as the file words it, against launch/memory.py's estimate for its command (the predicted
    peak, the 10% margin over it, a row, or the saving of parallel.offload=activations), rounded as quoted."""
    import importlib.util
    from pathlib import Path

    from parallel.memory import estimate

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("launch_memory", root / "launch" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    gib = 2 ** 30
    cache = {}

    def peak(args) -> tuple[float, dict]:
        if args not in cache:
            est = estimate(memory.memory_inputs(list(args))[2])
            cache[args] = (est.total / gib, {k: v / gib for k, v in est.rows.items()})
        return cache[args]

    wrong = []
    for path, phrase, args, what, decimals in _QUOTED:
        total, rows = peak(args)
        value = {"total": total, "margin": total * 1.1, "TiB": total / 1024,
                 "model state": sum(rows[k] for k in rows if k.startswith(("parameters", "gradients", "optimizer"))),
                 "kept activations": sum(rows[k] for k in rows if k.startswith(("attention", "MoE"))),
                 "offload": total - peak(args + ("parallel.offload=activations",))[0]}.get(what)
        if value is None:
            name, _, per = what.partition("/")
            value = rows[name] / int(per or 1)
        quoted = phrase.format(f"{value:.{decimals}f}")
        if quoted not in (root / path).read_text():
            wrong.append(f"{path}: expected {quoted!r} (python launch/memory.py {' '.join(args)})")
    assert not wrong, "\n".join(wrong)


def test_optimizer_step_temporaries_are_torch_adamws():
    """torch's AdamW (megatron's optimizer without apex / TransformerEngine) as it runs on CUDA (foreach), profiled on
    the CPU: its largest allocation of temporaries, sqrt(v) of one parameter group at once, against the estimate's
    optimizer step for the same dense and expert shards (each its own group, one after the other). Exact: the
    profiler counts bytes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from parallel.memory import optimizer_step_bytes, step_phase_bytes

    m = MemoryInputs(lm=lm(num_layers=4), seq_length=8, dp=2, edp=1, ep=2)
    dense, expert = trainable_counts(m, rank=0)
    shards = [int(dense) // 2, int(expert)]  # the distributed optimizer's shards: dense over dp 2, experts over edp 1
    groups = [{"params": [torch.nn.Parameter(torch.ones(n - n // 3)), torch.nn.Parameter(torch.ones(n // 3))]}
              for n in shards]
    for g in groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(groups, lr=1e-3, foreach=True)
    opt.step()  # the Adam state exists before the measured step, as in a run's later steps
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    sqrt = [e.cpu_memory_usage for e in prof.events() if e.name == "aten::_foreach_sqrt"]
    assert len(sqrt) == 2 and max(sqrt) == optimizer_step_bytes(m, rank=0), (sqrt, shards)
    # a step of few tokens: the optimizer step is the peak, and the estimate says so (before, it held the smaller
    # forward and backward's peak)
    est = estimate(m)
    assert est.total == step_phase_bytes(m, rank=0)
    assert est.rows["AdamW step's temporaries, above the forward and backward's peak"] > 0


@pytest.mark.parametrize("pp,vpp", [(2, 2), (4, 2), (2, 4)])
def test_the_embedding_output_row_counts_the_first_chunks_forwards_megatron_holds(pp, vpp):
    """The first rank's embedding output is kept by each forward of its model chunk 0 until that forward's backward.
    Reference: megatron's schedule (get_schedule_table, the warm-up of get_pp_rank_microbatches, backwards taking
    the chunks in reverse) replayed forward by forward with each chunk's bytes (its layers', chunk 0's with the
    embedding output), the chunk-0 forwards held at the peak. By hand at pp 2 x vpp 2 (warm-up 4): f(0,c0) f(1,c0)
    f(0,c1) f(1,c1), then f(2,c0) b(0,c1) f(3,c0): four forwards of chunk 0 wait beside one of chunk 1, the peak
    since chunk 0 is the heavier; three (with two of chunk 1) hold less."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table
    from parallel.memory import _chunk_layers, _layer_kept

    n = 2 * pp
    m = MemoryInputs(lm=lm(num_layers=2 * pp * vpp), seq_length=64, pp=pp, vpp=vpp, num_microbatches=n)
    emb = m.micro_batch_size * m.model_seq * m.lm.hidden_size * (2 if m.bf16 else 4)   # tp 1, cp 1
    weights = [sum(_layer_kept(m, v) for v in c) for c in _chunk_layers(m, rank=0)[0]]
    weights[0] += emb
    p2p = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda: 0),
                          virtual_pipeline_model_parallel_size=vpp)
    total, _, warmup, _ = get_pp_rank_microbatches(n, vpp, pp, p2p_communicator=p2p)
    table = get_schedule_table(n, vpp, pp)
    held, peak, chunk0 = [0] * vpp, -1.0, 0
    for k in range(total):
        held[table[k][1]] += 1
        if sum(h * w for h, w in zip(held, weights)) > peak:
            peak, chunk0 = sum(h * w for h, w in zip(held, weights)), held[0]
        if k >= warmup:
            held[vpp - 1 - table[k - warmup][1]] -= 1
    if (pp, vpp) == (2, 2):
        assert chunk0 == 4
    rotary = m.model_seq * m.lm.head_dim * 4
    assert activation_bytes(m, rank=0)["embedding output + rotary"] == chunk0 * emb + rotary
