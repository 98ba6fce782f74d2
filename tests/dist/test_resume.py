"""Exact resumption, resumption under another layout, and a hard kill mid-run.

- Stop after step 2, resume: steps 3..5 equal an uninterrupted run bit for bit (same layout, same seed,
  fp32 on CPU: the resumed run restores weights, fp32 master weights, Adam moments and per-parameter
  step counts, the data position and the RNG states, so every operation repeats exactly). The same for a
  model whose layers mix DSA (sparse stage: its indexer KL rides on the loss), KSA and dense attention, data
  parallel over 2 ranks, so the distributed optimizer's state is sharded: the variants' own parameters are
  stacked over their layers alone (models/attention variant_place) and their moments travel with them.
- Reshard: the step-2 checkpoint written at TP2/EP2 is resumed at TP1/EP1 (and EP2 -> TP2): the next
  step's loss equals the TP2/EP2 continuation within 2e-5 relative (only fp32 reduction order differs
  between layouts, see test_layout_parity.py for the measured size of that).
Killed runs (a rank dying mid-step, a rank dying between writing its shards and the commit, a torn
or corrupted checkpoint, SIGTERM) resume from the newest complete checkpoint and reproduce the
uninterrupted curve exactly: tests/dist/test_faults.py, where the kill points are deterministic.
- A changed model stops before the resume: the step-2 checkpoint records its config, and validating a command
  for that run directory with another model size names the settings that differ (no process group built);
  settings that only change how the model is computed (the loss's chunking) may change. With
  train.checkpoint.resume=false that directory is refused (a fresh run would write among its checkpoints).
"""

from pathlib import Path

import pytest

from tests.launch_util import QUIET, run_layouts_all

pytestmark = pytest.mark.slow

# auxiliary-loss-free balancing on, its bias moved by 0.05 a step (the softmax scores of the tiny LM's 4 experts are
# ~0.25): after two steps it changes routing choices, so a bias lost or rounded on resume changes the next losses
# (a plain router resumes in tests/dist/test_faults.py)
COMMON = ["recipe=keye_tiny_lm", "train.steps=5", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.seq_length=128", "parallel=single", "train.checkpoint.save_interval=2",
          "model.lm.moe_expert_bias=true", "model.lm.moe_bias_update_rate=0.05"]
TP2EP2 = ["parallel.tp=2", "parallel.ep=2"]
VPP = ["parallel.pp=2", "parallel.vpp=2"]
# the tiny LM's 4 layers: DSA (top 32 of the 128 tokens, so it selects), KSA (chunks of 8), dense, DSA
MIXED = ["model.lm.attention_per_layer=[dsa,ksa,dense,dsa]", "model.lm.dsa.index_heads=4", "model.lm.dsa.index_dim=8",
         "model.lm.dsa.topk=32", "model.lm.dsa.stage=sparse", "model.lm.ksa.chunk=8", "model.lm.ksa.windows=[4]"]


# ---------------------------------------------------------------------------- other hyper-parameters on resume
# A resume with another train.lr, min_lr, adam_beta2 or adam_eps (logged as a changed setting) must train with them:
# megatron-core's loader handed the optimizer the checkpoint's parameter groups, so the LM went on at the old peak
# and floor of the schedule (and the old betas and eps) while the log showed the new learning rate.
HYPER = ["train.lr_schedule=cosine", "train.warmup_steps=1", "train.steps=6"]
CHANGED = {"lr": 1.0e-3, "min_lr": 2.0e-4, "adam_beta2": 0.99, "adam_eps": 1.0e-6}
FORMATS = ("dp_reshardable", "fully_reshardable")


