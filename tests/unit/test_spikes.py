"""train.spike (train/spikes.py; train/trainer.py Trainer._step_unless_spike, _spike_skip_or_stop): the decision
against a hand-computed median, the window's checkpoint state, the settings' errors, megatron's optimizer step split
around the decision (the same update as optimizer.step(): a one-process world, the tiny MoE LM), and the words of a
skipped and of a stopping step. A run that skips an injected spike and resumes its window from a checkpoint, against
one that skips the same step for a NaN: tests/dist/test_nonfinite.py."""

import copy
import gc
import json
import logging
import types

import pytest
import torch

from data.exclude import read_exclude
from train.config import SpikeConfig, to_config
from train.launch import compose_config
from train.spikes import Spike, SpikeStepError, SpikeWindow, apply_step, norm_before_step
from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron


def test_a_norm_above_factor_times_the_median_of_the_window_spikes():
    w = SpikeWindow(factor=3.0, window=4)
    for x in (1.0, 2.0, 10.0):
        assert w.check({"grad_norm": 1e9}) == []   # no decision before the window is full
        w.add({"grad_norm": x})
    w.add({"grad_norm": 3.0})
    # the window [1, 2, 10, 3]: median (2 + 3) / 2 = 2.5, so the bound is 7.5 (10 among them moves it not at all)
    assert w.check({"grad_norm": 7.5}) == []
    assert w.check({"grad_norm": 7.6}) == [Spike("grad_norm", 7.6, 2.5)]
    # the oldest norm leaves: [2, 10, 3, 4], median 3.5, bound 10.5
    w.add({"grad_norm": 4.0})
    assert w.check({"grad_norm": 10.5}) == [] and w.check({"grad_norm": 10.6}) == [Spike("grad_norm", 10.6, 3.5)]
    # each norm against its own window: the vision tower's is not judged before 4 of its own
    for x in (0.1, 0.2, 0.3):
        w.add({"vit_grad": x})
    assert w.check({"grad_norm": 5.0, "vit_grad": 100.0}) == []
    w.add({"vit_grad": 0.4})
    assert w.check({"grad_norm": 11.0, "vit_grad": 0.8}) == [Spike("grad_norm", 11.0, 3.5),
                                                             Spike("vit_grad", 0.8, 0.25)]
    # a part that does not train (norms 0) judges nothing
    z = SpikeWindow(factor=2.0, window=1)
    z.add({"grad_norm": 0.0})
    assert z.check({"grad_norm": 1.0}) == []


def test_the_window_round_trips_through_a_checkpoints_state():
    w = SpikeWindow(factor=2.0, window=3)
    for x in (1.0, 2.0, 3.0, 4.0):
        w.add({"grad_norm": x, "vit_grad": x / 10})
    state = copy.deepcopy(w.state_dict())
    assert state == {"norms": {"grad_norm": [2.0, 3.0, 4.0], "vit_grad": [0.2, 0.3, 0.4]}}
    back = SpikeWindow(factor=2.0, window=3)
    back.load_state_dict(state)
    assert back.check({"grad_norm": 6.1}) == w.check({"grad_norm": 6.1}) == [Spike("grad_norm", 6.1, 3.0)]
    # resumed with a shorter train.spike.window: its last norms
    short = SpikeWindow(factor=2.0, window=2)
    short.load_state_dict(state)
    assert short.state_dict() == {"norms": {"grad_norm": [3.0, 4.0], "vit_grad": [0.3, 0.4]}}


