"""HF interop at TP2/EP2 on 2 gloo processes, in one job (this file is also its driver; the test forks the
ranks with tests/launch_util.run_ranks, the same job runs under torchrun with the command below):

    1. import a sharded Qwen3-MoE HF checkpoint at TP2/EP2 (each rank reads its slices) into our checkpoint
       format, with the logits checked against transformers;
    2. the project's Trainer starts from it (train.checkpoint.init_from) and trains one step, saving a checkpoint;
       a second run with init_from naming the HF directory itself gives the same loss, and train.eval.only scores
       the HF directory as it scores the import;
    3. that checkpoint is exported to HF safetensors (bounded files + index);
    4. the export is re-imported at TP2/EP2 and every parameter compared, exactly, with the trained
       checkpoint loaded by train.checkpoint; the trained model's logits are checked against transformers
       running the export;
    5. the same for a DSA model (DSA on layer 1 of 2, top-16 of 32-token rows): a run starts from the HF
       directory of a DSA model (the tiny checkpoint plus indexers), trains a step, and its export carries the
       trained indexers; transformers runs the export through its DSA code (trust_remote_code) and gives the
       trained model's logits at 32 tokens, where the indexers select (the dense reading of the same files does
       not). The DSA warm-up starts from the plain directory (indexers at their init) with the dense run's first
       loss;
    6. a KSA directory (KSA on layer 1 of 2: the tiny checkpoint plus summary projections and embeddings) imports at
       TP2/EP2 with the logits of transformers running its KSA code, and exports back bit-identically.

    torchrun --standalone --nproc_per_node 2 tests/dist/test_hf_roundtrip.py OUT.json HF_DIR WORK_DIR DSA_HF_DIR KSA_HF_DIR
"""

import json
import sys
from pathlib import Path

import pytest

from tests.launch_util import run_ranks

REPO = Path(__file__).resolve().parents[2]
LAYOUT = dict(tp=2, ep=2)
TINY_MODEL = ["model.lm.num_layers=2", "model.lm.hidden_size=64", "model.lm.num_attention_heads=4",
              "model.lm.num_query_groups=2", "model.lm.head_dim=16", "model.lm.vocab_size=512",
              "model.lm.num_experts=8", "model.lm.moe_topk=2", "model.lm.moe_ffn_hidden_size=32"]
EXPORT_SHARD_BYTES = 50_000
DSA_TOPK = 16
DSA_MODEL = ["model.lm.attention_per_layer=[dense,dsa]", "model.lm.dsa.index_heads=4", "model.lm.dsa.index_dim=8",
             f"model.lm.dsa.topk={DSA_TOPK}"]


