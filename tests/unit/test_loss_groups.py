"""The step's loss of each data source and kind of document (train/loss_groups.py, wired through
train/trainer.py _forward_step, _loss_func, _loss_vector and _loss_from).

The reference is a plain per-token cross-entropy of the same logits, grouped in Python loops by the source and kind
of the document each token belongs to, as the test describes the packs. The model is a fixed logits table
looked up by token (so a CP rank's share of the tokens gets the same per-token losses as the whole row); the
world's all-reduce is the sum of every rank's _loss_vector (train/metrics.py sum_over_world does that sum)."""

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from data.video.packing import DOC_KINDS
from data.video_stream import VideoBatchStream
from train.loss_groups import group_metrics
from train.metrics import Meter, StepStats
from train.trainer import StepInputs, Trainer, _forward_step

V = 11
SOURCES = ["short", "long", "tokens"]


class FakeGroup:
    """Stands in for a CP process group (batch.py asks group_size_rank for its size and rank)."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank


class TableModel:
    """Per-token cross-entropy of logits looked up by token id (ids past the vocabulary, KSA summary slots, wrap)."""

    def __init__(self, seed: int = 0):
        self.logits = torch.randn(4 * V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def ce(self, tokens, labels):
        return F.cross_entropy(self.logits[tokens % (4 * V)].reshape(-1, V), labels.reshape(-1),
                               reduction="none").view(tokens.shape)

    def __call__(self, tokens, pos, _mask, *, labels, **kwargs):
        return self.ce(tokens, labels).float()


# (source, [(kind, length), ...], padding): a pack of a mixture; a document may be cut at the row's end (no
# padding after it)
PACKS = [("short", [("video", 9), ("text", 5), ("image", 6)], 4),
         ("long", [("video", 17), ("text", 7)], 0),
         ("tokens", [("text", 10), ("text", 14)], 0)]
S = 24


def _micro_batch(source, docs, pad, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 4 * V, (1, S), generator=g)
    labels = torch.randint(0, V, (1, S), generator=g)
    mask = (torch.rand(1, S, generator=g) < 0.8).float()
    cu = [0]
    for _, n in docs:
        cu.append(cu[-1] + n)
    if pad:
        mask[0, cu[-1]:] = 0
        cu.append(S)
    assert cu[-1] == S
    pack = SimpleNamespace(doc_kinds=[k for k, _ in docs], num_docs=len(docs), source=source,
                           cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                           sample_keys=[f"doc{i}" for i in range(len(docs))], excluded=[])   # as a PackedSample's
    loader = SimpleNamespace(loader=SimpleNamespace(source_names=SOURCES))
    return {"tokens": tokens, "labels": labels, "loss_mask": mask,
            "position_ids": torch.arange(S).view(1, 1, S).expand(3, 1, S),
            "cu_seqlens": pack.cu_seqlens, "doc_groups": VideoBatchStream._doc_groups(loader, pack)}


def _reference(mbs, model):
    """{(source, kind): (loss sum, tokens)} from the whole rows' per-token cross-entropy, by Python loops."""
    out = {}
    for (source, docs, _), mb in zip(PACKS, mbs):
        ce = model.ce(mb["tokens"], mb["labels"])[0]
        at = 0
        for kind, n in docs:
            for p in range(at, at + n):
                if mb["loss_mask"][0, p]:
                    s, c = out.get((source, kind), (0.0, 0))
                    out[(source, kind)] = (s + float(ce[p]), c + 1)
            at += n
    return out


def _trainer(groups: int, tp_rank: int = 0):
    """What Trainer._loss_vector, _loss_from and _eval_values read of a trainer."""
    t = SimpleNamespace(device=torch.device("cpu"), pgs=SimpleNamespace(tp=SimpleNamespace(rank=lambda: tp_rank)),
                        dsa_by_chunk=[], loss_sources=SOURCES,
                        step_inputs=StepInputs(device=torch.device("cpu"), vocab_size=V, loss_groups=groups))
    t._loss_from = functools.partial(Trainer._loss_from, t)
    return t


@pytest.mark.parametrize("cp,split", [(1, "document"), (2, "document"), (2, "sequence")])
def test_the_loss_of_each_source_and_kind_is_the_plain_cross_entropy_of_its_tokens(cp, split, monkeypatch):
    import parallel.context.batch as batch

    monkeypatch.setattr(batch, "group_size_rank", lambda g: (1, 0) if g is None else (g._size, g._rank))
    model = TableModel()
    mbs = [_micro_batch(*p, seed=i) for i, p in enumerate(PACKS)]
    n_groups = len(SOURCES) * len(DOC_KINDS)
    world = torch.zeros(6 + 2 * n_groups, dtype=torch.float64)
    for rank in range(cp):   # each CP rank's share of every micro-batch; then the world's sum of the loss vectors
        inputs = StepInputs(device=torch.device("cpu"), vocab_size=V, loss_groups=n_groups,
                            cp_group=FakeGroup(cp, rank) if cp > 1 else None, cp_split=split)
        losses = []
        for mb in mbs:
            output, loss_func = _forward_step(inputs, iter([mb]), model)
            losses.append(loss_func(output)[2])
        world += Trainer._loss_vector(_trainer(n_groups), losses)
    # another pipeline stage (no losses) and another TP rank add zeros of the same size: the all-reduce matches
    assert torch.equal(Trainer._loss_vector(_trainer(n_groups), []), torch.zeros_like(world))
    assert torch.equal(Trainer._loss_vector(_trainer(n_groups, tp_rank=1), losses), torch.zeros_like(world))
    loss, extra = Trainer._loss_from(_trainer(n_groups), world)

    ref = _reference(mbs, model)
    for source in SOURCES:
        s = sum(v[0] for (src, _), v in ref.items() if src == source)
        c = sum(v[1] for (src, _), v in ref.items() if src == source)
        assert extra[f"loss_src_tokens/{source}"] == c
        # float32 per-token losses of the model summed in float64: agree to float32's precision
        assert extra[f"loss_src/{source}"] == pytest.approx(s / c, rel=1e-6)
    for kind in DOC_KINDS:
        s = sum(v[0] for (_, k), v in ref.items() if k == kind)
        c = sum(v[1] for (_, k), v in ref.items() if k == kind)
        assert extra[f"loss_kind_tokens/{kind}"] == c
        assert extra[f"loss_kind/{kind}"] == pytest.approx(s / c, rel=1e-6)
    # the step's loss is the token-weighted mean of the parts (the step sums in float32 per micro-batch: 1e-6)
    for key in ("loss_src", "loss_kind"):
        names = [k.split("/")[1] for k in extra if k.startswith(key + "/")]
        mean = sum(extra[f"{key}/{n}"] * extra[f"{key}_tokens/{n}"] for n in names) / \
            sum(extra[f"{key}_tokens/{n}"] for n in names)
        assert loss == pytest.approx(mean, rel=1e-6)
    assert sum(extra[f"loss_kind_tokens/{k}"] for k in DOC_KINDS) == int(world[1])  # padding counts nowhere


