"""bench/probe_memory_estimate.py's parts that run without a GPU: every configuration composes and is estimated, each
runs in its own process whose failure (out of memory, an error, a hang) is recorded without stopping the rest, the
probe's time budget is kept, and a wrong configuration name is named. The measurement itself needs a GPU (its command
is in the script's docstring)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import probe_memory_estimate as probe  # noqa: E402


def test_a_configuration_is_estimated_from_the_recipe(tmp_path):
    rec = probe.estimate_record(probe.overrides("l8_1k_none", str(tmp_path / "run")))
    assert rec["total"] == pytest.approx(sum(rec["rows"].values()))
    # 1K tokens: the optimizer step (model state + its temporaries) is the peak, so the estimate holds it
    assert rec["total"] == pytest.approx(rec["optimizer_step_phase"]) and rec["optimizer_step"] > 0
    assert "AdamW step's temporaries, above the forward and backward's peak" in rec["rows"]


def test_each_configuration_runs_apart_and_its_failure_is_recorded(tmp_path):
    py = sys.executable
    scripts = {  # stand-ins for a configuration's process: what a GPU run of it can end in
        "ok": "import json,sys; step = dict(peak_allocated_gib=30.0, peak_reserved_gib=32.0, "
              "optimizer_temporaries_gib=2.9); open(sys.argv[1],'w').write(json.dumps({'steps': [step], "
              "'estimate': dict(total=31.0, optimizer_step=2.88)}))",
        "oom": "import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB', "
               "file=sys.stderr); sys.exit(1)",
        "error": "raise ValueError('model.lm.num_layers: bad')",
        "hang": "import time; time.sleep(30)",
    }
    out = tmp_path / "probe.json"
    recs = probe.run_all(["ok", "oom", "error", "hang", "ok"], out, timeout=3, budget=5.5, min_left=2.5,
                         cmd=lambda name, result: [py, "-c", scripts[name], str(result)])
    status = [r["status"] for r in recs]
    # the hang is stopped at 3 s (or at what is left of the 5.5 s budget); then less than 2.5 s are left: no start
    assert status == ["ok", "oom", "error", "timeout", "skipped"], recs
    assert "model.lm.num_layers: bad" in recs[2]["tail"]
    assert json.loads(out.read_text())["configs"] == recs
    assert recs[0]["steps"][0]["peak_allocated_gib"] == 30.0     # the configuration's own record, kept


def test_an_unknown_configuration_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["--only", "l8_64k_full,l9_64k", "--list"])
    assert e.value.code == 2
    assert "unknown configuration(s) l9_64k; known: l4_16k_none" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown configuration 'x'"):
        probe.overrides("x", "/tmp/run")
