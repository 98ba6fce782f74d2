"""Summary-token layout of Kwai Summary Attention (KSA): insert summary slots into a packed batch,
take them out again, and split / merge interleaved tensors. Pure torch, no global state.

Layout
------
Per document, text tokens are cut into chunks of C = `chunk` tokens; after every COMPLETE chunk
S = `num_summary` summary slots are inserted. An incomplete last chunk gets no summary:

    text        (C=4, S=1):  t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    interleaved            :  t0 t1 t2 t3 s0 | t4 t5 t6 t7 s1 | t8 t9

so inside a document interleaved index i is a summary slot iff ``i % (C+S) >= C`` and its chunk is
``i // (C+S)``; the KSA kernels (kernels/ksa) derive everything from that rule and cu_seqlens.
Why no summary after a partial chunk: a summary is read only by its own chunk's summary queries
and by text queries of LATER chunks of the same document, and a partial chunk is always the last
one, so its summary would be dead weight in training; at inference a summary is produced when a
chunk completes, so "one summary per complete chunk" is also what decoding sees. (A summary after
the last complete chunk of a document is kept: the rule does not look ahead.) Chunks restart at
every document boundary; documents never share chunks.

    positions : text tokens keep theirs; a summary copies the position of its chunk's last text
                token (every row of [3, T] multimodal positions)
    labels    : text labels are unchanged (a text token still predicts the next TEXT token);
                summary slots get `ignore_index` and loss mask 0 (no LM loss)
    input ids : summary slots get `summary_token_id` (a placeholder: the model embeds summaries with
                its own table, row `layout.summary_slot`)
    cu_seqlens: a document of n text tokens becomes n + S * (n // C) tokens long

Shapes legend: T text tokens, T' = T + S * sum_d(n_d // C) interleaved tokens, N = T' - T summary
slots. Token tensors are [T] or [B, T] (B > 1 only without cu_seqlens: then every row is one
document of T tokens); position ids are [..., T] (e.g. [T], [B, T], [3, T], [3, B, T]); hidden
states take `dim=` for their token axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SummaryLayout", "SummaryBatch", "build_summary_layout", "insert_summary_slots", "remove_summary_slots",
    "split_text_summary", "merge_text_summary", "pad_cu_seqlens",
]


@dataclass(frozen=True)
class SummaryLayout:
    """Index maps between the text sequence and the interleaved (text + summary) sequence."""

    chunk: int
    num_summary: int
    num_text: int                   # T
    num_total: int                  # T'
    cu_seqlens_text: torch.Tensor   # [docs+1] int32 document boundaries in the text sequence
    cu_seqlens: torch.Tensor        # [docs+1] int32 document boundaries in the interleaved sequence
    text_index: torch.Tensor        # [T] int64: interleaved position of every text token
    summary_index: torch.Tensor     # [N] int64: interleaved position of every summary slot
    summary_slot: torch.Tensor      # [N] int64: 0..S-1, which summary embedding row the slot uses
    summary_source: torch.Tensor    # [N] int64: text index of the last text token of the slot's chunk

    @property
    def num_summary_tokens(self) -> int:
        return self.num_total - self.num_text

    def is_summary(self) -> torch.Tensor:
        """[T'] bool: True at summary slots."""
        mask = torch.zeros(self.num_total, dtype=torch.bool, device=self.text_index.device)
        mask[self.summary_index] = True
        return mask


@dataclass
class SummaryBatch:
    """A packed batch after `insert_summary_slots` (every tensor on the interleaved layout)."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None  # None when the input had none (one document per row)
    layout: SummaryLayout


def interleaved_length(text_tokens, *, chunk: int, num_summary: int):
    """Tokens of a document of `text_tokens` text tokens (an int, or a tensor of them) once its summary slots are
    inserted: num_summary after each complete chunk."""
    return text_tokens + (text_tokens // chunk) * num_summary


def build_summary_layout(
    num_text_tokens: int, *, chunk: int, num_summary: int = 1, cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> SummaryLayout:
    """Layout of `num_text_tokens` text tokens (one document, or the documents of `cu_seqlens`)."""
    if chunk < 1 or num_summary < 1:
        raise ValueError(f"chunk ({chunk}) and num_summary ({num_summary}) must be >= 1")
    if cu_seqlens is None:
        cu = torch.tensor([0, num_text_tokens], dtype=torch.long, device=device)
    else:
        device = cu_seqlens.device if device is None else device
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != num_text_tokens:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at the number of text tokens "
                             f"({num_text_tokens}); got {cu.tolist()}")
        if (cu.diff() < 0).any():
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    period = chunk + num_summary
    n_text = cu.diff()                                   # [docs]
    n_full = n_text // chunk                             # complete chunks per document
    cu_new = torch.zeros_like(cu)
    cu_new[1:] = interleaved_length(n_text, chunk=chunk, num_summary=num_summary).cumsum(0)
    docs = torch.arange(n_text.numel(), device=cu.device)

    doc_of_text = torch.repeat_interleave(docs, n_text)  # [T]
    local = torch.arange(num_text_tokens, device=cu.device) - cu[doc_of_text]
    text_index = cu_new[doc_of_text] + local + (local // chunk) * num_summary

    doc_of_chunk = torch.repeat_interleave(docs, n_full)                      # [chunks]
    chunk_start = torch.zeros_like(n_full)
    chunk_start[1:] = n_full.cumsum(0)[:-1]
    chunk_local = torch.arange(doc_of_chunk.numel(), device=cu.device) - chunk_start[doc_of_chunk]
    slot = torch.arange(num_summary, device=cu.device)
    summary_index = (cu_new[doc_of_chunk] + chunk_local * period + chunk)[:, None] + slot        # [chunks, S]
    summary_source = (cu[doc_of_chunk] + chunk_local * chunk + chunk - 1)[:, None].expand(-1, num_summary)
    num_total = int(cu_new[-1])
    return SummaryLayout(
        chunk=chunk, num_summary=num_summary, num_text=num_text_tokens, num_total=num_total,
        cu_seqlens_text=cu.to(torch.int32), cu_seqlens=cu_new.to(torch.int32),
        text_index=text_index, summary_index=summary_index.reshape(-1),
        summary_slot=slot.repeat(doc_of_chunk.numel()), summary_source=summary_source.reshape(-1),
    )


def _scatter_last(x: torch.Tensor, layout: SummaryLayout, fill) -> torch.Tensor:
    out = x.new_full((*x.shape[:-1], layout.num_total), fill)
    out[..., layout.text_index] = x
    return out


def insert_summary_slots(
    input_ids: torch.Tensor, *, chunk: int, num_summary: int = 1, cu_seqlens: torch.Tensor | None = None,
    labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None, summary_token_id: int = 0, ignore_index: int = -100,
    slot_ids_from: int | None = None,
) -> SummaryBatch:
    """Insert S summary slots after every complete chunk of C text tokens of every document.

    input_ids/labels/loss_mask: [T] or [B, T] (with cu_seqlens: [T] or [1, T]); position_ids: [..., T]
    (None: document-local 0, 1, 2, ...); cu_seqlens: [docs+1] text boundaries. A missing loss_mask
    counts as all ones. Returns the interleaved tensors, the remapped cu_seqlens and the layout.
    slot_ids_from: summary slot j gets id slot_ids_from + j instead of `summary_token_id` (the model's
    convention, models/lm.py KeyeLM: the vocabulary size, so the ids name the summary embedding rows).
    """
    if input_ids.ndim not in (1, 2):
        raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[-1]
    if cu_seqlens is not None and input_ids.ndim == 2 and input_ids.shape[0] != 1:
        raise ValueError(f"packed input (cu_seqlens) needs batch 1, got input_ids {tuple(input_ids.shape)}")
    for name, t in (("labels", labels), ("loss_mask", loss_mask)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if position_ids is not None and position_ids.shape[-1] != T:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} must end with the token dim {T}")
    layout = build_summary_layout(T, chunk=chunk, num_summary=num_summary, cu_seqlens=cu_seqlens,
                                  device=input_ids.device)
    if position_ids is None:
        cu = layout.cu_seqlens_text.long()
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff())
        position_ids = (torch.arange(T, device=cu.device) - cu[doc]).expand_as(input_ids)
    if loss_mask is None:
        loss_mask = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    ids = _scatter_last(input_ids, layout, summary_token_id)
    if slot_ids_from is not None:
        ids[..., layout.summary_index] = slot_ids_from + layout.summary_slot
    new_pos = _scatter_last(position_ids, layout, 0)
    new_pos[..., layout.summary_index] = position_ids[..., layout.summary_source]
    return SummaryBatch(
        input_ids=ids,
        labels=None if labels is None else _scatter_last(labels, layout, ignore_index),
        loss_mask=_scatter_last(loss_mask, layout, 0),
        position_ids=new_pos,
        cu_seqlens=None if cu_seqlens is None else layout.cu_seqlens.to(cu_seqlens.dtype),
        layout=layout,
    )


def remove_summary_slots(x: torch.Tensor, layout: SummaryLayout, *, dim: int = -1) -> torch.Tensor:
    """Keep the text positions of an interleaved tensor (exact inverse of the insertion)."""
    return x.index_select(dim, layout.text_index)


def split_text_summary(x: torch.Tensor, layout: SummaryLayout, *, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved [.., T', ..] -> (text [.., T, ..], compacted summaries [.., N, ..]) along `dim`."""
    if x.shape[dim] != layout.num_total:
        raise ValueError(f"dim {dim} of {tuple(x.shape)} is not the interleaved length {layout.num_total}")
    return x.index_select(dim, layout.text_index), x.index_select(dim, layout.summary_index)


def merge_text_summary(text: torch.Tensor, summary: torch.Tensor, layout: SummaryLayout, *,
                       dim: int = -1) -> torch.Tensor:
    """Inverse of `split_text_summary` (differentiable in both inputs), e.g. to scatter the summary
    embeddings `table[layout.summary_slot]` between the text embeddings."""
    if text.shape[dim] != layout.num_text or summary.shape[dim] != layout.num_summary_tokens:
        raise ValueError(f"text {tuple(text.shape)} / summary {tuple(summary.shape)} do not match the layout "
                         f"({layout.num_text} text, {layout.num_summary_tokens} summary tokens) along dim {dim}")
    shape = list(text.shape)
    shape[dim] = layout.num_total
    out = text.new_zeros(shape)
    out = out.index_copy(dim, layout.text_index, text)
    return out.index_copy(dim, layout.summary_index, summary.to(text.dtype))


def pad_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[docs+1] boundaries of a packed row padded to `length` tokens: one more (padding) document from
    the row's end to `length`, none when it is already that long. Packed KSA rows carry a number of
    summaries that depends on their documents; the pipeline and the context-parallel split need one
    length, so the trainer pads every row to the model's and the vision tower computes the same row."""
    cu = cu_seqlens.reshape(-1)
    end = int(cu[-1])
    if end > length:
        raise ValueError(f"a packed row of {end} tokens exceeds the model's {length}")
    return cu if end == length else torch.cat([cu, cu.new_full((1,), length)])