def test_a_ksa_row_keeps_each_token_in_its_document(monkeypatch):
    """KSA inserts summary slots (no loss) after every chunk of each document and pads the row to a fixed length
    with one more segment: each token's group follows its document."""
    model = TableModel(seed=1)
    mbs = [_micro_batch(*p, seed=10 + i) for i, p in enumerate(PACKS)]
    n_groups = len(SOURCES) * len(DOC_KINDS)
    inputs = StepInputs(device=torch.device("cpu"), vocab_size=V, ksa_chunk=4, model_seq=40, loss_groups=n_groups)
    losses = []
    for mb in mbs:
        output, loss_func = _forward_step(inputs, iter([mb]), model)
        losses.append(loss_func(output)[2])
    _, extra = Trainer._loss_from(_trainer(n_groups), Trainer._loss_vector(_trainer(n_groups), losses))
    ref = _reference(mbs, model)
    for (source, kind), (s, c) in ref.items():
        assert extra[f"loss_kind_tokens/{kind}"] == sum(v[1] for (_, k), v in ref.items() if k == kind)
        assert extra[f"loss_src_tokens/{source}"] == sum(v[1] for (x, _), v in ref.items() if x == source)
    for kind in DOC_KINDS:
        s = sum(v[0] for (_, k), v in ref.items() if k == kind)
        c = sum(v[1] for (_, k), v in ref.items() if k == kind)
        assert extra[f"loss_kind/{kind}"] == pytest.approx(s / c, rel=1e-6)   # float32 losses, as above


def test_group_metrics_leave_out_what_had_no_tokens_and_one_source():
    sums = torch.zeros(2 * 3)
    sums[0], sums[2], sums[3], sums[5] = 6.0, 3.0, 4.0, 2.0   # one source: video 6/4, text 3/2, no image
    assert group_metrics(sums, ["short"]) == {"loss_kind/video": 1.5, "loss_kind_tokens/video": 4,
                                              "loss_kind/text": 1.5, "loss_kind_tokens/text": 2}


def _line(extra):
    m = Meter(flops_per_token=1.0, world_size=1, peak_tflops=None, total_steps=10)
    return m.line(StepStats(step=1, loss=2.5, grad_norm=1.0, lr=1e-4, seconds=1.0, tokens=10, extra=extra))


def test_the_step_line_shows_the_parts_compactly_where_there_are_several():
    two = {"loss_src/short": 2.25, "loss_src_tokens/short": 100, "loss_src/long": 2.75, "loss_src_tokens/long": 50,
           "loss_kind/video": 2.5, "loss_kind_tokens/video": 150, "data_wait_s": 0.5}
    line = _line(two)
    assert "| loss 2.5000 | src short 2.2500 long 2.7500 | data_wait_s 0.5000 |" in line
    assert "tokens" not in line.split("tok/s")[0] and "kind" not in line   # one kind: in metrics.jsonl alone
    # a one-source text run's line does not grow
    assert _line({"loss_kind/text": 2.5, "loss_kind_tokens/text": 9}) == _line({})


def test_the_evaluation_reports_each_kind_where_a_set_mixes_them(caplog):
    n_groups = len(SOURCES) * len(DOC_KINDS)
    t = _trainer(n_groups)
    total = torch.zeros(6 + 2 * n_groups, dtype=torch.float64)
    total[0], total[1] = 10.0, 5.0
    total[6 + 0], total[6 + n_groups + 0] = 4.0, 2.0     # a held-out set is source 0: video 2.0 over 2 tokens
    total[6 + 2], total[6 + n_groups + 2] = 6.0, 3.0     # text 2.0 over 3
    out = Trainer._eval_values(t, total)
    assert out == {"val_loss": 2.0, "val_loss_kind/video": 2.0, "val_loss_kind_tokens/video": 2,
                   "val_loss_kind/text": 2.0, "val_loss_kind_tokens/text": 3}
    with caplog.at_level("INFO", logger="train"):
        Meter(flops_per_token=1.0, world_size=1, peak_tflops=None, total_steps=10).log_eval(3, out)
    assert "| val_loss 2.0000 | val_loss_kind/video 2.0000 | val_loss_kind/text 2.0000 |" in caplog.text
    assert "_tokens" not in caplog.text                  # the counts are in eval.jsonl
    total[6 + 2] = total[6 + n_groups + 2] = 0.0         # one kind: val_loss says it all
    assert Trainer._eval_values(t, total) == {"val_loss": 2.0}
