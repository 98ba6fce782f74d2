"""A tiny random Qwen3-MoE checkpoint written by transformers itself, for tests and for trying the converter.

    python -c "from models.hf.tiny import save_tiny_qwen3_moe; save_tiny_qwen3_moe('/tmp/tiny_hf')"

Every weight is random, norm weights included (1 + noise, so that swapping q_norm and k_norm, or the
input and post-attention norms, changes the logits), and the router is drawn wide enough that top-k
choices are not near ties (so two implementations route every token the same way).
"""

from __future__ import annotations

import os

import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1.0e7, rms_norm_eps=1e-6,
            max_position_embeddings=4096)


@torch.no_grad()
def save_tiny_qwen3_moe(path: str | os.PathLike, *, seed: int = 0, max_shard_size: str | None = None,
                        dtype: torch.dtype = torch.float32, **overrides) -> dict:
    """Builds Qwen3MoeForCausalLM(TINY | overrides) with random weights and save_pretrained's it (safetensors;
    sharded when `max_shard_size` is given, e.g. "50KB"). Returns the config dict used."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        elif name.endswith("mlp.gate.weight"):
            p.normal_(0.0, 0.3)
        else:
            p.normal_(0.0, 0.05)
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return cfg
