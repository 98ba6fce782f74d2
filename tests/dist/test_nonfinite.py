"""A step whose gradients hold a NaN or an Inf updates no weight (train/trainer.py _nonfinite, _skip_or_stop).

The NaN comes from train/faults.py: KEYE_FAULT=nan_in_step:step=3:rank=1 makes rank 1's loss in step 3 NaN, so its
gradients are NaN and, through the data-parallel reduction, every rank's shards; rank 0's own loss stays finite.
KEYE_FAULT=nan_grad_in_step:step=3:rank=1 makes only rank 1's gradients NaN, after the reduction: the decision to
skip is the world's, so rank 0, whose own gradients are finite, skips too. nan_backward_in_step makes rank 1's own
gradients NaN before the reduction, its loss finite (a backward that overflowed). In the DSA warm-up, whose step runs
forward only, nan_in_step makes a rank's indexer inputs NaN. With `micro=1` only the loss (the warm-up: the indexer
KL) of the rank's second micro-batch is NaN: the messages name that micro-batch's data alone; with `doc=J` too, that
of one of its rows (the LM's) or documents (a pack's) alone.
- Stop (the default, train.skip_nonfinite_steps=0): the launcher exits 4 with `non-finite step: step 3 ...`, naming
  the step's loss, where it arose (the ranks whose own loss, or own gradients before the reduction, were not finite)
  with those ranks' data in the step, and the last checkpoint (step 2); each rank's log names the samples it trained
  on in the step. The rerun without the fault resumes from step 2 and gives an uninterrupted run's losses bit for bit
  (CPU fp32).
- Skip (train.skip_nonfinite_steps=1): after step 3 every parameter, the language model's and the vision tower's,
  equals its value after step 2 (a run stopped there: parameter sums compared exactly), the step counts in
  `skipped_steps` (kept in the checkpoint: a resumed run reports it), and the run goes on. Two such steps in a row
  with one allowed stop at the second.
- A gradient spike (train.spike; KEYE_FAULT=spike_grad_in_step: the gradients 1000 times what they were) is skipped
  too: the run goes on as one that skipped the same step for a NaN, bit for bit, and the window of norms it judges
  against travels with the checkpoint.
"""

import json
import math
import re

import pytest

from tests.launch_util import losses, run_launch, run_layouts_all

pytestmark = pytest.mark.slow

LM = ["recipe=keye_tiny_lm", "train.global_batch_size=16", "train.micro_batch_size=4", "train.seq_length=64",
      "train.steps=5", "train.checkpoint.save_interval=1"]
FAULT = "nan_in_step:step=3:rank=1"
SPIKE = ["train.spike.factor=5", "train.spike.window=2", "train.spike.skip_steps=1"]