@pytest.mark.slow
def test_tp2_ep2_import_train_export_reimport(tmp_path):
    pytest.importorskip("transformers", reason="HF interop tests need transformers (setup.py dev extra)")
    import torch

    from models.hf.checkpoint_io import HFCheckpoint
    from models.hf.tiny import save_tiny_qwen3_moe

    import shutil

    from models.hf.tiny import add_tiny_dsa_indexers, add_tiny_ksa

    hf_dir, work, out, dsa_dir = tmp_path / "hf", tmp_path / "work", tmp_path / "out.json", tmp_path / "dsa_hf"
    ksa_dir = tmp_path / "ksa_hf"
    save_tiny_qwen3_moe(hf_dir, max_shard_size="50KB")
    shutil.copytree(hf_dir, dsa_dir)
    add_tiny_dsa_indexers(dsa_dir, [1], topk=DSA_TOPK)
    shutil.copytree(hf_dir, ksa_dir)
    add_tiny_ksa(ksa_dir, [1], chunk=4, num_summary=2, windows=[1, 2])
    run_ranks(2, "tests.dist.test_hf_roundtrip:main", (str(out), str(hf_dir), str(work), str(dsa_dir), str(ksa_dir)),
              tmp_path / "logs", timeout=600)
    res = json.loads(out.read_text())
    print("\nTP2/EP2:", json.dumps(res, indent=1))

    assert res["import_verify"]["ok"], res["import_verify"]
    assert res["import_verify"]["argmax_agree"] == 1.0
    assert len(res["losses"]) == 1 and 5.0 < res["losses"]["1"] < 8.0  # about ln(512) = 6.24 on random tokens
    # training straight from the HF directory starts from the same weights as from the imported checkpoint
    assert res["losses_direct"] == res["losses"], (res["losses_direct"], res["losses"])
    # train.eval.only: the HF directory, logged at step 0, scores as its import does (the same weights, exactly)
    hf, imported = res["eval_hf"], res["eval_imported"]
    assert hf["step"] == 0 and 5.0 < hf["val_loss"] < 8.0
    assert {k: v for k, v in hf.items() if k not in ("val_seconds", "step")} == \
        {k: v for k, v in imported.items() if k not in ("val_seconds", "step")}, (hf, imported)
    assert res["reimport_mismatches"] == [], res["reimport_mismatches"]
    assert res["reimport_tensors"] > 0
    assert res["export_verify"]["ok"], res["export_verify"]
    # the export is a complete Qwen3-MoE checkpoint of the trained weights: all tensors, training moved them
    src, exported = HFCheckpoint(hf_dir), HFCheckpoint(work / "exported")
    assert sorted(exported.names()) == sorted(src.names())
    changed = [n for n in src.names() if not torch.equal(src.read(n), exported.read(n))]
    assert len(changed) > 0.9 * len(src.names()), f"training changed only {len(changed)} tensors"
    # ... by one Adam step of lr 3e-3 (about lr per element) from the HF weights, not from a fresh init
    step = max((src.read(n) - exported.read(n)).abs().max().item() for n in src.names())
    assert step < 0.01, f"the trained weights moved {step} from the HF ones: training did not start from them"
    assert len(res["export"]["files"]) > 1 and (work / "exported" / "model.safetensors.index.json").is_file()

    # DSA: the run started from the DSA directory (its indexers included) and its export holds them trained
    dsa = res["dsa"]
    assert len(dsa["losses"]) == 1 and 5.0 < dsa["losses"]["1"] < 8.0
    assert dsa["config_round_trip"] and dsa["reimport_mismatches"] == []
    assert dsa["reimport_tensors"] == res["reimport_tensors"] + 4
    assert dsa["export_verify"]["ok"], dsa["export_verify"]   # transformers' DSA code on the export, 32 tokens
    assert not dsa["dense_reading"]["ok"], dsa["dense_reading"]
    src, exported = HFCheckpoint(dsa_dir), HFCheckpoint(work / "dsa_exported")
    assert sorted(exported.names()) == sorted(src.names())
    indexer = [n for n in src.names() if ".indexer." in n]
    assert len(indexer) == 4 and all(n.startswith("model.layers.1.") for n in indexer)
    assert json.loads((work / "dsa_exported" / "config.json").read_text())["dsa_layers"] == [1]
    for n in indexer:  # trained by the indexer KL, from the directory's values
        moved = (src.read(n) - exported.read(n)).abs().max().item()
        assert 0 < moved < 0.01, (n, moved)
    # the warm-up started from the plain Qwen3-MoE directory (its indexers at init): dense attention and the same
    # weights, so its first step's LM loss is the dense run's from that directory
    assert dsa["warmup_losses"] == res["losses_direct"], (dsa["warmup_losses"], res["losses_direct"])

    # KSA: imported at TP2/EP2 (the summary projections split over TP as the text QKV), the logits of transformers
    # running the directory's KSA code (32 tokens: 8 chunks of 4, 2 summaries each), exported back exactly
    ksa = res["ksa"]
    assert ksa["import_verify"]["ok"] and ksa["import_verify"]["argmax_agree"] == 1.0, ksa["import_verify"]
    src, exported = HFCheckpoint(ksa_dir), HFCheckpoint(work / "ksa_exported")
    assert sorted(exported.names()) == sorted(src.names()) and sum("summary" in n for n in src.names()) == 4
    for n in src.names():
        assert torch.equal(exported.read(n), src.read(n)), n


