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


@torch.no_grad()
def add_tiny_dsa_indexers(path: str | os.PathLike, layers: list[int], *, heads: int = 4, dim: int = 8,
                          topk: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    """Makes a checkpoint from save_tiny_qwen3_moe read as the HF export of a DSA model: random indexers on
    `layers` (the names of models/hf/qwen3_moe.py INDEXER_KEYS; LayerNorm weights 1 + noise) in a file of their own
    (added to the index, one is written for a single-file checkpoint), the config's DSA fields and transformers' DSA
    code (models/hf/modeling_qwen3_moe_dsa.py, named in the config's auto_map). Returns the indexers."""
    h = _config(path)["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    added = {}
    for l in layers:
        pre = f"model.layers.{l}.self_attn.indexer."
        added[pre + "wq.weight"] = 0.3 * torch.randn(heads * dim, h, generator=g)
        added[pre + "wk.weight"] = 0.3 * torch.randn(dim, h, generator=g)
        added[pre + "k_norm.weight"] = 1.0 + 0.3 * torch.randn(dim, generator=g)
        added[pre + "weights_proj.weight"] = 0.3 * torch.randn(heads, h, generator=g)
    _add_variant(path, "dsa", added, index_n_heads=heads, index_head_dim=dim, index_topk=topk,
                 dsa_layers=list(layers))
    return added


@torch.no_grad()
def add_tiny_ksa(path: str | os.PathLike, layers: list[int], *, chunk: int = 4, num_summary: int = 1,
                 windows: list[int] = (1, 2), seed: int = 2) -> dict[str, torch.Tensor]:
    """Makes a checkpoint from save_tiny_qwen3_moe read as the HF export of a KSA model: on `layers` summary
    projections summary_{q,k,v}_proj (the text projection plus noise of a third of its size, so the two differ), random
    summary embeddings, the config's KSA fields and transformers' KSA code (models/hf/modeling_qwen3_moe_ksa.py),
    written as add_tiny_dsa_indexers writes indexers. Returns the tensors added."""
    from models.hf.checkpoint_io import HFCheckpoint

    ck = HFCheckpoint(path)
    g = torch.Generator().manual_seed(seed)
    added = {"model.summary_embed.weight": 0.3 * torch.randn(num_summary, ck.config["hidden_size"], generator=g)}
    for l in layers:
        for n in ("q_proj", "k_proj", "v_proj"):
            w = ck.read(f"model.layers.{l}.self_attn.{n}.weight")
            added[f"model.layers.{l}.self_attn.summary_{n}.weight"] = w + w.std() / 3 * torch.randn(w.shape, generator=g)
    _add_variant(path, "ksa", added, ksa_layers=list(layers), ksa_chunk=chunk, ksa_num_summary=num_summary,
                 ksa_windows=list(windows))
    return added


def _config(path) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(path) / "config.json").read_text())


def _add_variant(path, variant: str, added: dict[str, torch.Tensor], **fields) -> None:
    """Writes `added` to model-{variant}.safetensors of the checkpoint at `path` (under its index; one is written
    for a single-file checkpoint), the config fields and the variant's modeling code with its auto_map."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from models.hf.checkpoint_io import INDEX, SINGLE
    from models.hf.qwen3_moe import auto_map, write_modeling

    p = Path(path)
    if not (p / INDEX).is_file():  # one file: it becomes the first of two, under an index
        weights = load_file(p / SINGLE)
        (p / SINGLE).unlink()
        save_file(weights, str(p / "model-main.safetensors"), metadata={"format": "pt"})
        (p / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: "model-main.safetensors" for n in weights}}))
    save_file(added, str(p / f"model-{variant}.safetensors"), metadata={"format": "pt"})
    index = json.loads((p / INDEX).read_text())
    index["weight_map"].update({n: f"model-{variant}.safetensors" for n in added})
    (p / INDEX).write_text(json.dumps(index, indent=2))
    config = {**_config(p), **fields, "auto_map": auto_map(variant)}
    (p / "config.json").write_text(json.dumps(config, indent=2))
    write_modeling(p, variant)
