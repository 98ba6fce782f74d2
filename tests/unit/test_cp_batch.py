"""parallel/context/batch.py (the trainer's CP split) and the CP checks of parallel/layout.py, one process.

The split itself is exercised through the model in tests/dist/test_cp_model.py; here: what is split, what
stays global, and the errors a user sees."""
import pytest
import torch

from models.config import KSAConfig, LMConfig
from parallel.context.batch import split_batch_for_cp
from parallel.context.split import cp_global_indices
from parallel.layout import ParallelConfig, ParallelLayout


class FakeGroup:
    """Stands in for a CP process group of `size` ranks (batch.py only asks for size and rank)."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank


@pytest.fixture(autouse=True)
def fake_groups(monkeypatch):
    import parallel.context.batch as batch

    monkeypatch.setattr(batch, "group_size_rank", lambda g: (1, 0) if g is None else (g._size, g._rank))


def _batch(s: int):
    tok = torch.arange(s)[None]
    return tok, tok + 100, torch.ones(1, s), torch.arange(s).expand(3, 1, s)


def test_tokens_are_split_positions_and_cu_seqlens_stay_global():
    from train.trainer import packed_params

    tok, lab, mask, pos = _batch(16)
    psp = packed_params(torch.tensor([0, 5, 11, 16]))
    t, l, m, p, kw = split_batch_for_cp(tok, lab, mask, pos, {"packed_seq_params": psp}, FakeGroup(2, 1),
                                        split="sequence")
    idx = cp_global_indices(16, 2, 1)
    assert torch.equal(t[0], idx) and torch.equal(l[0], idx + 100) and m.shape == (1, 8)
    assert p is pos and kw["packed_seq_params"] is psp  # megatron's rotary module slices the positions itself


@pytest.mark.parametrize("cp", [2, 4])
def test_document_split_positions_survive_megatrons_rotary_slice(cp):
    """split="document": tokens follow every document's chunks; the position ids come back permuted so that
    megatron's rotary slice (chunks r and 2cp-1-r of the SEQUENCE, get_pos_emb_on_this_cp_rank) gives each
    rank the global positions of exactly its tokens."""
    from train.trainer import packed_params

    cu = torch.tensor([0, 13, 40, 57, 64])
    tok, lab, mask, pos = _batch(64)
    pos = torch.stack([torch.arange(64) * 3, torch.arange(64) % 7, -torch.arange(64)])[:, None]  # distinct rows
    for r in range(cp):
        t, l, m, p, kw = split_batch_for_cp(tok, lab, mask, pos, {"packed_seq_params": packed_params(cu)},
                                            FakeGroup(cp, r), split="document")
        idx = cp_global_indices(64, cp, r, split="document", cu_seqlens=cu)
        assert torch.equal(t[0], idx) and torch.equal(l[0], idx + 100) and m.shape == (1, 64 // cp)
        assert p.shape == pos.shape  # global length: megatron slices it
        c = 64 // (2 * cp)
        sliced = p.view(3, 1, 2 * cp, c)[:, :, [r, 2 * cp - 1 - r]].reshape(3, 1, -1)  # megatron's slice
        assert torch.equal(sliced, pos[..., idx])


@pytest.mark.parametrize("split", ["sequence", "document"])
@pytest.mark.parametrize("cp", [2, 4])
def test_each_rank_is_told_the_padding_that_ends_its_share(split, cp):
    """pad_tail_local, what the DSA attention and the chunked loss leave out on a CP rank: the rank's tokens that lie
    in the row's named trailing padding, counted from its global positions (cp_global_indices, independent of
    split.cp_local_tail's run arithmetic); they end its share, and a share that is padding alone leaves out none."""
    from models.attention.dense import local_documents
    from train.trainer import packed_params, trailing_padding

    s = 64
    for lengths in ([13, 27, 10, 14], [7, 57], [30, 2, 32], [60, 4]):
        cu = torch.tensor([0, *lengths]).cumsum(0)
        for k in range(1, len(lengths)):  # the last k segments named padding
            tail = trailing_padding(lengths, [False] * (len(lengths) - k) + [True] * k)
            psp = packed_params(cu, tail=tail)
            first = s - tail[0]
            for r in range(cp):
                *_, kw = split_batch_for_cp(*_batch(s), {"packed_seq_params": psp}, FakeGroup(cp, r), split=split)
                idx = cp_global_indices(s, cp, r, split=split, cu_seqlens=cu)
                padding = idx >= first
                whole = bool(padding.all())
                expect = 0 if whole else int(padding.sum())
                assert kw["packed_seq_params"].pad_tail_local == expect, (lengths, k, r)
                assert bool(padding[idx.numel() - expect:].all()) and not padding[:idx.numel() - expect].any() \
                    or whole
                n = local_documents(idx.numel(), kw["packed_seq_params"], context_parallel=True)
                assert n == idx.numel() - expect
                assert kw["packed_seq_params"].pad_tail == tail[0]  # the whole row's, for the attention functions


def test_no_group_is_a_no_op():
    tok, lab, mask, pos = _batch(6)
    assert split_batch_for_cp(tok, lab, mask, pos, {}, None, split="document")[0] is tok


def test_errors_name_the_numbers():
    from train.trainer import packed_params

    tok, lab, mask, pos = _batch(18)
    with pytest.raises(ValueError, match="not divisible by 2 \\* cp = 4"):
        split_batch_for_cp(tok, lab, mask, pos, {}, FakeGroup(2, 0), split="document")
    tok, lab, mask, pos = _batch(16)
    with pytest.raises(ValueError, match="GLOBAL boundaries"):
        split_batch_for_cp(tok, lab, mask, pos, {"packed_seq_params": packed_params(torch.tensor([0, 8]))},
                           FakeGroup(2, 0), split="document")


