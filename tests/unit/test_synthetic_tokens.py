"""The synthetic token stream: deterministic, resumable, and independent of the data-parallel size."""

import torch

from data.synthetic_tokens import DataConfig, SyntheticTokenStream


def stream(dp_rank=0, dp_size=1, gbs=8, mbs=2):
    return SyntheticTokenStream(DataConfig(), vocab_size=97, seq_length=40, micro_batch_size=mbs,
                                global_batch_size=gbs, dp_rank=dp_rank, dp_size=dp_size)


def take_step(s):
    return [next(s) for _ in range(s.num_microbatches)]


def test_labels_are_next_tokens_and_in_vocab():
    b = next(stream())
    assert b["tokens"].shape == (2, 40) and b["tokens"].max() < 97
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])


def test_dp_ranks_partition_the_global_batch_in_order():
    single = torch.cat([m["tokens"] for m in take_step(stream())])
    halves = [torch.cat([m["tokens"] for m in take_step(stream(r, 2))]) for r in range(2)]
    assert torch.equal(single, torch.cat(halves))


def test_resume_continues_exactly_and_across_dp_sizes():
    a = stream()
    for _ in range(3):
        take_step(a)
    state = a.state_dict()
    assert state["consumed_samples"] == 24
    expected = torch.cat([m["tokens"] for m in take_step(a)])
    parts = []
    for r in range(2):
        b = stream(r, 2)
        b.load_state_dict(state)
        parts.append(torch.cat([m["tokens"] for m in take_step(b)]))
    assert torch.equal(expected, torch.cat(parts))


def test_text_is_learnable_not_uniform():
    # Each token has at most `branching` successors: the bigram table is sparse.
    toks = torch.cat([next(stream())["tokens"].flatten() for _ in range(4)])
    pairs = set(zip(toks[:-1].tolist(), toks[1:].tolist()))
    assert len(pairs) < 0.5 * len(toks)
