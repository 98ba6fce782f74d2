"""Qwen3-MoE Hugging Face interop at TP1/EP1 in one process: config checks, the QKV interleaving, import
against transformers' logits, loud failures on extra / missing / unmapped tensors, and export round trips.
(The TP2/EP2 import, a training step and the re-import of its export are in tests/dist/test_hf_roundtrip.py.)"""

import importlib.util
import json
import os
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers", reason="HF interop tests need transformers (setup.py dev extra)")
pytest.importorskip("safetensors", reason="HF interop needs safetensors")

from models.config import LMConfig  # noqa: E402
from models.hf import qwen3_moe as q  # noqa: E402
from models.hf.checkpoint_io import HFCheckpoint  # noqa: E402
from models.hf.verify import compare_logits, fixed_input_ids, reference_logits  # noqa: E402
from tests.dist.test_hf_roundtrip import TINY_MODEL  # noqa: E402  (a recipe's model.lm for the tiny checkpoint)

REPO = Path(__file__).resolve().parents[2]


def _convert_module():
    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "launch" / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The tiny random checkpoint, saved as one file and as 50 KB shards, with transformers' logits."""
    from models.hf.tiny import save_tiny_qwen3_moe

    root = tmp_path_factory.mktemp("hf")
    save_tiny_qwen3_moe(root / "single")
    save_tiny_qwen3_moe(root / "sharded", max_shard_size="50KB")
    config = json.loads((root / "single" / "config.json").read_text())
    lm = q.lm_config_from_hf(config)
    ids = fixed_input_ids(lm.vocab_size)
    return {"root": root, "single": root / "single", "sharded": root / "sharded", "lm": lm, "ids": ids,
            "ref": reference_logits(root / "single", ids), "config": config}


@pytest.fixture(scope="module")
def pgs():
    from parallel.groups import build_process_groups, init_distributed, seed_all
    from parallel.layout import ParallelConfig, ParallelLayout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(30000 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    init_distributed()
    groups = build_process_groups(ParallelLayout.build(ParallelConfig(), world_size=1, lm=LMConfig()))
    seed_all(0, groups)
    yield groups
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _build(lm, pgs):
    from models.lm import build_lm, transformer_config
    from models.config import ModelParallelSizes

    return build_lm(lm, transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True),
                    pg_collection=pgs, pp_rank=0, pp_size=1)


def _copy_with(src: Path, dst: Path, *, add: dict | None = None, drop: tuple = ()) -> Path:
    """A single-file copy of checkpoint `src` with tensors added / removed."""
    from safetensors.torch import save_file

    ck = HFCheckpoint(src)
    tensors = {n: ck.read(n) for n in ck.names() if n not in drop}
    tensors.update(add or {})
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------ config
def test_hf_config_maps_to_lm_config_and_back(hf):
    lm = hf["lm"]
    assert (lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.num_query_groups, lm.head_dim) == (2, 64, 4, 2, 16)
    assert (lm.num_experts, lm.moe_topk, lm.moe_ffn_hidden_size, lm.vocab_size) == (8, 2, 32, 512)
    assert lm.rope_theta == 1.0e7 and lm.moe_norm_topk_prob and lm.untie_embeddings and lm.norm_eps == 1e-6
    assert sum(lm.mrope_section) * 2 == lm.head_dim
    assert q.lm_config_from_hf(q.hf_config_from_lm(lm)) == lm
    q.check_hf_config(hf["config"], lm)
    # transformers 4.x configs: num_experts and a top-level rope_theta
    legacy = {k: v for k, v in hf["config"].items() if k not in ("rope_parameters", "num_local_experts")}
    legacy.update(num_experts=8, rope_theta=1.0e7)
    q.check_hf_config(legacy, lm)
    assert q.default_mrope_section(128) == [16, 24, 24]


def test_a_keye_vl_config_gives_its_3d_rotary_split():
    """The 3D rotary split as the public configs hold it: Keye-VL-1.5's and Qwen2.5-VL's `rope_scaling`
    {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"} with a top-level rope_theta, transformers
    5's `rope_parameters`, and Qwen2-VL's first configs ({"type": "mrope", ...}, which were refused as scaled RoPE).
    Import took none of them (model.lm kept its preset's split, unchecked); it reads each, and refuses a split that
    does not fill head_dim / 2 or is not 3 counts, naming the field."""
    from omegaconf import OmegaConf

    lm = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig),
                                             OmegaConf.load(REPO / "recipes" / "model" / "keye_30b_a3b.yaml").lm))
    base = {k: v for k, v in q.hf_config_from_lm(lm).items() if k not in ("rope_scaling", "rope_parameters")}
    assert (base["intermediate_size"], base["moe_intermediate_size"]) == (6144, 768)   # Qwen3-30B-A3B's config.json
    keye = {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}   # Keye-VL-1.5-8B's
    for rope in ({"rope_scaling": {**keye, "mrope_section": [8, 28, 28]}, "rope_theta": 1.0e6},
                 {"rope_parameters": {"rope_type": "default", "rope_theta": 1.0e6, "mrope_section": [8, 28, 28]}},
                 {"rope_scaling": {"type": "mrope", "mrope_section": [8, 28, 28]}, "rope_theta": 1.0e6}):
        got = q.lm_config_from_hf({**base, **rope}, base=lm)
        assert (got.mrope_section, got.rope_theta) == ([8, 28, 28], 1.0e6), rope
    q.check_hf_config({**base, "rope_scaling": keye, "rope_theta": lm.rope_theta}, lm)   # the preset's own split
    with pytest.raises(ValueError, match=r"HF config mrope_section=\[8, 28, 28\] does not match model\.lm\."
                                         r"mrope_section=\[16, 24, 24\]"):
        q.check_hf_config({**base, "rope_scaling": {**keye, "mrope_section": [8, 28, 28]}}, lm)
    with pytest.raises(ValueError, match=r"mrope_section=\[16, 24, 16\] sums to 56, not head_dim / 2 = 64"):
        q.lm_config_from_hf({**base, "rope_scaling": {**keye, "mrope_section": [16, 24, 16]}})
    with pytest.raises(ValueError, match=r"HF config rope_parameters\.mrope_section=\[64\]: expected 3 counts"):
        q.lm_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "mrope_section": [64]}})


@pytest.mark.parametrize("hf_field, value, lm_field", [
    ("hidden_size", 128, "hidden_size"),
    ("num_key_value_heads", 4, "num_query_groups"),
    ("head_dim", 32, "head_dim"),
    ("num_local_experts", 16, "num_experts"),
    ("num_experts_per_tok", 4, "moe_topk"),
    ("moe_intermediate_size", 64, "moe_ffn_hidden_size"),
    ("vocab_size", 1024, "vocab_size"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1.0e6}, "rope_theta"),
    ("norm_topk_prob", False, "moe_norm_topk_prob"),
    ("tie_word_embeddings", True, "untie_embeddings"),
    ("rms_norm_eps", 1e-5, "norm_eps"),
])
def test_config_mismatch_names_the_field(hf, hf_field, value, lm_field):
    bad = {**hf["config"], hf_field: value}
    with pytest.raises(ValueError, match=rf"model\.lm\.{lm_field}="):
        q.check_hf_config(bad, hf["lm"])


def test_config_mismatch_names_every_field(hf):
    """A model of other sizes than the HF directory's (keye_tiny's LM against the tiny checkpoint) was refused on its
    first field alone ('HF config num_hidden_layers=2 does not match model.lm.num_layers=4'): a user relaunched
    once per field. Every field that differs is named, in one message."""
    lm = replace(hf["lm"], num_layers=4, hidden_size=128, num_attention_heads=8)
    with pytest.raises(ValueError, match=r"^HF config num_hidden_layers=2 does not match model\.lm\.num_layers=4; "
                                         r"HF config hidden_size=64 does not match model\.lm\.hidden_size=128; "
                                         r"HF config num_attention_heads=4 does not match "
                                         r"model\.lm\.num_attention_heads=8$"):
        q.check_hf_config(hf["config"], lm)


@pytest.mark.parametrize("field, value", [("attention_bias", True), ("mlp_only_layers", [1]), ("hidden_act", "gelu"),
                                          ("model_type", "keye_vl"), ("decoder_sparse_step", 2),
                                          ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e7})])
def test_unsupported_architectures_are_refused(hf, field, value):
    with pytest.raises(ValueError, match=field):
        q.check_hf_config({**hf["config"], field: value}, hf["lm"])