def test_a_nan_step_stops_the_run_naming_it_and_the_rerun_resumes_exactly(skipped, tmp_path):
    reference = skipped["losses"]["lm_reference"]   # the same settings without the fault (forked ranks)
    run = tmp_path / "run"
    out = run_launch(2, LM, run, env={"KEYE_FAULT": FAULT}, check=False)
    assert out.returncode == 4, out.stderr[-3000:]   # train/launch.py's exit code of a non-finite step
    # rank 0's own gradients are NaN before the data-parallel reduction too: the tiny LM's experts are spread over
    # the 2 ranks (ep 2), and an expert's gradient sums every rank's tokens; its loss stays finite, so rank 1 is
    # where it arose, and G = 16 over 2 data-parallel ranks makes rank 1's part of step 3 global samples 40..47
    assert ("non-finite step: step 3: the language model's gradients hold a NaN or an Inf (the step's loss nan), so no "
            "weight was updated and the run stops; before their reduction over ranks, the loss on rank 1 and the "
            "gradients on ranks 0-1 were not finite. The last checkpoint is " + str(run / "checkpoints" / "step_000002")
            + ": rerunning the same command resumes from it. Rank 1's data in the step: a synthetic_tokens stream: "
            "global samples 40..47. train.skip_nonfinite_steps=N") in out.stderr, out.stderr[-3000:]
    for rank, (first, last) in enumerate(((32, 39), (40, 47))):
        text = (run / "logs" / f"rank{rank}.log").read_text()
        assert ("step 3: the language model's gradients hold a NaN or an Inf (the step's loss nan); before their "
                "reduction over ranks, the loss on rank 1 and the gradients on ranks 0-1 were not finite") in text
        assert (f"; this rank's data in the step: a synthetic_tokens stream: global samples {first}..{last}"
                in text), text[-2000:]
    assert "rank 1's data in the step: a synthetic_tokens stream: global samples 40..47; this rank's data" in \
        (run / "logs" / "rank0.log").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_000001", "step_000002"]
    assert sorted(reference) == [1, 2, 3, 4, 5]
    assert losses(run) == {s: v for s, v in reference.items() if s <= 2}
    # the run's record of the step (nonfinite.jsonl): what the message says, for a script
    (rec,) = [json.loads(line) for line in (run / "nonfinite.jsonl").read_text().splitlines()]
    assert {k: rec[k] for k in ("step", "action", "gradients", "loss_ranks", "grad_ranks", "data")} == {
        "step": 3, "action": "stopped", "gradients": ["the language model's"], "loss_ranks": [1],
        "grad_ranks": [0, 1], "data": {"1": "a synthetic_tokens stream: global samples 40..47"}}
    assert rec["samples"] == {"1": {"micro_batches": None, "streams": [{"stream": "synthetic_tokens",
                                                                        "global_samples": list(range(40, 48))}]}}
    # strict JSON: the NaN loss is null, named in "nonfinite" (train/metrics.py json_record), as in metrics.jsonl
    assert rec["loss"] is None and rec["nonfinite"] == {"loss": "nan"} and "moe_load_max" in rec
    run_launch(2, LM, run)  # the same command without the fault
    assert losses(run) == reference
    # it trained step 3 again: the record moved aside with the stopped launch's others
    assert (run / "nonfinite.jsonl").read_text() == ""
    assert json.loads((run / "nonfinite.superseded.jsonl").read_text())["step"] == 3


