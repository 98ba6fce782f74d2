"""Qwen3-MoE checkpoints in the Hugging Face layout <-> the language model of this project.

Legend: L layers, H hidden size, nq query heads, ng KV heads (= query groups), d head_dim, E experts,
F expert FFN size (moe_intermediate_size), V vocabulary.

Both directions are driven by one table, `megatron_to_hf`: a megatron checkpoint tensor (its global key
as in `sharded_state_dict`, plus the layer / expert index of its prepended axes) is the concatenation
along dim 0 of row ranges ("segments") of HF tensors:

    embedding.word_embeddings.weight [V, H]      = model.embed_tokens.weight
    linear_qkv.weight [ng*(nq/ng+2)*d, H]        = per query group g: q_proj rows of the group's nq/ng
                                                   heads, k_proj rows of head g, v_proj rows of head g
    experts.linear_fc1.weight [2F, H] (l, e)     = experts.e.gate_proj rows, then experts.e.up_proj rows
    ...                                            (see docs/hf.md for the whole table)

Import (`load_hf_into`) walks the model's own sharded state dict, as `models.init` does, so it fills
every parameter of any TP / PP / EP / ETP layout with exactly the slice that rank owns, reading only
that slice from the safetensors files. Export (`export_hf`) walks the same table over a
dist_checkpointing checkpoint, loading a bounded group of tensors at a time. Both refuse to finish when
a tensor is left over on either side and name it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from models.config import LMConfig
from models.hf.checkpoint_io import HFCheckpoint, HFShardWriter, remove_earlier_save

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ names
EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
# megatron key of a per-layer tensor -> HF name under model.layers.{l}. (one HF tensor, rows in order)
LAYER_KEYS = {
    "decoder.layers.input_layernorm.weight": "input_layernorm.weight",
    "decoder.layers.self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "decoder.layers.self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "decoder.layers.self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "decoder.layers.pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "decoder.layers.mlp.router.weight": "mlp.gate.weight",
}
# A DSA layer's indexer (models/attention/dsa.py DSAIndexer) under model.layers.{l}. Named after DeepSeek-V3.2's
# indexer where the tensor means the same: wk (the shared index key), k_norm (its LayerNorm; ours has no bias) and
# weights_proj (the per-head weights w); `wq` reads the hidden state (DeepSeek's wq_b reads its query LoRA).
INDEXER_KEYS = {
    "decoder.layers.self_attention.indexer.wq.weight": "self_attn.indexer.wq.weight",
    "decoder.layers.self_attention.indexer.wk.weight": "self_attn.indexer.wk.weight",
    "decoder.layers.self_attention.indexer.k_norm.weight": "self_attn.indexer.k_norm.weight",
    "decoder.layers.self_attention.indexer.ww.weight": "self_attn.indexer.weights_proj.weight",
}
# A KSA layer's summary-token projection (models/attention/ksa.py linear_qkv_summary): laid out as the text QKV, so it
# splits into model.layers.{l}.self_attn.summary_{q,k,v}_proj as linear_qkv does into {q,k,v}_proj; and the model's
# summary-token embeddings (models/lm.py KeyeLM.summary_embedding, [S, h]).
SUMMARY_QKV = "decoder.layers.self_attention.linear_qkv_summary.weight"
# the auxiliary-loss-free routing bias (model.lm.moe_expert_bias; models/moe/router.py): no Qwen3-MoE counterpart
EXPERT_BIAS = "decoder.layers.mlp.router.expert_bias"
SUMMARY_EMBED = "summary_embedding"
GLOBAL_KEYS = {EMBED: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight", OUTPUT: "lm_head.weight",
               SUMMARY_EMBED: "model.summary_embed.weight"}
# a variant's own per-layer tensors are stacked over that variant's layers alone (models/attention/layer_axis.py)
VARIANT_LAYER_KEYS = {**{k: "dsa" for k in INDEXER_KEYS}, SUMMARY_QKV: "ksa"}
# number of prepended (layer, expert) axes of each megatron key
PREPEND = {EMBED: 0, OUTPUT: 0, FINAL_NORM: 0, SUMMARY_EMBED: 0, QKV: 1, SUMMARY_QKV: 1, FC1: 2, FC2: 2,
           **{k: 1 for k in LAYER_KEYS}, **{k: 1 for k in INDEXER_KEYS}}


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + rows) of the HF tensor `name` (all of its other dimensions)."""

    name: str
    start: int
    rows: int


def _layer(l: int) -> str:
    return f"model.layers.{l}."


def megatron_to_hf(key: str, index: tuple[int, ...], lm: LMConfig) -> list[Segment] | None:
    """The HF segments whose row-wise concatenation is megatron tensor `key` at prepended `index`
    (layer, or layer and expert); None for a key that has no HF counterpart."""
    if key not in PREPEND:
        return None
    if len(index) != PREPEND[key]:
        raise ValueError(f"{key}: expected {PREPEND[key]} prepended axes (layer/expert), got index {index}")
    if key == OUTPUT and not lm.untie_embeddings:
        key = EMBED  # a tied output layer on a last pipeline stage is the embedding
    if key in GLOBAL_KEYS:
        name = GLOBAL_KEYS[key]
        return [Segment(name, 0, _hf_shapes_global(lm)[name][0])]
    l = index[0]
    if key in VARIANT_LAYER_KEYS:  # stacked over the variant's layers alone (models/attention/layer_axis.py)
        variant = VARIANT_LAYER_KEYS[key]
        layers = lm.layers_with(variant)
        if not 0 <= l < len(layers):
            raise ValueError(f"{key}[{l}]: model.lm has {len(layers)} {variant.upper()} layer(s) {layers}")
        if key == SUMMARY_QKV:
            return _qkv_segments(lm, layers[l], "summary_")
        name = _layer(layers[l]) + INDEXER_KEYS[key]
        return [Segment(name, 0, _hf_layer_shapes(lm, layers[l])[name][0])]
    if key in LAYER_KEYS:
        name = _layer(l) + LAYER_KEYS[key]
        return [Segment(name, 0, _hf_layer_shapes(lm, l)[name][0])]
    if key == QKV:
        return _qkv_segments(lm, l)
    e, f = index[1], lm.moe_ffn_hidden_size
    p = f"{_layer(l)}mlp.experts.{e}."
    if key == FC1:
        return [Segment(p + "gate_proj.weight", 0, f), Segment(p + "up_proj.weight", 0, f)]
    return [Segment(p + "down_proj.weight", 0, lm.hidden_size)]  # FC2