# ------------------------------------------------------------------------------------------ driver
def _train_one_step(init_from: Path, run_dir: Path, model: list[str] = ()) -> dict:
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    overrides = ["recipe=keye_tiny_lm", *TINY_MODEL, *model, f"parallel.tp={LAYOUT['tp']}", f"parallel.ep={LAYOUT['ep']}",
                 "train.steps=2", "train.stop_after=1", "train.warmup_steps=1", "train.global_batch_size=2",
                 "train.micro_batch_size=1", "train.seq_length=32", "train.wandb.enabled=false",
                 f"train.checkpoint.init_from={init_from}", f"run_dir={run_dir}"]
    cfg, layout = validate(compose_config(overrides))
    trainer = Trainer(cfg, layout)
    history = trainer.train()
    del trainer
    return {s.step: s.loss for s in history}


def _eval_only(init_from: Path, run_dir: Path) -> dict:
    """train.eval.only on the weights of `init_from` (one of our run directories, or a Hugging Face directory)."""
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    overrides = ["recipe=keye_tiny_lm", *TINY_MODEL, f"parallel.tp={LAYOUT['tp']}", f"parallel.ep={LAYOUT['ep']}",
                 "train.global_batch_size=2", "train.micro_batch_size=1", "train.seq_length=32",
                 "train.wandb.enabled=false", "train.eval.only=true", "train.eval.batches=2",
                 f"train.checkpoint.init_from={init_from}", f"run_dir={run_dir}"]
    cfg, layout = validate(compose_config(overrides))
    trainer = Trainer(cfg, layout)
    (result,) = trainer.evaluate_only()
    trainer.close()
    del trainer
    return result


def _reimport(convert, lm, exported: Path, run: Path, res: dict) -> None:
    """The export re-imported at LAYOUT against the run's checkpoint, parameter by parameter (exactly), and the
    checkpoint's logits against transformers running the export."""
    import torch
    import torch.distributed as dist

    from models.hf.qwen3_moe import load_hf_into
    from train import checkpoint as ckpt

    chunks, _, _ = convert.build_model(lm, **LAYOUT)
    load_hf_into(chunks, exported, lm=lm)
    reimported = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    chunks, pgs, _ = convert.build_model(lm, **LAYOUT)
    missing = ckpt.load_model_weights(ckpt.find_latest(run), chunks, dp_cp_group=pgs.dp_cp)
    assert not missing, missing
    bad = [f"rank{dist.get_rank()}:{n}" for n, p in chunks[0].named_parameters() if not torch.equal(p, reimported[n])]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, bad)
    res["reimport_mismatches"] = sum(gathered, [])
    res["reimport_tensors"] = len(reimported)
    res["export_verify"] = convert.verify_chunks(chunks, str(exported), pgs=pgs, seq=32)