@pytest.fixture(scope="module")
def skipped(tmp_path_factory):
    from data.video_stream import ensure_synthetic_shards

    # text-only samples among the videos: packs of several documents
    shards = ensure_synthetic_shards(tmp_path_factory.mktemp("videos"), 8, 1234, rank=0, n_text=24)
    vl = ["recipe=keye_tiny", "train.steps=5", "train.global_batch_size=4", "train.checkpoint.enabled=false",
          "data.synthetic_videos=8", f"data.video.shards={shards}"]
    lm = [o for o in LM if "save_interval" not in o] + ["train.checkpoint.enabled=false"]
    skip = [f"KEYE_FAULT={FAULT}", "train.skip_nonfinite_steps=1"]
    # the loss of rank 1's second micro-batch of step 3 alone is NaN (2 per rank and step in either run), of its
    # third row (the LM's micro-batches of 4 rows), or of its first document (a pack)
    skip_one = [f"KEYE_FAULT={FAULT}:micro=1", "train.skip_nonfinite_steps=1"]
    layouts = {}
    for name, common, part in (("lm", lm, 2), ("vl", vl, 0)):
        skip_part = [f"KEYE_FAULT={FAULT}:micro=1:doc={part}", "train.skip_nonfinite_steps=1"]
        layouts.update({f"{name}_before": common + ["train.stop_after=2"],
                        f"{name}_skipped": common + skip_part + ["train.stop_after=3"],
                        f"{name}_on": common + skip_part})
    # the samples the skipped step's record names (one sample key of rank 1's pack), left out of the same data:
    # steps 1-2 as before, the pack of step 3 closed up without it, no fault (data/exclude.py)
    tmp = tmp_path_factory.mktemp("skip")
    layouts["vl_excluded"] = vl + [f"data.exclude={tmp / 'runs' / 'vl_skipped' / 'nonfinite.jsonl'}",
                                   "train.stop_after=3"]
    layouts["lm_one_rank"] = lm + ["KEYE_FAULT=nan_grad_in_step:step=3:rank=1", "train.skip_nonfinite_steps=1",
                                   "train.stop_after=3"]
    layouts["lm_backward"] = lm + ["KEYE_FAULT=nan_backward_in_step:step=3:rank=1", "train.skip_nonfinite_steps=1",
                                   "train.stop_after=3"]
    # TP2: the loss of rank 1 (TP rank 1, which the step's loss sum does not count) in its micro-batch 1 of step 1;
    # CP2: every rank's loss, each CP rank holding half of one replica's tokens (a step each: ~2 s)
    layouts["lm_tp2"] = lm + ["parallel.tp=2", "parallel.ep=1", "KEYE_FAULT=nan_in_step:step=1:rank=1:micro=1",
                              "train.skip_nonfinite_steps=1", "train.stop_after=1"]
    layouts["lm_cp2"] = lm + ["parallel.cp=2", "parallel.ep=1", "KEYE_FAULT=nan_in_step:step=1",
                              "train.skip_nonfinite_steps=1", "train.stop_after=1"]
    # the DSA warm-up: only the indexers train, in a forward-only step (each layer's KL back-propagates in its
    # forward); rank 1's indexer inputs are NaN in step 3, in its second micro-batch
    warmup = ["recipe=keye_tiny_dsa_warmup", "train.steps=5", "train.checkpoint.enabled=false"]
    layouts["warmup_before"] = warmup + ["train.stop_after=2"]
    layouts["warmup_skipped"] = warmup + skip_one + ["train.stop_after=3"]
    # the count of skipped steps travels with the checkpoint: a run that skipped step 3 stops after it, and the
    # resumed run (no NaN) reports it from its first step on
    saved = [o for o in lm if o != "train.checkpoint.enabled=false"] + ["train.checkpoint.save_interval=1", "run_dir=ck"]
    # (with train.spike: the window, steps 1-2's norms, travels too: the resumed run judges step 4, rank 1's own
    # gradients 1000 times what they were before their reduction, against it)
    layouts["lm_saved_skip"] = saved + skip + SPIKE + ["train.stop_after=3"]
    layouts["lm_resumed_skip"] = saved + SPIKE + ["KEYE_FAULT=spike_backward_in_step:step=4:rank=1"]
    # the whole-loss fault skipped, the run going on to its last step (its records read as strict JSON)
    layouts["lm_strict"] = LM + skip + ["train.checkpoint.enabled=false"]
    # the stopping test's reference: its settings without the fault
    layouts["lm_reference"] = LM + ["train.checkpoint.enabled=false"]
    # train.spike: step 3's gradients 1000 times what they were (every rank's, after their reduction): skipped as
    # lm_strict skips its NaN step
    layouts["lm_spike"] = lm + SPIKE + ["KEYE_FAULT=spike_grad_in_step:step=3"]
    data = run_layouts_all(2, layouts, tmp)
    data["logs"] = [(tmp / "logs" / f"rank{r}.log").read_text() for r in range(2)]  # every layout's, in turn
    data["records"] = {name: [json.loads(x) for x in (tmp / "runs" / name / "nonfinite.jsonl").read_text().splitlines()]
                       for name in ("ck", "lm_skipped", "vl_skipped", "lm_tp2", "lm_cp2")}
    records = {name: tmp / "runs" / name / "spikes.jsonl" for name in ("ck", "lm_spike")}
    data["spikes"] = {name: [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
                      for name, p in records.items()}
    data["runs"] = tmp / "runs"
    return data


def test_a_skipped_step_leaves_every_parameter_as_it_was(skipped):
    steps, digests = skipped["losses"], skipped["digests"]
    for name in ("lm", "vl"):
        before, skip, on = (f"{name}_{x}" for x in ("before", "skipped", "on"))
        assert sorted(steps[skip]) == [1, 2, 3] and math.isnan(steps[skip][3]), steps[skip]
        assert {s: steps[skip][s] for s in (1, 2)} == steps[before]
        assert digests[skip] == digests[before], name  # the LM's and (vl) the vision tower's parameters
        assert name == "lm" or any(k.startswith("vision.") for k in digests[skip])
        assert sorted(steps[on]) == [1, 2, 3, 4, 5] and all(math.isfinite(steps[on][s]) for s in (1, 2, 4, 5))
        assert {s: steps[on][s] for s in (1, 2)} == steps[before]
    # the multimodal run names its packs: epoch, index and sample keys (shard/key); of rank 1's second alone, the
    # only one whose loss was not finite, its first document alone (of several: text-only samples among them), and
    # rank 0's two whole
    pack = r"epoch \d+ pack \d+: shard-\d+\.tar/[^;]+"
    one = (r"epoch \d+ pack \d+: shard-\d+\.tar/[^;,]+ \(its document 0 of ([2-9]|\d\d+), whose tokens' loss was "
           r"not finite\)")
    assert re.search(rf"rank 1's data in the step: its micro-batch 1 of 2, whose loss was not finite: video packs "
                     rf"{one}; this rank's data in the step: video packs {pack}; {pack}\n",
                     skipped["logs"][0]), skipped["logs"][0][-2000:]
    # the run's record holds the same as fields: the micro-batch, the pack and the one sample key named
    (rec,) = skipped["records"]["vl_skipped"]
    (pack,) = rec["samples"]["1"]["streams"][0]["packs"]
    assert rec["samples"]["1"]["micro_batches"] == [1] and len(pack["samples"]) == 1
    assert f"epoch {pack['epoch']} pack {pack['pack']}: {pack['samples'][0]} (its document 0 of" in rec["data"]["1"]
    # that sample (a video: one pack per epoch) left out of the same data (data.exclude=<the record's file>): out of
    # its pack of epoch 0 and of the record's pack of epoch 1, in step 3 (its epoch 0 pack: step 1 here, whose
    # loss then differs); the packs' contents: tests/data/test_exclude.py
    assert pack["epoch"] == 1 and "clip_" in pack["samples"][0]
    excluded = {s: skipped["extras"]["vl_excluded"][s].get("data_samples_excluded", 0) for s in (1, 2, 3)}
    assert excluded == {1: 1, 2: 1, 3: 2}, excluded
    assert steps["vl_excluded"][1] != steps["vl_before"][1]
    assert all(math.isfinite(steps["vl_excluded"][s]) for s in (1, 2, 3))
    (rec,) = skipped["records"]["lm_skipped"]
    assert rec["samples"]["1"] == {"micro_batches": [1], "streams": [{"stream": "synthetic_tokens",
                                                                       "global_samples": [46]}]}
    # the language model's: rank 1's samples 40..47 in micro-batches of 4, of the second alone its third row
    assert ("the loss on rank 1 and the gradients on ranks 0-1 were not finite; rank 1's data in the step: its "
            "micro-batch 1 of 2, whose loss was not finite: a synthetic_tokens stream: global samples 46 (the rows "
            "whose tokens' loss was not finite, of 44..47); this rank's data in the step: a synthetic_tokens stream: "
            "global samples 32..39") in skipped["logs"][0]
    # rank 0's gradients finite, rank 1's NaN: rank 0 skipped too (its parameters are those after step 2), and the
    # step's loss is finite (the NaN came after the loss)
    assert digests["lm_one_rank"] == digests["lm_before"]
    assert math.isfinite(steps["lm_one_rank"][3]) and {s: steps["lm_one_rank"][s] for s in (1, 2)} == steps["lm_before"]
    assert ("(the step's loss %s): skipped, no weight updated (1 in a row of the 1 train.skip_nonfinite_steps allows); "
            "before their reduction over ranks, every rank's loss and gradients were finite: it arose in the reduction "
            "or after it; this rank's data in the step: a synthetic_tokens stream: global samples 32..39"
            % f"{steps['lm_one_rank'][3]:.6g}") in skipped["logs"][0]


def test_where_a_nan_arose_is_named_and_a_warmup_step_is_skipped(skipped):
    steps, digests, logs = skipped["losses"], skipped["digests"], skipped["logs"]
    # rank 1's own gradients NaN before the reduction, every loss finite: rank 0's log names rank 1 and its data
    assert digests["lm_backward"] == digests["lm_before"] and math.isfinite(steps["lm_backward"][3])
    assert ("before their reduction over ranks, the gradients on rank 1 were not finite; rank 1's data in the step: a "
            "synthetic_tokens stream: global samples 40..47; this rank's data in the step: a synthetic_tokens stream: "
            "global samples 32..39") in logs[0]
    # the DSA warm-up: the indexers (the only parameters that train) keep their values after the skipped step 3;
    # the step's LM loss is finite (the frozen model's), its indexer KL is not
    assert digests["warmup_skipped"] == digests["warmup_before"]
    assert {s: steps["warmup_skipped"][s] for s in (1, 2)} == steps["warmup_before"]
    assert math.isfinite(steps["warmup_skipped"][3])
    assert math.isnan(skipped["extras"]["warmup_skipped"][3]["indexer_kl"])
    # (the indexer KL of rank 1's second micro-batch alone: its data alone is named)
    assert ("its indexer KL nan): skipped, no weight updated (1 in a row of the 1 train.skip_nonfinite_steps allows); "
            "before their reduction over ranks, the loss on rank 1 and the gradients on rank 1 were not finite; "
            "rank 1's data in the step: its micro-batch 1 of 2, whose loss was not finite: a synthetic_tokens stream: "
            "global samples 44..47; this rank's data") in logs[0]


def test_a_nan_under_tp_or_cp_names_the_rank_where_it_arose_and_its_data_once(skipped):
    """TP2: rank 1's loss NaN in its micro-batch 1 (16 samples a step, one data replica: step 1's 0..15, micro-batches
    of 4): the record names rank 1's loss and that micro-batch's samples alone (TP rank 1's own loss was not looked
    at: the record said loss_ranks [] and named rank 0's whole step besides). CP2: both ranks' loss NaN, one
    replica: its data once (it was named for rank 0 and again for rank 1)."""
    (tp,) = skipped["records"]["lm_tp2"]
    assert (tp["loss_ranks"], tp["grad_ranks"]) == ([1], [0, 1])
    assert tp["data"] == {"1": "its micro-batch 1 of 4, whose loss was not finite: a synthetic_tokens stream: global "
                               "samples 4..7"}
    assert tp["samples"] == {"1": {"micro_batches": [1], "streams": [{"stream": "synthetic_tokens",
                                                                       "global_samples": [4, 5, 6, 7]}]}}
    (cp,) = skipped["records"]["lm_cp2"]
    assert (cp["loss_ranks"], cp["grad_ranks"]) == ([0, 1], [0, 1])
    assert cp["data"] == {"0": "a synthetic_tokens stream: global samples 0..15"}
    assert cp["samples"] == {"0": {"micro_batches": None, "streams": [{"stream": "synthetic_tokens",
                                                                        "global_samples": list(range(16))}]}}


def test_the_skipped_count_resumes_with_the_run(skipped):
    extras = skipped["extras"]
    # the skipped step's record stays in the run's nonfinite.jsonl: the resumed launch starts after it
    assert [(r["step"], r["action"], r["loss_ranks"]) for r in skipped["records"]["ck"]] == [(3, "skipped", [1])]
    assert extras["lm_saved_skip"][3]["skipped_steps"] == 1 and "skipped_steps" not in extras["lm_saved_skip"][2]
    assert sorted(extras["lm_resumed_skip"]) == [4, 5]
    assert [extras["lm_resumed_skip"][s]["skipped_steps"] for s in (4, 5)] == [1, 1]


def test_two_nan_steps_in_a_row_with_one_skip_allowed_stop_at_the_second(tmp_path):
    out = run_launch(2, LM + ["train.skip_nonfinite_steps=1"], tmp_path / "run",
                     env={"KEYE_FAULT": "nan_in_step:rank=1"}, check=False)
    assert out.returncode == 4, out.stderr[-3000:]
    assert "non-finite step: step 2: the language model's gradients hold a NaN or an Inf" in out.stderr
    assert "skips up to N such steps in a row (2 in a row now)" in out.stderr
    text = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "step 1: the language model's gradients hold a NaN or an Inf (the step's loss nan): skipped, no weight " \
           "updated (1 in a row of the 1 train.skip_nonfinite_steps allows)" in text
    assert "Rank 1's data in the step: a synthetic_tokens stream: global samples 24..31. train.skip" in out.stderr


def _strict(text: str) -> list[dict]:
    """The lines of a record file as a strict JSON parser reads them (JSON has no NaN or Infinity)."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_a_skipped_steps_records_are_strict_json(skipped):
    """A skipped step's loss and grad_norm are NaN: metrics.jsonl and nonfinite.jsonl write them as null and name
    them in "nonfinite" (train/metrics.py json_record), so a parser without Python's NaN extension reads every line;
    read_record (the tests' losses()) gives the NaN back, and the other steps' values are those written."""
    run = skipped["runs"] / "lm_strict"
    metrics = _strict((run / "metrics.jsonl").read_text())
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[2]["loss"] is None and metrics[2]["grad_norm"] is None
    assert metrics[2]["nonfinite"] == {"loss": "nan", "grad_norm": "nan"} and metrics[2]["skipped_steps"] == 1
    assert all("nonfinite" not in m and math.isfinite(m["loss"]) for i, m in enumerate(metrics) if i != 2)
    (rec,) = _strict((run / "nonfinite.jsonl").read_text())
    assert (rec["step"], rec["action"], rec["loss"], rec["nonfinite"]) == (3, "skipped", None, {"loss": "nan"})
    got = losses(run)
    assert math.isnan(got.pop(3)) and got == {m["step"]: m["loss"] for m in metrics if m["step"] != 3}


def test_a_run_stopped_by_a_document_resumes_without_it(tmp_path):
    """Token files: the NaN of step 3 in the first document of rank 1's second row stops the run; the message offers the
    run's record as data.exclude, and the same command with it resumes from step 2 and trains on with that document's
    tokens left out of its row (data/exclude.py; the rows' contents: tests/data/test_exclude.py)."""
    run = tmp_path / "run"
    tok = ["recipe=keye_tiny_lm", "data=tokens_tiny", "train.micro_batch_size=1", "train.global_batch_size=4",
           "train.seq_length=128", "train.steps=4", "train.checkpoint.save_interval=1"]
    out = run_launch(2, tok, run, env={"KEYE_FAULT": FAULT + ":micro=1:doc=0"}, check=False)
    assert out.returncode == 4, out.stderr[-3000:]
    records = run / "nonfinite.jsonl"
    assert f"data.exclude={records} leaves the samples it names out of the data; train.skip_nonfinite_steps=N" \
        in out.stderr, out.stderr[-3000:]
    (rec,) = [json.loads(line) for line in records.read_text().splitlines()]
    (stream,) = rec["samples"]["1"]["streams"]
    assert rec["samples"]["1"]["micro_batches"] == [1] and stream["global_samples"] == [11]
    ((prefix, number),) = stream["documents"]
    run_launch(2, tok + [f"data.exclude={records}"], run)
    assert sorted(losses(run)) == [1, 2, 3, 4]
    log0, log1 = ((run / "logs" / f"rank{r}.log").read_text() for r in range(2))
    assert f"data.exclude: 1 sample(s) named in {records}" in log0
    # global sample 11: rank 1's second row of step 3 (G = 4 over 2 ranks: samples 8 + 2 x rank + micro)
    assert f"data.exclude: {prefix} document {number} left out of global sample 11 " in log1, log1[-3000:]


def test_a_spiking_step_is_skipped_as_a_nan_step_is(skipped):
    """train.spike: step 3's gradient norm, 1000 times its natural one, exceeds 5 x the median of steps 1-2's. The step
    updates nothing, so the run goes on as one that skipped step 3 for a NaN (lm_strict, the same data): the same
    losses and parameters, bit for bit; steps 1-2, applied by megatron's optimizer step split around the decision,
    are the reference's."""
    steps, digests, extras, norms = skipped["losses"], skipped["digests"], skipped["extras"], skipped["grad_norms"]
    ref, spike = steps["lm_reference"], steps["lm_spike"]
    assert {s: spike[s] for s in (1, 2, 3)} == {s: ref[s] for s in (1, 2, 3)}   # step 3: the fault came after its loss
    assert {s: spike[s] for s in (4, 5)} == {s: steps["lm_strict"][s] for s in (4, 5)}
    assert digests["lm_spike"] == digests["lm_strict"]
    # the skipped step's norm (the step line's grad), 1000 x the reference's (fp32 rounding of the sum of squares)
    v = norms["lm_spike"][3]
    assert v == pytest.approx(1000 * norms["lm_reference"][3], rel=1e-5)
    assert "spike_skipped_steps" not in extras["lm_spike"][2]
    assert [extras["lm_spike"][s]["spike_skipped_steps"] for s in (3, 4, 5)] == [1, 1, 1]
    median = (norms["lm_reference"][1] + norms["lm_reference"][2]) / 2
    (rec,) = skipped["spikes"]["lm_spike"]
    assert (rec["step"], rec["action"], rec["spikes"]) == (3, "skipped", [
        {"norm": "grad_norm", "value": v, "median": median}])
    assert rec["data"] == {"0": "a synthetic_tokens stream: global samples 32..39",
                           "1": "a synthetic_tokens stream: global samples 40..47"}
    assert (f"step 3: the language model's gradient norm {v:.6g} is {v / median:.3g} x the median {median:.6g} of "
            f"the last 2 applied steps' (more than train.spike.factor=5) (the step's loss {ref[3]:.6g}): skipped, no "
            "weight updated (1 in a row of the 1 train.spike.skip_steps allows); rank 1's data in the step: a "
            "synthetic_tokens stream: global samples 40..47; this rank's data in the step: a synthetic_tokens "
            "stream: global samples 32..39") in skipped["logs"][0]


def test_the_spike_window_resumes_with_the_run(skipped):
    """The run stopped after step 3 (skipped for a NaN: not in the window) resumes with the window of steps 1-2's
    norms, and judges step 4 (rank 1's own gradients 1000 times what they were, before their reduction) against it:
    skipped. An empty window would judge nothing. The record's suspects name rank 1 first (its own gradient norm
    before the reduction ~2 x the median of the two ranks', rank 0's ~0), one of its rows: step 4's global samples
    56..63 (G = 16 over 2 data-parallel ranks)."""
    norms, extras = skipped["grad_norms"], skipped["extras"]
    (rec,) = skipped["spikes"]["ck"]
    median = (norms["lm_reference"][1] + norms["lm_reference"][2]) / 2
    assert (rec["step"], rec["action"], rec["spikes"]) == (4, "skipped", [
        {"norm": "grad_norm", "value": norms["lm_resumed_skip"][4], "median": median}])
    assert [extras["lm_resumed_skip"][s]["spike_skipped_steps"] for s in (4, 5)] == [1, 1]
    first = rec["suspects"][0]
    assert first["rank"] == 1 and rec["replicas"]["1"]["norm_ratio"] > 1.9 > 0.1 > rec["replicas"]["0"]["norm_ratio"]
    (sample,) = first["samples"]["streams"][0]["global_samples"]
    assert 56 <= sample < 64 and first["micro_batch"] in (0, 1), rec