LM = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=2, head_dim=16, num_experts=4,
          moe_topk=2, moe_ffn_hidden_size=32, mrope_section=[2, 3, 3])


def test_layout_accepts_cp_and_checks_ulysses_heads():
    lm = LMConfig(**LM)
    lay = ParallelLayout.build(ParallelConfig(cp=4), world_size=8, lm=lm)
    assert (lay.cp, lay.dp, lay.cp_comm) == (4, 2, "a2a")
    with pytest.raises(ValueError, match="query heads per TP rank"):
        ParallelLayout.build(ParallelConfig(cp=8, tp=2), world_size=16, lm=lm)  # 4 heads per TP rank, cp 8
    with pytest.raises(ValueError, match="must divide one another"):
        ParallelLayout.build(ParallelConfig(cp=3), world_size=3, lm=LMConfig(**{**LM, "num_attention_heads": 6}))
    # all-gather KV has no head constraint (dense only)
    lay = ParallelLayout.build(ParallelConfig(cp=8, tp=2, cp_comm="allgather"), world_size=16, lm=lm)
    assert lay.model_sizes().cp_comm == "allgather"  # reaches transformer_config.cp_comm_type
    with pytest.raises(ValueError, match="KSA layers run by Ulysses"):
        ParallelLayout.build(ParallelConfig(cp=8, tp=2, cp_comm="allgather"), world_size=16,
                             lm=LMConfig(**{**LM, "attention": "ksa"}))
    with pytest.raises(ValueError, match="parallel.cp_comm must be one of"):
        ParallelConfig(cp=2, cp_comm="ring")
    assert lay.cp_split == "document"  # the default token layout
    assert ParallelLayout.build(ParallelConfig(cp=2, cp_split="sequence"), world_size=2, lm=lm).cp_split == "sequence"
    with pytest.raises(ValueError, match="parallel.cp_split must be one of"):
        ParallelConfig(cp=2, cp_split="zigzag")


def test_models_reach_context_parallelism_only_by_injection():
    """DESIGN's arrows (kernels <- models <- parallel): no module under models/ imports our parallel package;
    a CP layer built without the injected functions says how to pass them."""
    import ast
    from pathlib import Path
    from types import SimpleNamespace

    from models.attention.cp import cp_ops_for
    from parallel.context import ContextParallelAttention

    root = Path(__file__).resolve().parents[2]
    bad = []
    for f in (root / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{f.relative_to(root)}: {n}" for n in names if n == "parallel" or n.startswith("parallel.")]
    assert not bad, bad
    config = SimpleNamespace(context_parallel_size=2)
    pgs = SimpleNamespace(cp=SimpleNamespace(size=lambda: 2))
    with pytest.raises(ValueError, match=r"build_lm\(\.\.\., cp_ops="):
        cp_ops_for(config, pgs, None)
    ops = ContextParallelAttention(split="sequence")
    assert cp_ops_for(config, pgs, ops) == (pgs.cp, ops)
    assert cp_ops_for(SimpleNamespace(context_parallel_size=1), None, ops) == (None, None)
    with pytest.raises(ValueError, match="parallel.cp_split must be one of"):
        ContextParallelAttention(split="zigzag")


def test_layout_checks_the_model_sequence_length():
    ksa = LMConfig(**{**LM, "attention": "ksa", "ksa": KSAConfig(chunk=8, windows=[4])})
    lay = ParallelLayout.build(ParallelConfig(cp=2), world_size=2, lm=ksa)
    assert lay.check_seq_length(128, ksa) == 144
    with pytest.raises(ValueError, match="KSA summaries = 135"):
        lay.check_seq_length(120, ksa)


@pytest.mark.parametrize("par,world,expect", [
    (dict(), 1, {1: 1, 37: 37, 128: 128}),                          # nothing to split evenly: no padding
    (dict(tp=2), 2, {37: 38, 38: 38, 127: 128}),                    # sequence parallelism: tp
    (dict(cp=2), 2, {37: 40, 40: 40, 125: 128}),                    # 2 * cp chunks
    (dict(cp=2, tp=2), 4, {37: 40, 41: 44, 125: 128}),              # both: lcm(2 cp, cp tp) = 4
    (dict(cp=4, tp=2), 8, {37: 40, 97: 104, 121: 128}),             # lcm(8, 8) = 8
    (dict(cp=2, tp=4), 8, {37: 40, 41: 48, 121: 128}),              # lcm(4, 8) = 8
    (dict(pp=2), 2, {1: 128, 37: 128, 128: 128}),                   # the pipeline's fixed shape: the whole length
])
def test_a_short_packed_row_is_padded_only_as_far_as_the_layout_needs(par, world, expect):
    """ParallelLayout.row_length: what a packed row of n tokens is padded to (data.video.pad_to_seq_len=false) with
    a model length of 128: each case against the layout's own length check (check_seq_length accepts the length,
    and refuses the length before it where that is not n)."""
    lm = LMConfig(**{**LM, "num_layers": 2, "num_query_groups": 4})
    lay = ParallelLayout.build(ParallelConfig(**par), world_size=world, lm=lm)
    for n, length in expect.items():
        assert lay.row_length(n, 128) == length, (par, n)
        assert lay.check_seq_length(length, lm) == length
        if length > n and "pp" not in par:
            with pytest.raises(ValueError):
                lay.check_seq_length(length - 1, lm)
