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


def test_resume_at_another_global_batch_size_takes_the_next_samples():
    """A batch-size ramp by hand (8 -> 16 after 3 steps: 24 consumed, not a multiple of 16), then fewer samples at
    another data-parallel and micro-batch size: the steps read the global samples in order, none skipped or repeated.
    Reference: one sample per micro-batch and step, in order. (Before, the resume at 16 raised ValueError 'checkpoint
    consumed 24 samples, not a multiple of train.global_batch_size (16)'.)"""
    ref = stream(gbs=1, mbs=1)
    expected = torch.cat([next(ref)["tokens"] for _ in range(24 + 2 * 16 + 4)])
    a = stream(gbs=8)
    got = [m["tokens"] for _ in range(3) for m in take_step(a)]
    state = a.state_dict()
    b = stream(gbs=16, mbs=4)
    b.load_state_dict(state)
    got += [m["tokens"] for _ in range(2) for m in take_step(b)]
    state = b.state_dict()
    assert state["consumed_samples"] == 24 + 2 * 16
    ranks = [stream(r, 2, gbs=4, mbs=1) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    got += [m["tokens"] for r in ranks for m in take_step(r)]
    assert torch.equal(torch.cat(got), expected)


def test_text_is_learnable_not_uniform():
    # Each token has at most `branching` successors: the bigram table is sparse.
    toks = torch.cat([next(stream())["tokens"].flatten() for _ in range(4)])
    pairs = set(zip(toks[:-1].tolist(), toks[1:].tolist()))
    assert len(pairs) < 0.5 * len(toks)


def test_held_out_samples_follow_the_training_chain():
    """train.eval's held-out text (data.sample_seed + 1) is other samples of the chain the run trains on: every
    transition outside a copied span is one of that chain's, and none of the samples is a training one. (Before,
    the held-out text came from data.seed + 1, another chain: a held-out loss that rose as training went on.)"""
    from dataclasses import replace

    from data.synthetic_tokens import SyntheticTokenSource, samples_seed

    train_cfg = DataConfig(copy_prob=0.0)
    held_cfg = replace(train_cfg, sample_seed=samples_seed(train_cfg) + 1)
    train, held = (SyntheticTokenSource(c, vocab_size=97, seq_length=64) for c in (train_cfg, held_cfg))
    assert torch.equal(train.successors, held.successors)
    allowed = {(a, b) for a, row in enumerate(train.successors.tolist()) for b in row}
    samples = [held.sample(i) for i in range(8)]
    for s in samples:
        assert all((a, b) in allowed for a, b in zip(s[:-1].tolist(), s[1:].tolist()))
    assert all(not torch.equal(s, train.sample(i)) for i, s in enumerate(samples))
    # data.seed + 1, the old held-out text, is another chain: most of its transitions are not this one's. A random
    # pair is one of this chain's with probability 4 / 97, so about 3 of the 64 are expected; 16 is far above that
    # and far below the 64 of a sample of this chain
    other = SyntheticTokenSource(replace(train_cfg, seed=train_cfg.seed + 1), vocab_size=97, seq_length=64).sample(0)
    assert sum((a, b) in allowed for a, b in zip(other[:-1].tolist(), other[1:].tolist())) < 16