def _qkv_segments(lm: LMConfig, l: int, prefix: str = "") -> list[Segment]:
    """megatron's fused QKV rows (per query group: its query heads, its key, its value) as HF q/k/v_proj rows."""
    d, ng = lm.head_dim, lm.num_query_groups
    qpg = lm.num_attention_heads // ng
    p = f"{_layer(l)}self_attn.{prefix}"
    segs = []
    for g in range(ng):
        segs += [Segment(p + "q_proj.weight", g * qpg * d, qpg * d), Segment(p + "k_proj.weight", g * d, d),
                 Segment(p + "v_proj.weight", g * d, d)]
    return segs


def _hf_shapes_global(lm: LMConfig) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (lm.vocab_size, lm.hidden_size), "model.norm.weight": (lm.hidden_size,)}
    if lm.uses_ksa:
        out["model.summary_embed.weight"] = (lm.ksa.num_summary, lm.hidden_size)
    if lm.untie_embeddings:
        out["lm_head.weight"] = (lm.vocab_size, lm.hidden_size)
    return out


def _hf_layer_shapes(lm: LMConfig, l: int) -> dict[str, tuple[int, ...]]:
    h, d, f = lm.hidden_size, lm.head_dim, lm.moe_ffn_hidden_size
    q, kv = lm.num_attention_heads * d, lm.num_query_groups * d
    p = _layer(l)
    out = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "self_attn.q_norm.weight": (d,),
        p + "self_attn.k_norm.weight": (d,),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate.weight": (lm.num_experts, h),
    }
    if lm.layer_attention()[l] == "dsa":
        hi, di = lm.dsa.index_heads, lm.dsa.index_dim
        shapes = {"wq": (hi * di, h), "wk": (di, h), "k_norm": (di,), "weights_proj": (hi, h)}
        out.update({f"{p}self_attn.indexer.{n}.weight": s for n, s in shapes.items()})
    if lm.layer_attention()[l] == "ksa":
        out.update({p + "self_attn.summary_q_proj.weight": (q, h), p + "self_attn.summary_k_proj.weight": (kv, h),
                    p + "self_attn.summary_v_proj.weight": (kv, h)})
    for e in range(lm.num_experts):
        out[f"{p}mlp.experts.{e}.gate_proj.weight"] = (f, h)
        out[f"{p}mlp.experts.{e}.up_proj.weight"] = (f, h)
        out[f"{p}mlp.experts.{e}.down_proj.weight"] = (h, f)
    return out


