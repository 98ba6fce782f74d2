"""The padding at a packed row's end, named by the trainer (PackedSeqDocuments.pad_tail), costs the model no
attention and no logits, and changes nothing of its documents: the whole language model (a dense and a DSA layer,
each with MoE experts; the chunked loss and megatron's) on a row of two documents and 12 tokens of padding in two
segments gives the documents' tokens the per-token losses, and every parameter the gradients, of the same model on
the row without the padding; the padding's attention output is 0 in both layers (computed when not named: checked),
its per-token loss is 0 with the chunked loss (no logits) and its hidden states get no gradient. One process, gloo
world of 1, fp32 on CPU."""

import pytest
import torch

from tests.kernels.helpers import assert_close
from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron

SEED = 11
BOUNDS, REAL, S = (0, 11, 28, 33, 40), 28, 40     # documents of 11 and 17 tokens, then padding of 5 and 7
# the same fp32 model on the same documents, some sums in another order (the losses exact; the DSA indexer's
# k_norm gradient 6e-8 relative RMSE, the first that is not)
TOL = 1e-5


@pytest.fixture(scope="module")
def pgs():
    pgs = init_one_process_megatron(SEED)
    try:
        yield pgs
    finally:
        destroy_one_process_megatron()


def _model(pgs, chunk: int):
    from models.config import DSAConfig, LMConfig, ModelParallelSizes
    from models.lm import build_lm, transformer_config

    lm = LMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, num_experts=4, moe_topk=2,
                  vocab_size=64, loss_chunk_tokens=chunk, attention_per_layer=["dense", "dsa"],
                  dsa=DSAConfig(index_heads=2, index_dim=8, topk=6))      # top-k 6 < 11, 17: the sparse path
    cfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True)
    torch.manual_seed(SEED)
    return build_lm(lm, cfg, pg_collection=pgs, pp_rank=0, pp_size=1).train()


def _run(model, n: int, tail: bool):
    """Per-token losses [n] of the model on the row's first n tokens (its padding named when `tail`), the
    gradients of the documents' loss sum into every parameter, and the hidden states' gradient at the output."""
    from models.moe.router import PackedSeqDocuments

    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(1, 64, (1, S), generator=g)
    tokens[:, REAL:] = 0                                                  # padding: one token id repeated
    labels = torch.randint(1, 64, (1, S), generator=g)
    bounds = [b for b in BOUNDS if b <= n]
    cu = torch.tensor(bounds, dtype=torch.int32)
    docs = torch.repeat_interleave(torch.tensor([0, 1, -1, -1][:len(bounds) - 1]), cu[1:] - cu[:-1]).view(1, -1)
    psp = PackedSeqDocuments(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=17, max_seqlen_kv=17,
                             documents=docs, num_documents=len(bounds) - 1, pad_tail=n - REAL if tail else 0,
                             pad_tail_segments=2 if tail else 0)
    pos = torch.arange(n).view(1, 1, -1).expand(3, 1, -1)
    model.zero_grad(set_to_none=True)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["h"] = out

    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    hooks = [model.decoder.final_layernorm.register_forward_hook(keep)]
    hooks += [c.register_forward_hook(lambda m, i, o: seen.setdefault("attention", []).append(o.detach()))
              for c in cores]
    try:
        loss = model(tokens[:, :n], pos, None, labels=labels[:, :n], packed_seq_params=psp)
    finally:
        for h in hooks:
            h.remove()
    loss[:, :REAL].sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach()[0], grads, seen["h"].grad, seen["attention"]


@pytest.mark.parametrize("chunk", [8, 0])
def test_the_padding_at_a_rows_end_changes_nothing_of_its_documents(pgs, chunk):
    model = _model(pgs, chunk)
    ref_loss, ref_grads, _, _ = _run(model, REAL, tail=False)              # the row without the padding
    loss, grads, dh, attention = _run(model, S, tail=True)
    assert_close("documents' losses", ref_loss, loss[:REAL], TOL)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in ref_grads.items():
        assert_close(name, g, grads[name], TOL)
    assert torch.equal(dh[REAL:], torch.zeros_like(dh[REAL:]))
    assert len(attention) == 2 and all(torch.equal(a[REAL:], torch.zeros_like(a[REAL:])) for a in attention)
    if chunk:                                                               # no logits for the padding
        assert torch.equal(loss[REAL:], torch.zeros_like(loss[REAL:]))
    named_not, _, _, attended = _run(model, S, tail=False)                  # the padding attended, its loss taken
    assert named_not[REAL:].abs().min() > 0 and all(a[REAL:].abs().amax() > 0 for a in attended)