def main(out: str, hf_dir: str, work: str, dsa_dir: str, ksa_dir: str) -> None:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "launch"))
    from train.noise import silence_known_warnings

    silence_known_warnings()
    import torch.distributed as dist

    import convert  # launch/convert.py
    from parallel.groups import teardown

    out, hf_dir, work = Path(out), Path(hf_dir), Path(work)
    lm = convert.model_config(None, [], hf_dir=str(hf_dir))
    res = {}
    res["import_verify"] = convert.import_hf(str(hf_dir), str(work / "imported"), lm=lm, verify=True, **LAYOUT)["verify"]
    res["losses"] = _train_one_step(work / "imported", work / "run")
    res["losses_direct"] = _train_one_step(hf_dir, work / "run_direct")  # init_from names the HF directory
    # train.eval.only scores the HF directory itself (step 0) as its import (the import's step)
    res["eval_hf"] = _eval_only(hf_dir, work / "eval_hf")
    res["eval_imported"] = _eval_only(work / "imported", work / "eval_imported")
    res["export"] = convert.export(str(work / "run"), str(work / "exported"), lm=lm, max_shard_bytes=EXPORT_SHARD_BYTES)
    _reimport(convert, lm, work / "exported", work / "run", res)

    # DSA: init_from names the DSA directory; model.lm from its config.json (the DSA fields included)
    dsa = res["dsa"] = {}
    lm_dsa = convert.model_config(None, [], hf_dir=dsa_dir)
    dsa["losses"] = _train_one_step(Path(dsa_dir), work / "dsa_run", DSA_MODEL)
    dsa["export"] = convert.export(str(work / "dsa_run"), str(work / "dsa_exported"), lm=lm_dsa,
                                   max_shard_bytes=EXPORT_SHARD_BYTES)
    dsa["config_round_trip"] = convert.model_config(None, [], hf_dir=str(work / "dsa_exported")) == lm_dsa
    _reimport(convert, lm_dsa, work / "dsa_exported", work / "dsa_run", dsa)
    if dist.get_rank() == 0:  # at verify's 32 tokens the indexers select: the dense reading of the export differs
        from models.hf.verify import compare_logits, fixed_input_ids, reference_logits

        ids = fixed_input_ids(lm_dsa.vocab_size, seq=32)
        dsa["dense_reading"] = compare_logits(reference_logits(work / "dsa_exported", ids, dense=True),
                                              reference_logits(work / "dsa_exported", ids))
    # the DSA warm-up straight from the plain directory: the indexers keep their init, the attention stays dense
    dsa["warmup_losses"] = _train_one_step(hf_dir, work / "warmup_run",
                                           DSA_MODEL + ["model.lm.dsa.stage=dense_warmup", "train.trainable=indexer"])

    # KSA: model.lm from the directory's config.json (its KSA fields)
    ksa = res["ksa"] = {}
    lm_ksa = convert.model_config(None, [], hf_dir=ksa_dir)
    ksa["import_verify"] = convert.import_hf(ksa_dir, str(work / "ksa_imported"), lm=lm_ksa, verify=True,
                                             **LAYOUT)["verify"]
    ksa["export"] = convert.export(str(work / "ksa_imported"), str(work / "ksa_exported"), lm=lm_ksa,
                                   max_shard_bytes=EXPORT_SHARD_BYTES)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(res, default=str))
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:6])


@pytest.mark.slow
def test_multimodal_run_starts_from_a_keye_vl_checkpoint(tmp_path):
    """train.checkpoint.init_from naming a Keye-VL-style HF directory fills the LM (through the
    Qwen3-MoE mapping) and the vision tower + projector (models/hf/keye_vision.py) of the tiny
    multimodal recipe, then it trains."""
    pytest.importorskip("transformers", reason="HF interop tests need transformers (setup.py dev extra)")
    from models.hf.keye_vision import save_tiny_keye_vl
    from tests.launch_util import losses, run_launch

    hf_dir = tmp_path / "keye_vl"
    save_tiny_keye_vl(hf_dir)
    run = tmp_path / "run"
    run_launch(2, ["recipe=keye_tiny", *TINY_MODEL, "train.steps=2", "train.warmup_steps=1",
                   "train.checkpoint.save_interval=2", f"train.checkpoint.init_from={hf_dir}"], run)
    log = (run / "logs" / "rank0.log").read_text()
    assert "initialised model weights from the Hugging Face checkpoint" in log
    assert "initialised the vision tower from the Hugging Face checkpoint" in log
    assert sorted(losses(run)) == [1, 2]


