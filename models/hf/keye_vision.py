"""Keye-VL checkpoints in the Hugging Face layout <-> this project's vision tower (models/vision).

Legend: h ViT width, C channels, p patch side, G position-grid side (image_size // patch_size), L ViT
layers, m merge side (2), H the language model's hidden size.

The public Keye-VL checkpoints (Kwai-Keye/Keye-VL-8B-Preview, Keye-VL-1.5-8B; modelling code
`modeling_keye.py` shipped with them and ported to transformers as `models/keye`) store the SigLIP
tower under `visual.vision_model.` and the 2x2 projector under `mlp_AR.`; the language model is under
`model.` / `lm_head.`. transformers' newer VLM layout renames them on load to `model.visual.`,
`model.mlp_AR.` and `model.language_model.` (its `_checkpoint_conversion_mapping`); both layouts
are read here, and export writes the one the released checkpoints use. See docs/hf.md for the
table and for where our modules differ:

    ours                                    HF (prefix V = visual.vision_model.)
    vit.patch_embed.weight [h, C*p*p]       V embeddings.patch_embedding.weight [h, C, p, p]  (reshape)
    vit.blocks.{i}.attn.qkv.{weight,bias}   V encoder.layers.{i}.self_attn.{q,k,v}_proj  (rows q | k | v)
    projector.{norm,fc1,fc2}                mlp_AR.{pre_norm,linear_1,linear_2}

Two groups of tensors in those checkpoints are not used by Keye's own forward (it calls the tower
with interpolate_pos_encoding=True and return_pooler_output=False), and our model has no place for
them: `embeddings.packing_position_embedding.weight` [32768, h] and the SigLIP attention-pooling
`head.*`. They are skipped by name (KNOWN_UNUSED) and logged; every other unmapped `visual.*` /
`mlp_AR.*` tensor is an error, as is a missing one or a wrong shape.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from models.hf.checkpoint_io import INDEX, SINGLE, HFCheckpoint, read_json

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ layouts


@dataclass(frozen=True)
class KeyeLayout:
    """Where the three parts of a Keye-VL checkpoint live. `vit`: the SigLIP transformer; `vit_root`: the
    whole vision module (its unused tensors are under it too); `projector`: mlp_AR; `lm`: the language
    model's `model.` part."""

    name: str
    vit_root: str
    vit: str
    projector: str
    lm: str


LEGACY = KeyeLayout("keye", "visual.", "visual.vision_model.", "mlp_AR.", "model.")
TRANSFORMERS = KeyeLayout("transformers", "model.visual.", "model.visual.vision_model.", "model.mlp_AR.",
                          "model.language_model.")
LAYOUTS = (LEGACY, TRANSFORMERS)

# Tensors of the public checkpoints that Keye's forward never reads (relative to `vit`), by pattern.
KNOWN_UNUSED = (r"embeddings\.packing_position_embedding\.weight", r"head\..+")

# Keye's projector LayerNorm has eps 1e-5 hard-coded (mlp_AR.pre_norm); our PatchMerger uses
# VisionConfig.projector_norm_eps, whose default is that value.
KEYE_PROJECTOR_EPS = 1e-5
KEYE_ROPE_THETA = 10000.0  # SigLIPRotaryEmbedding's default; not in the HF config


def detect_layout(names) -> KeyeLayout:
    """The layout whose vision prefix the checkpoint's tensor names use; ValueError when none does."""
    names = list(names)
    for lay in (TRANSFORMERS, LEGACY):  # `model.visual.` first: `visual.` is not its prefix, but be explicit
        if any(n.startswith(lay.vit) for n in names):
            return lay
    raise ValueError("no vision tensors in this checkpoint: expected names under "
                     f"{' or '.join(repr(l.vit) for l in LAYOUTS)} (a text-only checkpoint?)")


def is_multimodal(config: dict) -> bool:
    """A config.json with a vision_config: the directory holds a vision tower next to the LM."""
    return isinstance(config.get("vision_config"), dict)


