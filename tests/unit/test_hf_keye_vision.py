"""Keye-VL vision interop (models/hf/keye_vision.py) in one process: HF -> ours -> HF round trips in both
layouts, our VisionModel loaded from a tiny Keye-VL checkpoint against an independent transcription of
Keye's vision forward written from the HF tensors by name, loud failures (unmapped / unused / missing /
mis-shaped tensors, config fields), the combined LM + vision export and the import-vision command.

Tolerance: relative RMSE 1e-12 in float64 between VisionModel and the transcription below. They compute
the same function in different orders (Linear vs Conv2d patch embedding, fused qkv vs three GEMMs,
grouped SDPA vs an explicit softmax, merge-group vs row-major patch order), i.e. a few hundred float64
roundings (eps 2.2e-16); a swapped or mis-shaped tensor gives errors of order 1e-2 and more (tested).
Keye's projector LayerNorm eps (1e-5, hard-coded there) is our VisionConfig.projector_norm_eps default,
so the transcription with Keye's own eps is matched exactly; a different eps is detected (tested).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the tiny checkpoint's LM is written by transformers")
pytest.importorskip("safetensors", reason="HF interop needs safetensors")

from models.hf import keye_vision as kv  # noqa: E402
from models.hf.checkpoint_io import HFCheckpoint  # noqa: E402
from models.vision import VisionModel  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-12
# two frame sizes: the native 6x6 grid of the tiny preset (table used as is) and 4x8 (bilinear resize)
SIZES = [(6, 6), (4, 8), (4, 8)]


_CONVERT = []


def _convert_module():
    """launch/convert.py as a module, executed once (its import pulls in megatron: ~10-20 s on 2 busy cores)."""
    if not _CONVERT:
        spec = importlib.util.spec_from_file_location("convert_cli", REPO / "launch" / "convert.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _CONVERT.append(mod)
    return _CONVERT[0]


def _rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    assert ref.shape == got.shape, (ref.shape, got.shape)
    ref, got = ref.detach().double(), got.detach().double()
    return float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def _rewrite(src: Path, dst: Path, *, rename=None, add: dict | None = None, drop=()) -> Path:
    """A single-file copy of `src` with tensors renamed (a function of the name), added or dropped."""
    from safetensors.torch import save_file

    ck = HFCheckpoint(src)
    tensors = {(rename(n) if rename else n): ck.read(n) for n in ck.names() if n not in drop}
    tensors.update(add or {})
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _to_transformers_layout(name: str) -> str:
    """Released names -> transformers' newer layout (its _checkpoint_conversion_mapping for Keye)."""
    if name.startswith(("visual.", "mlp_AR.")):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("keye")
    info = kv.save_tiny_keye_vl(root / "keye", max_shard_size="60KB")
    _rewrite(root / "keye", root / "tf", rename=_to_transformers_layout)
    return {"root": root, "keye": root / "keye", "tf": root / "tf", "vision": info["vision"], "lm": info["lm"]}


def _loaded(hf, path=None, dtype=torch.float64) -> VisionModel:
    m = VisionModel(hf["vision"])
    kv.load_keye_vision_into(m, path or hf["keye"])
    return m.to(dtype)