@pytest.mark.slow
def test_align_stage_takes_its_vit_from_a_second_checkpoint(tmp_path):
    """Keye-VL-2.0's first stage: the language model from a Qwen3-MoE directory, the ViT from a Keye-VL one
    whose projector feeds another language model (here 96 wide against our 64, as Keye-VL-1.5-8B's 4096 against
    Qwen3-30B-A3B's 2048). train.checkpoint.vision_init_from names it: the ViT is that checkpoint's, tensor for
    tensor (checked against load_keye_vision_into on its own), and the projector, which trains, keeps its init.
    Without it the frozen ViT would stay random: the run stops before its first step, naming the setting."""
    pytest.importorskip("transformers", reason="HF interop tests need transformers (setup.py dev extra)")
    from data.video_stream import ensure_synthetic_shards
    from models.hf.keye_vision import load_keye_vision_into, save_tiny_keye_vl
    from models.hf.tiny import save_tiny_qwen3_moe
    from models.vision import VisionModel
    from models.vision import tiny as tiny_vision
    from tests.launch_util import run_layouts

    qwen, keye = tmp_path / "qwen3", tmp_path / "keye_vl_other_lm"
    save_tiny_qwen3_moe(qwen)
    save_tiny_keye_vl(keye, seed=3, hidden_size=96)
    shards = ensure_synthetic_shards(tmp_path / "videos", 8, 1234, rank=0)
    align = ["recipe=keye_tiny_align", *TINY_MODEL, "parallel=single", "train.steps=2", "train.warmup_steps=1",
             "train.global_batch_size=2", "train.checkpoint.enabled=false", "data.synthetic_videos=8",
             f"data.video.shards={shards}", f"train.checkpoint.init_from={qwen}"]
    _, d = run_layouts(1, {"align": align + [f"train.checkpoint.vision_init_from={keye}"],
                           "fresh": align + ["train.lr=0", "train.min_lr=0",
                                             "train.checkpoint.init_from=''"]},
                       tmp_path / "runs", digests=True)
    vit = VisionModel(tiny_vision(64))
    load_keye_vision_into(vit, keye, projector=False)
    for n, p in vit.named_parameters():
        got = d["align"][f"vision.{n}"]
        if n.startswith("vit."):
            # the same fp32 values summed in float64 in two processes (the digests pass JSON exactly): rel 1e-12
            # leaves room for the summation order only
            assert got == pytest.approx([float(p.double().sum()), float(p.double().abs().sum())], rel=1e-12), n
    # and, read past the loader, the sum of the checkpoint's own ViT tensors (a concatenation or reshape keeps it)
    from safetensors.torch import load_file

    hf = {k: v for f in keye.glob("*.safetensors") for k, v in load_file(f).items()}
    used = [v for k, v in hf.items() if k.startswith("visual.vision_model.")
            and not k.endswith("packing_position_embedding.weight") and ".head." not in k]
    vit_sum = sum(v[0] for n, v in d["align"].items() if n.startswith("vision.vit."))
    # float64 sums of the same values grouped differently (q, k, v are one tensor of ours, three of the file's)
    assert used and vit_sum == pytest.approx(sum(float(v.double().sum()) for v in used), rel=1e-9)
    projector = [n for n in d["align"] if n.startswith("vision.projector.")]
    assert projector and all(d["align"][n] != d["fresh"][n] for n in projector)  # it trained, from its init
    with pytest.raises(AssertionError, match=r"train\.checkpoint\.init_from=.*holds no weights for .* vision "
                                             r"tower's tensors .*train\.trainable=projector keeps them frozen.*"
                                             r"vision_init_from"):
        run_layouts(1, {"no_vit": align}, tmp_path / "runs_no_vit")