def lm_hf_config(hf_dir: str | os.PathLike) -> dict:
    """config.json of a Hugging Face directory's language model: the file itself, or for a multimodal Keye-VL
    directory the LM part as KeyeLMView presents it (Qwen3-MoE fields, no vision_config). Opens no weights of a
    plain directory."""
    config = read_json(Path(hf_dir, "config.json"))
    return KeyeLMView(hf_dir).config if is_multimodal(config) else config


def lm_checkpoint(hf_dir: str | os.PathLike):
    """The language model of a Hugging Face directory, read as a Qwen3-MoE checkpoint (`names`, `read`, `config`,
    ...): the directory itself, or for a multimodal Keye-VL one its KeyeLMView."""
    config = read_json(Path(hf_dir, "config.json"))
    return KeyeLMView(hf_dir) if is_multimodal(config) else HFCheckpoint(hf_dir)


class KeyeLMView:
    """The language model of a Keye-VL checkpoint presented as a Qwen3-MoE checkpoint, so that the
    existing mapping (`qwen3_moe.load_hf_into`, `check_hf_config`) reads it unchanged: tensor names
    `model.language_model.X` (transformers layout) appear as `model.X`, `lm_head.*` stays, the vision and
    projector tensors are hidden; config.json loses vision_config, a nested text_config is lifted to the
    top level, and model_type reads qwen3_moe (the original is kept as `source_model_type`). The
    architecture checks still run on the LM fields: a dense-MLP Keye LM (Keye-VL-1.5's Qwen3-8B) is
    refused there. Same reading interface as HFCheckpoint (names, shape, dtype, read, config, path)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self._ck = HFCheckpoint(hf_dir)
        self.path = self._ck.path
        self.layout = detect_layout(self._ck.names())
        lm_prefix = self.layout.lm
        self._to_hf: dict[str, str] = {}
        for n in self._ck.names():
            if n.startswith((self.layout.vit_root, self.layout.projector)):
                continue
            if n.startswith(lm_prefix):
                self._to_hf["model." + n[len(lm_prefix):]] = n
            else:
                self._to_hf[n] = n  # lm_head.*, or anything else: the Qwen3 checks name it if unexpected
        cfg = {k: v for k, v in self._ck.config.items() if k not in ("vision_config", "text_config")}
        cfg.update(self._ck.config.get("text_config") or {})
        cfg["source_model_type"] = self._ck.config.get("model_type")
        cfg["model_type"] = "qwen3_moe"
        self.config = cfg

    def names(self) -> list[str]:
        return list(self._to_hf)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._ck.shape(self._to_hf[name])

    def dtype(self, name: str) -> str:
        return self._ck.dtype(self._to_hf[name])

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        return self._ck.read(self._to_hf[name], index)


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class VisionTensor:
    """Our parameter `ours` is the row-wise concatenation of the HF tensors `hf` (names relative to the
    layout's prefixes: 'V:' the ViT, 'P:' the projector), reshaped to `ours`'s shape."""

    ours: str
    hf: tuple[str, ...]


def vision_table(depth: int) -> list[VisionTensor]:
    """Every parameter of VisionModel (in named_parameters order) and its HF source(s)."""
    t = [VisionTensor("vit.patch_embed.weight", ("V:embeddings.patch_embedding.weight",)),
         VisionTensor("vit.patch_embed.bias", ("V:embeddings.patch_embedding.bias",)),
         VisionTensor("vit.pos_embed", ("V:embeddings.position_embedding.weight",))]
    for i in range(depth):
        o, h = f"vit.blocks.{i}.", f"V:encoder.layers.{i}."
        for wb in ("weight", "bias"):
            t.append(VisionTensor(f"{o}norm1.{wb}", (f"{h}layer_norm1.{wb}",)))
        for wb in ("weight", "bias"):
            t.append(VisionTensor(f"{o}attn.qkv.{wb}", tuple(f"{h}self_attn.{x}_proj.{wb}" for x in "qkv")))
        for wb in ("weight", "bias"):
            t.append(VisionTensor(f"{o}attn.proj.{wb}", (f"{h}self_attn.out_proj.{wb}",)))
        for wb in ("weight", "bias"):
            t.append(VisionTensor(f"{o}norm2.{wb}", (f"{h}layer_norm2.{wb}",)))
        for fc in ("fc1", "fc2"):
            for wb in ("weight", "bias"):
                t.append(VisionTensor(f"{o}mlp.{fc}.{wb}", (f"{h}mlp.{fc}.{wb}",)))
    for wb in ("weight", "bias"):
        t.append(VisionTensor(f"vit.post_norm.{wb}", (f"V:post_layernorm.{wb}",)))
    for ours, hf in (("norm", "pre_norm"), ("fc1", "linear_1"), ("fc2", "linear_2")):
        for wb in ("weight", "bias"):
            t.append(VisionTensor(f"projector.{ours}.{wb}", (f"P:{hf}.{wb}",)))
    return t


def _full(name: str, layout: KeyeLayout) -> str:
    kind, rel = name.split(":", 1)
    return (layout.vit if kind == "V" else layout.projector) + rel


def hf_vision_shapes(cfg, layout: KeyeLayout = LEGACY) -> dict[str, tuple[int, ...]]:
    """Every vision / projector tensor a Keye-VL HF checkpoint of VisionConfig `cfg` holds (the known-unused
    ones excepted), with its shape."""
    h, C, p, mlp, m2 = cfg.hidden, cfg.in_channels, cfg.patch, cfg.mlp, cfg.merge_tokens
    V, P = layout.vit, layout.projector
    out = {V + "embeddings.patch_embedding.weight": (h, C, p, p), V + "embeddings.patch_embedding.bias": (h,),
           V + "embeddings.position_embedding.weight": (cfg.pos_grid ** 2, h)}
    for i in range(cfg.depth):
        b = f"{V}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{b}{ln}.weight"] = out[f"{b}{ln}.bias"] = (h,)
        for x in ("q", "k", "v", "out"):
            out[f"{b}self_attn.{x}_proj.weight"], out[f"{b}self_attn.{x}_proj.bias"] = (h, h), (h,)
        out[f"{b}mlp.fc1.weight"], out[f"{b}mlp.fc1.bias"] = (mlp, h), (mlp,)
        out[f"{b}mlp.fc2.weight"], out[f"{b}mlp.fc2.bias"] = (h, mlp), (h,)
    out[V + "post_layernorm.weight"] = out[V + "post_layernorm.bias"] = (h,)
    out[P + "pre_norm.weight"] = out[P + "pre_norm.bias"] = (h,)
    out[P + "linear_1.weight"], out[P + "linear_1.bias"] = (m2 * h, m2 * h), (m2 * h,)
    out[P + "linear_2.weight"], out[P + "linear_2.bias"] = (cfg.lm_hidden, m2 * h), (cfg.lm_hidden,)
    return out


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _known_unused(name: str, layout: KeyeLayout, ignore) -> bool:
    rel = name[len(layout.vit):] if name.startswith(layout.vit) else None
    return rel is not None and any(re.fullmatch(pat, rel) for pat in ignore)


# ------------------------------------------------------------------------------------------ config
def _vision_hf_config(hf_config: dict) -> dict:
    vc = hf_config.get("vision_config")
    if not isinstance(vc, dict):
        raise ValueError("HF config has no vision_config (not a multimodal Keye-VL checkpoint)")
    return vc


def projector_width(hf_config: dict) -> int | None:
    """The language-model width a Keye-VL checkpoint's projector maps to (its LM's hidden_size), or None."""
    text = hf_config.get("text_config") or {}
    return text.get("hidden_size", hf_config.get("hidden_size"))


# HF vision_config field -> (our field, HF value -> our value, default when the HF config omits it)
VISION_FIELDS: dict[str, tuple[str, Callable, object]] = {
    "num_hidden_layers": ("depth", int, None),
    "hidden_size": ("hidden", int, None),
    "num_attention_heads": ("heads", int, None),
    "intermediate_size": ("mlp", int, None),
    "patch_size": ("patch", int, None),
    "num_channels": ("in_channels", int, 3),
    "spatial_merge_size": ("merge", int, 2),
    "layer_norm_eps": ("layer_norm_eps", float, 1e-6),
}


def _hf_pos_grid(vc: dict) -> int:
    image, patch = vc.get("image_size"), vc.get("patch_size")
    if image is None or patch is None:
        raise ValueError("HF vision_config needs image_size and patch_size (the position table is "
                         "(image_size // patch_size)^2 entries)")
    return int(image) // int(patch)


def check_vision_config(hf_config: dict, vision, *, lm_hidden: int | None = None, projector: bool = True) -> None:
    """ValueError naming the first field where the HF `vision_config` and our vision config disagree
    (projector=False: the ViT's fields only, not the projector's output width).

    `vision`: a models.vision.VisionConfig (its lm_hidden is checked against the HF hidden_size) or the
    recipe's models.config.VisionModelConfig (pass `lm_hidden` to check it; fields that node does not
    carry, in_channels and layer_norm_eps, are compared with VisionConfig's defaults). The position
    grid is `vision_config.image_size // patch_size`. Activation: Keye's ViT MLP must be tanh-GELU
    (gelu_pytorch_tanh), the only one our VisionMLP computes."""
    from models.vision.config import VisionConfig

    vc = _vision_hf_config(hf_config)
    node = "vision" if isinstance(vision, VisionConfig) else "model.vision"
    defaults = {f.name: f.default for f in fields(VisionConfig)}
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ValueError(f"HF vision_config.hidden_act={act!r} is not supported (our ViT MLP is tanh-GELU: "
                         "gelu_pytorch_tanh)")
    for hf_name, (ours, conv, default) in VISION_FIELDS.items():
        hf_v = vc.get(hf_name, default)
        if hf_v is None:
            raise ValueError(f"HF vision_config has no {hf_name!r}")
        our_v = getattr(vision, ours, defaults.get(ours))
        same = math.isclose(conv(hf_v), our_v, rel_tol=1e-9) if isinstance(our_v, float) else conv(hf_v) == our_v
        if not same:
            raise ValueError(f"HF vision_config.{hf_name}={hf_v!r} does not match {node}.{ours}={our_v!r}")
    theta = getattr(vision, "rope_theta", KEYE_ROPE_THETA)
    if not math.isclose(theta, KEYE_ROPE_THETA):
        raise ValueError(f"{node}.rope_theta={theta!r}: Keye's ViT RoPE uses theta {KEYE_ROPE_THETA:g} "
                         "(SigLIPRotaryEmbedding's default, not in the HF config)")
    grid = _hf_pos_grid(vc)
    if grid != vision.pos_grid:
        raise ValueError(f"HF vision_config.image_size={vc['image_size']!r} (// patch_size {vc['patch_size']} = "
                         f"{grid} positions per side) does not match {node}.pos_grid={vision.pos_grid!r}")
    want_lm = getattr(vision, "lm_hidden", lm_hidden)
    hf_lm = projector_width(hf_config)
    if projector and want_lm is not None and hf_lm is not None and int(hf_lm) != int(want_lm):
        raise ValueError(f"HF config hidden_size={hf_lm!r} (the projector's output width) does not match "
                         f"{node}.lm_hidden={want_lm!r}")


def vision_config_from_hf(hf_config: dict, **overrides):
    """models.vision.VisionConfig for an HF Keye-VL config (sizes from vision_config, lm_hidden from the
    top-level hidden_size); `overrides` replace fields (e.g. pixel_mean)."""
    from models.vision.config import VisionConfig

    vc = _vision_hf_config(hf_config)
    values = {}
    for hf_name, (ours, conv, default) in VISION_FIELDS.items():
        v = vc.get(hf_name, default)
        if v is None:
            raise ValueError(f"HF vision_config has no {hf_name!r}")
        values[ours] = conv(v)
    values["pos_grid"] = _hf_pos_grid(vc)
    hf_lm = projector_width(hf_config)
    if hf_lm is None:
        raise ValueError("HF config has no hidden_size (the projector's output width)")
    values["lm_hidden"] = int(hf_lm)
    values["rope_theta"] = KEYE_ROPE_THETA
    values.update(overrides)
    cfg = VisionConfig(**values)
    check_vision_config(hf_config, cfg)
    return cfg


def hf_vision_config(cfg, *, image_size: int | None = None) -> dict:
    """The `vision_config` block of a Keye-VL config.json for VisionConfig `cfg` (KeyeVisionConfig names)."""
    return {
        "hidden_size": cfg.hidden, "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads, "num_channels": cfg.in_channels, "patch_size": cfg.patch,
        "image_size": image_size or cfg.pos_grid * cfg.patch, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": cfg.layer_norm_eps, "attention_dropout": 0.0, "spatial_merge_size": cfg.merge,
    }


# ------------------------------------------------------------------------------------------ import
def check_vision_tensors(ckpt: HFCheckpoint, cfg, layout: KeyeLayout, *, ignore=KNOWN_UNUSED,
                         projector: bool = True) -> list[str]:
    """Every vision / projector tensor the model needs is present with its shape, and no other tensor is
    under the vision or projector prefixes except the known-unused ones; returns those skipped.
    projector=False: the ViT's tensors only (the projector's are neither needed nor checked)."""
    prefixes = (layout.vit_root, layout.projector) if projector else (layout.vit_root,)
    want = {n: s for n, s in hf_vision_shapes(cfg, layout).items() if n.startswith(prefixes)}
    ours = {n for n in ckpt.names() if n.startswith(prefixes)}
    skipped = sorted(n for n in ours - set(want) if _known_unused(n, layout, ignore))
    extra = ours - set(want) - set(skipped)
    missing = set(want) - ours
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} vision tensor(s) the model has no place for (unused): {_listing(extra)}")
        if missing:
            parts.append(f"{len(missing)} vision tensor(s) the model needs are missing: {_listing(missing)}")
        raise ValueError(f"HF checkpoint {ckpt.path}: " + "; ".join(parts))
    wrong = [f"{n} has shape {list(ckpt.shape(n))}, the model needs {list(s)}" for n, s in want.items()
             if ckpt.shape(n) != s]
    if wrong:
        raise ValueError(f"HF checkpoint {ckpt.path}: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    return skipped


@torch.no_grad()
def load_keye_vision_into(vision_model, hf_dir: str | os.PathLike, *, check_config: bool = True,
                          ignore=KNOWN_UNUSED, projector: bool = True) -> dict:
    """Fills every parameter of `vision_model` (a models.vision.VisionModel) from the vision tower and
    projector of a Keye-VL HF checkpoint (either layout), reading only those tensors, by name.
    projector=False fills the ViT only and leaves the projector as it is: a source whose projector feeds
    another language model (Keye-VL-1.5-8B's maps to 4096 dims, Qwen3-30B-A3B's hidden is 2048).

    Raises ValueError on a vision_config mismatch (naming the field; skip with check_config=False), on a
    `visual.*` / `mlp_AR.*` tensor with no place in the model or a missing one (naming them; the
    `ignore` patterns, relative to the ViT prefix, are skipped: KNOWN_UNUSED by default, () for strict),
    on a shape mismatch (both shapes), and RuntimeError on a model parameter the table does not fill.
    Values are cast to each parameter's dtype. Returns {"layout", "tensors", "elements", "skipped"}.
    """
    module = getattr(vision_model, "module", vision_model)
    cfg = module.cfg
    ckpt = HFCheckpoint(hf_dir)
    layout = detect_layout(ckpt.names())
    if check_config:
        check_vision_config(ckpt.config, cfg, projector=projector)
    skipped = check_vision_tensors(ckpt, cfg, layout, ignore=ignore, projector=projector)
    if skipped:
        log.info("%s: skipped %d tensor(s) Keye's forward does not use: %s", ckpt.path, len(skipped), _listing(skipped))
    if projector and not math.isclose(cfg.projector_norm_eps, KEYE_PROJECTOR_EPS):
        log.warning("Keye's projector LayerNorm (mlp_AR.pre_norm) has eps %g, this model's projector_norm_eps is %g: "
                    "embeddings differ by O(eps / var) relative", KEYE_PROJECTOR_EPS, cfg.projector_norm_eps)
    params = {n: p for n, p in module.named_parameters() if projector or not n.startswith("projector.")}
    filled, elements = set(), 0
    for vt in vision_table(cfg.depth):
        if vt.ours.startswith("projector.") and not projector:
            continue
        if vt.ours not in params:
            raise RuntimeError(f"the vision table names {vt.ours}, which the model does not have")
        p = params[vt.ours]
        parts = [ckpt.read(_full(n, layout)) for n in vt.hf]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if t.numel() != p.numel():
            raise ValueError(f"model parameter {vt.ours} has shape {list(p.shape)}, its HF source "
                             f"{[_full(n, layout) for n in vt.hf]} gives {list(t.shape)}")
        p.copy_(t.reshape(p.shape))  # reshape: only the patch embedding's [h, C, p, p] -> [h, C*p*p]
        filled.add(vt.ours)
        elements += p.numel()
    unfilled = set(params) - filled
    if unfilled:
        raise RuntimeError(f"vision model parameters with no tensor in the HF checkpoint {ckpt.path}: "
                           f"{_listing(unfilled)}")
    return {"layout": layout.name, "tensors": len(filled), "elements": elements, "skipped": skipped}


# ------------------------------------------------------------------------------------------ export
@torch.no_grad()
def export_keye_vision(vision_model, *, layout: KeyeLayout = LEGACY,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The HF tensors (name -> tensor, CPU, contiguous) of `vision_model`'s ViT and projector in `layout`
    (default: the released checkpoints' `visual.vision_model.` / `mlp_AR.`). The known-unused tensors
    (packing_position_embedding, the pooling head) are not written: Keye's forward does not read them."""
    module = getattr(vision_model, "module", vision_model)
    cfg = module.cfg
    params = dict(module.named_parameters())
    shapes = hf_vision_shapes(cfg, layout)
    out: dict[str, torch.Tensor] = {}
    for vt in vision_table(cfg.depth):
        t = params.pop(vt.ours).detach().cpu()
        if dtype is not None:
            t = t.to(dtype)
        names = [_full(n, layout) for n in vt.hf]
        if len(names) == 1:
            out[names[0]] = t.reshape(shapes[names[0]]).clone().contiguous()
        else:  # q | k | v rows of the fused qkv
            for name, piece in zip(names, t.split([shapes[n][0] for n in names], 0)):
                out[name] = piece.clone().contiguous()
    assert not params, f"vision parameters with no HF name: {_listing(params)}"
    assert set(out) == set(shapes), "the vision table and the HF shapes disagree"
    return out