def _hyper_first(optimizer_format: str) -> list[str]:
    """The run resumed with CHANGED: EP2 at dp 2 (the distributed optimizer's sharded state), stopped after step 2."""
    return COMMON + HYPER + ["parallel.ep=2", "train.stop_after=2", f"run_dir=lr_{optimizer_format}",
                             f"train.checkpoint.optimizer_format={optimizer_format}"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def runs_all(root):
    return run_layouts_all(2, {
        "full": COMMON + TP2EP2,
        # fully_reshardable: the optimizer state in model space, so the TP1/EP1 resume below can load it
        "stopped": COMMON + TP2EP2 + ["train.stop_after=2", "run_dir=s",
                                      "train.checkpoint.optimizer_format=fully_reshardable"],
        # reshard: resume the TP2/EP2 step-2 checkpoint at TP1/EP1 (dp 2), one step, writing nothing
        "reshard_tp1ep1": COMMON + ["train.stop_after=1", "train.checkpoint.enabled=false", "run_dir=s"],
        # and at pp 2 x vpp 2; and a fully_reshardable checkpoint written at pp 2 x vpp 2, after its step 1
        "reshard_vpp": COMMON + VPP + ["train.stop_after=1", "train.checkpoint.enabled=false", "run_dir=s"],
        "vpp_saved": COMMON + VPP + ["train.stop_after=1", "run_dir=v",
                                     "train.checkpoint.optimizer_format=fully_reshardable"],
        "resumed": COMMON + TP2EP2 + ["run_dir=s"],
        "mixed_full": COMMON + MIXED,
        "mixed_stopped": COMMON + MIXED + ["train.stop_after=2", "run_dir=m"],
        # its step-2 checkpoint (dp_reshardable, dp 2) resumed at CP2 (dp 1), one step, writing nothing: the
        # optimizer shards over DP x CP, so its flat shards load there as at another DP size
        "mixed_cp2": COMMON + MIXED + ["parallel.cp=2", "train.stop_after=1", "train.checkpoint.enabled=false",
                                       "run_dir=m"],
        "mixed_resumed": COMMON + MIXED + ["run_dir=m"],
        # stopped after step 2, for a resume with other hyper-parameters in each optimizer format (HYPER below)
        **{f"hyper_{fmt}": _hyper_first(fmt) for fmt in FORMATS},
    }, root)


@pytest.fixture(scope="module")
def runs(runs_all):
    return runs_all["losses"]


def test_resume_is_bit_identical(runs):
    assert sorted(runs["stopped"]) == [1, 2]
    assert sorted(runs["resumed"]) == [3, 4, 5], "the resumed run must start after the checkpointed step"
    for step in (1, 2):
        assert runs["stopped"][step] == runs["full"][step]
    for step in (3, 4, 5):
        assert runs["resumed"][step] == runs["full"][step], f"step {step} differs after resume"


def test_the_expert_bias_resumes_exactly_and_across_layouts(runs_all):
    """The auxiliary-loss-free routing bias (model.lm.moe_expert_bias) is model state: after the resume at the same
    layout its range equals the uninterrupted run's bit for bit, and the TP2/EP2 checkpoint resumed at TP1/EP1 and at
    pp 2 x vpp 2 routes with the same bias (the range is the bias each step routed with, before its update)."""
    ex = runs_all["extras"]
    rng = {name: {s: (e["moe_bias_min"], e["moe_bias_max"]) for s, e in steps.items()} for name, steps in ex.items()}
    assert rng["full"][1] == (0.0, 0.0)   # the first step routes with a zero bias
    assert rng["full"][3][0] < rng["full"][3][1]   # moved by whole steps of the rate since
    for step in (3, 4, 5):
        assert rng["resumed"][step] == rng["full"][step], step
        assert rng["mixed_resumed"][step] == rng["mixed_full"][step], step
    assert rng["reshard_tp1ep1"][3] == rng["full"][3] and rng["reshard_vpp"][3] == rng["full"][3]
    assert rng["mixed_cp2"][3] == rng["mixed_full"][3]


def test_a_model_mixing_dsa_ksa_and_dense_layers_resumes_bit_identically(runs):
    assert sorted(runs["mixed_stopped"]) == [1, 2] and sorted(runs["mixed_resumed"]) == [3, 4, 5]
    assert runs["mixed_full"][1] != runs["full"][1]  # another model than the dense one's
    for step in (1, 2):
        assert runs["mixed_stopped"][step] == runs["mixed_full"][step]
    for step in (3, 4, 5):
        assert runs["mixed_resumed"][step] == runs["mixed_full"][step], f"step {step} differs after resume"


def test_reshard_on_resume_gives_the_same_loss(runs):
    assert sorted(runs["reshard_tp1ep1"]) == [3]
    ref = runs["full"][3]
    assert abs(runs["reshard_tp1ep1"][3] - ref) <= 2e-5 * ref


def test_an_interleaved_pipeline_loads_and_saves_the_optimizer_state_in_model_space(runs, root):
    """optimizer_format=fully_reshardable under an interleaved pipeline (pp 2 x vpp 2, two model chunks per rank): the
    TP2/EP2 step-2 checkpoint resumed there, its step 3 against the uninterrupted TP2/EP2 run's within the layouts'
    2e-5 (measured 2e-8), and a checkpoint written there. Both stopped with `ValueError: Model param Parameter
    containing: ... not in model_sharded_state_dict` before (the save after the run's first step, that step lost):
    the two chunks' state dicts were merged into one for the optimizer, the second chunk's tensors replacing the
    first's of the same local name."""
    assert sorted(runs["reshard_vpp"]) == [3] and sorted(runs["vpp_saved"]) == [1]
    ref = runs["full"]
    assert abs(runs["reshard_vpp"][3] - ref[3]) <= 2e-5 * ref[3], (runs["reshard_vpp"], ref)
    assert abs(runs["vpp_saved"][1] - ref[1]) <= 2e-5 * ref[1], (runs["vpp_saved"], ref)
    assert (root / "runs" / "v" / "checkpoints" / "step_000001" / "COMPLETE.json").is_file()


def test_a_dp_reshardable_checkpoint_resumes_at_another_context_parallel_size(runs):
    """The DSA / KSA / dense model's step-2 checkpoint at CP1 x DP2 resumed at CP2 x DP1: its step 3 against the
    uninterrupted CP1 run's, within the layouts' 2e-5 (only fp32 reduction order differs; measured 3e-8). It stopped
    with "this run changes cp 1->2. That format reshards over data parallelism only" before."""
    assert sorted(runs["mixed_cp2"]) == [3]
    ref = runs["mixed_full"][3]
    assert abs(runs["mixed_cp2"][3] - ref) <= 2e-5 * ref


def test_a_changed_model_stops_before_the_resume(runs, root, monkeypatch):
    from train.launch import compose_config, validate

    monkeypatch.setenv("WORLD_SIZE", "2")              # the layout the runs were launched at
    same = QUIET + COMMON + TP2EP2 + [f"run_dir={root / 'runs' / 's'}"]
    with pytest.raises(ValueError, match=r"holds a checkpoint \(step 5.*model\.lm\.hidden_size is 128 there, 96 here; "
                                         r"model\.lm\.moe_topk is 2 there, 1 here\. Resume it with its own model"):
        validate(compose_config(same + ["model.lm.hidden_size=96", "model.lm.moe_topk=1"]))
    with pytest.raises(ValueError, match=r"model\.lm\.dsa\.stage is 'sparse' there, 'dense_warmup' here"):
        validate(compose_config(same + ["model.lm.dsa.stage=dense_warmup"]))
    validate(compose_config(same + ["model.lm.loss_chunk_tokens=0"]))  # the same function, computed in one piece
    with pytest.raises(ValueError, match=r"holds a checkpoint \(step 5.*and train\.checkpoint\.resume=false: a fresh "
                                         r"run would write its checkpoints among that run's"):
        validate(compose_config(same + ["train.checkpoint.resume=false"]))
    # a layout the checkpoint's optimizer state cannot be loaded at (dp_reshardable: only DP may change) stops here,
    # before any process group or model; the trainer found it only after building the model
    mixed = QUIET + COMMON + MIXED + [f"run_dir={root / 'runs' / 'm'}"]
    with pytest.raises(ValueError, match=r"runs/m/checkpoints/step_000005 stores the optimizer as dp_reshardable at "
                                         r"tp=1 .*this run changes tp 1->2.*optimizer_format=fully_reshardable"):
        validate(compose_config(mixed + ["parallel.tp=2"]))
    validate(compose_config(mixed))
    # a checkpoint's optimizer state holds the parameters its stage trained: another train.trainable failed in
    # megatron's load after the build (KeyError naming an optimizer entry); scoring its weights trains nothing
    with pytest.raises(ValueError, match=r"runs/m/checkpoints/step_000005\) of a stage with train\.trainable=all, and "
                                         r"this launch has train\.trainable=indexer: .*init_from=.*runs/m"):
        validate(compose_config(mixed + ["train.trainable=indexer"]))
    validate(compose_config(mixed + ["train.trainable=indexer", "train.eval.only=true"]))


def resumed_hyperparameters(jobs: str) -> None:
    """For each [out, overrides] of the JSON list `jobs`, in turn: resumes the run directory in `overrides` with
    CHANGED and writes, from rank 0, every LM parameter group's lr (as apply_lr sets it for the next step), betas and
    eps, and the lr the step logs."""
    import json

    from parallel.groups import teardown
    from train.launch import compose_config, validate
    from train.optim import apply_lr, torch_optimizers
    from train.trainer import Trainer

    for out, overrides in json.loads(jobs):
        cfg, layout = validate(compose_config(overrides.split() + [f"train.{k}={v}" for k, v in CHANGED.items()]))
        tr = Trainer(cfg, layout)
        logged = apply_lr(tr.optimizer, tr.step, cfg.train)
        groups = [{"lr": g["lr"], "betas": list(g["betas"]), "eps": g["eps"], "wd_mult": g.get("wd_mult", 1.0)}
                  for opt in torch_optimizers(tr.optimizer) for g in opt.param_groups]
        if tr.rank == 0:
            with open(out, "w") as f:
                json.dump({"step": tr.step, "logged": logged, "groups": groups}, f)
        tr.close()
    teardown()


@pytest.fixture(scope="module")
def resumed_groups(runs_all, root):
    """Each optimizer format's run (stopped after step 2 in runs_all) resumed with CHANGED, both in one job of 2 ranks:
    format -> what resumed_hyperparameters wrote."""
    import json

    from tests.launch_util import run_ranks

    jobs = [[str(root / f"groups_{fmt}.json"),
             " ".join(QUIET + [o for o in _hyper_first(fmt) if not o.startswith(("run_dir", "train.stop_after"))]
                      + [f"run_dir={root / 'runs' / f'lr_{fmt}'}"])] for fmt in FORMATS]
    run_ranks(2, "tests.dist.test_resume:resumed_hyperparameters", (json.dumps(jobs),), root / "hyper_logs")
    return {fmt: json.loads(Path(out).read_text()) for fmt, (out, _) in zip(FORMATS, jobs)}


@pytest.mark.parametrize("optimizer_format", FORMATS)
def test_a_resume_trains_with_the_learning_rate_and_adam_settings_it_is_given(resumed_groups, optimizer_format):
    import math

    got = resumed_groups[optimizer_format]
    assert got["step"] == 2
    # the cosine schedule of optim.py's docstring at 0-based step 2, warm-up 1 of 6 steps, with the new bounds
    lo, hi = CHANGED["min_lr"], CHANGED["lr"]
    want = lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * (2 - 1) / (6 - 1)))
    assert got["logged"] == pytest.approx(want, rel=1e-12)   # float64 arithmetic in another order
    assert got["groups"]
    for g in got["groups"]:
        assert g["lr"] == pytest.approx(want, rel=1e-12), g
        assert g["betas"] == [0.9, CHANGED["adam_beta2"]] and g["eps"] == CHANGED["adam_eps"], g