@pytest.mark.slow
def test_vision_init_from_a_run_of_another_language_model_width_keeps_the_projector_at_init(tmp_path):
    """vision_init_from naming one of our run directories whose language model is of another width (the ViT of a
    small model's run for a wider one): the ViT is that run's, and the projector, whose output is the language
    model's width, keeps its init, as from a Hugging Face directory. It stopped every rank with megatron's
    'Global shape mismatch ... vision.projector.fc2.weight' once the model was built."""
    from data.video_stream import ensure_synthetic_shards
    from tests.launch_util import run_layouts

    shards = ensure_synthetic_shards(tmp_path / "videos", 8, 1234, rank=0)
    base = ["recipe=keye_tiny", "parallel=single", "train.steps=1", "train.warmup_steps=0",
            "train.global_batch_size=2", "data.synthetic_videos=8", f"data.video.shards={shards}"]
    _, d = run_layouts(1, {"src": base + ["run_dir=src", "train.checkpoint.save_interval=1"],
                           # lr 0: its weights after the step are the ones it started from
                           "wide": base + ["run_dir=wide", "model.lm.hidden_size=96", "train.lr=0", "train.min_lr=0",
                                           "train.checkpoint.enabled=false",
                                           "train.checkpoint.vision_init_from={root}/src"],
                           "fresh": base + ["run_dir=fresh", "model.lm.hidden_size=96", "train.lr=0", "train.min_lr=0",
                                            "train.checkpoint.enabled=false"]},
                       tmp_path, digests=True)
    vit = [n for n in d["src"] if n.startswith("vision.vit.")]
    projector = [n for n in d["wide"] if n.startswith("vision.projector.")]
    assert vit and all(d["wide"][n] == d["src"][n] for n in vit)   # the same tensors: their digests exactly
    assert any(d["fresh"][n] != d["src"][n] for n in vit)
    # the projector as the same seed initialises it without vision_init_from
    assert projector and all(d["wide"][n] == d["fresh"][n] for n in projector)


@pytest.mark.slow
def test_verify_under_torchrun_stops_every_rank_when_rank_0_cannot_run_transformers(tmp_path):
    """`launch/convert.py verify` under torchrun: rank 0 alone computes transformers' logits. With transformers not
    importable there (as on a node without it; a sitecustomize blocks the import on rank 0 only), rank 0 failed
    and waited in the teardown's barrier while rank 1 waited for its logits: the command hung until the process
    group's timeout, printing nothing. Rank 1 now stops naming rank 0's error, and the command ends."""
    import os
    import subprocess

    from launch.supervise import run_torchrun
    from models.hf.tiny import save_tiny_qwen3_moe

    hf_dir, block = tmp_path / "hf", tmp_path / "block"
    save_tiny_qwen3_moe(hf_dir, max_shard_size="50KB")
    block.mkdir()
    (block / "sitecustomize.py").write_text('import os, sys\nif os.environ.get("RANK") == "0":\n'
                                            '    sys.modules["transformers"] = None\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{block}{os.pathsep}{REPO}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "convert.py"), "verify", str(hf_dir), "--tp", "2"]
    try:
        proc = run_torchrun(cmd, cwd=REPO, env=env, timeout=120, grace=10)  # it ends in ~25 s
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"convert verify hung after rank 0 failed: {(e.stderr or '')[-2000:]}")
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert (f"convert verify: rank 0 failed computing transformers' reference logits of {hf_dir}: "
            "ModuleNotFoundError: import of transformers halted") in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_export_under_torchrun_ends_when_rank_0_cannot_write_a_file(tmp_path):
    """`launch/convert.py export` under torchrun: every rank loads each file's tensors (a collective), rank 0 writes
    it. When rank 0's write failed (here a directory stands where its third file's temporary goes), rank 0 waited in
    the teardown's barrier while rank 1 waited in the next file's load: the command hung. Rank 0 now leaves without
    the barrier, naming its error, and the command ends."""
    import os
    import subprocess

    from launch.supervise import run_torchrun
    from models.hf.tiny import save_tiny_qwen3_moe

    hf_dir, ours, out = tmp_path / "hf", tmp_path / "ours", tmp_path / "out"
    save_tiny_qwen3_moe(hf_dir, max_shard_size="50KB")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "launch" / "convert.py"), "import", str(hf_dir), str(ours)], env=env,
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    (out / "model-00003-of-00013.tmp").mkdir(parents=True)   # 13 files of at most 50 KB: the export's plan
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "convert.py"), "export", str(ours), str(out), "--max-shard-size", "50KB"]
    try:
        proc = run_torchrun(cmd, cwd=REPO, env=env, timeout=120, grace=10)  # it ends in ~15 s
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"convert export hung after rank 0 failed to write: {(e.stderr or '')[-2000:]}")
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Is a directory" in proc.stderr, proc.stderr[-3000:]