def _read_index_or_single(out: Path) -> dict[str, str]:
    """weight_map of an HF directory written by export_hf / save_pretrained (single file: all in it)."""
    if (out / INDEX).is_file():
        return json.loads((out / INDEX).read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(out / SINGLE), framework="pt") as f:
        return {k: SINGLE for k in f.keys()}


VISION_FILE = "model-vision.safetensors"


def add_vision_to_hf_dir(out_dir: str | os.PathLike, vision_tensors: dict[str, torch.Tensor], vision_cfg, *,
                         max_shard_bytes: int = 5 * 2**30, image_size: int | None = None,
                         lm_fields: dict | None = None) -> dict:
    """Adds the vision tensors to an HF directory that already holds a language model (written by
    export_hf or save_pretrained): they go to `model-vision*.safetensors` files of at most
    `max_shard_bytes`, one `model.safetensors.index.json` then lists every tensor (LM and vision), and
    config.json gains `vision_config` and `lm_fields`, the top-level fields a multimodal model's config adds
    (the LM's 3D rotary split: qwen3_moe.hf_mrope_fields). The LM files are not rewritten. Returns {"files",
    "tensors"}."""
    out = Path(out_dir)
    weight_map = _read_index_or_single(out)
    clash = set(weight_map) & set(vision_tensors)
    if clash:
        raise ValueError(f"{out}: already holds vision tensors {_listing(clash)}")
    shards, cur, size = [], {}, 0
    for name, t in vision_tensors.items():
        b = t.numel() * t.element_size()
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += b
    if cur:
        shards.append(cur)
    from safetensors.torch import save_file

    files = []
    for i, shard in enumerate(shards):
        fname = VISION_FILE if len(shards) == 1 else f"model-vision-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = out / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / fname)
        weight_map.update({n: fname for n in shard})
        files.append(fname)
    total = 0
    for fname in sorted(set(weight_map.values())):
        from safetensors import safe_open

        with safe_open(str(out / fname), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                total += math.prod(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / INDEX)
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    config["vision_config"] = hf_vision_config(vision_cfg, image_size=image_size)
    config.update(lm_fields or {})
    cfg_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"files": files, "tensors": len(vision_tensors)}