def hf_tensor_shapes(lm: LMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3-MoE HF checkpoint of this model holds, with its shape, in file order."""
    g = _hf_shapes_global(lm)
    out = {"model.embed_tokens.weight": g["model.embed_tokens.weight"]}
    if "model.summary_embed.weight" in g:
        out["model.summary_embed.weight"] = g["model.summary_embed.weight"]
    for l in range(lm.num_layers):
        out.update(_hf_layer_shapes(lm, l))
    out["model.norm.weight"] = g["model.norm.weight"]
    if "lm_head.weight" in g:
        out["lm_head.weight"] = g["lm_head.weight"]
    return out


@dataclass(frozen=True)
class Unit:
    """One megatron checkpoint tensor at one (layer, expert) index, and the HF segments it is made of."""

    key: str
    index: tuple[int, ...]
    segments: tuple[Segment, ...]


def units(lm: LMConfig) -> list[Unit]:
    """All megatron tensors of the model (per layer / expert), in HF file order."""
    def unit(key, *index):
        return Unit(key, tuple(index), tuple(megatron_to_hf(key, tuple(index), lm)))

    out = [unit(EMBED)]
    if lm.uses_ksa:
        out.append(unit(SUMMARY_EMBED))
    dsa, ksa = lm.layers_with("dsa"), lm.layers_with("ksa")
    for l in range(lm.num_layers):
        out += [unit("decoder.layers.input_layernorm.weight", l), unit(QKV, l)]
        if l in ksa:  # a variant's own tensors count that variant's layers (models/attention/layer_axis.py)
            out.append(unit(SUMMARY_QKV, ksa.index(l)))
        out += [unit(k, l) for k in list(LAYER_KEYS)[1:]]
        if l in dsa:
            out += [unit(k, dsa.index(l)) for k in INDEXER_KEYS]
        for e in range(lm.num_experts):
            out += [unit(FC1, l, e), unit(FC2, l, e)]
    out.append(unit(FINAL_NORM))
    if lm.untie_embeddings:
        out.append(unit(OUTPUT))
    return out


# ------------------------------------------------------------------------------------------ config
def _hf_rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for where, d in (("rope_parameters", rp), ("rope_scaling", scaling)):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ("default", "mrope", None):   # "mrope": Qwen2-VL's first configs, plain RoPE with a 3D split
            raise ValueError(f"HF config {where}.rope_type={kind!r}: only plain RoPE (default) is supported")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def hf_mrope_section(cfg: dict) -> list[int] | None:
    """The 3D rotary split (time, height, width channel pairs) an HF config holds: `rope_scaling.mrope_section`, as
    Keye-VL's and Qwen2.5-VL's configs write it (transformers reads rope_scaling first), else transformers 5's
    `rope_parameters.mrope_section`; None without one. ValueError naming the field when it is not 3 counts."""
    for where in ("rope_scaling", "rope_parameters"):
        d = cfg.get(where)
        section = d.get("mrope_section") if isinstance(d, dict) else None
        if section is None:
            continue
        if not (isinstance(section, list) and len(section) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in section)):
            raise ValueError(f"HF config {where}.mrope_section={section!r}: expected 3 counts >= 0 (rotary channel "
                             "pairs of the time, height and width rows)")
        return list(section)
    return None


def hf_mrope_fields(lm: LMConfig) -> dict:
    """config.json's 3D rotary split of `lm` for a multimodal export, laid out as Keye-VL's and Qwen2.5-VL's configs
    hold it (`rope_scaling`: {"mrope_section", "rope_type": "default", "type": "default"}, which transformers reads
    first) and in transformers 5's `rope_parameters` beside it. A text-only export leaves it out: its model never saw
    3D positions (text takes three equal rows: plain RoPE), and transformers' Qwen3-MoE would log the unknown key."""
    section = [int(x) for x in lm.mrope_section]
    return {"rope_scaling": {"rope_type": "default", "type": "default", "mrope_section": section},
            "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta, "mrope_section": section}}


def _hf_value(cfg: dict, name: str):
    if name == "num_experts":
        v = cfg.get("num_experts", cfg.get("num_local_experts"))
    elif name == "head_dim":
        v = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    elif name == "rope_theta":
        v = _hf_rope_theta(cfg)
    elif name == "tie_word_embeddings":
        v = cfg.get("tie_word_embeddings", False)
    else:
        v = cfg.get(name)
    if v is None:
        raise ValueError(f"HF config has no {name!r}")
    return v


# HF config field -> (LMConfig field, HF value from the LMConfig value)
CONFIG_FIELDS = {
    "num_hidden_layers": ("num_layers", lambda v: v),
    "hidden_size": ("hidden_size", lambda v: v),
    "num_attention_heads": ("num_attention_heads", lambda v: v),
    "num_key_value_heads": ("num_query_groups", lambda v: v),
    "head_dim": ("head_dim", lambda v: v),
    "vocab_size": ("vocab_size", lambda v: v),
    "num_experts": ("num_experts", lambda v: v),
    "num_experts_per_tok": ("moe_topk", lambda v: v),
    "moe_intermediate_size": ("moe_ffn_hidden_size", lambda v: v),
    "rope_theta": ("rope_theta", float),
    "norm_topk_prob": ("moe_norm_topk_prob", bool),
    "tie_word_embeddings": ("untie_embeddings", lambda v: not v),
    "rms_norm_eps": ("norm_eps", float),
}


def check_hf_architecture(cfg: dict) -> None:
    """Rejects HF configs whose model this project's LM is not (every layer MoE, SiLU, no biases, ...)."""
    if cfg.get("model_type") not in ("qwen3_moe", None):
        raise ValueError(f"HF config model_type={cfg.get('model_type')!r}: only qwen3_moe is supported "
                         "(a multimodal Keye-VL checkpoint needs the ViT, which this converter does not map)")
    checks = [
        ("hidden_act", cfg.get("hidden_act", "silu") == "silu", "silu"),
        ("attention_bias", not cfg.get("attention_bias", False), "false"),
        ("use_sliding_window", not cfg.get("use_sliding_window", False), "false"),
        ("decoder_sparse_step", cfg.get("decoder_sparse_step", 1) == 1, "1 (every layer MoE)"),
        ("mlp_only_layers", not cfg.get("mlp_only_layers"), "[] (every layer MoE)"),
    ]
    for name, ok, want in checks:
        if not ok:
            raise ValueError(f"HF config {name}={cfg.get(name)!r} is not supported (needs {want})")
    _hf_rope_theta(cfg)


def check_hf_config(cfg: dict, lm: LMConfig, *, plain_ok: bool = False) -> None:
    """ValueError naming every field where the HF config and model.lm disagree (the first alone made a user of
    another model's sizes relaunch once per field). plain_ok: a plain Qwen3-MoE config (no DSA indexers, no KSA)
    is accepted for a model with DSA or KSA layers (load_hf_into's keep_init)."""
    check_hf_architecture(cfg)
    differ = []
    for hf_name, (lm_name, conv) in CONFIG_FIELDS.items():
        hf_v = conv(_hf_value(cfg, hf_name))
        lm_v = getattr(lm, lm_name)
        same = math.isclose(hf_v, lm_v, rel_tol=1e-9) if isinstance(lm_v, float) else hf_v == lm_v
        if not same:
            differ.append(f"HF config {hf_name}={_hf_value(cfg, hf_name)!r} does not match model.lm.{lm_name}={lm_v!r}")
    section = hf_mrope_section(cfg)   # a multimodal directory's 3D split: how its frames' positions turn
    if section is not None and section != list(lm.mrope_section):
        differ.append(f"HF config mrope_section={section!r} does not match model.lm.mrope_section="
                      f"{list(lm.mrope_section)!r}")
    if differ:
        raise ValueError("; ".join(differ))
    check_hf_dsa(cfg, lm, plain_ok=plain_ok)
    check_hf_ksa(cfg, lm, plain_ok=plain_ok)
    if cfg.get("max_position_embeddings", lm.max_position_embeddings) != lm.max_position_embeddings:
        log.warning("HF config max_position_embeddings=%s, model.lm.max_position_embeddings=%s (weights do not "
                    "depend on it)", cfg["max_position_embeddings"], lm.max_position_embeddings)


# ------------------------------------------------------------------------------------------ DSA
# config.json fields of a model with DSA layers: DeepSeek-V3.2's names for the indexer's shape and top-k, and the
# layers that have one (DeepSeek's every layer; ours may be some, model.lm.attention_per_layer)
DSA_FIELDS = ("index_n_heads", "index_head_dim", "index_topk", "dsa_layers")


def hf_dsa_fields(lm: LMConfig) -> dict:
    """The DSA fields of config.json for `lm` (none for a model without DSA layers)."""
    if not lm.layers_with("dsa"):
        return {}
    return {"index_n_heads": lm.dsa.index_heads, "index_head_dim": lm.dsa.index_dim, "index_topk": lm.dsa.topk,
            "dsa_layers": lm.layers_with("dsa")}


# transformers' code for a model with DSA or KSA layers (models/hf/modeling_qwen3_moe_{dsa,ksa}.py): written beside
# config.json, which names it in `auto_map`, so AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
# runs the model as trained
MODELING = {"dsa": (Path(__file__).with_name("modeling_qwen3_moe_dsa.py"), "Qwen3MoeDSAForCausalLM"),
            "ksa": (Path(__file__).with_name("modeling_qwen3_moe_ksa.py"), "Qwen3MoeKSAForCausalLM")}


def auto_map(variant: str) -> dict:
    """config.json's `auto_map` for a model with `variant` layers."""
    path, cls = MODELING[variant]
    return {"AutoModelForCausalLM": f"{path.stem}.{cls}"}


def write_modeling(out_dir: str | os.PathLike, variant: str) -> Path:
    """Copies the `variant`'s modeling file into `out_dir` (the HF directory of such a model); returns its path there."""
    src = MODELING[variant][0]
    dst = Path(out_dir, src.name)
    shutil.copyfile(src, dst)
    return dst


def modeling_variant(hf_config: dict, where: str = "config.json") -> str | None:
    """The variant (dsa or ksa) whose code an HF directory with this config.json runs through; None for a dense
    model. Both at once is refused (a directory carries one variant's code)."""
    has = [v for v, key in (("dsa", "dsa_layers"), ("ksa", "ksa_layers")) if hf_config.get(key)]
    if len(has) > 1:
        raise ValueError(f"{where} names both dsa_layers and ksa_layers: no modeling file runs such a model")
    return has[0] if has else None


def modeling_is_current(hf_dir: str | os.PathLike, config: dict | None = None) -> bool:
    """Whether an HF directory of a DSA or KSA model carries this version's modeling file and names it in its
    auto_map (a dense model's directory: always). An export written by an older version may carry older code.
    `config`: its config.json, if the caller has read it already."""
    if config is None:
        config = json.loads(Path(hf_dir, "config.json").read_text())
    variant = modeling_variant(config, f"{hf_dir}/config.json")
    if variant is None:
        return True
    src = MODELING[variant][0]
    dst = Path(hf_dir, src.name)
    return (dst.is_file() and dst.read_bytes() == src.read_bytes()
            and all(config.get("auto_map", {}).get(k) == v for k, v in auto_map(variant).items()))


def update_modeling(hf_dir: str | os.PathLike) -> tuple[str, bool]:
    """Writes this version's modeling file into the HF directory of a DSA or KSA model (config.json's dsa_layers or
    ksa_layers) and names it in config.json's auto_map (other auto_map entries kept), so an export written by an
    older version (older code, or none) runs as this version's. Returns (variant, whether anything changed)."""
    path = Path(hf_dir, "config.json")
    if not path.is_file():
        raise ValueError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    config = json.loads(path.read_text())
    variant = modeling_variant(config, str(path))
    if variant is None:
        raise ValueError(f"{path} names no dsa_layers or ksa_layers: a dense model needs no modeling file "
                         "(transformers' Qwen3-MoE runs it)")
    if modeling_is_current(hf_dir, config):
        return variant, False
    write_modeling(hf_dir, variant)
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map(variant)}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return variant, True


def _variant(lm: LMConfig) -> str | None:
    """The attention variant (dsa or ksa) an HF directory of `lm` carries code for; None for a dense model."""
    variants = sorted({v for v in lm.layer_attention() if v != "dense"})
    if len(variants) > 1:
        raise ValueError(f"model.lm has layers of {' and '.join(variants)}: a Qwen3-MoE HF checkpoint holds one "
                         "attention variant beside dense layers")
    return variants[0] if variants else None


# ------------------------------------------------------------------------------------------ KSA
# config.json fields of a model with KSA layers: the layers, the chunk C, the summaries per chunk S and the windows
# (layer l uses ksa_windows[l % len(ksa_windows)] chunks: models/config.py KSAConfig)
KSA_FIELDS = ("ksa_layers", "ksa_chunk", "ksa_num_summary", "ksa_windows")


def hf_ksa_fields(lm: LMConfig) -> dict:
    """The KSA fields of config.json for `lm` (none for a model without KSA layers)."""
    if not lm.uses_ksa:
        return {}
    return {"ksa_layers": lm.layers_with("ksa"), "ksa_chunk": lm.ksa.chunk, "ksa_num_summary": lm.ksa.num_summary,
            "ksa_windows": list(lm.ksa.windows)}


def _check_variant_layers(cfg: dict, lm: LMConfig, variant: str, fields: tuple[str, ...], *, plain_ok: bool,
                          what: str, use: str, start: str) -> bool:
    """ValueError when the HF config's `{variant}_layers` and model.lm's layers of `variant` differ (`what` the
    checkpoint holds of it, `use` how to get a model with it, `start` how to start one from a plain directory).
    Returns whether both have such layers, so their other fields are to be compared."""
    up = variant.upper()
    ours, theirs = lm.layers_with(variant), cfg.get(f"{variant}_layers")
    if theirs is None and any(f in cfg for f in fields):
        raise ValueError(f"HF config has {up} fields ({', '.join(f for f in fields if f in cfg)}) but no "
                         f"'{variant}_layers' (the layers with {up})")
    theirs = list(theirs or [])
    if plain_ok and not theirs:
        return False
    if theirs != ours:
        if not ours:
            raise ValueError(f"HF config {variant}_layers={theirs}: the checkpoint has {what}, model.lm has none "
                             f"(attention={lm.attention}): {use}")
        other = "ksa" if variant == "dsa" else "dsa"
        if not theirs and cfg.get(f"{other}_layers"):
            raise ValueError(f"model.lm has {up} on layers {ours} but the HF config has none (no {variant}_layers): "
                             f"a checkpoint with {other.upper()} on layers {list(cfg[f'{other}_layers'])}. Import it "
                             f"with a model of {other.upper()} layers (e.g. --model <preset>_{other}, docs/hf.md)")
        if not theirs:
            raise ValueError(f"model.lm has {up} on layers {ours} but the HF config has none (no {variant}_layers): a "
                             f"plain Qwen3-MoE checkpoint. {start}, or import it into the dense model (docs/hf.md)")
        raise ValueError(f"HF config {variant}_layers={theirs} does not match the {up} layers of model.lm {ours} "
                         "(model.lm.attention_per_layer)")
    return bool(ours)


def check_hf_ksa(cfg: dict, lm: LMConfig, *, plain_ok: bool = False) -> None:
    """ValueError when the HF config's KSA (KSA_FIELDS) and model.lm's differ: which layers, the chunk, the summaries
    per chunk or the windows (each changes what the model computes). plain_ok: a config without KSA is accepted for
    a KSA model (its summary parameters keep their init)."""
    if not _check_variant_layers(
            cfg, lm, "ksa", KSA_FIELDS, plain_ok=plain_ok, what="KSA layers",
            use="use a KSA model (model.lm.attention=ksa, e.g. the keye_30b_a3b_ksa preset)",
            start="Start the KSA conversion from it with train.checkpoint.init_from (the summary parameters keep "
                  "their init)"):
        return
    for hf_name, lm_name in (("ksa_chunk", "chunk"), ("ksa_num_summary", "num_summary"), ("ksa_windows", "windows")):
        if cfg.get(hf_name) != getattr(lm.ksa, lm_name):
            raise ValueError(f"HF config {hf_name}={cfg.get(hf_name)!r} does not match model.lm.ksa.{lm_name}="
                             f"{getattr(lm.ksa, lm_name)!r}")


def check_hf_dsa(cfg: dict, lm: LMConfig, *, plain_ok: bool = False) -> None:
    """ValueError when the HF config's DSA indexers (DSA_FIELDS) and model.lm's differ in which layers have one
    or in their shape. A different top-k only warns: it shapes no weight (a model trained at one top-k can be run
    or trained on at another). plain_ok: a config without indexers is accepted for a DSA model (the indexers
    keep their init)."""
    if not _check_variant_layers(
            cfg, lm, "dsa", DSA_FIELDS, plain_ok=plain_ok, what="DSA indexers",
            use="use a DSA model (model.lm.attention=dsa, e.g. the keye_30b_a3b_dsa preset: model=keye_30b_a3b_dsa, "
                "or convert's --model keye_30b_a3b_dsa)",
            start="Start the DSA warm-up from it with train.checkpoint.init_from (the indexers keep their init)"):
        return
    for hf_name, lm_name in (("index_n_heads", "index_heads"), ("index_head_dim", "index_dim")):
        if cfg.get(hf_name) != getattr(lm.dsa, lm_name):
            raise ValueError(f"HF config {hf_name}={cfg.get(hf_name)!r} does not match model.lm.dsa.{lm_name}="
                             f"{getattr(lm.dsa, lm_name)!r}")
    if cfg.get("index_topk", lm.dsa.topk) != lm.dsa.topk:
        log.warning("HF config index_topk=%s, model.lm.dsa.topk=%s: the model selects %s keys per query (no weight "
                    "depends on it)", cfg["index_topk"], lm.dsa.topk, lm.dsa.topk)


def default_mrope_section(head_dim: int) -> list[int]:
    """(time, height, width) rotary pairs summing to head_dim / 2, split 1/4 : 3/8 : 3/8 as in Qwen3-VL
    ([16, 24, 24] at head_dim 128). Text positions use three equal rows, so the split does not matter there."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def lm_config_from_hf(cfg: dict, base: LMConfig | None = None) -> LMConfig:
    """model.lm for an HF config: the HF fields replace those of `base` (default LMConfig()); the rest of
    `base` (experts_impl, attention variant, loss chunking, ...) stays."""
    check_hf_architecture(cfg)
    base = base or LMConfig()
    values = {lm_name: _from_hf(_hf_value(cfg, hf_name), lm_name) for hf_name, (lm_name, _) in CONFIG_FIELDS.items()}
    values["max_position_embeddings"] = int(cfg.get("max_position_embeddings", base.max_position_embeddings))
    section = hf_mrope_section(cfg)
    if section is not None:
        if sum(section) * 2 != values["head_dim"]:
            raise ValueError(f"HF config mrope_section={section!r} sums to {sum(section)}, not head_dim / 2 = "
                             f"{values['head_dim'] // 2}")
        values["mrope_section"] = section
    elif sum(base.mrope_section) * 2 != values["head_dim"]:
        values["mrope_section"] = default_mrope_section(values["head_dim"])
    n = values["num_layers"]
    kinds = ["dense"] * n  # each layer's attention, from the variants' layer lists
    for variant in ("dsa", "ksa"):
        layers = cfg.get(f"{variant}_layers")
        if not layers:
            continue
        if any(not 0 <= l < n for l in layers):
            raise ValueError(f"HF config {variant}_layers={layers}: layers of a {n}-layer model are 0..{n - 1}")
        if variant == "dsa":  # the checkpoint's DSA indexers: their shape and top-k
            values["dsa"] = replace(base.dsa, index_heads=int(cfg["index_n_heads"]),
                                    index_dim=int(cfg["index_head_dim"]), topk=int(cfg.get("index_topk", base.dsa.topk)))
        else:  # its KSA layout and windows
            values["ksa"] = replace(base.ksa, chunk=int(cfg["ksa_chunk"]), num_summary=int(cfg["ksa_num_summary"]),
                                    windows=[int(w) for w in cfg["ksa_windows"]])
        for l in layers:
            kinds[l] = variant
    out = replace(base, **values)
    return out.with_layer_attention(kinds) if set(kinds) != {"dense"} else out


def _from_hf(v, lm_name: str):
    if lm_name == "untie_embeddings":
        return not v
    if lm_name in ("rope_theta", "norm_eps"):
        return float(v)
    if lm_name == "moe_norm_topk_prob":
        return bool(v)
    return int(v)


def hf_router_aux_loss_coef(lm: LMConfig) -> float:
    """transformers' `router_aux_loss_coef` that balances the experts as strongly as `model.lm.moe_aux_loss_coeff`
    did in training. Megatron adds coeff x E sum_e f_e P_e for every layer (f_e: the expert's share of the layer's
    k x T routed slots, P_e: its mean probability; 1.0 at a perfect balance); transformers adds
    coef x E sum_e F_e P_e once, with F_e and P_e pooled over all L layers' tokens and F_e the expert's slots per
    token (k times a share: k at a perfect balance). Where the layers route alike the two are equal, in value and
    in gradient, for coef = coeff x L / k; where they differ they are different functions of the routing and this
    factor matches their scale."""
    return lm.moe_aux_loss_coeff * lm.num_layers / lm.moe_topk


def hf_config_from_lm(lm: LMConfig, *, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for a Qwen3-MoE checkpoint of `lm` (readable by transformers 4.51+ and 5.x). With DSA or KSA
    layers it also holds their fields (hf_dsa_fields, hf_ksa_fields) and an `auto_map` naming the variant's modeling
    file (MODELING): with trust_remote_code transformers runs that model. Without it, transformers' Qwen3-MoE reads a
    DSA directory as the dense model (ignoring the indexers: the DSA model's own computation wherever every query's
    causal prefix fits in its top-k); a KSA directory it cannot read (the summary tensors)."""
    variant = _variant(lm)
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.hidden_size,
        # the width of a dense-MLP layer (mlp_only_layers), which no layer here has: unused. Qwen3-30B-A3B's and
        # Qwen3-235B-A22B's configs write expert FFN x top-k there (6144 = 768 x 8, 12288 = 1536 x 8), as this does
        "intermediate_size": lm.moe_ffn_hidden_size * lm.moe_topk,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_attention_heads,
        "num_key_value_heads": lm.num_query_groups,
        "head_dim": lm.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": lm.max_position_embeddings,
        "rms_norm_eps": lm.norm_eps,
        "rope_theta": lm.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta},
        "tie_word_embeddings": not lm.untie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_experts": lm.num_experts,
        "num_experts_per_tok": lm.moe_topk,
        "moe_intermediate_size": lm.moe_ffn_hidden_size,
        "norm_topk_prob": lm.moe_norm_topk_prob,
        "router_aux_loss_coef": hf_router_aux_loss_coef(lm),
        "output_router_logits": False,
        "initializer_range": lm.init_std,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **hf_dsa_fields(lm),
        **hf_ksa_fields(lm),
        **({"auto_map": auto_map(variant)} if variant else {}),
    }


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_hf_tensors(ckpt: HFCheckpoint, lm: LMConfig) -> None:
    """Every tensor the model needs is present with its shape, and no other tensor is there."""
    want = hf_tensor_shapes(lm)
    have = set(ckpt.names())
    extra = have - set(want)
    if not lm.untie_embeddings and "lm_head.weight" in extra:
        # some tied checkpoints still store the head; it must be the embedding
        if not torch.equal(ckpt.read("lm_head.weight"), ckpt.read("model.embed_tokens.weight")):
            raise ValueError(f"{ckpt.path}: tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embed_tokens.weight")
        extra.discard("lm_head.weight")
    missing = set(want) - have
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} tensor(s) the model has no place for: {_listing(extra)}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) the model needs are missing: {_listing(missing)}")
        raise ValueError(f"HF checkpoint {ckpt.path}: " + "; ".join(parts))
    wrong = [f"{n} has shape {list(ckpt.shape(n))}, the model needs {list(s)}" for n, s in want.items()
             if ckpt.shape(n) != s]
    if wrong:
        raise ValueError(f"HF checkpoint {ckpt.path}: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))


# ------------------------------------------------------------------------------------------ import
def _iter_sharded_tensors(sharded_sd):
    from models.init import _iter_sharded_tensors as it  # the walker the layout-invariant init uses

    return it(sharded_sd)


def _read_block(ckpt: HFCheckpoint, segments, offsets, shape, reads: set) -> torch.Tensor:
    """Rows [offsets[0], offsets[0] + shape[0]) (and the given ranges of the other dims) of the row-wise
    concatenation of `segments`, reading only those parts of the HF tensors."""
    r0, r1 = offsets[0], offsets[0] + shape[0]
    rest = tuple(slice(o, o + n) for o, n in zip(offsets[1:], shape[1:]))
    parts, pos = [], 0
    for seg in segments:
        a, b = max(r0, pos), min(r1, pos + seg.rows)
        if a < b:
            hf_rows = slice(seg.start + a - pos, seg.start + b - pos)
            parts.append(ckpt.read(seg.name, (hf_rows, *rest)))
            reads.add((seg.name, (hf_rows.start, hf_rows.stop), *((s.start, s.stop) for s in rest)))
        pos += seg.rows
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


# the model's own parameters of an attention variant: DSA's indexers, KSA's summary embedding and summary QKV
VARIANT_KEYS = {**{k: "dsa" for k in INDEXER_KEYS}, SUMMARY_EMBED: "ksa", SUMMARY_QKV: "ksa"}


@torch.no_grad()
def load_hf_into(model_chunks, hf_dir: str | os.PathLike, *, lm: LMConfig, group=None, keep_init: bool = False) -> dict:
    """Fills every parameter of the (unwrapped or DDP-wrapped) model chunks from a Qwen3-MoE HF checkpoint.

    Collective when torch.distributed is initialised: all ranks of `group` (default: all ranks) call it,
    and together they must have read every element of every HF tensor. Each rank reads only the slices its
    parameters hold. Raises ValueError on a config mismatch (naming the field), on an HF tensor the model
    has no place for or a missing one (naming them), and RuntimeError on a model tensor with no HF source.
    Returns counts: {"tensors": model tensors written, "elements": elements written, "hf_slices": reads}.
    keep_init: a plain Qwen3-MoE directory may fill a DSA or KSA model. Its attention variant's own parameters
    (VARIANT_KEYS: the indexers, the summary embedding and QKV), which such a directory lacks, keep their values,
    and their keys are returned under "kept". A variant the directory has is read as without keep_init. The routers'
    expert biases (model.lm.moe_expert_bias), which no Qwen3-MoE router has, start at zero (also under "kept").
    `hf_dir` may also be an open checkpoint (an HFCheckpoint, or a view with its interface such as
    models.hf.keye_vision.KeyeLMView: the language model of a multimodal checkpoint under Qwen3 names).
    """
    ckpt = hf_dir if hasattr(hf_dir, "read") and hasattr(hf_dir, "names") else HFCheckpoint(hf_dir)
    check_hf_config(ckpt.config, lm, plain_ok=keep_init)
    # the model the directory holds: model.lm with dense attention on the layers of a variant it lacks (keep_init),
    # whose own parameters are kept
    absent = {v for v in ("dsa", "ksa") if keep_init and lm.layers_with(v) and not ckpt.config.get(f"{v}_layers")}
    src_lm = lm.with_layer_attention(["dense" if kind in absent else kind for kind in lm.layer_attention()]) \
        if absent else lm
    check_hf_tensors(ckpt, src_lm)
    reads: set = set()
    unmapped: set[str] = set()
    kept: set[str] = set()
    written = elements = 0
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        covered: set[int] = set()
        for sh in _iter_sharded_tensors(module.sharded_state_dict()):
            if sh.flattened_range is not None:
                raise ValueError(f"{sh.key}: flattened shards cannot be loaded here")
            if VARIANT_KEYS.get(sh.key) in absent or sh.key == EXPERT_BIAS:
                if sh.key == EXPERT_BIAS:   # a Qwen3-MoE router has none: the bias starts at zero, routing as HF's
                    sh.data.zero_()
                kept.add(sh.key)
                covered.add(sh.data.untyped_storage().data_ptr())
                continue
            pre = sh.prepend_axis_num
            index = tuple(sh.global_offset[:pre])
            segments = megatron_to_hf(sh.key, index, src_lm)
            if segments is None:
                unmapped.add(sh.key)
                continue
            full = tuple(sh.global_shape[pre:])
            want = (sum(s.rows for s in segments), *ckpt.shape(segments[0].name)[1:])
            if full != want:
                raise ValueError(f"model tensor {sh.key}{list(index)} has shape {list(full)}, its HF source "
                                 f"{[s.name for s in segments][:3]} gives {list(want)}")
            block = _read_block(ckpt, segments, tuple(sh.global_offset[pre:]), tuple(sh.data.shape), reads)
            sh.data.copy_(block)
            covered.add(sh.data.untyped_storage().data_ptr())
            written += 1
            elements += sh.data.numel()
        unmapped |= {n for n, p in module.named_parameters() if p.untyped_storage().data_ptr() not in covered}
    # one verdict for all ranks (a parameter only one pipeline stage holds must not leave the others waiting)
    _check_coverage(reads, hf_tensor_shapes(src_lm), group, where=str(ckpt.path), unfilled=unmapped)
    out = {"tensors": written, "elements": elements, "hf_slices": len(reads)}
    return {**out, "kept": sorted(kept)} if keep_init else out


def _check_coverage(reads: set, shapes: dict, group, *, where: str, unfilled: set = frozenset()) -> None:
    """No model parameter was left unfilled on any rank, every element of every HF tensor was read by some
    rank, and no two distinct reads overlap. Collective over `group` when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (reads, unfilled), group=group)
        reads = set().union(*(r for r, _ in gathered))
        unfilled = set().union(*(u for _, u in gathered))
    if unfilled:
        raise RuntimeError(f"model parameters with no tensor in the HF checkpoint {where}: {_listing(unfilled)}")
    by_name = defaultdict(list)
    for name, *rect in reads:
        by_name[name].append(rect)
    unused = [n for n in shapes if n not in by_name]
    partial = []
    for name, rects in by_name.items():
        area = sum(math.prod(b - a for a, b in r) for r in rects)
        overlap = any(all(a1 < b2 and a2 < b1 for (a1, b1), (a2, b2) in zip(r, s))
                      for i, r in enumerate(rects) for s in rects[i + 1:])
        if overlap or area != math.prod(shapes[name]):
            partial.append(name)
    if unused or partial:
        raise RuntimeError(f"HF checkpoint {where}: tensors not used by the model: {_listing(unused)}; "
                           f"tensors only partly used: {_listing(partial)}")


# ------------------------------------------------------------------------------------------ export
def model_keys_in_checkpoint(checkpoint_dir: str | os.PathLike) -> dict:
    """The language-model tensors (key -> metadata ShardedTensor) of one of our dist_checkpointing
    checkpoints: not the optimizer's, and not the vision tower's (`vision.*` / `vision_optimizer.*`,
    train/vision.py; models/hf/keye_vision.py exports those)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    # optimizer keys: "optimizer.*", or "chained_{i}.optimizer.*" for megatron's chained (multi-group) optimizer
    return {k: v for k, v in meta.items()
            if not re.match(r"(chained_\d+\.)?optimizer\.|vision\.|vision_optimizer\.", k)}


def _plan_shards(plan_units: list[Unit], nbytes: dict[str, int], max_shard_bytes: int) -> list[list[Unit]]:
    shards, cur, size = [], [], 0
    for u in plan_units:
        b = sum(nbytes[n] for n in {s.name for s in u.segments})
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(u)
        size += b
    if cur:
        shards.append(cur)
    return shards


@torch.no_grad()
def export_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, lm: LMConfig,
              max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None,
              before_write: Callable[[], None] | None = None) -> dict:
    """Writes one of our checkpoints (a `step_*` directory) as a Qwen3-MoE HF checkpoint: config.json,
    safetensors files of at most `max_shard_bytes` each (plus model.safetensors.index.json when there are
    several). Tensors are loaded one output file at a time, so memory stays about one file's worth.

    Collective when torch.distributed is initialised (every rank loads, rank 0 writes). `dtype`: cast the
    weights (default: as stored). Raises on a checkpoint tensor with no HF name or of the wrong shape, before
    anything is written. `before_write`: called on rank 0 once the checkpoint is judged exportable, before the first
    file of `out_dir` is removed or written (launch/convert.py records the export there).
    Returns {"files": [...], "tensors": n, "bytes": total}.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    hf_cfg = hf_config_from_lm(lm, dtype=dtype or torch.float32)
    meta = model_keys_in_checkpoint(checkpoint_dir)
    plan = units(lm)
    # every stored tensor must have a place in the export of model.lm: a DSA checkpoint exported with a dense
    # model.lm would otherwise lose its indexers without a word
    planned = {u.key for u in plan}
    if EXPERT_BIAS in meta:
        # transformers' Qwen3-MoE routes by the top-k of the softmax alone: without the bias the exported model
        # would send tokens to other experts than the trained one, and an extra tensor would be dropped unread
        raise ValueError(f"checkpoint {checkpoint_dir} holds the routers' expert biases of model.lm.moe_expert_bias "
                         f"({EXPERT_BIAS}): a Qwen3-MoE router has no such bias, so the export would route "
                         f"differently from the trained model and is refused. Export a model trained without "
                         f"model.lm.moe_expert_bias")
    unknown = [k for k in meta if k not in planned]
    if unknown:
        kinds = sorted(set(lm.layer_attention()))
        raise ValueError(f"checkpoint {checkpoint_dir}: tensors with no counterpart in the Qwen3-MoE HF checkpoint of "
                         f"model.lm (attention {kinds}): {_listing(unknown)}"
                         + "".join(f": the checkpoint has {hint}; give the model it was trained with (e.g. --model "
                                   f"keye_30b_a3b_{v})" for v, hint in (("dsa", "DSA indexers"), ("ksa", "KSA layers"))
                                   if any(VARIANT_KEYS.get(k) == v for k in unknown)))
    shapes = hf_tensor_shapes(lm)
    assert {seg.name for u in plan for seg in u.segments} == set(shapes), "the unit table misses HF tensors"
    absent = planned - set(meta)
    if absent:
        raise ValueError(f"checkpoint {checkpoint_dir}: model tensors missing: {_listing(absent)}")
    def axes(u: Unit) -> tuple[int, ...]:  # sizes of the prepended (layer, expert) axes; a variant's own: its layers
        if u.key in VARIANT_LAYER_KEYS:
            return (len(lm.layers_with(VARIANT_LAYER_KEYS[u.key])),)
        return (lm.num_layers, lm.num_experts)[:len(u.index)]

    for u in plan:
        want = (*axes(u), sum(s.rows for s in u.segments), *shapes[u.segments[0].name][1:])
        if tuple(meta[u.key].global_shape) != want:
            raise ValueError(f"checkpoint tensor {u.key} has shape {list(meta[u.key].global_shape)}, "
                             f"model.lm gives {list(want)}")
    out_dtype = dtype or meta[EMBED].dtype
    hf_cfg["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    elem = torch.empty(0, dtype=out_dtype).element_size()
    nbytes = {n: math.prod(s) * elem for n, s in shapes.items()}
    shards = _plan_shards(plan, nbytes, max_shard_bytes)
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if rank0:  # an earlier export's files would mix with these (remove_earlier_save says how)
        if before_write is not None:
            before_write()
        removed = remove_earlier_save(out_dir, also=tuple(path.name for path, _ in MODELING.values()))
        if removed:
            log.warning("%s held an earlier save: removed its %s before writing", out_dir, ", ".join(removed))
    writer = HFShardWriter(out_dir, len(shards)) if rank0 else None
    produced: set[str] = set()
    for shard in shards:
        sd = {}
        for i, u in enumerate(shard):
            local = (sum(s.rows for s in u.segments), *shapes[u.segments[0].name][1:])
            offsets = [(axis, idx, axes(u)[axis]) for axis, idx in enumerate(u.index)]
            # the layer / expert axes as ordinary axes of size 1: torch's sharded-tensor path that a request
            # with prepended axes takes cannot load a subset of a tensor in a single process
            sd[f"u{i}"] = ShardedTensor.from_rank_offsets(
                u.key, torch.empty((1,) * len(u.index) + local, dtype=meta[u.key].dtype), *offsets, replica_id=0)
        # a subset of each stored tensor: the "every shard read exactly once" check does not apply
        loaded = dist_checkpointing.load(sd, str(checkpoint_dir), validate_access_integrity=False)
        tensors: dict[str, torch.Tensor] = {}
        filled: dict[str, int] = defaultdict(int)
        for i, u in enumerate(shard):
            t, pos = loaded[f"u{i}"].reshape(-1, *loaded[f"u{i}"].shape[len(u.index) + 1:]), 0
            for seg in u.segments:
                if seg.name not in tensors:
                    tensors[seg.name] = torch.empty(shapes[seg.name], dtype=out_dtype)
                tensors[seg.name][seg.start: seg.start + seg.rows] = t[pos: pos + seg.rows]
                filled[seg.name] += seg.rows
                pos += seg.rows
        short = [n for n, r in filled.items() if r != shapes[n][0]]
        assert not short, f"HF tensors assembled from the wrong number of rows: {short}"
        produced |= set(tensors)
        if writer is not None:
            writer.add_shard(tensors)
        del loaded, tensors
    assert produced == set(shapes), f"export produced no data for {_listing(set(shapes) - produced)}"
    if writer is not None:
        writer.finish()
        Path(out_dir, "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        variant = _variant(lm)  # the code that config.json's auto_map names
        if variant:
            write_modeling(out_dir, variant)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    files = [HFShardWriter.shard_name(i, len(shards)) for i in range(len(shards))]
    return {"files": files, "tensors": len(produced), "bytes": sum(nbytes[n] for n in produced)}

