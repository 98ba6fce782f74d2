"""The load-balanced context-parallel split (parallel/context/split.py), both layouts ("sequence" and
per-"document"), and head checks, one process.

All comparisons are exact (integer indices, pure data movement)."""
import pytest
import torch

from parallel.context import (causal_pairs_per_rank, check_cp_heads, cp_chunk_bounds, cp_global_indices,
                              cp_rank_concat_indices, expand_kv_heads_for_cp, natural_to_rank_concat,
                              rank_concat_to_natural, split_for_cp, unsplit_from_cp)


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_megatron_chunk_convention(cp):
    S = 2 * cp * 5
    c = S // (2 * cp)
    for r in range(cp):
        assert cp_chunk_bounds(S, cp, r) == [(r * c, (r + 1) * c), ((2 * cp - 1 - r) * c, (2 * cp - r) * c)]
    # every token is held by exactly one rank
    assert torch.equal(torch.sort(cp_rank_concat_indices(S, cp)).values, torch.arange(S))


@pytest.mark.parametrize("cp", [2, 4])
def test_split_unsplit_round_trip_every_layout(cp):
    S, B, H = 8 * cp, 2, 3
    tokens = torch.randint(0, 1000, (B, S))
    pos3 = torch.randint(0, 1000, (3, B, S))
    emb = torch.randn(S, B, H)
    for x, dim in ((tokens, 1), (pos3, -1), (emb, 0)):
        parts = [split_for_cp(x, dim=dim, cp_size=cp, cp_rank=r) for r in range(cp)]
        assert all(p.shape[dim] == S // cp for p in parts)
        assert torch.equal(unsplit_from_cp(parts, dim=dim), x)
        for r, p in enumerate(parts):  # the global indices say which tokens a rank holds
            assert torch.equal(p, x.index_select(dim, cp_global_indices(S, cp, r)))


def test_positions_come_from_global_position_ids():
    """3D RoPE: a rank's position ids are the global ones at its tokens, not a local arange."""
    S, cp = 16, 2
    pos = torch.stack([torch.arange(S) // 4, torch.arange(S) % 4, torch.arange(S) * 2])[:, None, :]  # [3, 1, S]
    local = split_for_cp(pos, dim=-1, cp_size=cp, cp_rank=1)
    g = cp_global_indices(S, cp, 1)
    assert torch.equal(local[2, 0], g * 2)


def test_rank_concat_order_round_trip():
    S, cp = 24, 3
    x = torch.randn(S, 2)
    concat = torch.cat([split_for_cp(x, dim=0, cp_size=cp, cp_rank=r) for r in range(cp)])
    assert torch.equal(natural_to_rank_concat(x, cp, dim=0), concat)
    assert torch.equal(rank_concat_to_natural(concat, cp, dim=0), x)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_causal_work_is_balanced(cp):
    S = 2 * cp * 32
    c = S // (2 * cp)
    work = causal_pairs_per_rank(S, cp)
    assert max(work) == min(work)  # no documents: exactly equal
    contiguous = [sum(t + 1 for t in range(r * S // cp, (r + 1) * S // cp)) for r in range(cp)]
    assert max(contiguous) - min(contiguous) > c * c  # the naive split is not balanced
    # within one chunk: any single prefix cut moves at most one chunk's pairs
    for r in range(cp):
        assert abs(work[r] - sum(work) / cp) <= c * c


def test_packed_documents_are_not_balanced_by_the_sequence_split():
    """The sequence split balances ONE causal sequence; packed documents make the work depend on where
    documents start. The document split (each document cut into 2*cp chunks) balances them."""
    S, cp = 256, 4
    cu = torch.tensor([0, 80, 144, S])
    work = causal_pairs_per_rank(S, cp, cu, split="sequence")
    assert sum(work) == sum(causal_pairs_per_rank(S, 1, cu))
    assert max(work) > 1.5 * min(work)
    doc = causal_pairs_per_rank(S, cp, cu, split="document")
    assert sum(doc) == sum(work) and max(doc) == min(doc)  # 80, 64, 112: multiples of 2cp = 8


# a 184K-token video plus short documents in a 256K pack, scaled down 1000x: 184 + 72 tokens
LONG_VIDEO_PACKS = {
    "multiples_of_2cp": [184, 24, 16, 16, 8, 8],   # every document a multiple of 2cp = 8 (megatron's THD)
    "odd_lengths": [184, 29, 19, 13, 11],          # remainders 0, 5, 3, 5, 3 dealt by the remainder zigzag
}


@pytest.mark.parametrize("pack", LONG_VIDEO_PACKS)
def test_document_split_balances_a_long_video_pack(pack):
    """max/min causal pairs per rank at cp 4 (measured: sequence 11.17 / 10.17, document 1.000 / 1.005)."""
    S, cp = 256, 4
    docs = LONG_VIDEO_PACKS[pack]
    cu = torch.tensor([0, *docs]).cumsum(0)
    assert int(cu[-1]) == S
    seq = causal_pairs_per_rank(S, cp, cu, split="sequence")
    doc = causal_pairs_per_rank(S, cp, cu, split="document")
    assert sum(seq) == sum(doc) == sum(causal_pairs_per_rank(S, 1, cu))
    assert max(seq) / min(seq) > 10  # rank 0 holds the cheap start of the video and the cheap short documents
    assert max(doc) / min(doc) <= (1.0 if pack == "multiples_of_2cp" else 1.01)


def _docs(lengths):
    return torch.tensor([0, *lengths]).cumsum(0)


@pytest.mark.parametrize("cp,lengths", [(2, [13, 27, 24]), (4, [13, 27, 24]), (3, [5, 1, 0, 30, 12]),
                                        (4, [64]), (2, [1] * 12), (8, [100, 3, 25])])
def test_document_split_partitions_the_sequence_equally(cp, lengths):
    cu = _docs(lengths)
    S = int(cu[-1])
    x = torch.randn(S, 2)
    parts = [split_for_cp(x, dim=0, cp_size=cp, cp_rank=r, split="document", cu_seqlens=cu) for r in range(cp)]
    assert all(p.shape[0] == S // cp for p in parts)  # equal token counts, no padding
    assert torch.equal(unsplit_from_cp(parts, dim=0, split="document", cu_seqlens=cu), x)
    concat = cp_rank_concat_indices(S, cp, split="document", cu_seqlens=cu)
    assert torch.equal(torch.sort(concat).values, torch.arange(S))
    for r, p in enumerate(parts):
        g = cp_global_indices(S, cp, r, split="document", cu_seqlens=cu)
        assert torch.equal(p, x[g]) and torch.equal(g, torch.sort(g).values)  # ascending local order
        assert torch.equal(g, torch.cat([torch.arange(a, b) for a, b in
                                         cp_chunk_bounds(S, cp, r, split="document", cu_seqlens=cu)]))
    assert torch.equal(natural_to_rank_concat(x, cp, dim=0, split="document", cu_seqlens=cu), torch.cat(parts))


@pytest.mark.parametrize("cp", [2, 4])
def test_document_split_is_megatron_thd_for_multiples_of_2cp(cp):
    """Every document a multiple of 2cp: rank r holds chunks r and 2cp-1-r of each document."""
    lengths = [2 * cp * 3, 2 * cp, 2 * cp * 5]
    cu = _docs(lengths)
    S = int(cu[-1])
    for r in range(cp):
        want = []
        for start, n in zip(cu[:-1].tolist(), lengths):
            q = n // (2 * cp)
            want += list(range(start + r * q, start + (r + 1) * q))
            want += list(range(start + (2 * cp - 1 - r) * q, start + (2 * cp - r) * q))
        assert cp_global_indices(S, cp, r, split="document", cu_seqlens=cu).tolist() == want


def test_one_document_or_no_boundaries_is_the_sequence_split():
    S, cp = 48, 3
    for cu in (None, torch.tensor([0, S])):
        for r in range(cp):
            assert torch.equal(cp_global_indices(S, cp, r, split="document", cu_seqlens=cu),
                               cp_global_indices(S, cp, r))


def test_document_split_needs_global_boundaries():
    with pytest.raises(ValueError, match="GLOBAL non-decreasing document boundaries"):
        cp_global_indices(16, 2, 0, split="document", cu_seqlens=torch.tensor([0, 5, 12]))
    with pytest.raises(ValueError, match="CP split must be one of"):
        cp_global_indices(16, 2, 0, split="zigzag")


def test_split_length_error_names_the_numbers():
    with pytest.raises(ValueError, match=r"sequence length 30 is not divisible by 2 \* cp = 8 \(cp = 4\)"):
        split_for_cp(torch.zeros(30), dim=0, cp_size=4, cp_rank=0)


def test_split_is_differentiable():
    x = torch.randn(16, 2, requires_grad=True)
    split_for_cp(x, dim=0, cp_size=2, cp_rank=1).sum().backward()
    expected = torch.zeros(16)
    expected[cp_global_indices(16, 2, 1)] = 1
    assert torch.equal(x.grad[:, 0], expected)


def test_gqa_head_checks_and_kv_replication():
    assert check_cp_heads(32, 4, 2) == 4      # 2 kv heads per rank
    assert check_cp_heads(32, 4, 8) == 8      # each kv head replicated twice
    assert check_cp_heads(8, 1, 4) == 4
    with pytest.raises(ValueError, match=r"query heads \(6.*divisible by cp \(4\)"):
        check_cp_heads(6, 2, 4)
    with pytest.raises(ValueError, match=r"KV heads \(3.*cp \(2\)"):
        check_cp_heads(6, 3, 2)
    k = torch.arange(2.0).view(1, 1, 2, 1)
    kk, vv = expand_kv_heads_for_cp(k, k, 8, 4)
    assert kk.flatten().tolist() == [0, 0, 1, 1]  # rank j's query heads read kv head j // 2
