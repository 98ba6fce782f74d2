"""train/metrics.py set_aside_redone: a launch that starts at step S (the checkpoint it resumes, or 0) trains the
steps after S again, so the records a killed launch logged for them leave metrics.jsonl / eval.jsonl (and
nonfinite.jsonl: tests/dist/test_nonfinite.py) for *.superseded.jsonl, where they stay as they were written.
Reference: the lines written, split by hand. json_record writes those lines as strict JSON."""
import json
import math

from train.metrics import set_aside_redone


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_the_records_of_steps_a_launch_trains_again_are_set_aside_whole(tmp_path):
    metrics = [json.dumps({"step": s, "loss": 10.0 - s}) for s in range(1, 7)]
    evals = [json.dumps({"step": 0, "val_loss": 9.0}), json.dumps({"step": 4, "val_loss": 6.5}),
             json.dumps({"step": 4, "val_loss": 6.5, "eval_only": True}), json.dumps({"step": 6, "val_loss": 6.0})]
    cut = '{"step": 7, "lo'   # a write cut short by the kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics) + "\n" + cut)
    (tmp_path / "eval.jsonl").write_text("\n".join(evals) + "\n")
    notes = set_aside_redone(str(tmp_path), 4)
    assert _lines(tmp_path / "metrics.jsonl") == metrics[:4]
    assert _lines(tmp_path / "metrics.superseded.jsonl") == metrics[4:] + [cut]
    assert _lines(tmp_path / "eval.jsonl") == evals[:3]     # eval-only's line scored a checkpoint: it stays
    assert _lines(tmp_path / "eval.superseded.jsonl") == evals[3:]
    assert notes == ["metrics.jsonl: 3 record(s) after step 4, which this launch trains again, moved to "
                     "metrics.superseded.jsonl",
                     "eval.jsonl: 1 record(s) after step 4, which this launch trains again, moved to "
                     "eval.superseded.jsonl"]
    # the next launch that starts over (no checkpoint kept) sets the rest aside after them; a resume at the last
    # record's step moves nothing
    assert set_aside_redone(str(tmp_path), 4) == []
    assert set_aside_redone(str(tmp_path), 0)[0] == ("metrics.jsonl: 4 record(s) of the run it starts over, which "
                                                     "this launch trains again, moved to metrics.superseded.jsonl")
    assert _lines(tmp_path / "metrics.jsonl") == []
    assert _lines(tmp_path / "metrics.superseded.jsonl") == metrics[4:] + [cut] + metrics[:4]
    assert _lines(tmp_path / "eval.jsonl") == [evals[2]]   # its step-0 evaluation is done again too
    assert _lines(tmp_path / "eval.superseded.jsonl") == [evals[3], evals[0], evals[1]]
    assert set_aside_redone(str(tmp_path / "nothing_here"), 3) == []


def test_a_record_with_non_finite_values_is_strict_json_and_reads_back():
    """train/metrics.py json_record / read_record: NaN and the infinities become null, named with what they were in
    "nonfinite" (a nested one by its keys joined with dots); read_record restores them. Reference: the line written
    out by hand."""
    from train.metrics import json_record, read_record

    rec = {"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3, "moe_idle_experts": 0,
           "val_loss/text": float("-inf"), "inner": {"kl": float("nan"), "ok": 0.5}}
    line = json_record(rec)
    assert json.loads(line, parse_constant=lambda w: 1 / 0) == {
        "step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "moe_idle_experts": 0, "val_loss/text": None,
        "inner": {"kl": None, "ok": 0.5},
        "nonfinite": {"loss": "nan", "grad_norm": "inf", "val_loss/text": "-inf", "inner.kl": "nan"}}
    back = read_record(line)
    assert math.isnan(back.pop("loss")) and math.isnan(back["inner"].pop("kl"))
    assert back == {"step": 3, "grad_norm": float("inf"), "lr": 1e-3, "moe_idle_experts": 0,
                    "val_loss/text": float("-inf"), "inner": {"ok": 0.5}}
    # a finite record is written as json.dumps writes it, without the field
    assert json_record({"step": 1, "loss": 2.5}) == json.dumps({"step": 1, "loss": 2.5})
    assert math.isnan(read_record(json.dumps({"step": 1, "loss": float("nan")}))["loss"])   # an older line's NaN