_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def export_keye_vl(checkpoint_dir: str | os.PathLike, vision_model, out_dir: str | os.PathLike, *, lm,
                   max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> dict:
    """A combined export: the language model of one of our checkpoints through `export_hf` (Qwen3-MoE
    names under `model.` / `lm_head.`), then `vision_model`'s tower and projector under `visual.` /
    `mlp_AR.`, one index over all files, config.json = the Qwen3-MoE config + `vision_config` and the LM's 3D
    rotary split (`rope_scaling.mrope_section`)."""
    from models.hf.qwen3_moe import export_hf, hf_mrope_fields

    result = export_hf(checkpoint_dir, out_dir, lm=lm, max_shard_bytes=max_shard_bytes, dtype=dtype)
    module = getattr(vision_model, "module", vision_model)
    vis = add_vision_to_hf_dir(out_dir, export_keye_vision(module, dtype=dtype), module.cfg,
                               max_shard_bytes=max_shard_bytes, lm_fields=hf_mrope_fields(lm))
    return {"files": result["files"] + vis["files"], "tensors": result["tensors"] + vis["tensors"]}


# ------------------------------------------------------------------------------------------ tiny checkpoint
@torch.no_grad()
def save_tiny_keye_vl(path: str | os.PathLike, *, seed: int = 0, vision=None, with_unused: bool = True,
                      max_shard_size: str | None = None, dtype: torch.dtype = torch.float32, **lm_overrides) -> dict:
    """A tiny random Keye-VL-style multimodal checkpoint, for tests and for trying the converter: the LM by
    `save_tiny_qwen3_moe` (transformers' own writer), plus a random vision tower + projector
    (`vision`: a VisionConfig, default models.vision.tiny(LM hidden)) in the released checkpoints' names,
    with the known-unused packing_position_embedding and pooling head (`with_unused`) as the real
    checkpoints have them. Weights are drawn off the defaults (LayerNorm 1 + noise, biases nonzero) so a
    swapped tensor changes the embeddings. Returns {"lm": LM config dict, "vision": VisionConfig}."""
    from models.hf.tiny import save_tiny_qwen3_moe
    from models.vision import VisionModel
    from models.vision import tiny as tiny_vision

    lm_cfg = save_tiny_qwen3_moe(path, seed=seed, max_shard_size=max_shard_size, dtype=dtype, **lm_overrides)
    vcfg = vision or tiny_vision(lm_cfg["hidden_size"])
    if vcfg.lm_hidden != lm_cfg["hidden_size"]:
        raise ValueError(f"vision.lm_hidden={vcfg.lm_hidden} must equal the LM hidden_size {lm_cfg['hidden_size']}")
    g = torch.Generator().manual_seed(seed + 1)
    model = VisionModel(vcfg)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("pos_embed"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g) * (4.0 if p.dim() == 1 else 1.0))
    tensors = export_keye_vision(model, dtype=dtype)
    if with_unused:
        h, V = vcfg.hidden, LEGACY.vit
        unused = {V + "embeddings.packing_position_embedding.weight": (32768, h), V + "head.probe": (1, 1, h),
                  V + "head.attention.in_proj_weight": (3 * h, h), V + "head.attention.in_proj_bias": (3 * h,),
                  V + "head.attention.out_proj.weight": (h, h), V + "head.attention.out_proj.bias": (h,),
                  V + "head.layernorm.weight": (h,), V + "head.layernorm.bias": (h,),
                  V + "head.mlp.fc1.weight": (vcfg.mlp, h), V + "head.mlp.fc1.bias": (vcfg.mlp,),
                  V + "head.mlp.fc2.weight": (h, vcfg.mlp), V + "head.mlp.fc2.bias": (h,)}
        tensors.update({n: (0.02 * torch.randn(s, generator=g)).to(dtype) for n, s in unused.items()})
    shard = _parse_size(max_shard_size) if max_shard_size else 2**62
    add_vision_to_hf_dir(path, tensors, vcfg, max_shard_bytes=shard)
    return {"lm": lm_cfg, "vision": vcfg}


def _parse_size(text: str) -> int:
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(t)
