"""Which documents (or rows) of a micro-batch held a non-finite loss (train/nonfinite.py part_ids, nonfinite_parts,
nonfinite_micro_batches), what the streams name of them, and that the narrowing is true of the model: a NaN that
enters one document of a packed row stays in that document's tokens through the tiny MoE LM (dense and DSA
attention), so the other documents' losses are those of the same row without it.

The references are plain Python loops over positions (which segment of cu_seqlens holds a position, which
positions a CP rank holds) and the model's own run on the row without the NaN. The launches that name the parts in
a run's message are tests/dist/test_nonfinite.py's.
"""

import math

import pytest
import torch

from parallel.context.batch import cp_share
from parallel.context.split import cp_global_indices
from train.nonfinite import nonfinite_micro_batches, nonfinite_parts, part_ids
from train.trainer import _loss_func, packed_params
from tests.kernels.test_dsa import _interpreter_fixes  # noqa: F401  (triton 3.6's interpreter with numpy 2)
from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron

NAN = float("nan")


class FakeGroup:
    """Stands in for a CP process group (batch.py asks group_size_rank for its size and rank)."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank


def _segment(cu: list[int], p: int) -> int:
    return next(d for d in range(len(cu) - 1) if cu[d] <= p < cu[d + 1])


def test_part_ids_are_documents_or_rows():
    cu = [0, 3, 4, 9, 12]   # the last segment as a pack's padding: a part too
    ids = part_ids(torch.Size([1, 12]), torch.tensor(cu, dtype=torch.int32), torch.device("cpu"))
    assert ids.tolist() == [[_segment(cu, p) for p in range(12)]]
    assert part_ids(torch.Size([3, 5]), None, torch.device("cpu")).tolist() == [[r] * 5 for r in range(3)]


@pytest.mark.parametrize("split", ["sequence", "document"])
def test_a_cp_rank_holds_the_parts_of_its_tokens(split, monkeypatch):
    import parallel.context.batch as batch

    monkeypatch.setattr(batch, "group_size_rank", lambda g: (1, 0) if g is None else (g._size, g._rank))
    cu = torch.tensor([0, 5, 6, 19, 32], dtype=torch.int32)
    ids = part_ids(torch.Size([1, 32]), cu, torch.device("cpu"))
    kwargs = {"packed_seq_params": packed_params(cu)}
    for rank in range(2):
        mine = cp_share(ids, kwargs, FakeGroup(2, rank), split=split)
        where = cp_global_indices(32, 2, rank, torch.device("cpu"), split=split, cu_seqlens=cu)
        assert mine.tolist() == [[_segment(cu.tolist(), int(p)) for p in where]], (split, rank)
    assert cp_share(ids, kwargs, None, split=split) is ids


def test_the_parts_whose_tokens_were_not_finite():
    loss = torch.ones(2, 6)
    loss[1, 4] = NAN
    loss[0, 0] = math.inf
    rows = part_ids(loss.shape, None, loss.device)
    assert nonfinite_parts(loss, rows, 2).tolist() == [1.0, 1.0]
    cu = torch.tensor([0, 2, 7, 12])
    packed = torch.ones(1, 12)
    packed[0, 8] = NAN   # masked or not: its NaN reaches the loss sum
    assert nonfinite_parts(packed, part_ids(packed.shape, cu, packed.device), 3).tolist() == [0.0, 0.0, 1.0]
    assert nonfinite_parts(torch.ones(12, 1, 4), part_ids(packed.shape, cu, packed.device), 3) is None


def test_the_loss_report_carries_the_parts_and_the_step_names_them():
    cu = torch.tensor([0, 4, 6, 10])
    parts = part_ids(torch.Size([1, 10]), cu, torch.device("cpu"))
    mask = torch.ones(1, 10)
    clean = torch.full((1, 10), 2.0)
    one = clean.clone()
    one[0, 5] = NAN
    every = clean * NAN
    reports = [_loss_func(mask, out, parts=parts, n_parts=3)[2] for out in (clean, one, every)]
    assert reports[0]["nonfinite_parts"].tolist() == [0.0, 0.0, 0.0]
    assert reports[1]["nonfinite_parts"].tolist() == [0.0, 1.0, 0.0]
    # the second micro-batch's document 1 alone; the third's every document, so the whole micro-batch
    assert nonfinite_micro_batches(reports, []) == {1: [1], 2: None}
    # a DSA layer's indexer KL (one mean per micro-batch) not finite in the first: the whole micro-batch; in the
    # second, whose LM loss names its document, the KL's NaN is that document's
    kls = [[torch.tensor(NAN), torch.tensor(NAN), torch.tensor(0.5)]]
    assert nonfinite_micro_batches(reports, kls) == {0: None, 1: [1], 2: None}
    # a distillation loss is not per token: no parts
    assert nonfinite_micro_batches([{"lm_loss": torch.tensor([NAN, 3.0])}], []) == {0: None}


def test_a_stream_of_rows_names_the_rows():
    from data.sample_position import GlobalSamplePosition

    # micro-batches of 4 rows on rank 1 of 2, global batch 16: rank 1's step holds global samples 8..15
    stream = GlobalSamplePosition(micro_batch_size=4, global_batch_size=16, dp_rank=1, dp_size=2)
    stream.what = "a synthetic_tokens stream"
    stream.next_start(), stream.next_start()
    assert stream.describe_step([1], {1: [0, 2]}) == ("a synthetic_tokens stream: global samples 12, 14 (the rows "
                                                     "whose tokens' loss was not finite, of 12..15)")
    assert stream.describe_step([0, 1], {1: [3]}) == ("a synthetic_tokens stream: global samples 8..11, 15 (the rows "
                                                      "whose tokens' loss was not finite, of 8..15)")
    assert stream.describe_step([1]) == "a synthetic_tokens stream: global samples 12..15"


# ------------------------------------------------------------------------------ the model keeps documents apart
def test_a_nan_in_one_frame_stays_in_its_tokens_through_the_vision_tower():
    """The vision tower encodes each frame on its own (attention within a frame): a NaN in one frame's (normalised)
    pixels reaches that frame's merged tokens alone, so the language model gets it in its document alone."""
    from models.vision import VisionModel, tiny

    torch.manual_seed(0)
    model = VisionModel(tiny(24)).eval()
    grid = torch.tensor([[1, 2, 2], [1, 4, 6], [1, 2, 2], [1, 4, 6]])   # frames of two sizes, as packs mix them
    sizes = grid.prod(-1).tolist()
    pixels = torch.randn(sum(sizes), 3 * 14 * 14)
    poisoned = pixels.clone()
    poisoned[sizes[0] + 5, 7] = NAN   # frame 1
    with torch.no_grad():
        clean, bad = model(pixels, grid), model(poisoned, grid)
    frame = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes) // 4)   # merged tokens per frame
    assert (~torch.isfinite(bad[frame == 1])).any() and torch.isfinite(bad[frame != 1]).all()
    torch.testing.assert_close(bad[frame != 1], clean[frame != 1], rtol=0, atol=0)   # the same products



