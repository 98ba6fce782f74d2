"""Trainable parameters and the model's dtype.

megatron-core 0.16.1's distributed optimizer cannot checkpoint a trainable fp32 parameter in a bf16 model: the
first checkpoint of `keye_tiny_vl_dsa_sparse` on an H200 stopped on its assertion `(torch.Size([8]), 65536,
65664)` (the DSA indexer's key LayerNorm weight, then stored in fp32, paired with another parameter's optimizer
state; bench/RESULTS.md, "The tiny recipes through the launcher on a GPU"). The CPU runs are fp32 throughout and
never saw it. So:
- `train.optim.check_param_dtypes` stops such a model before its first step, naming the parameter;
- the indexer stores its LayerNorm weight in the model's dtype and still normalises in fp32. The reference for
  its key is torch's LayerNorm in float64 over the same projection, with the stored weight.
What megatron-core did with such a parameter was read in its source and seen in an ad-hoc run on one CPU rank
(a bf16 model with an fp32 8-element LayerNorm weight beside bf16 norms of 32 and 8 elements in the no-decay
group): the 8-element bf16 norm was paired with the fp32 weight's main copy, same shape, no error.
"""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from models.attention.dsa import DSAIndexer
from train.optim import check_param_dtypes


class _Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4, dtype=torch.bfloat16)
        self.norm = torch.nn.LayerNorm(4, dtype=torch.float32)


def test_fp32_parameter_in_bf16_model_stops_before_the_run():
    with pytest.raises(ValueError, match=r"trainable fp32 parameters in a bf16 model: norm\.weight .*norm\.bias"):
        check_param_dtypes([_Mixed()], bf16=True, distributed=True)


def test_frozen_or_fp32_models_pass():
    frozen = _Mixed()
    frozen.norm.requires_grad_(False)
    check_param_dtypes([frozen], bf16=True, distributed=True)      # nothing of it in the optimizer
    check_param_dtypes([_Mixed()], bf16=False, distributed=True)   # fp32 training: one dtype
    check_param_dtypes([_Mixed()], bf16=True, distributed=False)   # the check is for the distributed optimizer


def _indexer(dtype):
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                            params_dtype=dtype, bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    return DSAIndexer(cfg, heads=4, dim=8)


def test_indexer_parameters_follow_the_model_dtype():
    idx = _indexer(torch.bfloat16)
    assert {n: p.dtype for n, p in idx.named_parameters()} == {
        "wq.weight": torch.bfloat16, "wk.weight": torch.bfloat16, "ww.weight": torch.bfloat16,
        "k_norm.weight": torch.bfloat16}
    check_param_dtypes([idx], bf16=True, distributed=True)


def test_indexer_key_is_its_normalised_projection():
    """The key of a bf16 indexer: its projection normalised (in fp32) with the stored bf16 weight, rounded once to
    bf16. (torch's CPU LayerNorm also normalises a bf16 input in fp32, so this checks the values, not the dtype the
    forward normalises in.)"""
    idx = _indexer(torch.bfloat16)
    with torch.no_grad():
        idx.k_norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(1, 16, 32, generator=g) * 3 + 1).to(torch.bfloat16)
    freqs = torch.zeros(1, 16, 1, 4)                                          # RoPE off: the key is the norm's output
    _, _, k = idx(h, freqs)
    # the projection itself is a bf16 matmul (fp32 accumulation, rounded to bf16 before the norm's .float()):
    # reference over that same rounded projection, in float64
    proj = idx.wk(h).double()
    ref = torch.nn.functional.layer_norm(proj, (8,), idx.k_norm.weight.double(), None, idx.k_norm.eps)
    # one bf16 rounding of the output: half an ulp at 8 significant bits, 2^-9 relative
    assert k.dtype == torch.bfloat16
    torch.testing.assert_close(k.double(), ref, rtol=2 ** -8, atol=1e-6)