# ------------------------------------------------------------------------------------------ reference
def _frames(sizes, cfg, seed=0):
    """Random normalised frames [C, rows*p, cols*p] (float64) and our merge-group-order pixel_values."""
    g = torch.Generator().manual_seed(seed)
    p, m, C = cfg.patch, cfg.merge, cfg.in_channels
    imgs, rows_out = [], []
    for r, c in sizes:
        img = torch.randn(C, r * p, c * p, generator=g, dtype=torch.float64)
        imgs.append(img)
        # [C, r/m, m, p, c/m, m, p] -> (merge row, merge col, row in group, col in group, C, ph, pw)
        x = img.view(C, r // m, m, p, c // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        rows_out.append(x.reshape(-1, C * p * p))
    grid = torch.tensor([[1, r, c] for r, c in sizes])
    return imgs, torch.cat(rows_out), grid


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w + b


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


@torch.no_grad()
def keye_reference(hf_dir: Path, imgs, *, projector_eps: float) -> torch.Tensor:
    """Keye-VL's vision forward (SiglipVisionTransformer with interpolate_pos_encoding=True, use_rope=True,
    then mlp_AR) transcribed from the HF tensors, by name, one frame at a time, in float64: Conv2d patch
    embedding on the image, the position table resized as [1, h, G, G], separate q/k/v projections, 2D
    rotate-half RoPE on (row, col) with theta 1e4, explicit softmax, tanh-GELU MLP, post LayerNorm, then
    pre_norm (eps `projector_eps`), row-major 2x2 groups "(h p1 w p2) d -> (h w) (p1 p2 d)", erf-GELU MLP."""
    ck = HFCheckpoint(hf_dir)
    cfg = ck.config["vision_config"]
    V, P = "visual.vision_model.", "mlp_AR."
    t = {n: ck.read(n).double() for n in ck.names() if n.startswith((V, P))}
    h, heads, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    p, m, eps = cfg["patch_size"], cfg["spatial_merge_size"], cfg["layer_norm_eps"]
    d = h // heads
    G = int(math.isqrt(t[V + "embeddings.position_embedding.weight"].shape[0]))
    outs = []
    for img in imgs:
        R, W = img.shape[1] // p, img.shape[2] // p
        n = R * W
        x = F.conv2d(img[None], t[V + "embeddings.patch_embedding.weight"], t[V + "embeddings.patch_embedding.bias"],
                     stride=p)[0].reshape(h, n).t()
        table = t[V + "embeddings.position_embedding.weight"].reshape(1, G, G, h).permute(0, 3, 1, 2)
        pos = F.interpolate(table, size=(R, W), mode="bilinear", align_corners=False)
        x = x + pos.permute(0, 2, 3, 1).reshape(n, h)
        inv = 1.0 / 10000.0 ** (torch.arange(0, d // 2, 2, dtype=torch.float64) / (d // 2))
        rr, cc = torch.arange(n) // W, torch.arange(n) % W
        ang = torch.cat([rr[:, None] * inv, cc[:, None] * inv], -1).repeat(1, 2)   # [n, d]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        for i in range(L):
            b = f"{V}encoder.layers.{i}."
            y = _ln(x, t[b + "layer_norm1.weight"], t[b + "layer_norm1.bias"], eps)
            q, k, v = (F.linear(y, t[f"{b}self_attn.{z}_proj.weight"], t[f"{b}self_attn.{z}_proj.bias"])
                       .view(n, heads, d) for z in "qkv")
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            s = torch.einsum("qhd,khd->hqk", q, k) * d ** -0.5
            a = torch.softmax(s, -1)
            o = torch.einsum("hqk,khd->qhd", a, v).reshape(n, h)
            x = x + F.linear(o, t[b + "self_attn.out_proj.weight"], t[b + "self_attn.out_proj.bias"])
            y = _ln(x, t[b + "layer_norm2.weight"], t[b + "layer_norm2.bias"], eps)
            y = F.linear(y, t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"])
            y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
            x = x + F.linear(y, t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"])
        x = _ln(x, t[V + "post_layernorm.weight"], t[V + "post_layernorm.bias"], eps)
        x = _ln(x, t[P + "pre_norm.weight"], t[P + "pre_norm.bias"], projector_eps)
        x = x.reshape(R // m, m, W // m, m, h).permute(0, 2, 1, 3, 4).reshape(-1, m * m * h)
        y = F.linear(x, t[P + "linear_1.weight"], t[P + "linear_1.bias"])
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        outs.append(F.linear(y, t[P + "linear_2.weight"], t[P + "linear_2.bias"]))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------ numerics
def test_embeddings_match_keye_transcription(hf):
    m = _loaded(hf)
    imgs, pv, grid = _frames(SIZES, m.cfg)
    ours = m(pv, grid)
    assert m.cfg.projector_norm_eps == kv.KEYE_PROJECTOR_EPS
    ref = keye_reference(hf["keye"], imgs, projector_eps=kv.KEYE_PROJECTOR_EPS)
    assert ours.shape == (sum(r * c for r, c in SIZES) // 4, hf["lm"]["hidden_size"])
    err = _rel(ref, ours)
    print(f"\nrelative RMSE vs Keye transcription (Keye's projector eps 1e-5): {err:.3g}")
    assert err <= TOL, err
    # the comparison resolves the eps: with 1e-6 the LayerNorm output scales by
    # sqrt((var + 1e-5) / (var + 1e-6)) ~ 1 + 4.5e-6 / var (var ~ 1 here), far above TOL
    other = _rel(keye_reference(hf["keye"], imgs, projector_eps=1e-6), ours)
    assert other > 1e3 * TOL, other


def test_swapped_mapping_is_caught(hf, monkeypatch):
    """The comparison has teeth: exchanging q_proj and k_proj in the table breaks the embeddings."""
    original = kv.vision_table

    def swapped(depth):
        return [replace(vt, hf=tuple(n.replace("q_proj", "@").replace("k_proj", "q_proj").replace("@", "k_proj")
                                     for n in vt.hf)) for vt in original(depth)]

    monkeypatch.setattr(kv, "vision_table", swapped)
    m = _loaded(hf)
    imgs, pv, grid = _frames(SIZES, m.cfg)
    err = _rel(keye_reference(hf["keye"], imgs, projector_eps=m.cfg.layer_norm_eps), m(pv, grid))
    assert err > 1e-3, err


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("src, layout", [("keye", kv.LEGACY), ("tf", kv.TRANSFORMERS)])
def test_round_trip_is_exact(hf, src, layout):
    m = VisionModel(hf["vision"])
    stats = kv.load_keye_vision_into(m, hf[src])
    assert stats["layout"] == layout.name and stats["elements"] == sum(p.numel() for p in m.parameters())
    assert len(stats["skipped"]) == 12  # packing_position_embedding + the 11 pooling-head tensors
    back = kv.export_keye_vision(m, layout=layout)
    ck = HFCheckpoint(hf[src])
    assert set(back) == set(kv.hf_vision_shapes(m.cfg, layout))
    for name, tensor in back.items():
        assert torch.equal(tensor, ck.read(name)), name
    # the two layouts load the same values
    other = VisionModel(hf["vision"])
    kv.load_keye_vision_into(other, hf["keye"])
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), other.parameters()))


def test_qkv_is_q_then_k_then_v_rows(hf):
    m = VisionModel(hf["vision"])
    kv.load_keye_vision_into(m, hf["keye"])
    ck, h = HFCheckpoint(hf["keye"]), m.cfg.hidden
    w = m.vit.blocks[1].attn.qkv.weight
    for i, z in enumerate("qkv"):
        name = f"visual.vision_model.encoder.layers.1.self_attn.{z}_proj.weight"
        assert torch.equal(w[i * h:(i + 1) * h], ck.read(name)), name
    conv = ck.read("visual.vision_model.embeddings.patch_embedding.weight")
    assert torch.equal(m.vit.patch_embed.weight, conv.reshape(h, -1))


# ------------------------------------------------------------------------------------------ failures
def test_unmapped_vision_tensor_is_named(hf, tmp_path):
    extra = "visual.vision_model.encoder.layers.0.self_attn.qk_norm.weight"
    path = _rewrite(hf["keye"], tmp_path / "x", add={extra: torch.ones(64)})
    with pytest.raises(ValueError, match=r"no place for \(unused\): "
                                         r"visual\.vision_model\.encoder\.layers\.0\.self_attn\.qk_norm\.weight"):
        kv.load_keye_vision_into(VisionModel(hf["vision"]), path)


def test_strict_mode_names_the_known_unused_tensors(hf):
    with pytest.raises(ValueError, match=r"packing_position_embedding\.weight"):
        kv.load_keye_vision_into(VisionModel(hf["vision"]), hf["keye"], ignore=())


def test_missing_vision_tensor_is_named(hf, tmp_path):
    gone = "mlp_AR.linear_2.bias"
    path = _rewrite(hf["keye"], tmp_path / "x", drop=(gone,))
    with pytest.raises(ValueError, match=r"missing: mlp_AR\.linear_2\.bias"):
        kv.load_keye_vision_into(VisionModel(hf["vision"]), path)


def test_wrong_shape_is_named(hf, tmp_path):
    name = "visual.vision_model.encoder.layers.1.self_attn.v_proj.weight"
    path = _rewrite(hf["keye"], tmp_path / "x", add={name: torch.zeros(64, 32)})
    with pytest.raises(ValueError, match=r"v_proj\.weight has shape \[64, 32\], the model needs \[64, 64\]"):
        kv.load_keye_vision_into(VisionModel(hf["vision"]), path)


def test_text_only_checkpoint_is_refused(hf, tmp_path):
    path = _rewrite(hf["keye"], tmp_path / "x", drop=[n for n in HFCheckpoint(hf["keye"]).names()
                                                       if n.startswith(("visual.", "mlp_AR."))])
    with pytest.raises(ValueError, match=r"no vision tensors"):
        kv.load_keye_vision_into(VisionModel(hf["vision"]), path, check_config=False)


@pytest.mark.parametrize("hf_field, value, ours", [
    ("hidden_size", 128, "hidden"), ("num_hidden_layers", 3, "depth"), ("num_attention_heads", 8, "heads"),
    ("intermediate_size", 256, "mlp"), ("patch_size", 16, "patch"), ("image_size", 112, "pos_grid"),
    ("spatial_merge_size", 4, "merge"), ("layer_norm_eps", 1e-5, "layer_norm_eps"),
])
def test_config_mismatch_names_the_field(hf, hf_field, value, ours):
    from models.config import VisionModelConfig

    config = json.loads((hf["keye"] / "config.json").read_text())
    kv.check_vision_config(config, hf["vision"])
    bad = {**config, "vision_config": {**config["vision_config"], hf_field: value}}
    with pytest.raises(ValueError, match=rf"vision_config\.{hf_field}=.*does not match vision\.{ours}="):
        kv.check_vision_config(bad, hf["vision"])
    node = VisionModelConfig(enabled=True, depth=2, hidden=64, heads=4, mlp=128, pos_grid=6)
    kv.check_vision_config(config, node, lm_hidden=64)
    if hasattr(node, ours):
        with pytest.raises(ValueError, match=rf"does not match model\.vision\.{ours}="):
            kv.check_vision_config(bad, node)


def test_config_lm_hidden_and_activation(hf):
    config = json.loads((hf["keye"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"hidden_size=96 .*vision\.lm_hidden=64"):
        kv.check_vision_config({**config, "hidden_size": 96}, hf["vision"])
    with pytest.raises(ValueError, match=r"vision_config\.hidden_act='gelu'"):
        kv.check_vision_config({**config, "vision_config": {**config["vision_config"], "hidden_act": "gelu"}},
                               hf["vision"])
    with pytest.raises(ValueError, match=r"vision\.rope_theta=100000\.0"):
        kv.check_vision_config(config, replace(hf["vision"], rope_theta=1e5))
    assert kv.vision_config_from_hf(config) == hf["vision"]


# ------------------------------------------------------------------------------------------ commands
def test_import_vision_command(hf, tmp_path):
    convert = _convert_module()
    out = tmp_path / "vision.pt"
    assert convert.main(["import-vision", str(hf["tf"]), str(out)]) == 0
    got = convert.load_vision_file(str(out))
    ref = VisionModel(hf["vision"])
    kv.load_keye_vision_into(ref, hf["keye"])
    assert got.cfg == ref.cfg
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    assert convert.main(["import-vision", str(hf["keye"]), str(tmp_path / "strict.pt"), "--strict"]) == 2


@pytest.fixture(scope="module")
def pgs():
    import torch.distributed as dist

    from models.config import LMConfig
    from parallel.groups import build_process_groups, init_distributed, seed_all
    from parallel.layout import ParallelConfig, ParallelLayout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(31000 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    init_distributed()
    groups = build_process_groups(ParallelLayout.build(ParallelConfig(), world_size=1, lm=LMConfig()))
    seed_all(0, groups)
    yield groups
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _assert_same_as_source(src: HFCheckpoint, back_dir: Path, files: list[str]) -> None:
    """Every tensor of the tiny Keye-VL checkpoint but the known-unused ones is in `back_dir`, bit-identical,
    listed in one index that names exactly the files written."""
    back = HFCheckpoint(back_dir)
    index = json.loads((back_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(back.names()) and set(files) == set(index["weight_map"].values())
    want = [n for n in src.names() if "packing_position_embedding" not in n and ".head." not in n]
    assert sorted(back.names()) == sorted(want)
    for n in want:
        assert torch.equal(back.read(n), src.read(n)), n
    assert back.config["vision_config"] == src.config["vision_config"]


@pytest.mark.parametrize("src", ["keye", "tf"])
def test_multimodal_import_then_export_is_exact(hf, pgs, tmp_path, src):
    """`import` of a multimodal directory (either layout): the LM through the Qwen3-MoE mapping (KeyeLMView),
    the vision tower as `vision.*` checkpoint tensors (the trainer's VisionTower keys); `export` of that
    checkpoint writes both back under the released names, one index, bit-identical."""
    convert = _convert_module()
    lm = convert.model_config(None, [], hf_dir=str(hf[src]))
    # --verify: the language model's logits against transformers' Qwen3-MoE on the directory's LM part (it refused a
    # multimodal directory, and `verify` stopped on the 55 vision tensors the LM has no place for); the transformers
    # layout's `model.language_model.*` names must be mapped, or transformers runs a random model (diff ~2)
    out = convert.import_hf(str(hf[src]), str(tmp_path / "ours"), lm=lm, verify=True)
    assert out["verify"]["ok"] and out["verify"]["argmax_agree"] == 1.0, out["verify"]
    assert convert.verify(str(hf[src]), lm=lm)["ok"]
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(out["checkpoint"]))
    want = {f"vision.{n}" for n, _ in VisionModel(hf["vision"]).named_parameters()}
    assert {k for k in meta if k.startswith("vision.")} == want
    result = convert.export(str(tmp_path / "ours"), str(tmp_path / "back"), max_shard_bytes=100_000)
    _assert_same_as_source(HFCheckpoint(hf["keye"]), tmp_path / "back", result["files"])
    with pytest.raises(ValueError, match="already holds a vision tower"):
        convert.export(str(tmp_path / "ours"), str(tmp_path / "again"), vision=str(tmp_path / "none.pt"))


def test_text_only_import_plus_vision_file_export(hf, pgs, tmp_path):
    """The other route: an LM-only checkpoint exported with --vision VISION.pt (from import-vision)."""
    from models.hf.qwen3_moe import lm_config_from_hf

    convert = _convert_module()
    src = HFCheckpoint(hf["keye"])
    vision_names = [n for n in src.names() if n.startswith(("visual.", "mlp_AR."))]
    text_only = _rewrite(hf["keye"], tmp_path / "lm", drop=vision_names)
    config = json.loads((text_only / "config.json").read_text())
    config.pop("vision_config")
    (text_only / "config.json").write_text(json.dumps(config))
    convert.import_hf(str(text_only), str(tmp_path / "ours"), lm=lm_config_from_hf(config))
    convert.import_vision(str(hf["keye"]), str(tmp_path / "vision.pt"))
    result = convert.export(str(tmp_path / "ours"), str(tmp_path / "back"), max_shard_bytes=100_000,
                            vision=str(tmp_path / "vision.pt"))
    _assert_same_as_source(src, tmp_path / "back", result["files"])
    m = VisionModel(hf["vision"])
    assert kv.load_keye_vision_into(m, tmp_path / "back")["skipped"] == []
    step_dir, _ = convert.resolve_checkpoint(tmp_path / "ours")  # the Python API route gives the same files
    api = kv.export_keye_vl(step_dir, m, tmp_path / "api", lm=lm_config_from_hf(config), max_shard_bytes=100_000)
    _assert_same_as_source(src, tmp_path / "api", api["files"])


def test_export_writes_the_3d_rotary_split_and_import_reads_it(hf, pgs, tmp_path):
    """A multimodal export's config.json held no 3D rotary split ("rope_scaling": null): a model trained with another
    split than its head_dim's default came back from `import` with the default, and Keye-VL's or Qwen2.5-VL's code
    would turn its frames' positions by theirs. The export writes it as Keye-VL's released configs do
    (`rope_scaling`: {"mrope_section", "rope_type": "default", "type": "default"}); the references are transformers'
    own config classes: Qwen2.5-VL's text config reads that split, Qwen3-MoE's keeps the run's rope_theta. `import`
    reads it back, and a model.lm with another split is refused, naming both."""
    from transformers import AutoConfig, Qwen2_5_VLConfig

    from models.hf.qwen3_moe import check_hf_config

    convert = _convert_module()
    lm = replace(convert.model_config(None, [], hf_dir=str(hf["keye"])), mrope_section=[4, 2, 2])
    assert lm.head_dim == 16   # whose default split is [2, 3, 3]
    convert.import_hf(str(hf["keye"]), str(tmp_path / "ours"), lm=lm)
    convert.export(str(tmp_path / "ours"), str(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "default", "type": "default", "mrope_section": [4, 2, 2]}
    text = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "vision_config")}
    assert Qwen2_5_VLConfig(**text).text_config.rope_parameters["mrope_section"] == [4, 2, 2]
    assert AutoConfig.from_pretrained(tmp_path / "back").rope_parameters["rope_theta"] == lm.rope_theta
    back = convert.model_config(None, [], hf_dir=str(tmp_path / "back"))
    assert back.mrope_section == [4, 2, 2] and back == lm
    with pytest.raises(ValueError, match=r"HF config mrope_section=\[4, 2, 2\] does not match "
                                         r"model\.lm\.mrope_section=\[2, 3, 3\]"):
        check_hf_config(kv.lm_hf_config(tmp_path / "back"), replace(lm, mrope_section=[2, 3, 3]))


def test_a_multimodal_export_names_the_tokens_of_its_frames(hf, pgs, tmp_path):
    """A multimodal export's config.json named none of the tokens its run wrote frames and images with, so code that
    reads Keye-VL's or Qwen2.5-VL's config (`image_token_id`, `video_token_id`, `vision_start_token_id`,
    `vision_end_token_id`) took Qwen's ids, 151652 to 151656, outside a smaller tokenizer's vocabulary. The export
    writes the ids of the tokenizer the run trained with (here the import's, copied beside its checkpoint). The
    reference: transformers' own tokenizer on the exported tokenizer.json, through transformers' Qwen2.5-VL config."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig

    from data.video.synthetic import make_synthetic_hf_tokenizer

    convert = _convert_module()
    src = tmp_path / "src"
    shutil.copytree(hf["keye"], src)
    make_synthetic_hf_tokenizer(src)
    convert.import_hf(str(src), str(tmp_path / "ours"), lm=convert.model_config(None, [], hf_dir=str(src)))
    convert.export(str(tmp_path / "ours"), str(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    tf = Qwen2_5_VLConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures",
                                                                          "vision_config")})
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "back" / "tokenizer.json"))
    want = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    assert max(want.values()) < config["vocab_size"] < 151652
    assert {name: getattr(tf, name) for name in want} == want
