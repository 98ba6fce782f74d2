"""The benchmark scripts as a user runs them on a machine without a GPU: each GPU-only one stops at once and says
so (not a CUDA traceback from deep inside, not minutes of cases recorded as errors, not a run that prints errors and
exits 0), and the ones whose command line is positional answer --help with their docstring instead of reading
'--help' as a file name or a label."""
import ast
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow    # a process per script (forked from the warm one: tests/launch_util.run_script)

REPO = Path(__file__).resolve().parents[2]

# (script, its arguments): each command as bench/RESULTS.md or the script's docstring gives it
OUT = ["--out", "{tmp}/o.json"]
GPU_ONLY = [(s, OUT) for s in ("bench_checkpoint.py", "bench_cp.py", "bench_dsa_short.py", "bench_dsa_stage.py",
                               "bench_dsa_warmup.py", "bench_packed_attention.py", "bench_spine.py",
                               "bench_padding_tail.py", "bench_padding_tail_cp.py", "bench_vit_layout.py",
                               "probe_dsa.py", "probe_fp8_index.py",
                               "probe_overlap.py", "profile_dsa_stage.py", "sweep_dsa.py")]
GPU_ONLY += [("bench_nonfinite.py", []), ("probe_sdpa_grad_layout.py", []), ("probe_determinism.py", OUT)]
GPU_ONLY += [("smoke_gpu_recipes.py", OUT + ["--root", "{tmp}/runs"])]


def _run(script: str, args: list[str], tmp_path, timeout=120) -> subprocess.CompletedProcess:
    """`python bench/<script> args` in tmp_path, as a process forked from the warm one (torch and megatron-core
    imported there once, without the Triton interpreter) instead of a fresh interpreter per script."""
    from tests.launch_util import run_script

    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    env.pop("TRITON_INTERPRET", None)
    return run_script(REPO / "bench" / script, [a.format(tmp=tmp_path) for a in args], cwd=tmp_path, env=env,
                      timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU answers")
@pytest.mark.parametrize("script,args", GPU_ONLY, ids=[s for s, _ in GPU_ONLY])
def test_a_gpu_benchmark_says_it_needs_a_gpu(script, args, tmp_path):
    # 120 s: a script that starts its cases instead takes minutes (bench_cp.py ~25 s per case, each an error)
    r = _run(script, args, tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and err, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert err[-1].startswith(script) and "CUDA GPU" in err[-1] and "none is visible here" in err[-1] \
        or err[-1] == f"{script} needs 2 CUDA GPUs and 0 are visible here; --smoke checks the script on the CPU", \
        err[-3:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not list(tmp_path.iterdir())            # nothing written: no JSON of errors


POSITIONAL = ["hf_code_gpu.py", "hf_dsa_prefill_gpu.py", "hf_ksa_batch_gpu.py", "hf_ksa_prefill_gpu.py",
              "hf_logits_gpu.py", "probe_dsa_attention.py", "probe_dsa_selection.py", "probe_dsa_ways_fp32.py",
              "probe_sdpa_cudnn.py", "probe_sdpa_grad_layout.py"]
TAKES_A_BASELINE = ["hf_dsa_prefill_gpu.py", "hf_ksa_batch_gpu.py", "hf_ksa_prefill_gpu.py", "probe_dsa_attention.py",
                    "probe_dsa_selection.py"]


@pytest.mark.parametrize("script", POSITIONAL)
def test_help_prints_the_docstring(script, tmp_path):
    """Before, `--help` was read as the baseline file (FileNotFoundError), as the label (hf_code_gpu.py ran its whole
    dry run under the label '--help') or as N (ValueError), or ignored (the run started)."""
    first = ast.get_docstring(ast.parse((REPO / "bench" / script).read_text())).splitlines()[0]
    r = _run(script, ["--help"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: " + script), (r.stdout[-2000:], r.stderr[-2000:])
    assert first in r.stdout and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script", TAKES_A_BASELINE)
def test_a_missing_baseline_file_is_named(script, tmp_path):
    r = _run(script, [str(tmp_path / "nope.py")], tmp_path)
    assert r.returncode == 2 and f"'{tmp_path / 'nope.py'}': no such file" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_the_padding_bench_runs_its_smoke_cases_on_the_cpu(tmp_path):
    """bench_padding_tail.py --smoke: every module's case at tiny shapes, the padding named against not: the
    documents' outputs and gradients the same, the padding's output 0 when named and not 0 when attended."""
    import json

    r = _run("bench_padding_tail.py", ["--smoke", "--out", "{tmp}/p.json"], tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "p.json").read_text())["cases"]
    assert [row["module"] for row in rows] == ["dense", "dsa", "ksa", "loss"]
    for row in rows:
        # fp32 on the CPU, the documents computed alike: exact but for sums over a row of another length in another
        # order (KSA's reference: 1e-8 relative RMSE seen)
        assert row["out_rel"] < 1e-6 and row["grad_rel"] < 1e-6 and row["padding_out_zero"], row
        assert row["padding_out_max_not_named"] > 0.1, row


def test_the_padding_bench_under_context_parallelism_runs_its_smoke_cases_on_the_cpu(tmp_path):
    """bench_padding_tail_cp.py --smoke: 2 gloo ranks, each module at tiny shapes under CP 2 with the padding named
    against not: on each rank the documents' outputs and gradients the same and the padding's output 0 when named;
    each rank holds a share of the padding (the document layout deals the padding segment's chunks to both)."""
    import json

    r = _run("bench_padding_tail_cp.py", ["--smoke", "--out", "{tmp}/p.json"], tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "p.json").read_text())["cases"]
    assert sorted((row["module"], row["rank"]) for row in rows) == sorted(
        (m, rank) for m in ("dense", "dsa", "dsa", "loss") for rank in (0, 1))
    for row in rows:
        # fp32, the documents' rows computed from the same inputs either way (the attention and the KL only see
        # fewer padding rows): exact but for sums in another order
        assert row["out_rel"] < 1e-6 and row["grad_rel"] < 1e-6 and row["padding_out_zero"], row
        assert row["local_padding"] == row["padding"] // 2, row
