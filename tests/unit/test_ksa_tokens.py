"""Summary-slot insertion for KSA (models/ksa_tokens.py): layout, round trips, packed documents."""
import pytest
import torch

from models.ksa_tokens import (
    build_summary_layout, insert_summary_slots, merge_text_summary, remove_summary_slots, split_text_summary,
)

SEED = 42


def _packed(lengths, vocab=1000):
    torch.manual_seed(SEED)
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(1, vocab, (T,))
    labels = torch.randint(0, vocab, (T,))
    return ids, labels, cu


def test_layout_rule_per_document():
    """Inside each document: index i is a summary iff i % (C+S) >= C; one summary group per complete chunk."""
    lengths, C, S = [3, 0, 8, 13, 16, 1], 4, 2
    _, _, cu = _packed(lengths)
    layout = build_summary_layout(sum(lengths), chunk=C, num_summary=S, cu_seqlens=cu)
    assert layout.cu_seqlens.tolist() == [0, *torch.tensor([n + S * (n // C) for n in lengths]).cumsum(0).tolist()]
    is_sum = layout.is_summary()
    for d, (a, b) in enumerate(zip(layout.cu_seqlens[:-1].tolist(), layout.cu_seqlens[1:].tolist())):
        local = torch.arange(b - a)
        assert torch.equal(is_sum[a:b], local % (C + S) >= C), f"document {d}"
        assert int(is_sum[a:b].sum()) == S * (lengths[d] // C)  # no summary after a partial chunk
    assert layout.summary_slot.tolist() == [0, 1] * (layout.num_summary_tokens // S)


def test_insert_remove_round_trip_packed():
    lengths, C = [3, 0, 8, 13, 16, 1, 9], 4
    ids, labels, cu = _packed(lengths)
    torch.manual_seed(SEED)
    loss_mask = (torch.rand(ids.shape) > 0.3).float()
    pos = torch.cat([torch.arange(n) for n in lengths])
    batch = insert_summary_slots(ids, chunk=C, cu_seqlens=cu, labels=labels, loss_mask=loss_mask, position_ids=pos,
                                 summary_token_id=7, ignore_index=-100)
    lay = batch.layout
    assert batch.cu_seqlens.dtype == cu.dtype and torch.equal(batch.cu_seqlens, lay.cu_seqlens)
    # round trip
    assert torch.equal(remove_summary_slots(batch.input_ids, lay), ids)
    assert torch.equal(remove_summary_slots(batch.labels, lay), labels)
    assert torch.equal(remove_summary_slots(batch.loss_mask, lay), loss_mask)
    assert torch.equal(remove_summary_slots(batch.position_ids, lay), pos)
    # summary slots: placeholder id, no loss, position of the chunk's last text token
    s = lay.summary_index
    assert (batch.input_ids[s] == 7).all() and (batch.labels[s] == -100).all() and (batch.loss_mask[s] == 0).all()
    assert torch.equal(batch.position_ids[s], batch.position_ids[s - 1])  # S = 1: the token just before
    assert batch.position_ids[s].tolist() == [C - 1 + C * c for n in lengths for c in range(n // C)]


def test_multimodal_positions_and_defaults():
    """[3, T] positions: every row of a summary copies its chunk's last text token; batch rows without cu_seqlens."""
    B, T, C, S = 2, 23, 4, 2
    torch.manual_seed(SEED)
    ids = torch.randint(1, 100, (B, T))
    mrope = torch.randint(0, 50, (3, B, T))
    batch = insert_summary_slots(ids, chunk=C, num_summary=S, position_ids=mrope)
    lay = batch.layout
    assert batch.input_ids.shape == (B, T + S * (T // C)) and batch.position_ids.shape == (3, B, lay.num_total)
    last_text = torch.tensor([c * C + C - 1 for c in range(T // C) for _ in range(S)])
    assert torch.equal(batch.position_ids[..., lay.summary_index], mrope[..., last_text])
    assert torch.equal(remove_summary_slots(batch.position_ids, lay), mrope)
    assert batch.labels is None and batch.cu_seqlens is None
    assert batch.loss_mask[:, lay.summary_index].eq(0).all() and batch.loss_mask[:, lay.text_index].eq(1).all()
    # the model's summary ids (slot_ids_from): vocabulary size + slot, the text ids unchanged
    named = insert_summary_slots(ids, chunk=C, num_summary=S, slot_ids_from=100)
    assert named.input_ids[:, lay.summary_index].tolist() == [[100, 101] * (T // C)] * B
    assert torch.equal(remove_summary_slots(named.input_ids, lay), ids)
    # default positions: document-local 0..n-1 for text, summaries repeat the last text position
    packed = insert_summary_slots(ids[0], chunk=C, cu_seqlens=torch.tensor([0, 10, 23]))
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 8, 9,
                                            0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 11, 12]


def test_split_merge_round_trip_and_grad():
    lengths, C, S, D = [5, 17, 9], 4, 1, 3
    _, _, cu = _packed(lengths)
    lay = build_summary_layout(sum(lengths), chunk=C, num_summary=S, cu_seqlens=cu)
    torch.manual_seed(SEED)
    x = torch.randn(2, lay.num_total, D)
    text, summ = split_text_summary(x, lay, dim=1)
    assert text.shape == (2, lay.num_text, D) and summ.shape == (2, lay.num_summary_tokens, D)
    assert torch.equal(merge_text_summary(text, summ, lay, dim=1), x)
    # scatter a learned summary embedding table in; gradients reach both parts
    table = torch.randn(S, D, requires_grad=True)
    text_emb = torch.randn(lay.num_text, D, requires_grad=True)
    merged = merge_text_summary(text_emb, table[lay.summary_slot], lay, dim=0)
    merged.sum().backward()
    assert torch.equal(table.grad, torch.full((S, D), float(lay.num_summary_tokens)))
    assert torch.equal(text_emb.grad, torch.ones(lay.num_text, D))


def test_errors():
    ids, _, cu = _packed([5, 6])
    with pytest.raises(ValueError, match="chunk"):
        insert_summary_slots(ids, chunk=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        insert_summary_slots(ids, chunk=4, cu_seqlens=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match="batch 1"):
        insert_summary_slots(ids.view(1, -1).repeat(2, 1), chunk=4, cu_seqlens=cu)


def test_packed_row_padding_and_visual_positions_follow_the_summaries():
    """A packed video row under KSA: summaries per document, one padding document up to the model's fixed
    length, and the visual placeholders found again at their mapped positions; the vision tower computes
    the same row (its context-parallel shares are cut from it) without building the batch."""
    from train.trainer import pad_packed_row
    from train.vision import model_row

    cu = torch.tensor([0, 13, 33, 40], dtype=torch.int32)         # documents of 13, 20 and 7 text tokens
    tokens = torch.arange(40) + 100
    visual_pos = torch.tensor([2, 3, 14, 15, 16, 34])
    sb = insert_summary_slots(tokens, chunk=4, num_summary=1, cu_seqlens=cu, labels=tokens,
                              loss_mask=torch.ones(40), position_ids=torch.arange(40), summary_token_id=7)
    assert sb.layout.num_total == 40 + 3 + 5 + 1                   # 13 // 4 + 20 // 4 + 7 // 4 summaries
    t, lab, m, p, cu_m = pad_packed_row(sb.input_ids, sb.labels, sb.loss_mask, sb.position_ids, sb.cu_seqlens, 50)
    assert t.shape == lab.shape == m.shape == p.shape == (50,)
    assert cu_m.tolist() == sb.cu_seqlens.tolist() + [50]
    assert m[49:].sum() == 0 and (t[49:] == 0).all() and torch.equal(t[:49], sb.input_ids)
    v = sb.layout.text_index[visual_pos]
    assert torch.equal(t[v], tokens[visual_pos]) and not (t[v] == 7).any()
    seq, cu_v, v_v = model_row(40, cu, visual_pos, (4, 1, 50))
    assert seq == 50 and cu_v.tolist() == cu_m.tolist() and torch.equal(v_v, v)
    assert model_row(40, cu, visual_pos, None) == (40, cu, visual_pos)
