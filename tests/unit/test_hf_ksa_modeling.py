"""transformers' code for a KSA model (models/hf/modeling_qwen3_moe_ksa.py, written beside a KSA export).

Its logits against our model are checked in test_hf_qwen3_moe.py (test_ksa_import_export_round_trip) and at TP2/EP2
in tests/dist/test_hf_roundtrip.py. Here: its summary layout and mask against models/ksa_tokens.py and
kernels/ksa/naive.py (the trainer's), and what inference needs beyond one forward.
"""

import pytest
import torch

from kernels.ksa import naive
from models.hf.modeling_qwen3_moe_ksa import Qwen3MoeKSAAttention, ksa_mask, summary_layout
from models.hf.verify import LOGIT_ATOL, LOGIT_RTOL
from models.ksa_tokens import build_summary_layout


@pytest.mark.parametrize("chunk, num_summary", [(1, 1), (4, 2), (5, 1)])
def test_layout_and_mask_are_the_trainers(chunk, num_summary):
    """The summary positions, slots and sources equal models/ksa_tokens.build_summary_layout's for every length from
    0 to 3 chunks + 2; the mask of every window from 0 to 3 chunks equals kernels/ksa/naive.ksa_mask's, also when
    built a few query rows at a time."""
    for t in range(3 * chunk + 3):
        ours, ref = summary_layout(t, chunk, num_summary), build_summary_layout(t, chunk=chunk, num_summary=num_summary)
        assert torch.equal(ours["text_index"], ref.text_index) and torch.equal(ours["summary_index"], ref.summary_index)
        assert torch.equal(ours["slot"], ref.summary_slot) and torch.equal(ours["source"], ref.summary_source)
    total = ref.num_total
    for window in range(4):
        want = naive.ksa_mask(total, chunk=chunk, window=window, num_summary=num_summary)
        rows = [ksa_mask(torch.arange(i, min(total, i + 3)), total, chunk=chunk, num_summary=num_summary,
                         window=window) for i in range(0, total, 3)]
        assert torch.equal(torch.cat(rows), want)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny checkpoint as a KSA export (KSA on layer 1 of 2, chunks of 4, 2 summaries, windows 1 and 2)."""
    from transformers import AutoModelForCausalLM

    from models.hf.tiny import add_tiny_ksa, save_tiny_qwen3_moe

    d = tmp_path_factory.mktemp("ksa") / "hf"
    save_tiny_qwen3_moe(d)
    add_tiny_ksa(d, [1], chunk=4, num_summary=2, windows=[1, 2])
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, trust_remote_code=True).eval()
    # transformers runs its own copy of the file (its module cache): the class by name
    assert [type(layer.self_attn).__name__ for layer in m.model.layers] == ["Qwen3MoeAttention",
                                                                         Qwen3MoeKSAAttention.__name__]
    return m


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """verify.py's logit tolerance (fp32: the same arithmetic in another order, a few ulp of the logits' size)."""
    return (a - b).abs().max().item() <= LOGIT_ATOL + LOGIT_RTOL * b.abs().max().item()


@torch.no_grad()
def test_generation_runs_the_whole_sequence_each_step(model):
    """No cache: generate() gives the tokens of a greedy loop over whole-sequence forwards (each new token may
    complete a chunk, whose summaries then go in); asking for a cache is refused with the reason."""
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=9, do_sample=False)
    loop = ids
    for _ in range(9):
        loop = torch.cat([loop, model(input_ids=loop).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, loop)
    with pytest.raises(ValueError, match="without a cache"):
        model(input_ids=ids, use_cache=True)


@torch.no_grad()
def test_padded_rows_run_as_alone(model):
    """A left-padded batch: each row gives the logits of its tokens run alone (its chunks start at its first token),
    and generate() continues each row as it continues that row alone. A mask that is not one run of tokens per row
    is refused."""
    g = torch.Generator().manual_seed(3)
    long, short = (torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in (17, 10))
    pad = 17 - 10
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batch = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(batch[1, :pad], torch.zeros_like(batch[1, :pad]))
    assert _close(batch[1:, pad:], model(input_ids=short).logits) and _close(batch[:1], model(input_ids=long).logits)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[1, pad:], model.generate(short, max_new_tokens=6, do_sample=False)[0])
    assert torch.equal(out[:1], model.generate(long, max_new_tokens=6, do_sample=False))
    mask[0, 3] = 0
    with pytest.raises(ValueError, match="row 0 of attention_mask is not one run of tokens"):
        model(input_ids=ids, attention_mask=mask)


@torch.no_grad()
def test_query_chunks_and_rows_change_nothing(model):
    """Queries a few at a time give the logits of one pass; a row of a batch gives its logits alone."""
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    whole = model(input_ids=ids).logits
    assert _close(whole[1:], model(input_ids=ids[1:]).logits)
    attn = model.model.layers[1].self_attn
    attn.query_chunk = 5
    try:
        assert _close(model(input_ids=ids).logits, whole)
    finally:
        attn.query_chunk = None


def test_a_config_without_ksa_layers_is_refused():
    from transformers import Qwen3MoeConfig

    from models.hf.modeling_qwen3_moe_ksa import Qwen3MoeKSAForCausalLM

    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                ksa_chunk=4, ksa_num_summary=1, ksa_windows=[1])
    for layers, match in (([], "names no layer"), ([2], r"layers \[2\] are not in 0..1")):
        with pytest.raises(ValueError, match=match):
            Qwen3MoeKSAForCausalLM(Qwen3MoeConfig(**base, ksa_layers=layers))