@pytest.fixture(scope="module")
def megatron_world():
    pgs = init_one_process_megatron(7)
    yield pgs
    destroy_one_process_megatron()


@pytest.mark.parametrize("attention,backend", [("dense", "auto"), ("dsa", "triton"), ("dsa", "naive")])
def test_a_nan_in_one_document_stays_in_its_tokens(megatron_world, attention, backend):
    """A NaN in document 2's input reaches that document's tokens alone, and the others' losses are those of the row
    without it: dense attention, and DSA's Triton kernels (what a GPU runs; interpreted here, fp32). DSA's O(L^2)
    reference (its backend on CPU) is the exception: its products over the whole row multiply the NaN by the zero of
    a masked probability, which is NaN, so every document is named (the whole micro-batch, as before the
    narrowing)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from models.config import DSAConfig, LMConfig, ModelParallelSizes
    from models.lm import build_lm, transformer_config

    get_moe_layer_wise_logging_tracker().clear()
    lm = LMConfig(vocab_size=96, loss_chunk_tokens=0, attention=attention,
                  dsa=DSAConfig(index_heads=2, index_dim=8, topk=4, backend=backend))
    cfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True)
    model = build_lm(lm, cfg, pg_collection=megatron_world, pp_rank=0, pp_size=1).eval()
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 9, 20, 31, 40], dtype=torch.int32)   # 4 documents, each longer than the top-k
    parts = part_ids(torch.Size([1, 40]), cu, torch.device("cpu"))
    tokens = torch.randint(0, lm.vocab_size, (1, 40), generator=g)
    labels = torch.randint(0, lm.vocab_size, (1, 40), generator=g)
    pos = (torch.arange(40) - cu[parts[0]].long()).expand(3, 1, 40)   # positions restart in each document
    # document 2's tokens 23 and 24 come as visual embeddings (as the vision tower's would), one of them NaN
    where = torch.tensor([23, 24])
    embeds = torch.randn(2, lm.hidden_size, generator=g)
    poisoned = embeds.clone()
    poisoned[1, 5] = NAN
    with torch.no_grad():
        out = {name: model(tokens, pos, None, labels=labels, packed_seq_params=packed_params(cu), visual=(e, where))
               for name, e in (("clean", embeds), ("nan", poisoned))}
    get_moe_layer_wise_logging_tracker().clear()
    assert torch.isfinite(out["clean"]).all()
    flags = nonfinite_parts(out["nan"], parts, 4).tolist()
    if backend == "naive":
        assert flags == [1.0] * 4
        assert nonfinite_micro_batches([{"lm_loss": torch.tensor([NAN, 1.0]), "nonfinite_parts": torch.tensor(flags)}],
                                       []) == {0: None}
        return
    assert flags == [0.0, 0.0, 1.0, 0.0]
    # the NaN token's own loss; the later ones of its document where they attend to it (dense: all of them; the
    # DSA kernels rank its NaN index scores last, so the others selected other keys)
    assert not torch.isfinite(out["nan"][0, 24])
    assert attention == "dsa" or not torch.isfinite(out["nan"][0, 25:31]).any()
    others = parts[0] != 2
    # the other documents' losses are those of the row without the NaN; fp32 on CPU: the same products, but the
    # experts' grouped matrices hold other tokens (the NaN tokens may route elsewhere), which may change the
    # summation order of a row
    torch.testing.assert_close(out["nan"][0, others], out["clean"][0, others], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "naive"])
def test_a_nan_in_one_document_stays_in_its_tokens_with_ksa(megatron_world, backend):
    """The same through KSA layers (summary slots after every 4 text tokens; windows of 2 chunks and a full one): a
    NaN entering document 2 stays in its tokens and summaries with the Triton kernels (interpreted, fp32). The mask
    reference (the CPU backend) multiplies it by masked zeros over the whole row, as DSA's: every document."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from models.config import KSAConfig, LMConfig, ModelParallelSizes
    from models.ksa_tokens import insert_summary_slots
    from models.lm import build_lm, transformer_config

    get_moe_layer_wise_logging_tracker().clear()
    lm = LMConfig(vocab_size=96, loss_chunk_tokens=0, attention="ksa",
                  ksa=KSAConfig(chunk=4, num_summary=1, windows=[2, 8], backend=backend))
    cfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True)
    model = build_lm(lm, cfg, pg_collection=megatron_world, pp_rank=0, pp_size=1).eval()
    g = torch.Generator().manual_seed(5)
    cu_text = torch.tensor([0, 9, 20, 31, 40], dtype=torch.int32)
    tokens = torch.randint(0, lm.vocab_size, (1, 40), generator=g)
    labels = torch.randint(0, lm.vocab_size, (1, 40), generator=g)
    sb = insert_summary_slots(tokens, chunk=4, num_summary=1, cu_seqlens=cu_text, labels=labels,
                              slot_ids_from=lm.vocab_size, ignore_index=0)
    cu, n = sb.cu_seqlens.to(torch.int32), sb.input_ids.shape[-1]
    pos = sb.position_ids.reshape(1, n).expand(3, 1, n)
    where = sb.layout.text_index[[23, 24]]   # document 2's text tokens 23 and 24, in the interleaved row
    embeds = torch.randn(2, lm.hidden_size, generator=g)
    poisoned = embeds.clone()
    poisoned[1, 5] = NAN
    with torch.no_grad():
        out = {name: model(sb.input_ids.reshape(1, n), pos, None, labels=sb.labels.reshape(1, n),
                           packed_seq_params=packed_params(cu), visual=(e, where))
               for name, e in (("clean", embeds), ("nan", poisoned))}
    get_moe_layer_wise_logging_tracker().clear()
    assert torch.isfinite(out["clean"]).all()
    parts = part_ids(torch.Size([1, n]), cu, torch.device("cpu"))
    flags = nonfinite_parts(out["nan"], parts, 4).tolist()
    if backend == "naive":
        assert flags == [1.0] * 4
        return
    assert flags == [0.0, 0.0, 1.0, 0.0]
    others = parts[0] != 2
    # fp32 on CPU, not exact for the reason of the dense and DSA case: the experts' grouped products hold other
    # tokens when the NaN tokens route elsewhere
    torch.testing.assert_close(out["nan"][0, others], out["clean"][0, others], rtol=1e-5, atol=1e-6)
