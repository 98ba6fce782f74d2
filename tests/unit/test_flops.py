"""The FLOPs per token behind the log's TFLOP/s and MFU (models/config.py lm_flops_per_token) against counts made
another way: Qwen3-30B-A3B's matmuls written out by hand, and the (query, key) pairs each attention variant attends
counted from its mask (KSA: kernels/ksa/naive.py's mask tensor, or a loop over chunks at 256K; DSA: the top-k of each
causal row)."""

import pytest
import torch
from omegaconf import OmegaConf

from kernels.ksa.naive import ksa_mask
from models.config import LMConfig, causal_pairs, ksa_pairs, lm_flops_per_token
from tests.unit.test_lm_params import REPO

# Qwen3-30B-A3B: hidden 2048, 48 layers, 32 query / 4 KV heads of 128, 128 experts top-8 of width 768, vocab 151936
H, LAYERS, Q, KV, VOCAB = 2048, 48, 32 * 128, 4 * 128, 151936
# one token's matmuls, multiply-add = 2 FLOPs: QKV and output projection, router, 8 SwiGLU experts (3 matrices),
# output layer (the input embedding is a lookup)
PER_TOKEN_30B = 2 * (LAYERS * (H * (Q + 2 * KV) + Q * H + H * 128 + 8 * 3 * H * 768) + VOCAB * H)


def model(name: str) -> LMConfig:
    """A recipes/model preset, with the preset it names in its defaults underneath."""
    raw = OmegaConf.load(REPO / "recipes" / "model" / f"{name}.yaml")
    base = [d for d in raw.get("defaults", []) if d != "_self_"]
    lm = OmegaConf.merge(*(OmegaConf.load(REPO / "recipes" / "model" / f"{b}.yaml").lm for b in base), raw.lm)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig), lm))


def loop_ksa_pairs(seq: int, chunk: int, window: int) -> int:
    """KSA pairs of one document with one summary per chunk, chunk by chunk (the rule of kernels/ksa/naive.py)."""
    n, total = seq // chunk, 0
    for c in range(n + 1):
        text = chunk if c < n else seq % chunk
        # a text query: its chunk causally, `window` chunks of text before, one summary of each older chunk
        total += sum(j + 1 + chunk * min(c, window) + max(0, c - window) for j in range(text))
        if c < n:
            total += chunk + 1   # the summary query: its chunk's text and itself
    return total


def test_dense_30b_against_the_hand_count():
    seq = 8192
    # forward + backward = 3 x forward; causal attention: 2 x 2 x q_dim per pair, seq (seq + 1) / 2 pairs per layer
    want = 3 * (PER_TOKEN_30B + 4 * Q * LAYERS * seq * (seq + 1) / 2 / seq)
    assert lm_flops_per_token(model("keye_30b_a3b"), seq) == pytest.approx(want, rel=1e-12)  # float rounding
    assert want / 1e9 == pytest.approx(27.915, abs=1e-3)


def test_dsa_30b_counts_the_top_k_and_the_indexer_not_dense_attention():
    # 256K tokens, top-2048: each query attends min(t + 1, 2048) keys; the indexer (16 heads x 64) scores every causal
    # key forward and its KL's backward (2x) covers the selected ones; its projections are matmuls of every token,
    # forward and their weights' gradients (their input is detached)
    seq, k = 262144, 2048
    selected = k * (k + 1) // 2 + k * (seq - k)
    every = seq * (seq + 1) // 2
    indexer_proj = 2 * LAYERS * H * (16 * 64 + 64 + 16)
    want = (3 * (PER_TOKEN_30B + 4 * Q * LAYERS * selected / seq) + 2 * indexer_proj
            + 2 * 16 * 64 * LAYERS * (every + 2 * selected) / seq)
    got = lm_flops_per_token(model("keye_30b_a3b_dsa"), seq)
    assert got == pytest.approx(want, rel=1e-12)  # float rounding
    assert got / 1e9 == pytest.approx(36.78, abs=0.005)   # dense attention would be 327.5 GFLOP per token
    # the warm-up stage attends densely, its indexers' KL covers every causal key
    warm = model("keye_30b_a3b_dsa")
    warm.dsa.stage = "dense_warmup"
    want_warm = (3 * (PER_TOKEN_30B + 4 * Q * LAYERS * every / seq) + 2 * indexer_proj
                 + 2 * 16 * 64 * LAYERS * 3 * every / seq)
    assert lm_flops_per_token(warm, seq) == pytest.approx(want_warm, rel=1e-12)
    # train.trainable=indexer: the frozen model's backward computes its inputs' gradients only (indexer_backward=model)
    want_frozen = (2 * PER_TOKEN_30B + 3 * 4 * Q * LAYERS * every / seq + 2 * indexer_proj
                   + 2 * 16 * 64 * LAYERS * 3 * every / seq)
    assert lm_flops_per_token(warm, seq, trainable="indexer") == pytest.approx(want_frozen, rel=1e-12)
    # and with train.indexer_backward=local its step runs the frozen model forward only
    want_fwd = PER_TOKEN_30B + 4 * Q * LAYERS * every / seq + 2 * indexer_proj + 2 * 16 * 64 * LAYERS * 3 * every / seq
    assert lm_flops_per_token(warm, seq, backward=False, trainable="indexer") == pytest.approx(want_fwd, rel=1e-12)