@pytest.mark.parametrize("key,value,words", [
    ("factor", 1.0, "train.spike.factor must be a finite number > 1, or 0 for off; got 1.0"),
    ("factor", 0.5, "train.spike.factor must be a finite number > 1"),
    ("factor", -3.0, "train.spike.factor must be a finite number > 1"),
    ("factor", float("nan"), "train.spike.factor must be a finite number > 1"),
    ("factor", float("inf"), "train.spike.factor must be a finite number > 1"),
    ("window", 0, "train.spike.window must be >= 1 (applied steps), got 0"),
    ("skip_steps", -1, "train.spike.skip_steps must be >= 0, got -1"),
])
def test_bad_spike_settings_name_the_key(key, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        SpikeConfig(**{key: value})


def test_bad_spike_settings_stop_the_config_and_the_default_is_off():
    with pytest.raises(ValueError, match=r"train\.spike\.window must be >= 1"):
        to_config(compose_config(["recipe=keye_tiny_lm", "train.spike.factor=10", "train.spike.window=0"]))
    assert to_config(compose_config(["recipe=keye_tiny_lm"])).train.spike.factor == 0


@pytest.fixture(scope="module")
def world():
    pgs = init_one_process_megatron(3)
    try:
        yield pgs
    finally:
        del pgs
        destroy_one_process_megatron()
        gc.collect()


def test_the_split_step_updates_as_megatrons_step(world):
    """Two copies of the tiny MoE LM, the same gradients: megatron's optimizer.step() on one, norm_before_step and
    apply_step on the other (gradients clipped: train.grad_clip 1.0 below their norm). Every parameter equal, bit
    for bit, and the same norm."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from models.config import LMConfig, ModelParallelSizes
    from models.lm import build_lm, transformer_config
    from train.config import TrainConfig
    from train.optim import build_optimizer

    lm = LMConfig(num_layers=2, loss_chunk_tokens=0)
    tcfg = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True, recompute=None)
    first = build_lm(lm, tcfg, pg_collection=world, pp_rank=0, pp_size=1)
    second = build_lm(lm, tcfg, pg_collection=world, pp_rank=0, pp_size=1)
    second.load_state_dict(first.state_dict())
    g = torch.Generator().manual_seed(3)
    tokens, labels = (torch.randint(0, lm.vocab_size, (2, 16), generator=g) for _ in range(2))
    pos = torch.arange(16).expand(3, 2, 16)
    out = {}
    for name, module in (("step", first), ("split", second)):
        ddp = DistributedDataParallel(config=tcfg, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                      module=module, pg_collection=world)
        opt = build_optimizer([ddp], TrainConfig(grad_clip=1.0), bf16=False, distributed=False, pg_collection=world)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        (ddp(tokens, pos, None, labels=labels).sum() * 1000).backward()   # x 1000: a norm the clip scales down
        finalize_model_grads([ddp], pg_collection=world)
        if name == "step":
            ok, norm, _ = opt.step()
        else:
            norm = norm_before_step(opt)
            ok = apply_step(opt, norm)
        out[name] = ok, norm, {n: p.detach().clone() for n, p in module.named_parameters()}
    (ok1, n1, p1), (ok2, n2, p2) = out["step"], out["split"]
    assert ok1 and ok2 and n1 == n2 and n1 > 1.0
    assert p1.keys() == p2.keys() and all(torch.equal(p1[k], p2[k]) for k in p1)


class _Stream:
    def describe_step(self, micro, parts):
        assert micro is None and parts is None   # the whole step's data: its norm is the world's
        return "a synthetic_tokens stream: global samples 0..7"

    def step_record(self, micro, parts):   # a video stream's fields, which data.exclude reads
        return {"stream": "video", "packs": [{"epoch": 0, "pack": 3, "samples": ["shard-000001.tar/clip_1"]}]}


def _trainer(tmp_path, skip_steps: int):
    from train.config import Config

    cfg = Config(run_dir=str(tmp_path))
    cfg.train.spike = SpikeConfig(factor=4.0, window=2, skip_steps=skip_steps)
    cfg.train.checkpoint.enabled = False
    cfg.data.kind = "tokens"   # (synthetic text names no samples to leave out)
    from train.trainer import Trainer

    one = types.SimpleNamespace(rank=lambda: 0)
    tr = types.SimpleNamespace(cfg=cfg, streams=[_Stream()], rank=0, run_dir=str(tmp_path), step=7, hosts=[""],
                               spike_in_row=0, spike_skipped=0, _finish_saves=lambda blocking: None,
                               pgs=types.SimpleNamespace(tp=one, pp=one, cp=one),
                               own_grads=types.SimpleNamespace(own_norm=None), vit_own_norm=None)
    tr._spike_suspects = types.MethodType(Trainer._spike_suspects, tr)
    return tr


def test_a_spike_is_skipped_then_the_run_stops_naming_the_setting(world, tmp_path, caplog):
    from train.trainer import Trainer

    tr = _trainer(tmp_path, skip_steps=1)
    spike = [Spike("grad_norm", 40.0, 2.0)]
    Trainer._spike_skip_or_stop(tr, spike, 3.5, {"grad_norm": 40.0})
    assert (tr.spike_in_row, tr.spike_skipped) == (1, 1)
    what = ("step 7: the language model's gradient norm 40 is 20 x the median 2 of the last 2 applied steps' (more "
            "than train.spike.factor=4) (the step's loss 3.5)")
    assert (f"{what}: skipped, no weight updated (1 in a row of the 1 train.spike.skip_steps allows); this rank's "
            "data in the step: a synthetic_tokens stream: global samples 0..7") in caplog.text
    tr.step = 8
    with pytest.raises(SpikeStepError) as e:
        Trainer._spike_skip_or_stop(tr, spike, 3.5, {"grad_norm": 40.0})
    assert str(e.value) == (
        f"{what.replace('step 7', 'step 8')}, so no weight was updated and the run stops after 2 such steps in a row "
        "(train.spike.skip_steps=1 skips up to that many in a row). 2 steps in a row, each on other data, spiking "
        "against the same window point at the weights (the last applied step, its learning rate) more than at the "
        "data: a resume judges them against the same window and stops again unless train.spike.factor changes. "
        "Checkpoints are off (train.checkpoint.enabled="
        "false): rerunning starts the run over. Rank 0's data in the step: a synthetic_tokens stream: global samples "
        "0..7. data.exclude=" + str(tmp_path / "spikes.jsonl") + " leaves the samples it names out of the data (the "
        "whole step's; with data.exclude_spikes=suspect, only the first suspect's); a larger train.spike.factor (or "
        "train.spike.factor=0: off) lets such steps through")
    (tmp_path / "synthetic").mkdir()
    synthetic = _trainer(tmp_path / "synthetic", skip_steps=0)
    synthetic.cfg.data.kind = "synthetic_tokens"   # rows of a Markov chain name no samples to leave out
    with pytest.raises(SpikeStepError, match=r"global samples 0\.\.7\. A larger train\.spike\.factor \(or"):
        Trainer._spike_skip_or_stop(synthetic, spike, 3.5, {})
    recs = [json.loads(x) for x in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert [(r["step"], r["action"], r["spikes"]) for r in recs] == [
        (s, a, [{"norm": "grad_norm", "value": 40.0, "median": 2.0}]) for s, a in ((7, "skipped"), (8, "stopped"))]
    assert recs[0]["samples"] == {"0": {"micro_batches": None, "streams": [_Stream().step_record(None, None)]}}
    assert read_exclude(str(tmp_path / "spikes.jsonl")).keys == {"shard-000001.tar/clip_1"}   # what the stop names


def test_a_spike_names_each_ranks_data_once(world, tmp_path, caplog, monkeypatch):
    """Ranks 0 and 1 read the same data (a TP pair), rank 2 other data: the log and the record name ranks 0 and 2."""
    import train.trainer as trainer_module

    other = ("a synthetic_tokens stream: global samples 8..15", {"stream": "synthetic_tokens"},
             ([], None, (0, 0, 0), None))

    def gather(out, mine):
        out[:] = [mine, mine, other] if isinstance(mine, tuple) else [mine, {}, {}]   # (the suspects': none here)
    monkeypatch.setattr(trainer_module.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(trainer_module.dist, "all_gather_object", gather)
    tr = _trainer(tmp_path, skip_steps=1)
    trainer_module.Trainer._spike_skip_or_stop(tr, [Spike("grad_norm", 40.0, 2.0)], 3.5, {})
    assert ("skipped, no weight updated (1 in a row of the 1 train.spike.skip_steps allows); rank 2's data in the "
            "step: a synthetic_tokens stream: global samples 8..15; this rank's data in the step: a synthetic_tokens "
            "stream: global samples 0..7") in caplog.text
    (rec,) = [json.loads(x) for x in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert rec["data"] == {"0": "a synthetic_tokens stream: global samples 0..7", "2": other[0]}


def test_the_suspects_are_the_micro_batches_of_the_rank_whose_own_norm_stands_out(world, tmp_path, caplog,
                                                                                 monkeypatch):
    """3 data-parallel ranks (faked gathers), each with two micro-batches of the same losses; rank 2's own gradient
    norm before the reduction is 10 x the others' (its data made the norm): its micro-batch of the higher loss is the
    first suspect, named by rank 2's own stream (the second gather), though rank 0's loss is higher still. The record
    keeps the whole step's data too."""
    import train.trainer as trainer_module

    mb = lambda s: {"loss": s, "tokens": 2.0, "parts": [[s / 2, 1.0], [s / 2, 1.0]]}   # noqa: E731
    numbers = {0: ([mb(4.0), mb(20.0)], 1.0, (0, 0, 0), None), 1: ([mb(4.0), mb(6.0)], 1.0, (0, 0, 0), None),
               2: ([mb(4.0), mb(8.0)], 10.0, (0, 0, 0), None)}
    named = lambda i, samples: {"micro_batches": [i], "streams": [   # noqa: E731
        {"stream": "synthetic_tokens", "global_samples": samples}]}
    rank2 = {0: named(1, [21]), 1: named(0, [17])}   # by the suspects' places: rank 2 holds the first two

    def gather(out, mine):
        if isinstance(mine, tuple):   # (data, record, numbers): rank r's own
            out[:] = [(f"a synthetic_tokens stream: global samples {8 * r}..{8 * r + 7}", {"r": r}, numbers[r])
                      for r in range(3)]
        else:                         # each rank's named suspects, by their places in the ranking
            assert list(mine) == [2]   # rank 0 (this process) names the third, its own micro-batch 1
            out[:] = [mine, {}, rank2]
    monkeypatch.setattr(trainer_module.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(trainer_module.dist, "all_gather_object", gather)
    tr = _trainer(tmp_path, skip_steps=1)
    trainer_module.Trainer._spike_skip_or_stop(tr, [Spike("grad_norm", 40.0, 2.0)], 3.5, {}, [])
    (rec,) = [json.loads(x) for x in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    first = rec["suspects"][0]
    # own norms [1, 1, 10]: median 1, so rank 2's ratio 10; its micro-batch 1's mean 8 / 2 = 4 against the median of
    # the six means [2, 10, 2, 3, 2, 4] = 2.5 (z: (4 - 2.5) / (1.4826 x their median distance 0.5)); rank 2's
    # micro-batch 0 next (ratio 10), then rank 0's micro-batch 1
    assert [(s["rank"], s["micro_batch"]) for s in rec["suspects"]] == [(2, 1), (2, 0), (0, 1)]
    assert (first["loss"], first["median"], first["norm_ratio"], first["samples"]) == (4.0, 2.5, 10.0, rank2[0])
    assert rec["replicas"]["2"] == {"rank": 2, "own_norm": 10.0, "norm_ratio": 10.0}
    assert sorted(rec["samples"]) == ["0", "1", "2"]   # the whole step's data, as before
    assert ("the suspects, by their replica's own gradient norm, then loss: 1) rank 2 micro-batch 1 (global samples "
            "21): loss 4 against the step's median 2.5 (z 2.02), its document or row 0's 4; the replica's own "
            "gradient norm before the reduction 10 x its peers' median; 2) rank 2 micro-batch 0") in caplog.text


def test_the_cp_ranks_of_one_replica_are_not_each_others_peers(world, tmp_path, monkeypatch):
    """parallel.cp=2 and one data replica: rank 1 (CP rank 1) reads rank 0's data and holds the other half of its
    tokens, its own gradient norm 3 x rank 0's. Each rank's numbers are those the trainer sends (rank 1's taken from
    a pass as CP rank 1). One replica has no peers to stand out against: its ratio is 1, and the suspects are the
    best guess alone. Compared as peers (they were: the same pipeline and tensor rank), the replica's ratio was 1.5
    (3 over the median 2) and every micro-batch was listed (a CP2 run with rank 1's own gradients x 1000: ratio
    1.996, its 3 micro-batches listed)."""
    import train.trainer as trainer_module

    text = "a synthetic_tokens stream: global samples 0..7"
    losses = [{"lm_loss": torch.tensor([2.0, 1.0], dtype=torch.float64)},
              {"lm_loss": torch.tensor([2.2, 1.0], dtype=torch.float64)}]
    sent = []

    def run(cp_rank: int, norm: float, others: list, run_dir):
        """This process as the rank of that CP rank and own norm, the other ranks' numbers `others`."""
        def gather(out, mine):
            if isinstance(mine, tuple):
                sent.append(mine)
            out[:] = [mine, *others] if isinstance(mine, tuple) else [mine] + [{}] * len(others)
        monkeypatch.setattr(trainer_module.dist, "all_gather_object", gather)
        monkeypatch.setattr(trainer_module.dist, "get_world_size", lambda: 1 + len(others))
        run_dir.mkdir()
        tr = _trainer(run_dir, skip_steps=1)
        tr.pgs.cp = types.SimpleNamespace(rank=lambda: cp_rank)
        tr.own_grads.own_norm = torch.tensor(norm)
        tr.streams[0].describe_step = lambda micro, parts: text
        trainer_module.Trainer._spike_skip_or_stop(tr, [Spike("grad_norm", 40.0, 2.0)], 3.5, {}, losses)
        return [json.loads(x) for x in (run_dir / "spikes.jsonl").read_text().splitlines()][-1]
    run(1, 3.0, [], tmp_path / "cp1")                # rank 1: what it sends
    rec = run(0, 1.0, [sent[0]], tmp_path / "cp0")   # rank 0, with rank 1's numbers
    assert rec["data"] == {"0": text}   # rank 1 reads the same data: named once
    assert rec["replicas"] == {"0": {"rank": 0, "own_norm": 1.0, "norm_ratio": 1.0}}, rec["replicas"]
    assert [(s["rank"], s["micro_batch"], s["stands_out"]) for s in rec["suspects"]] == [(0, 1, False)]


def test_the_own_norm_holds_the_experts_where_they_see_the_ranks_own_tokens(monkeypatch):
    """GradsBeforeReduction's own norm (what a spiking step compares between data-parallel peers): a dense buffer of
    norm 5 and an expert buffer of norm 12. At parallel.ep=1 the experts' gradients are the rank's own data's: the
    norm is 13 (by hand: sqrt(25 + 144)); it was 5 whatever the layout, so a spike in the experts alone left the
    replicas' ratios at noise. At parallel.ep > 1 they sum other ranks' tokens: 5."""
    import train.nonfinite as nonfinite
    from train.nonfinite import GradsBeforeReduction

    monkeypatch.setattr(nonfinite, "finalize_model_grads", lambda model, *a, **k: None)
    buf = lambda *v: types.SimpleNamespace(grad_data=torch.tensor(v))   # noqa: E731
    model = [types.SimpleNamespace(buffers=[buf(3.0, 4.0)], expert_parallel_buffers=[buf(12.0)])]
    for experts_own, norm in ((True, 13.0), (False, 5.0)):
        own = GradsBeforeReduction(0, experts_own=experts_own)
        own(model)
        assert float(own.own_norm) == norm and bool(own.finite)


def test_a_vision_tower_spike_points_at_the_replica_whose_own_vit_norm_stands_out(world, tmp_path, monkeypatch):
    """A spike of the vision tower's norm alone, 3 data-parallel ranks: the language model's own norms equal, each
    rank's micro-batch losses alike; this rank's (0) own vision-tower gradient norm 5, the others' 1 (its frames made
    the spike). Its micro-batches are the suspects, by its ViT ratio 5 (over every rank's median 1), and no other's.
    The own norm held the LM's gradients alone: the suspects were ranked by loss alone, rank 2's micro-batch 1 (the
    highest, z 2.7: an innocent) named as the best guess."""
    import train.trainer as trainer_module

    mb = lambda s: {"loss": s, "tokens": 1.0, "parts": None}   # noqa: E731
    losses = [{"lm_loss": torch.tensor([2.0, 1.0], dtype=torch.float64)},
              {"lm_loss": torch.tensor([2.05, 1.0], dtype=torch.float64)}]
    others = [([mb(1.95), mb(2.0)], 1.0, (0, 0, 0), 1.0), ([mb(2.0), mb(2.1)], 1.0, (0, 0, 0), 1.0)]
    seen = []

    def gather(out, mine):
        if isinstance(mine, tuple):
            seen.append(mine[2])
            out[:] = [mine] + [(f"a synthetic_tokens stream: global samples {8 * r}..{8 * r + 7}", {}, n)
                               for r, n in enumerate(others, 1)]
        else:
            out[:] = [mine, {}, {}]
    monkeypatch.setattr(trainer_module.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(trainer_module.dist, "all_gather_object", gather)
    tr = _trainer(tmp_path, skip_steps=1)
    tr.own_grads.own_norm, tr.vit_own_norm = torch.tensor(1.0), torch.tensor(5.0)
    trainer_module.Trainer._spike_skip_or_stop(tr, [Spike("vit_grad", 40.0, 2.0)], 3.5, {}, losses)
    assert seen[0][3] == 5.0   # what this rank sends: its own vision-tower norm
    (rec,) = [json.loads(x) for x in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert [(s["rank"], s["micro_batch"], s["vit_norm_ratio"]) for s in rec["suspects"]] == [(0, 1, 5.0), (0, 0, 5.0)]
    assert rec["replicas"]["0"] == {"rank": 0, "own_norm": 1.0, "norm_ratio": 1.0, "vit_rank": 0, "vit_own_norm": 5.0,
                                    "vit_norm_ratio": 5.0}
    assert rec["replicas"]["1"]["vit_norm_ratio"] == 1.0


def test_the_vision_towers_own_norm_is_that_of_all_its_gradients():
    """VisionTower.own_grads: the norm of every trained parameter's gradient together (by hand: sqrt(3^2 + 4^2 +
    12^2) = 13), from the norms its finite check takes; None without gradients."""
    from train.vision import VisionTower

    tower = VisionTower.__new__(VisionTower)
    a, b, frozen = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True), torch.zeros(1)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    tower.params = [a, b, frozen]
    finite, norm = tower.own_grads()
    assert bool(finite) and float(norm) == 13.0
    tower.params = [frozen]
    finite, norm = tower.own_grads()
    assert bool(finite) and norm is None


def test_a_checkpoint_without_a_window_resumes_with_an_empty_one(caplog):
    """The common state of a checkpoint written before train.spike existed has no "spike": the counts start at 0,
    the window empty, and the log says so; one written with it gives its window back."""
    from train.trainer import Trainer

    tr = types.SimpleNamespace(rank=0, spikes=SpikeWindow(factor=5.0, window=2), spike_in_row=9, spike_skipped=9)
    with caplog.at_level(logging.INFO, logger="train"):
        Trainer._restore_spike_state(tr, {"step": 4, "nonfinite": {"in_row": 0, "skipped": 0}})
    assert (tr.spike_in_row, tr.spike_skipped, tr.spikes.norms) == (0, 0, {})
    assert ("train.spike: the checkpoint holds no window of gradient norms (written with train.spike off, or before it "
            "existed): the window starts empty, and no step is judged before 2 applied steps fill it") in caplog.text
    saved = {"in_row": 1, "skipped": 3, "window": {"norms": {"grad_norm": [1.0, 2.0]}}}
    Trainer._restore_spike_state(tr, {"spike": saved})
    assert (tr.spike_in_row, tr.spike_skipped, tr.spikes.state_dict()) == (1, 3, saved["window"])


def test_a_resumed_launch_sets_aside_the_spike_records_of_the_steps_it_trains_again(tmp_path):
    """spikes.jsonl is one of the run's record files (train/metrics.py set_aside_redone): a launch resuming at step 4
    moves the records of steps 5 on, which it trains again, to spikes.superseded.jsonl (reference: split by hand)."""
    from train.metrics import set_aside_redone

    recs = [json.dumps({"step": s, "action": "skipped"}) for s in (3, 5, 6)]
    (tmp_path / "spikes.jsonl").write_text("\n".join(recs) + "\n")
    assert set_aside_redone(str(tmp_path), 4) == ["spikes.jsonl: 2 record(s) after step 4, which this launch trains "
                                                  "again, moved to spikes.superseded.jsonl"]
    assert (tmp_path / "spikes.jsonl").read_text().splitlines() == recs[:1]
    assert (tmp_path / "spikes.superseded.jsonl").read_text().splitlines() == recs[1:]


def _counting_trainer(tmp_path, *, spike_skips: int, nonfinite_skips: int):
    """_trainer with the Trainer's two skip-or-stop methods bound, as _skipped_in_row calls them."""
    from train.trainer import Trainer

    tr = _trainer(tmp_path, skip_steps=spike_skips)
    tr.cfg.train.skip_nonfinite_steps = nonfinite_skips
    tr.nonfinite_in_row = tr.skipped_steps = 0
    tr.num_microbatches = 1
    for name in ("_skip_or_stop", "_spike_skip_or_stop"):
        setattr(tr, name, types.MethodType(getattr(Trainer, name), tr))
    return tr


@pytest.mark.parametrize("order", ["spike, nan, spike", "nan, spike, nan", "spike, applied, spike"])
def test_a_step_skipped_for_the_other_cause_neither_ends_nor_adds_to_a_count_in_a_row(world, tmp_path, order):
    """Steps in a row are steps with no applied step between them: a NaN step between two spiking ones updates no
    weight and adds no norm to the window, so the second spike meets the same weights and window as the first (the
    stop's point: spikes in a row point at the weights); the same for a spiking step between two NaN ones. Each
    count keeps its own limit (train.spike.skip_steps, train.skip_nonfinite_steps, 1 each here): the third step
    stops the run, its count at 2. An applied step between ends the count. (Before, a spiking step ended the count
    of NaN steps in a row: NaN, spike, NaN skipped the second NaN step as the first in a row.)"""
    from train.nonfinite import NonFinite, NonFiniteStepError
    from train.trainer import Trainer

    tr = _counting_trainer(tmp_path, spike_skips=1, nonfinite_skips=1)
    kinds = order.split(", ")
    steps = {"spike": (NonFinite([], [], []), [Spike("grad_norm", 40.0, 2.0)]),
             "nan": (NonFinite(["the language model's"], [0], []), []),
             "applied": (NonFinite([], [], []), [])}
    for i, kind in enumerate(kinds):
        bad, spikes = steps[kind]
        last = i == len(kinds) - 1
        if last and order != "spike, applied, spike":
            error = SpikeStepError if kind == "spike" else NonFiniteStepError
            with pytest.raises(error, match="2 such steps in a row" if kind == "spike" else r"\(2 in a row now\)"):
                Trainer._skipped_in_row(tr, bad, spikes, 3.5, {}, 40.0, micro={})
        else:
            Trainer._skipped_in_row(tr, bad, spikes, 3.5, {}, 40.0, micro={})
        tr.step += 1
    if order == "spike, applied, spike":
        assert (tr.spike_in_row, tr.spike_skipped) == (1, 2)


class _LMOptimizer:
    """Megatron's optimizer as _step_unless_spike drives it (norm_before_step, apply_step): finite gradients of norm
    1 at every step (the language model never spikes here), no parameters to clip; records the steps applied."""

    chained_optimizers: list = []

    def __init__(self):
        self.applied = 0

    def prepare_grads(self):
        return False

    def get_grad_norm(self):
        return 1.0

    def step_with_ready_grads(self):
        self.applied += 1
        return True


def test_a_spike_of_the_vision_towers_norm_alone_skips_the_step_as_a_reference_that_leaves_it_out():
    """The vision tower's gradient norm is judged against its own window: a step whose ViT gradients are x1000
    (the language model's norm as usual) is a spike of "vit_grad" alone, and neither part is updated. Reference:
    torch's AdamW over a copy of the tower (build_vision_optimizer's groups, train/optim.apply_lr at each applied
    step's index) stepping on the same gradients with that step left out; bit for bit, the same operations on the
    same values. The spiking norm joins no window."""
    from models.vision import VisionModel, tiny
    from train.config import TrainConfig
    from train.optim import apply_lr
    from train.trainer import Trainer
    from train.vision import VisionTower, build_vision_optimizer

    t = TrainConfig(steps=10, warmup_steps=2, lr=1e-3, min_lr=1e-4, vision_lr=2e-4)
    torch.manual_seed(0)
    model = VisionModel(tiny(24))
    ref_model = copy.deepcopy(model)
    tower = VisionTower.__new__(VisionTower)   # what update() and discard() read
    tower.optimizer, tower.train_cfg, tower.steps = build_vision_optimizer(model, t), t, 0
    ref = build_vision_optimizer(ref_model, t)
    lm = _LMOptimizer()
    tr = types.SimpleNamespace(lm_trainable=True, optimizer=lm, vision=tower, spikes=SpikeWindow(10.0, 3), step=0)
    g = torch.Generator().manual_seed(1)
    spiked, judged = 5, {}
    for k in range(8):
        grads = [torch.randn(p.shape, generator=g) * (1000.0 if k == spiked else 1.0) for p in model.parameters()]
        for p, x in zip(model.parameters(), grads):
            p.grad = x.clone()
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads])))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        lm_norm, judged[k] = Trainer._step_unless_spike(tr, norm)
        assert lm_norm == 1.0
        if k == spiked:
            assert [s.name for s in judged[k]] == ["vit_grad"] and judged[k][0].norm == norm
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())   # nothing moved
            assert all(p.grad is None for p in model.parameters())   # dropped, not carried into the next step
            assert norm not in tr.spikes.norms["vit_grad"]
        else:
            assert judged[k] == []
            apply_lr(ref, k, t)
            for p, x in zip(ref_model.parameters(), grads):
                p.grad = x.clone()
            ref.step()
            ref.zero_grad(set_to_none=True)
        tr.step += 1
    assert lm.applied == 7 and tower.steps == 7
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