@pytest.mark.parametrize("layers,topk", [(4, 2), (48, 8)])  # keye_tiny's and keye_30b_a3b's routing
def test_exported_balancing_coefficient_acts_as_the_training_one(layers, topk):
    """transformers' load-balancing loss with the exported router_aux_loss_coef against the loss the routers trained
    with: megatron's switch loss per layer, coeff * E / (k T^2) * sum_e count_e * sum_t softmax_te (written out here,
    the formula tests/unit/test_moe_stats.py holds the routers to), summed over the layers. With every layer given
    the same router logits the two are the same function of them: value and gradient must agree, to 1e-6 relative
    (the gradient as a relative RMSE; transformers sums the probabilities and counts in fp32 whatever the
    logits' dtype: measured <= 7e-8). The coefficient copied as it was (0.001) made transformers' loss k / L
    of the training one (1/2 for the tiny model, 1/6 for the 30B)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    E, T = 16, 37
    lm = LMConfig(num_layers=layers, num_experts=E, moe_topk=topk, moe_aux_loss_coeff=1e-3)
    coef = q.hf_config_from_lm(lm)["router_aux_loss_coef"]
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(T, E, generator=g, dtype=torch.float64) * 2).requires_grad_()
    logits = [base] * layers

    def megatron_layer(x):
        p = x.softmax(-1)
        counts = torch.bincount(p.topk(topk, dim=-1).indices.flatten(), minlength=E).to(p.dtype)
        return lm.moe_aux_loss_coeff * E / (topk * T * T) * (counts * p.sum(0)).sum()

    ours = sum(megatron_layer(x) for x in logits)
    (d_ours,) = torch.autograd.grad(ours, base)
    hf = coef * load_balancing_loss_func(tuple(logits), E, topk)
    (d_hf,) = torch.autograd.grad(hf, base)
    assert float(hf) == pytest.approx(float(ours), rel=1e-6)
    from tests.kernels.helpers import assert_close

    assert_close("d_router_logits", d_ours, d_hf, 1e-6)


def test_qkv_rows_interleave_per_query_group():
    lm = LMConfig(num_attention_heads=4, num_query_groups=2, head_dim=16, hidden_size=64)
    segs = q.megatron_to_hf(q.QKV, (1,), lm)
    p = "model.layers.1.self_attn."
    # megatron: [q0 q1 k0 v0 | q2 q3 k1 v1], 16 rows per head
    assert [(s.name.removeprefix(p), s.start, s.rows) for s in segs] == [
        ("q_proj.weight", 0, 32), ("k_proj.weight", 0, 16), ("v_proj.weight", 0, 16),
        ("q_proj.weight", 32, 32), ("k_proj.weight", 16, 16), ("v_proj.weight", 16, 16)]
    fc1 = q.megatron_to_hf(q.FC1, (0, 5), lm)
    assert [s.name for s in fc1] == ["model.layers.0.mlp.experts.5.gate_proj.weight",
                                     "model.layers.0.mlp.experts.5.up_proj.weight"]
    # a KSA layer's summary projection splits the same way, into summary_{q,k,v}_proj; its index counts KSA layers
    ksa = replace(lm, num_layers=3, attention_per_layer=["dense", "ksa", "ksa"])
    summary = q.megatron_to_hf(q.SUMMARY_QKV, (0,), ksa)
    assert [(s.name, s.start, s.rows) for s in summary] == [
        (s.name.replace(p, p + "summary_"), s.start, s.rows) for s in segs]
    with pytest.raises(ValueError, match=r"model.lm has 0 KSA layer\(s\) \[\]"):
        q.megatron_to_hf(q.SUMMARY_QKV, (0,), lm)


# ------------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("experts_impl, layout", [("auto", "single"), ("sequential", "sharded")])
def test_import_matches_transformers_logits(hf, pgs, experts_impl, layout):
    from models.hf.verify import model_logits

    lm = replace(hf["lm"], experts_impl=experts_impl)
    model = _build(lm, pgs)
    stats = q.load_hf_into([model], hf[layout], lm=lm)
    assert stats["elements"] == sum(p.numel() for p in model.parameters())
    result = compare_logits(model_logits(model, hf["ids"], tp_group=pgs.tp), hf["ref"])
    print(f"\nTP1/EP1 {experts_impl} experts, {layout} checkpoint: {result}")
    assert result["ok"], result
    assert result["max_abs_ref"] > 1.0  # the random checkpoint gives logits of a useful size
    assert result["argmax_agree"] == 1.0


@pytest.mark.parametrize("swap", [("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
                                  ("input_layernorm.weight", "post_attention_layernorm.weight"),
                                  ("gate_proj.weight", "up_proj.weight")])
def test_logit_check_catches_a_wrong_mapping(hf, pgs, monkeypatch, swap):
    """The verification has teeth: exchanging two same-shaped tensors in the table breaks the logits."""
    from models.hf.verify import model_logits

    a, b = swap
    original = q.megatron_to_hf

    def swapped(key, index, lm):
        segs = original(key, index, lm)
        return None if segs is None else [
            replace(s, name=s.name.replace(a, "@").replace(b, a).replace("@", b)) for s in segs]

    monkeypatch.setattr(q, "megatron_to_hf", swapped)
    model = _build(hf["lm"], pgs)
    q.load_hf_into([model], hf["single"], lm=hf["lm"])
    result = compare_logits(model_logits(model, hf["ids"], tp_group=pgs.tp), hf["ref"])
    assert result["max_abs_diff"] > 100 * result["tolerance"], result


def test_sharded_and_single_file_import_identically(hf, pgs):
    a, b = _build(hf["lm"], pgs), _build(hf["lm"], pgs)
    q.load_hf_into([a], hf["single"], lm=hf["lm"])
    q.load_hf_into([b], hf["sharded"], lm=hf["lm"])
    assert len(list(HFCheckpoint(hf["sharded"]).path.glob("*.safetensors"))) > 5
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n


def test_unknown_tensor_is_named(hf, pgs, tmp_path):
    extra = "model.layers.0.mlp.shared_expert.gate_proj.weight"
    path = _copy_with(hf["single"], tmp_path / "extra", add={extra: torch.zeros(32, 64)})
    with pytest.raises(ValueError, match=r"no place for: model\.layers\.0\.mlp\.shared_expert\.gate_proj\.weight"):
        q.load_hf_into([_build(hf["lm"], pgs)], path, lm=hf["lm"])


def test_missing_expert_tensor_is_named(hf, pgs, tmp_path):
    gone = "model.layers.1.mlp.experts.5.up_proj.weight"
    path = _copy_with(hf["single"], tmp_path / "missing", drop=(gone,))
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        q.load_hf_into([_build(hf["lm"], pgs)], path, lm=hf["lm"])


def test_wrong_shape_is_named(hf, pgs, tmp_path):
    name = "model.layers.0.self_attn.k_norm.weight"
    path = _copy_with(hf["single"], tmp_path / "shape", add={name: torch.ones(8)})
    with pytest.raises(ValueError, match=r"k_norm\.weight has shape \[8\]"):
        q.load_hf_into([_build(hf["lm"], pgs)], path, lm=hf["lm"])


def test_damaged_files_of_a_directory_are_named(hf, pgs, tmp_path):
    """A shard cut short (a download or copy that stopped), a config.json or index that is not JSON (a hand edit),
    an index without its weight_map: a ValueError naming the file, which the CLI prints and the trainer's init_from
    reports, not a safetensors or JSON traceback."""
    cases = {
        "cut_short": lambda d: os.truncate(d / "model-00002-of-00005.safetensors",
                                           (d / "model-00002-of-00005.safetensors").stat().st_size // 2),
        "config": lambda d: (d / "config.json").write_text('{"model_type": "qwen3_moe",\n'),
        "index": lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
    }
    sharded = tmp_path / "sharded"
    from models.hf.tiny import save_tiny_qwen3_moe

    save_tiny_qwen3_moe(sharded, max_shard_size="200KB")
    expect = {"cut_short": r"model-00002-of-00005\.safetensors is not a readable safetensors file",
              "config": r"config\.json is not valid JSON", "index": r"model\.safetensors\.index\.json has no weight_map"}
    for name, damage in cases.items():
        d = tmp_path / name
        shutil.copytree(sharded, d)
        damage(d)
        with pytest.raises(ValueError, match=rf"{d}/{expect[name]}"):
            q.load_hf_into([_build(hf["lm"], pgs)], d, lm=hf["lm"])


def test_model_parameters_without_hf_source_are_named(hf, pgs, monkeypatch):
    real = q.megatron_to_hf  # a mapping that forgot the router: the parameter is named, not left at its init
    monkeypatch.setattr(q, "megatron_to_hf",
                        lambda key, index, lm: None if key.endswith("router.weight") else real(key, index, lm))
    with pytest.raises(RuntimeError, match=r"model parameters with no tensor in the HF checkpoint .*router\.weight"):
        q.load_hf_into([_build(hf["lm"], pgs)], hf["single"], lm=hf["lm"])


def test_coverage_check_names_unread_and_partly_read_tensors():
    shapes = {"a": (4, 2), "b": (3,), "c": (2, 2)}
    q._check_coverage({("a", (0, 4), (0, 2)), ("b", (0, 3))}, {"a": (4, 2), "b": (3,)}, None, where="x")
    with pytest.raises(RuntimeError, match=r"not used by the model: c; tensors only partly used: a"):
        q._check_coverage({("a", (0, 2), (0, 2)), ("b", (0, 3))}, shapes, None, where="x")


# ------------------------------------------------------------------------------------------ export
def test_import_save_export_round_trip_is_exact(hf, pgs, tmp_path):
    """HF -> our checkpoint (train.checkpoint's format) -> HF: every tensor bit-identical, files bounded,
    and transformers loads the export and gives the reference logits."""
    convert = _convert_module()
    out = convert.import_hf(str(hf["sharded"]), str(tmp_path / "ours"), lm=hf["lm"])
    assert (out["checkpoint"] / "COMPLETE.json").is_file()
    limit = 40_000
    result = convert.export(str(tmp_path / "ours"), str(tmp_path / "back"), max_shard_bytes=limit)
    src, back = HFCheckpoint(hf["single"]), HFCheckpoint(tmp_path / "back")
    assert sorted(back.names()) == sorted(src.names())
    for n in src.names():
        assert torch.equal(back.read(n), src.read(n)), n
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src.names()) and len(result["files"]) > 5
    for f in result["files"]:  # bounded, unless one tensor alone is larger (the 128 KB embedding / head)
        names = [n for n, g in index["weight_map"].items() if g == f]
        size = sum(back.read(n).numel() * 4 for n in names)
        assert size <= limit or len(names) == 1, (f, size)
    assert compare_logits(reference_logits(tmp_path / "back", hf["ids"]), hf["ref"])["max_abs_diff"] == 0.0
    assert not (tmp_path / "back" / q.MODELING["dsa"][0].name).exists()  # a dense model: no code of its own
    # a re-import of the export fills the model with exactly the same values
    a, b = _build(hf["lm"], pgs), _build(hf["lm"], pgs)
    q.load_hf_into([a], hf["single"], lm=hf["lm"])
    q.load_hf_into([b], tmp_path / "back", lm=hf["lm"])
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_experts"] == 8
    assert asdict(q.lm_config_from_hf(json.loads((tmp_path / "back" / "config.json").read_text()))) == asdict(hf["lm"])


def test_import_carries_the_tokenizer_and_the_launcher_holds_runs_to_it(hf, pgs, tmp_path):
    """A Hugging Face directory's tokenizer travels with its import, so the run that starts from the import
    tokenizes its video documents with it, and the launcher refuses byte ids there (train.launch.check_tokenizer)."""
    import shutil

    from data.video.synthetic import make_synthetic_hf_tokenizer
    from train.launch import compose_config, validate

    convert = _convert_module()
    src = tmp_path / "hf"
    shutil.copytree(hf["single"], src)
    make_synthetic_hf_tokenizer(src)
    # Qwen3's generation config: the ids generate() stops at (config.json as export writes it holds none)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 403, "eos_token_id": [406, 400],
                                                            "pad_token_id": 400, "temperature": 0.6}))
    convert.import_hf(str(src), str(tmp_path / "ours"), lm=hf["lm"])
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    start = ["recipe=keye_tiny", "parallel=single", f"train.checkpoint.init_from={tmp_path / 'ours'}"]
    with pytest.raises(ValueError, match=f"Set data.video.tokenizer={tmp_path / 'ours'}"):
        validate(compose_config(start))
    validate(compose_config(start + [f"data.video.tokenizer={tmp_path / 'ours'}"]))
    convert.import_hf(str(hf["single"]), str(tmp_path / "plain"), lm=hf["lm"])  # no tokenizer: nothing copied
    assert not (tmp_path / "plain" / "tokenizer.json").exists()
    # and back: the export carries the tokenizer the weights were trained with (it held none, so the HF directory a
    # user shipped could not be tokenized): an import's own, or a run's data.video.tokenizer
    convert.export(str(tmp_path / "ours"), str(tmp_path / "back"))
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes(), name
    from transformers import GenerationConfig
    assert GenerationConfig.from_pretrained(tmp_path / "back").eos_token_id == [406, 400]
    run = {"config": {"data": {"video": {"tokenizer": str(src)}}}}
    assert convert.trained_tokenizer(run, tmp_path / "run") == src
    assert convert.trained_tokenizer({"config": {"data": {"video": {"tokenizer": "bytes"}}}}, tmp_path / "run") is None
    convert.export(str(tmp_path / "plain"), str(tmp_path / "back_plain"))
    assert not (tmp_path / "back_plain" / "tokenizer.json").exists()


def test_a_relative_tokenizer_is_found_from_another_working_directory(tmp_path, monkeypatch):
    """A run launched in /x with data.video.tokenizer=runs/keye_init, exported from another directory, looked for the
    tokenizer there: the export warned that the directory held no tokenizer.json and wrote no vision token ids. It is
    now looked for from the launch's directory (recorded with the checkpoint), or, for a checkpoint without that
    record, the one its relative run_dir implies."""
    convert = _convert_module()
    launch = tmp_path / "x"
    (launch / "runs" / "keye_init").mkdir(parents=True)
    (launch / "runs" / "keye_init" / "tokenizer.json").write_text("{}")
    run_dir = launch / "runs" / "ft"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = {"data": {"video": {"tokenizer": "runs/keye_init"}}, "run_dir": "runs/ft"}
    want = launch / "runs" / "keye_init"
    assert convert.trained_tokenizer({"config": config, "launch_dir": str(launch)}, run_dir) == want
    assert convert.trained_tokenizer({"config": config}, run_dir) == want                 # from run_dir=runs/ft
    assert convert.trained_tokenizer({"config": {**config, "run_dir": "", "recipe_name": "ft"}}, run_dir) == want
    assert convert.trained_tokenizer({"config": {**config, "run_dir": str(run_dir)}}, run_dir) is None   # no clue
    monkeypatch.chdir(launch)
    assert convert.trained_tokenizer({"config": {**config, "run_dir": str(run_dir)}}, run_dir) == want    # from here


def test_tied_embeddings_import_and_export(hf, pgs, tmp_path):
    """tie_word_embeddings: no lm_head in the files; the output layer is the embedding."""
    from models.hf.tiny import save_tiny_qwen3_moe
    from models.hf.verify import model_logits

    save_tiny_qwen3_moe(tmp_path / "tied", tie_word_embeddings=True)
    lm = q.lm_config_from_hf(json.loads((tmp_path / "tied" / "config.json").read_text()))
    assert not lm.untie_embeddings and "lm_head.weight" not in q.hf_tensor_shapes(lm)
    model = _build(lm, pgs)
    q.load_hf_into([model], tmp_path / "tied", lm=lm)
    result = compare_logits(model_logits(model, hf["ids"], tp_group=pgs.tp), reference_logits(tmp_path / "tied", hf["ids"]))
    assert result["ok"], result
    convert = _convert_module()
    convert.import_hf(str(tmp_path / "tied"), str(tmp_path / "ours"), lm=lm)
    convert.export(str(tmp_path / "ours"), str(tmp_path / "back"))
    src, back = HFCheckpoint(tmp_path / "tied"), HFCheckpoint(tmp_path / "back")
    assert sorted(back.names()) == sorted(src.names())
    assert all(torch.equal(back.read(n), src.read(n)) for n in src.names())


def test_export_over_an_earlier_save_replaces_its_weight_files(hf, pgs, tmp_path, monkeypatch):
    """An export with --overwrite into a directory that holds another model's weights (save_pretrained's, at one file
    or in shards): what transformers and our importer read there is the new export. Left in place, an earlier
    single model.safetensors is what transformers loads beside new shards, and an earlier index is what we read
    beside a new single file. Other files stay; an export cut off part-way leaves no config.json behind."""
    from models.hf.checkpoint_io import HFShardWriter, is_hf_checkpoint
    from models.hf.tiny import save_tiny_qwen3_moe

    convert = _convert_module()
    convert.import_hf(str(hf["single"]), str(tmp_path / "ours"), lm=hf["lm"])
    src = HFCheckpoint(hf["single"])
    for earlier, ours in (({}, {"max_shard_bytes": 40_000}), ({"max_shard_size": "50KB"}, {})):
        out = tmp_path / f"out{len(ours)}"
        save_tiny_qwen3_moe(out, seed=1, **earlier)  # another model's weights
        (out / "tokenizer.json").write_text("{}")
        convert.export(str(tmp_path / "ours"), str(out), overwrite=True, **ours)
        back = HFCheckpoint(out)
        assert all(torch.equal(back.read(n), src.read(n)) for n in src.names())
        assert (out / "model.safetensors").is_file() != (out / "model.safetensors.index.json").is_file()
        assert (out / "tokenizer.json").is_file()
        # transformers reads the same weights: the source's logits, bit for bit (the same fp32 values, same code)
        assert compare_logits(reference_logits(out, hf["ids"]), hf["ref"])["max_abs_diff"] == 0.0
    real = HFShardWriter.add_shard
    calls = []

    def cut_off(self, tensors):  # the export dies while writing its second file
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, tensors)

    monkeypatch.setattr(HFShardWriter, "add_shard", cut_off)
    with pytest.raises(KeyboardInterrupt):
        convert.export(str(tmp_path / "ours"), str(tmp_path / "out1"), max_shard_bytes=40_000)
    assert not is_hf_checkpoint(tmp_path / "out1") and not (tmp_path / "out1" / "config.json").exists()


def test_export_refuses_to_delete_weights_no_earlier_export_wrote(hf, pgs, tmp_path, monkeypatch, capsys):
    """An export removes its output directory's config.json and weight files first. Into the Hugging Face directory a
    run was imported from (or any directory whose weights no export there wrote) it is refused, exit 2 before any
    process group, naming the files, and they stay byte for byte; --overwrite replaces them. An earlier export's
    files (its keye_export.json says so) are replaced without it, also when that export was cut off part-way, but
    not once a weight file was written again by someone else. Before, every such directory was emptied silently."""
    from models.hf.checkpoint_io import HFShardWriter
    from models.hf.tiny import save_tiny_qwen3_moe

    convert = _convert_module()
    convert.import_hf(str(hf["single"]), str(tmp_path / "ours"), lm=hf["lm"])
    origin = tmp_path / "origin"   # the HF directory the run came from
    save_tiny_qwen3_moe(origin, seed=1)
    before = {p.name: p.read_bytes() for p in origin.iterdir()}
    assert convert.main(["export", str(tmp_path / "ours"), str(origin)]) == 2
    err = capsys.readouterr().err
    assert (f"convert export: {origin} holds config.json, model.safetensors, which no earlier export into it wrote "
            "(no keye_export.json there") in err and "or --overwrite to replace them" in err, err
    with pytest.raises(ValueError, match="holds config.json, model.safetensors, which no earlier export"):
        convert.export(str(tmp_path / "ours"), str(origin))
    assert {p.name: p.read_bytes() for p in origin.iterdir()} == before
    src = HFCheckpoint(hf["single"])
    convert.export(str(tmp_path / "ours"), str(origin), overwrite=True)
    assert all(torch.equal(HFCheckpoint(origin).read(n), src.read(n)) for n in src.names())
    # our own export's directory: exported again (another shard size) without --overwrite
    out = tmp_path / "out"
    convert.export(str(tmp_path / "ours"), str(out))
    convert.export(str(tmp_path / "ours"), str(out), max_shard_bytes=40_000)
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    # cut off while writing its second file: the rerun replaces what it left
    real, calls = HFShardWriter.add_shard, []

    def cut_off(self, tensors):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, tensors)

    with monkeypatch.context() as m:
        m.setattr(HFShardWriter, "add_shard", cut_off)
        with pytest.raises(KeyboardInterrupt):
            convert.export(str(tmp_path / "ours"), str(out), max_shard_bytes=30_000)
    convert.export(str(tmp_path / "ours"), str(out))
    assert all(torch.equal(HFCheckpoint(out).read(n), src.read(n)) for n in src.names())
    # a weight file written there since by something else (its size or time differs from the record): refused
    save_tiny_qwen3_moe(out, seed=2)
    with pytest.raises(ValueError, match=r"holds model.safetensors, which no earlier export into it wrote \(changed "
                                          r"since the export that keye_export.json records\)"):
        convert.export(str(tmp_path / "ours"), str(out))


def test_an_import_into_the_other_sparse_attention_names_both():
    """A DSA export imported with a KSA model was refused as `model.lm has none (attention=dense)`, and the other
    way round the KSA export was called `a plain Qwen3-MoE checkpoint`, whose DSA warm-up it was told to start."""
    from models.hf.qwen3_moe import check_hf_dsa, check_hf_ksa, hf_config_from_lm

    convert = _convert_module()
    dsa, ksa = convert.model_config("keye_tiny_dsa", []), convert.model_config("keye_tiny_ksa", [])
    with pytest.raises(ValueError, match=r"the checkpoint has DSA .*, model.lm has none \(attention=ksa\)"):
        check_hf_dsa(hf_config_from_lm(dsa), ksa)
    with pytest.raises(ValueError, match=r"but the HF config has none \(no ksa_layers\): a checkpoint with DSA on "
                                         r"layers \[.*\]\. Import it with a model of DSA layers"):
        check_hf_ksa(hf_config_from_lm(dsa), ksa)
    with pytest.raises(ValueError, match=r"\(no dsa_layers\): a checkpoint with KSA on layers"):
        check_hf_dsa(hf_config_from_lm(ksa), dsa)


def test_a_refused_export_leaves_the_output_directory_as_it_was(hf, pgs, tmp_path):
    """A refused export (here a model with a layer more than the checkpoint; an expert-bias checkpoint, a DSA one
    as dense) wrote its record (keye_export.json, 'complete': false) before the checkpoint was judged: it replaced an
    earlier export's record, left a directory holding that record alone, and an export into that directory later
    took a Hugging Face checkpoint copied there for its own and removed its weights without --overwrite."""
    from dataclasses import replace

    from models.hf.tiny import save_tiny_qwen3_moe

    convert = _convert_module()
    convert.import_hf(str(hf["single"]), str(tmp_path / "ours"), lm=hf["lm"])
    wrong = replace(hf["lm"], num_layers=hf["lm"].num_layers + 1)
    out = tmp_path / "out"
    convert.export(str(tmp_path / "ours"), str(out))
    record = (out / "keye_export.json").read_text()
    with pytest.raises(ValueError, match=r"has shape \[2, 64\], model.lm gives \[3, 64\]"):
        convert.export(str(tmp_path / "ours"), str(out), lm=wrong)
    assert (out / "keye_export.json").read_text() == record
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=r"has shape \[2, 64\], model.lm gives \[3, 64\]"):
        convert.export(str(tmp_path / "ours"), str(fresh), lm=wrong)
    assert not fresh.exists()
    save_tiny_qwen3_moe(fresh, seed=1)                     # a Hugging Face checkpoint put there since
    with pytest.raises(ValueError, match="which no earlier export into it wrote"):
        convert.export(str(tmp_path / "ours"), str(fresh))


@pytest.mark.parametrize("where", ["start", "end"])
def test_an_export_record_tells_a_same_size_rewrite_in_the_same_tick(tmp_path, where):
    """keye_export.json compared each weight file's size and modification time: a rewrite of the same size within
    one tick of a coarse clock (here the time set back to the recorded one, as such a clock, or a copy keeping its
    source's time, leaves it) passed as the export's own, and the next export deleted it. The record's hash of the
    file's first and last MiB tells it; the export's own files, untouched, still pass, and so do those an older
    record lists by size and time alone."""
    import json
    import os

    convert = _convert_module()
    out = tmp_path / "out"
    out.mkdir()
    weights = out / "model-00001-of-00001.safetensors"
    size = 3 * (1 << 20) + 123   # a first MiB, a middle and a last MiB
    weights.write_bytes(os.urandom(size))
    (out / "config.json").write_text("{}")
    convert._record_export(out, tmp_path / "ckpt", complete=True)
    convert.check_export_dir(out)                                   # the export's own: passes
    recorded = weights.stat().st_mtime_ns
    data = bytearray(weights.read_bytes())
    at = 10 if where == "start" else size - 10
    data[at] ^= 0xFF                                                # other weights, the same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(recorded, recorded))                      # ... written in the same tick
    with pytest.raises(ValueError, match=r"holds model-00001-of-00001.safetensors, which no earlier export into it "
                                         r"wrote \(changed since the export that keye_export.json records\)"):
        convert.check_export_dir(out)
    record = json.loads((out / "keye_export.json").read_text())     # an older record: size and time alone
    record["files"] = {name: mark[:2] for name, mark in record["files"].items()}
    (out / "keye_export.json").write_text(json.dumps(record))
    convert.check_export_dir(out)


def test_export_takes_a_checkpoint_whose_files_verify(hf, pgs, tmp_path):
    """Export (and verify --checkpoint) check a checkpoint's files against the CRC32s recorded at save time, as a
    resume does: a run directory whose newest checkpoint has a damaged shard exports the next older one, a damaged
    step directory named on its own is refused naming the file, and a run directory with no sound one too. Read
    as it was, a flipped byte in a shard went into the export as a wrong weight (1e37 for a flip in an exponent)."""
    from train import checkpoint as ckpt

    convert = _convert_module()
    run = tmp_path / "run"
    convert.import_hf(str(hf["single"]), str(run), lm=hf["lm"])
    ckpt.CHECKSUMS.wait()  # the save's background checksum records
    good, newer = run / "checkpoints" / "step_000000", run / "checkpoints" / "step_000005"
    shutil.copytree(good, newer)  # a newer checkpoint, then damaged on disk (same size, other bytes)
    shard = max(newer.glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    for off in range(len(data) // 10, len(data) - 64, len(data) // 10):
        data[off: off + 64] = bytes(b ^ 0x40 for b in data[off: off + 64])
    shard.write_bytes(bytes(data))
    convert.export(str(run), str(tmp_path / "back"))
    src, back = HFCheckpoint(hf["single"]), HFCheckpoint(tmp_path / "back")
    assert all(torch.equal(back.read(n), src.read(n)) for n in src.names())
    with pytest.raises(ValueError, match=rf"checkpoint {newer} is damaged: {shard}: CRC32 differs"):
        convert.export(str(newer), str(tmp_path / "bad"))
    shutil.rmtree(good)
    with pytest.raises(ValueError, match=rf"{run} holds no complete checkpoint whose files verify: step_000005: "):
        convert.export(str(run), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_import_refuses_a_run_directory_holding_later_checkpoints(hf, pgs, tmp_path):
    """An import writes step 0. Into a run directory that holds a later checkpoint, the run that names it in
    train.checkpoint.init_from (as the import's own message says) would take that checkpoint, not the import:
    refused, naming it, and nothing is written. An earlier import there is replaced."""
    from models.hf.tiny import save_tiny_qwen3_moe
    from train import checkpoint as ckpt

    convert = _convert_module()
    out = tmp_path / "ours"
    save_tiny_qwen3_moe(tmp_path / "other", seed=1)
    convert.import_hf(str(tmp_path / "other"), str(out), lm=hf["lm"])
    convert.import_hf(str(hf["single"]), str(out), lm=hf["lm"])  # a second import replaces the first
    convert.export(str(out), str(tmp_path / "back"))
    src, back = HFCheckpoint(hf["single"]), HFCheckpoint(tmp_path / "back")
    assert all(torch.equal(back.read(n), src.read(n)) for n in src.names())
    run = tmp_path / "run"  # a run's directory: a checkpoint of step 8
    shutil.copytree(out / "checkpoints" / "step_000000", run / "checkpoints" / "step_000008")
    with pytest.raises(ValueError, match=r"holds checkpoints of a run \(step_000008\): an import there writes step 0"):
        convert.import_hf(str(hf["single"]), str(run), lm=hf["lm"])
    assert [r.step for r in ckpt.complete_checkpoints(run)] == [8]


def test_verify_a_bf16_export_against_its_fp32_checkpoint(hf, pgs, tmp_path):
    """`verify --checkpoint` of an export written with --dtype bf16 (the docs' own example) compares our model with
    the checkpoint's weights rounded to bf16, the ones the files hold: the fp32 tolerance (summation order only,
    models/hf/verify.py) then holds. Unrounded, the bf16 rounding alone gave 0.016 here (0.04 on a trained tiny run),
    about a hundred times that tolerance, and exit 1 for a correct export."""
    convert = _convert_module()
    convert.import_hf(str(hf["single"]), str(tmp_path / "ours"), lm=hf["lm"])
    convert.export(str(tmp_path / "ours"), str(tmp_path / "bf16"), dtype="bf16")
    assert HFCheckpoint(tmp_path / "bf16").dtype("model.embed_tokens.weight") == "BF16"
    result = convert.verify(str(tmp_path / "bf16"), lm=hf["lm"], checkpoint=str(tmp_path / "ours"))
    assert result["ok"], result


def test_import_verify_of_bf16_files(hf, pgs, tmp_path):
    """`import --verify` of a bf16 directory (as Qwen3 releases are, and the docs' first command imports one): the
    comparison runs our model in fp32 on the files' weights, as transformers runs them, so the fp32 tolerance holds;
    the checkpoint keeps the files' bf16, and exports back bit-identically. Computed in bf16, our logits were 0.086
    from transformers' fp32 ones here (tolerance 1.9e-4): the import stopped with a traceback and wrote nothing."""
    from models.hf.tiny import save_tiny_qwen3_moe

    save_tiny_qwen3_moe(tmp_path / "bf16", dtype=torch.bfloat16)
    convert = _convert_module()
    result = convert.import_hf(str(tmp_path / "bf16"), str(tmp_path / "ours"), lm=hf["lm"], verify=True)
    assert result["verify"]["ok"], result["verify"]
    convert.export(str(tmp_path / "ours"), str(tmp_path / "back"))
    src, back = HFCheckpoint(tmp_path / "bf16"), HFCheckpoint(tmp_path / "back")
    assert back.dtype("model.embed_tokens.weight") == "BF16"
    assert sorted(back.names()) == sorted(src.names()) and all(torch.equal(back.read(n), src.read(n)) for n in src.names())


# ------------------------------------------------------------------------------------------ DSA
def _dsa_lm(lm, layers, *, topk=32):
    from models.config import DSAConfig

    return replace(lm, dsa=DSAConfig(index_heads=4, index_dim=8, topk=topk)).with_layer_attention(
        ["dsa" if l in layers else "dense" for l in range(lm.num_layers)])


def _with_indexers(src: Path, dst: Path, layers) -> Path:
    """A copy of the tiny checkpoint with random DSA indexers (4 heads x 8 dims, top-32) on `layers`."""
    from models.hf.tiny import add_tiny_dsa_indexers

    shutil.copytree(src, dst)
    add_tiny_dsa_indexers(dst, layers, topk=32)
    return dst


def test_verify_compares_where_the_sparse_layers_leave_keys_out(hf, pgs, tmp_path):
    """`verify` compared at 32 tokens unless told, where a top-32 indexer selects every key and KSA windows of 4 chunks
    of 8 hold every token: the sparse code of both sides went unchecked. Its default now reaches past each sparse
    layer's top-k or widest window. Reference: an export whose indexers are not the checkpoint's (another seed), which
    verify passes at 32 tokens and fails at its default length."""
    from models.hf.tiny import add_tiny_dsa_indexers

    convert = _convert_module()
    assert convert.verify_seq(hf["config"]) == 32
    assert convert.verify_seq({"dsa_layers": [1], "index_topk": 32}) == 48
    assert convert.verify_seq({"dsa_layers": [0], "index_topk": 2048}, tp=4) == 2064
    assert convert.verify_seq({"ksa_layers": [0], "ksa_chunk": 8, "ksa_windows": [4, 4, 4, 64]}, tp=3) == 528
    assert convert.verify_seq({"ksa_layers": [1], "ksa_chunk": 4, "ksa_windows": [1, 2]}) == 32
    lm = _dsa_lm(hf["lm"], [1])
    convert.import_hf(str(_with_indexers(hf["single"], tmp_path / "dsa", [1])), str(tmp_path / "ours"), lm=lm)
    shutil.copytree(hf["single"], tmp_path / "other")
    add_tiny_dsa_indexers(tmp_path / "other", [1], topk=32, seed=7)
    assert convert.verify(str(tmp_path / "dsa"), lm=lm, checkpoint=str(tmp_path / "ours"))["ok"]
    assert convert.verify(str(tmp_path / "other"), lm=lm, checkpoint=str(tmp_path / "ours"), seq=32)["ok"]
    assert not convert.verify(str(tmp_path / "other"), lm=lm, checkpoint=str(tmp_path / "ours"))["ok"]


def test_dsa_config_and_tensor_names(hf, caplog):
    """A DSA model's config.json carries its indexers (DeepSeek-V3.2's field names + the layers that have one) and
    maps back to the same model.lm; its tensors are the Qwen3-MoE ones plus an indexer per DSA layer; every
    disagreement between the HF config and model.lm about the indexers stops the import, naming both sides."""
    for layers in ([0, 1], [1]):
        lm = _dsa_lm(hf["lm"], layers)
        cfg = q.hf_config_from_lm(lm)
        assert (cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"], cfg["dsa_layers"]) == (4, 8, 32, layers)
        assert q.lm_config_from_hf(cfg) == lm
        q.check_hf_config(cfg, lm)
        indexer = {n: s for n, s in q.hf_tensor_shapes(lm).items() if ".indexer." in n}
        assert indexer == {f"model.layers.{l}.self_attn.indexer.{n}.weight": s for l in layers for n, s in
                           (("wq", (32, 64)), ("wk", (8, 64)), ("k_norm", (8,)), ("weights_proj", (4, 64)))}
        assert set(q.hf_tensor_shapes(lm)) - set(indexer) == set(q.hf_tensor_shapes(hf["lm"]))
    lm, cfg = _dsa_lm(hf["lm"], [1]), q.hf_config_from_lm(_dsa_lm(hf["lm"], [1]))
    assert "index_n_heads" not in q.hf_config_from_lm(hf["lm"])
    with pytest.raises(ValueError, match=r"dsa_layers=\[1\]: the checkpoint has DSA indexers, model.lm has none"):
        q.check_hf_config(cfg, hf["lm"])
    with pytest.raises(ValueError, match=r"DSA on layers \[1\] but the HF config has none.*plain Qwen3-MoE"):
        q.check_hf_config(hf["config"], lm)
    q.check_hf_config(hf["config"], lm, plain_ok=True)   # load_hf_into(keep_init=True): the indexers keep their init
    with pytest.raises(ValueError, match=r"dsa_layers=\[0\] does not match the DSA layers of model.lm \[1\]"):
        q.check_hf_config({**cfg, "dsa_layers": [0]}, lm)
    with pytest.raises(ValueError, match=r"index_n_heads=8 does not match model.lm.dsa.index_heads=4"):
        q.check_hf_config({**cfg, "index_n_heads": 8}, lm)
    with pytest.raises(ValueError, match=r"no 'dsa_layers'"):
        q.check_hf_config({k: v for k, v in cfg.items() if k != "dsa_layers"}, lm)
    with pytest.raises(ValueError, match=r"dsa_layers=\[2\]: layers of a 2-layer model are 0..1"):
        q.lm_config_from_hf({**cfg, "dsa_layers": [2]})
    q.check_hf_config({**cfg, "index_topk": 64}, lm)  # shapes no weight: a warning
    assert "index_topk=64, model.lm.dsa.topk=32" in caplog.text
    with pytest.raises(ValueError, match="layers of dsa and ksa: a Qwen3-MoE HF checkpoint holds one attention"):
        q.hf_config_from_lm(replace(lm, attention_per_layer=["dsa", "ksa"]))


@pytest.mark.parametrize("layers", [[0, 1], [1]])
def test_dsa_import_export_round_trip(hf, pgs, tmp_path, layers):
    """A DSA checkpoint in the HF layout -> our checkpoint -> HF: every tensor bit-identical, indexers included.
    The independent references: transformers' own Qwen3-MoE on the same files ignores the indexers and attends
    densely, which is what the DSA model computes while every query's causal prefix fits in its top-k (32 here, the
    32 tokens of the fixed input): our DSA model's logits from the files must match it. Past the top-k the indexers
    choose the keys: there the directory's DSA code for transformers (trust_remote_code, written by the export)
    gives our model's logits, the dense reading does not, and the model re-imported from the export gives exactly
    those of the model imported from the original."""
    from models.hf.verify import model_logits

    src = _with_indexers(hf["single"], tmp_path / "dsa_hf", layers)
    lm = q.lm_config_from_hf(json.loads((src / "config.json").read_text()))
    assert lm.layer_attention() == ["dsa" if l in layers else "dense" for l in range(2)] and lm.dsa.topk == 32
    model = _build(lm, pgs).eval()
    q.load_hf_into([model], src, lm=lm)
    result = compare_logits(model_logits(model, hf["ids"], tp_group=pgs.tp), hf["ref"])
    assert result["ok"] and result["argmax_agree"] == 1.0, result

    convert = _convert_module()
    convert.import_hf(str(src), str(tmp_path / "ours"), lm=lm)
    convert.export(str(tmp_path / "ours"), str(tmp_path / "back"))   # model.lm: the one the import recorded
    a, b = HFCheckpoint(src), HFCheckpoint(tmp_path / "back")
    assert sorted(b.names()) == sorted(a.names()) and sum(".indexer." in n for n in a.names()) == 4 * len(layers)
    for n in a.names():
        assert torch.equal(b.read(n), a.read(n)), n
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_cfg["dsa_layers"] == layers and q.lm_config_from_hf(back_cfg) == lm
    assert compare_logits(reference_logits(tmp_path / "back", hf["ids"], dense=True), hf["ref"])["max_abs_diff"] == 0.0
    assert (tmp_path / "back" / "modeling_qwen3_moe_dsa.py").read_bytes() == q.MODELING["dsa"][0].read_bytes()
    assert back_cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_qwen3_moe_dsa.Qwen3MoeDSAForCausalLM"}

    long_ids = fixed_input_ids(lm.vocab_size, seq=96, seed=3)   # 96 tokens, top-32: the indexers select
    again = _build(lm, pgs).eval()
    q.load_hf_into([again], tmp_path / "back", lm=lm)
    ours = model_logits(model, long_ids, tp_group=pgs.tp)
    assert torch.equal(model_logits(again, long_ids, tp_group=pgs.tp), ours)
    result = compare_logits(ours, reference_logits(tmp_path / "back", long_ids))  # transformers running DSA
    assert result["ok"] and result["argmax_agree"] == 1.0, result
    assert not compare_logits(ours, reference_logits(src, long_ids, dense=True))["ok"]  # sparse, not dense

    # exporting the DSA checkpoint as a dense model would drop the indexers: refused, naming them
    with pytest.raises(ValueError, match=r"indexer.*the checkpoint has DSA indexers; give the model it was trained"):
        convert.export(str(tmp_path / "ours"), str(tmp_path / "dense"), lm=hf["lm"])
    # and the dense model does not take the DSA files: a launch naming them in init_from stops before it starts
    with pytest.raises(ValueError, match="the checkpoint has DSA indexers, model.lm has none"):
        q.load_hf_into([_build(hf["lm"], pgs)], src, lm=hf["lm"])
    from train.launch import check_paths, compose_config, validate

    start = ["recipe=keye_tiny_lm", "parallel=single", f"train.checkpoint.init_from={src}", *TINY_MODEL,
             f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=r"train\.checkpoint\.init_from=.*the checkpoint has DSA indexers, model\.lm "
                                         r"has none .*model=keye_30b_a3b_dsa"):
        check_paths(validate(compose_config(start))[0])
    kinds = ",".join("dsa" if l in layers else "dense" for l in range(2))
    check_paths(validate(compose_config(start + [f"model.lm.attention_per_layer=[{kinds}]", "model.lm.dsa.index_heads=4",
                                                 "model.lm.dsa.index_dim=8", "model.lm.dsa.topk=32"]))[0])


@pytest.mark.parametrize("variant", ["dsa", "ksa"])
def test_a_plain_directory_starts_a_dsa_or_ksa_model(hf, pgs, tmp_path, variant):
    """keep_init (the trainer's init_from): a plain Qwen3-MoE directory fills every parameter a DSA model (DSA on layer
    1 of 2) or a KSA model shares with the dense one, exactly as it fills the dense model, and leaves the variant's
    own parameters as they were, naming them. The DSA model then gives transformers' logits (32 tokens, top-32).
    Without keep_init (convert import) both are refused, as before."""
    from models.hf.verify import model_logits

    lm = _dsa_lm(hf["lm"], [1]) if variant == "dsa" else replace(hf["lm"], attention="ksa")
    dense, model = _build(hf["lm"], pgs), _build(lm, pgs).eval()
    q.load_hf_into([dense], hf["single"], lm=hf["lm"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = q.load_hf_into([model], hf["sharded"], lm=lm, keep_init=True)
    own = {"dsa": ["decoder.layers.self_attention.indexer.k_norm.weight",
                   "decoder.layers.self_attention.indexer.wk.weight", "decoder.layers.self_attention.indexer.wq.weight",
                   "decoder.layers.self_attention.indexer.ww.weight"],
           "ksa": ["decoder.layers.self_attention.linear_qkv_summary.weight", "summary_embedding"]}[variant]
    assert stats["kept"] == own
    shared = dict(dense.named_parameters())
    for n, p in model.named_parameters():
        if n in shared:
            assert torch.equal(p, shared[n]), n
        else:  # the variant's own: untouched
            assert {"dsa": ".indexer.", "ksa": "summary"}[variant] in n and torch.equal(p, before[n]), n
    assert len(shared) < len(dict(model.named_parameters()))
    if variant == "dsa":
        result = compare_logits(model_logits(model, hf["ids"], tp_group=pgs.tp), hf["ref"])
        assert result["ok"] and result["argmax_agree"] == 1.0, result
        # and the launcher lets a DSA warm-up name the plain directory in init_from
        from train.launch import check_paths, compose_config, validate

        check_paths(validate(compose_config(
            ["recipe=keye_tiny_lm", "parallel=single", f"train.checkpoint.init_from={hf['single']}",
             f"run_dir={tmp_path / 'run'}", "model.lm.attention_per_layer=[dense,dsa]", "model.lm.dsa.index_heads=4",
             "model.lm.dsa.index_dim=8", "model.lm.dsa.stage=dense_warmup", "train.trainable=indexer", *TINY_MODEL]))[0])
    with pytest.raises((ValueError, RuntimeError), match="plain Qwen3-MoE|summary"):
        q.load_hf_into([_build(lm, pgs)], hf["single"], lm=lm)


# ------------------------------------------------------------------------------------------ KSA
KSA = dict(chunk=4, num_summary=2, windows=[1, 2])  # 40-50 token inputs: 10-12 chunks, windows of 1 and 2 chunks


def _ksa_lm(lm, layers):
    from models.config import KSAConfig

    return replace(lm, ksa=KSAConfig(**KSA)).with_layer_attention(
        ["ksa" if l in layers else "dense" for l in range(lm.num_layers)])


def _with_ksa(src: Path, dst: Path, layers) -> Path:
    """A copy of the tiny checkpoint as a KSA export (KSA on `layers`, models/hf/tiny.py add_tiny_ksa)."""
    from models.hf.tiny import add_tiny_ksa

    shutil.copytree(src, dst)
    add_tiny_ksa(dst, layers, **KSA)
    return dst


def test_ksa_config_and_tensor_names(hf):
    """A KSA model's config.json carries its layout (the KSA layers, chunk, summaries per chunk, windows) and maps back
    to the same model.lm; its tensors are the Qwen3-MoE ones plus summary q/k/v projections per KSA layer and the
    summary embeddings; every disagreement with model.lm stops the import, naming both sides."""
    for layers in ([0, 1], [1]):
        lm = _ksa_lm(hf["lm"], layers)
        cfg = q.hf_config_from_lm(lm)
        assert (cfg["ksa_layers"], cfg["ksa_chunk"], cfg["ksa_num_summary"], cfg["ksa_windows"]) == (layers, 4, 2, [1, 2])
        assert cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_qwen3_moe_ksa.Qwen3MoeKSAForCausalLM"}
        assert q.lm_config_from_hf(cfg) == lm
        q.check_hf_config(cfg, lm)
        own = {n: s for n, s in q.hf_tensor_shapes(lm).items() if "summary" in n}
        assert own == {"model.summary_embed.weight": (2, 64),
                       **{f"model.layers.{l}.self_attn.summary_{n}_proj.weight": s for l in layers
                          for n, s in (("q", (64, 64)), ("k", (32, 64)), ("v", (32, 64)))}}
        assert set(q.hf_tensor_shapes(lm)) - set(own) == set(q.hf_tensor_shapes(hf["lm"]))
    lm, cfg = _ksa_lm(hf["lm"], [1]), q.hf_config_from_lm(_ksa_lm(hf["lm"], [1]))
    with pytest.raises(ValueError, match=r"ksa_layers=\[1\]: the checkpoint has KSA layers, model.lm has none"):
        q.check_hf_config(cfg, hf["lm"])
    with pytest.raises(ValueError, match=r"KSA on layers \[1\] but the HF config has none.*plain Qwen3-MoE"):
        q.check_hf_config(hf["config"], lm)
    q.check_hf_config(hf["config"], lm, plain_ok=True)  # load_hf_into(keep_init=True): the summary parameters stay
    with pytest.raises(ValueError, match=r"ksa_layers=\[0\] does not match the KSA layers of model.lm \[1\]"):
        q.check_hf_config({**cfg, "ksa_layers": [0]}, lm)
    for field, value, lm_field in (("ksa_chunk", 8, "chunk"), ("ksa_num_summary", 1, "num_summary"),
                                   ("ksa_windows", [1], "windows")):
        with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} does not match model.lm.ksa.{lm_field}=")):
            q.check_hf_config({**cfg, field: value}, lm)
    with pytest.raises(ValueError, match=r"no 'ksa_layers'"):
        q.check_hf_config({k: v for k, v in cfg.items() if k != "ksa_layers"}, lm)


@pytest.mark.parametrize("layers", [[0, 1], [1]])
def test_ksa_import_export_round_trip(hf, pgs, tmp_path, layers):
    """A KSA checkpoint in the HF layout -> our checkpoint -> HF: every tensor bit-identical, the summary projections
    and embeddings included, with transformers' KSA code beside it. The independent reference: transformers running
    that code (trust_remote_code) gives our KSA model's text logits (the summary tokens inserted by each side: 50
    tokens, 12 complete chunks of 4, 2 summaries each), for KSA on every layer and beside a dense layer."""
    from models.hf.verify import model_logits

    src = _with_ksa(hf["single"], tmp_path / "ksa_hf", layers)
    lm = q.lm_config_from_hf(json.loads((src / "config.json").read_text()))
    assert lm.layer_attention() == ["ksa" if l in layers else "dense" for l in range(2)] and lm.ksa.windows == [1, 2]
    model = _build(lm, pgs).eval()
    q.load_hf_into([model], src, lm=lm)
    ids = fixed_input_ids(lm.vocab_size, seq=50, seed=3)
    ours = model_logits(model, ids, tp_group=pgs.tp)
    assert ours.shape == (2, 50, lm.vocab_size)
    result = compare_logits(ours, reference_logits(src, ids))
    assert result["ok"] and result["argmax_agree"] == 1.0, result
    assert not compare_logits(ours, reference_logits(hf["single"], ids))["ok"]  # the summaries change the logits

    convert = _convert_module()
    convert.import_hf(str(src), str(tmp_path / "ours"), lm=lm)
    convert.export(str(tmp_path / "ours"), str(tmp_path / "back"))
    a, b = HFCheckpoint(src), HFCheckpoint(tmp_path / "back")
    assert sorted(b.names()) == sorted(a.names()) and sum("summary" in n for n in a.names()) == 1 + 3 * len(layers)
    for n in a.names():
        assert torch.equal(b.read(n), a.read(n)), n
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert q.lm_config_from_hf(back_cfg) == lm
    assert (tmp_path / "back" / q.MODELING["ksa"][0].name).read_bytes() == q.MODELING["ksa"][0].read_bytes()
    again = _build(lm, pgs).eval()
    q.load_hf_into([again], tmp_path / "back", lm=lm)
    assert torch.equal(model_logits(again, ids, tp_group=pgs.tp), ours)
    # a dense model.lm refuses the KSA checkpoint both ways, naming the summary tensors or the KSA layers
    with pytest.raises(ValueError, match=r"no counterpart.*summary.*the checkpoint has KSA layers; give the model"):
        convert.export(str(tmp_path / "ours"), str(tmp_path / "dense"), lm=hf["lm"])
    with pytest.raises(ValueError, match="the checkpoint has KSA layers, model.lm has none"):
        q.load_hf_into([_build(hf["lm"], pgs)], src, lm=hf["lm"])


def test_an_older_export_gets_this_versions_code(hf, tmp_path, capsys):
    """An export written by an older version (older modeling code, or none and no auto_map) is refused by verify's
    reference with the command that mends it; `convert code DIR` writes this version's file and auto_map (keeping the
    config's other auto_map entries), after which transformers runs the directory as a fresh export; a second call
    changes nothing. A dense directory, or one naming both variants, is refused."""
    convert = _convert_module()
    for variant, make in (("ksa", _with_ksa), ("dsa", _with_indexers)):
        d = make(hf["single"], tmp_path / variant, [1])
        name = q.MODELING[variant][0].name
        assert q.modeling_is_current(d) and q.update_modeling(d) == (variant, False)
        fresh = reference_logits(d, hf["ids"])
        cfg = json.loads((d / "config.json").read_text())
        if variant == "ksa":  # older code
            (d / name).write_text((d / name).read_text().replace("CACHE_KEY = ", "# an older version\nCACHE_KEY = "))
            cfg["auto_map"]["AutoTokenizer"] = ["tokenizer_x.T", None]
        else:  # written before the directories carried code: no file, no auto_map
            (d / name).unlink()
            del cfg["auto_map"]
        (d / "config.json").write_text(json.dumps(cfg))
        assert not q.modeling_is_current(d)
        with pytest.raises(ValueError, match=f"`python launch/convert.py code {d}` writes it"):
            reference_logits(d, hf["ids"])
        assert convert.main(["code", str(d)]) == 0
        assert f"wrote this version's {name} ({variant.upper()})" in capsys.readouterr().out
        assert (d / name).read_bytes() == q.MODELING[variant][0].read_bytes() and q.modeling_is_current(d)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["auto_map"] == {**q.auto_map(variant), **({"AutoTokenizer": ["tokenizer_x.T", None]}
                                                             if variant == "ksa" else {})}
        assert torch.equal(reference_logits(d, hf["ids"]), fresh)
        assert convert.main(["code", str(d)]) == 0 and "already has" in capsys.readouterr().out
    with pytest.raises(ValueError, match="names no dsa_layers or ksa_layers"):
        q.update_modeling(hf["single"])
    assert convert.main(["code", str(hf["single"])]) == 2
    assert "convert code: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="names both dsa_layers and ksa_layers"):
        q.modeling_variant({"dsa_layers": [0], "ksa_layers": [1]})


def test_verify_refuses_an_older_export_before_any_process_group(hf, tmp_path, capsys, monkeypatch):
    """`convert verify` (and `import --verify`) of a DSA or KSA export that carries older code stop with the command
    that mends it (exit 2) before the model or any process group is built: rank 0 alone runs transformers' reference,
    so under torchrun the refusal from there left the other ranks waiting for its logits until killed."""
    convert = _convert_module()

    def built(*a, **k):
        raise AssertionError("the model was built (and its process groups made) before the directory was checked")

    monkeypatch.setattr(convert, "build_model", built)
    for variant, make in (("ksa", _with_ksa), ("dsa", _with_indexers)):
        d = make(hf["single"], tmp_path / variant, [1])
        name = q.MODELING[variant][0].name
        (d / name).write_text((d / name).read_text() + "# an older version\n")
        for argv in (["verify", str(d)], ["import", str(d), str(tmp_path / f"{variant}_out"), "--verify"]):
            assert convert.main(argv) == 2
            err = capsys.readouterr().err
            assert f"convert {argv[0]}: {d}: config.json names DSA or KSA layers, but the directory lacks this " \
                   f"version's code for them or its auto_map (an older export?): `python launch/convert.py code {d}` " \
                   "writes it" in err, err
        assert not (tmp_path / f"{variant}_out").exists()


def test_import_and_verify_name_a_directory_that_holds_no_checkpoint(hf, tmp_path, capsys):
    """`convert import` / `verify` of a directory without config.json stop with the directory named (exit 2), as
    `import-vision` and `code` do, before any process group or output directory exists."""
    convert = _convert_module()
    for argv in (["import", str(tmp_path), str(tmp_path / "out")], ["verify", str(tmp_path)]):
        assert convert.main(argv) == 2
        err = capsys.readouterr().err
        assert f"convert {argv[0]}: {tmp_path}: no config.json (not a Hugging Face checkpoint directory)" in err, err
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("")  # an output path that is a file: named, before anything is built
    for argv in (["import", str(hf["single"]), str(tmp_path / "afile")], ["export", str(tmp_path), str(tmp_path / "afile")]):
        assert convert.main(argv) == 2
        assert f"convert {argv[0]}: {tmp_path / 'afile'} is a file, not a directory" in capsys.readouterr().err
    # a --model that names no preset: the presets listed (it was "[Errno 2] No such file or directory: ...yaml")
    assert convert.main(["verify", str(hf["single"]), "--model", "keye_tiny_lm"]) == 2
    err = capsys.readouterr().err
    assert "--model keye_tiny_lm: no such model preset" in err and "keye_tiny_dsa" in err, err


@pytest.mark.parametrize("preset,base,variant", [
    ("keye_30b_a3b_dsa", "keye_30b_a3b", "dsa"), ("keye_30b_a3b_ksa", "keye_30b_a3b", "ksa"),
    ("keye_vl_30b_a3b", "keye_30b_a3b", "dense"), ("keye_vl_30b_a3b_dsa", "keye_30b_a3b", "dsa"),
    ("keye_vl_30b_a3b_ksa", "keye_30b_a3b", "ksa"), ("keye_tiny_dsa", "keye_tiny", "dsa"),
    ("keye_tiny_vl_ksa", "keye_tiny", "ksa")])
def test_convert_model_preset_takes_the_presets_it_builds_on(preset, base, variant):
    """`convert.py import|export|verify --model keye_30b_a3b_dsa` is keye_30b_a3b's language model with DSA
    attention: the preset names keye_30b_a3b in its defaults list. Read alone, its `lm` node left every other size
    at the schema's tiny default: `--model keye_30b_a3b_ksa` was a 2-layer, 64-wide model ('HF config
    num_hidden_layers=48 does not match model.lm.num_layers=2'), keye_30b_a3b_dsa stopped on 'index_dim (64) must
    be at most head_dim / 2 (8)' and keye_vl_30b_a3b on omegaconf's 'Missing key lm'. Reference: the base preset's
    own YAML (it has no defaults list) and the variant's settings as the preset files write them."""
    from omegaconf import OmegaConf

    convert = _convert_module()

    def plain(name):   # the file alone, merged into the schema
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig),
                                                   OmegaConf.load(REPO / "recipes/model" / f"{name}.yaml").lm))

    got, ref = convert.model_config(preset, []), plain(base)
    assert got.attention == variant
    assert replace(got, attention=ref.attention, dsa=ref.dsa, ksa=ref.ksa) == ref
    if variant == "dense":
        assert (got.dsa, got.ksa) == (ref.dsa, ref.ksa)
    else:   # the variant's settings as its own preset (keye_30b_a3b_dsa, ...) writes them; the other variant's default
        own = OmegaConf.to_container(OmegaConf.load(REPO / "recipes/model" / f"{base}_{variant}.yaml").lm[variant])
        assert {k: getattr(getattr(got, variant), k) for k in own} == own
        other = "ksa" if variant == "dsa" else "dsa"
        assert getattr(got, other) == getattr(ref, other)
    assert convert.model_config(preset, ["lm.num_layers=3"]).num_layers == 3   # --set still applies on top


def test_a_set_key_that_is_no_model_setting_is_named(tmp_path):
    """`--set lm.hidden_sise=64` (or a model file's unknown key) ended convert.py with omegaconf's ConfigKeyError
    traceback (a KeyError, which its ValueError handler let through); now a ValueError naming the override."""
    import pytest

    convert = _convert_module()
    with pytest.raises(ValueError, match=r"^--set lm.hidden_sise=64: lm.hidden_sise is not a setting of the language "
                                         r"model \(models/config.py LMConfig\)$"):
        convert.model_config("keye_tiny", ["lm.hidden_sise=64"])
    with pytest.raises(ValueError, match=r"^--set lm.dsa.topkk=3: lm.dsa.topkk is not a setting"):
        convert.model_config("keye_tiny", ["lm.dsa.topkk=3"])
    bad = tmp_path / "m.yaml"
    bad.write_text("lm:\n  num_layerz: 2\n")
    with pytest.raises(ValueError, match=rf"^--model {bad}: lm.num_layerz is not a setting"):
        convert.model_config(str(bad), [])


def test_export_of_a_step_folder_without_its_run_directory_takes_the_config_the_checkpoint_records(tmp_path):
    """A training checkpoint's step folder copied out of its run directory (no config.yaml beside it) stopped the
    export: `no model config: pass --model`, though the checkpoint's common state records the run's resolved config.
    The export now takes model.lm and the vision tower's config from it (after --model, an import's records and
    the run's config.yaml); the reference is the config the run had, as train/trainer.py records it (asdict of the
    resolved config)."""
    from train.launch import compose_config, validate

    convert = _convert_module()
    cfg, _ = validate(compose_config(["recipe=keye_tiny", "parallel=single", "model.lm.num_layers=3"]),
                      world_size=1)
    common = {"config": asdict(cfg)}
    copied = tmp_path / "copied"   # a step folder's parent without config.yaml
    copied.mkdir()
    with pytest.raises(ValueError, match="no model config"):   # what the export met before
        convert.model_config(None, [], run_dir=copied)
    assert convert.checkpoint_lm(common, None, [], copied) == cfg.model.lm
    assert convert.checkpoint_lm(common, None, ["lm.rope_theta=5000.0"], copied) == \
        replace(cfg.model.lm, rope_theta=5000.0)
    # the vision tower's config from the same record: the one the run built (models/config VisionModelConfig.build)
    built = cfg.model.vision.build(cfg.model.lm.hidden_size)
    assert convert.checkpoint_vision_config(common, copied, cfg.model.lm) == built
    assert convert.checkpoint_vision_config({}, copied, cfg.model.lm) is None


def test_an_expert_bias_model_imports_with_a_zero_bias_and_refuses_export(hf, pgs, tmp_path):
    """model.lm.moe_expert_bias: a Qwen3-MoE directory has no routing bias, so the import starts it at zero (the model
    then gives transformers' logits: the same routing) instead of stopping on a model tensor without HF source; the
    export of a checkpoint that holds the bias is refused naming the setting (transformers would route without it)."""
    from models.hf.verify import model_logits

    lm = replace(hf["lm"], moe_expert_bias=True)
    model = _build(lm, pgs)
    biases = [b for n, b in model.named_buffers() if n.endswith("router.expert_bias")]
    assert len(biases) == lm.num_layers
    for b in biases:
        b.fill_(1.0)   # the import must overwrite it
    stats = q.load_hf_into([model], hf["single"], lm=lm)
    assert all(not b.any() for b in biases)
    assert stats["elements"] == sum(p.numel() for p in model.parameters())
    assert compare_logits(model_logits(model, hf["ids"], tp_group=pgs.tp), hf["ref"])["ok"]
    convert = _convert_module()
    convert.import_hf(str(hf["single"]), str(tmp_path / "ours"), lm=lm)
    with pytest.raises(ValueError, match=r"holds the routers' expert biases of model\.lm\.moe_expert_bias .*"
                                         r"a Qwen3-MoE router has no such bias"):
        convert.export(str(tmp_path / "ours"), str(tmp_path / "back"), lm=lm)