def test_ksa_30b_counts_its_mask_and_its_summary_slots():
    # 256K text tokens, chunk 8, one summary per chunk: 9/8 as many tokens go through the layers, each through one
    # QKV projection; windows 128, 128, 128, 1024 chunks
    seq = 262144
    pairs = sum(loop_ksa_pairs(seq, 8, w) for w in [128, 128, 128, 1024] * 12)
    want = 3 * (PER_TOKEN_30B * (seq + seq // 8) + 4 * Q * pairs) / seq
    got = lm_flops_per_token(model("keye_30b_a3b_ksa"), seq)
    assert got == pytest.approx(want, rel=1e-12)  # float rounding
    assert got / 1e9 == pytest.approx(64.94, abs=0.01)
    # train.trainable=summary (the conversion's first stage): forward, the inputs' gradients, and the weight
    # gradients of the summary QKV projections on the summary slots alone; with distillation, the dense teacher's
    # forward over the text
    summary = 2 * PER_TOKEN_30B * (seq + seq // 8) + 3 * 4 * Q * pairs + 2 * LAYERS * H * (Q + 2 * KV) * (seq // 8)
    teacher = PER_TOKEN_30B * seq + 4 * Q * LAYERS * seq * (seq + 1) // 2
    cfg = model("keye_30b_a3b_ksa")
    assert lm_flops_per_token(cfg, seq, trainable="summary") == pytest.approx(summary / seq, rel=1e-12)
    assert lm_flops_per_token(cfg, seq, trainable="summary", teacher=True) == pytest.approx(
        (summary + teacher) / seq, rel=1e-12)
    # train.trainable=projector (alignment): the language model's backward carries the gradients to its input only
    dense = model("keye_30b_a3b")
    assert lm_flops_per_token(dense, 8192, trainable="projector") == pytest.approx(
        2 * PER_TOKEN_30B + 3 * 4 * Q * LAYERS * 8193 / 2, rel=1e-12)


@pytest.mark.parametrize("seq,window", [(256, 4), (256, 64), (100, 0), (61, 3), (7, 2)])
def test_ksa_pairs_are_those_of_the_mask(seq, window):
    tokens = seq + seq // 8
    mask = ksa_mask(tokens, chunk=8, window=window, num_summary=1)
    assert ksa_pairs(seq, chunk=8, num_summary=1, window=window) == int(mask.sum())
    mask2 = ksa_mask(seq + 2 * (seq // 8), chunk=8, window=window, num_summary=2)
    assert ksa_pairs(seq, chunk=8, num_summary=2, window=window) == int(mask2.sum())


@pytest.mark.parametrize("tokens,k", [(256, 32), (256, 256), (256, 1000), (33, 1)])
def test_causal_pairs_are_the_top_k_of_each_causal_row(tokens, k):
    rows = torch.ones(tokens, tokens).tril().sum(dim=1)
    assert causal_pairs(tokens, k) == int(rows.clamp(max=k).sum())


def test_tiny_models_per_variant():
    # keye_tiny: hidden 128, 4 layers, 8 x 16 query / 2 x 16 KV, 8 experts top-2 of width 64, vocab 512
    h, layers, q, kv, seq = 128, 4, 8 * 16, 2 * 16, 256
    per_token = 2 * (layers * (h * (q + 2 * kv) + q * h + h * 8 + 2 * 3 * h * 64) + 512 * h)
    dense = 3 * (per_token + 4 * q * layers * (seq + 1) / 2)
    assert lm_flops_per_token(model("keye_tiny"), seq) == pytest.approx(dense, rel=1e-12)
    # DSA top-32, indexer 4 x 8
    sel, every = 32 * 33 // 2 + 32 * (seq - 32), seq * (seq + 1) // 2
    dsa = (3 * (per_token + 4 * q * layers * sel / seq) + 2 * 2 * layers * h * (4 * 8 + 8 + 4)
           + 2 * 4 * 8 * layers * (every + 2 * sel) / seq)
    assert lm_flops_per_token(model("keye_tiny_dsa"), seq) == pytest.approx(dsa, rel=1e-12)
    # KSA: windows 4, 4, 4, 64 chunks, pairs from the mask tensor
    pairs = sum(int(ksa_mask(seq + seq // 8, chunk=8, window=w, num_summary=1).sum()) for w in (4, 4, 4, 64))
    ksa = 3 * (per_token * (seq + seq // 8) + 4 * q * pairs) / seq
    assert lm_flops_per_token(model("keye_tiny_ksa"), seq) == pytest.approx(ksa, rel=1e-12)
