"""bench/bench_dsa_deterministic.py without a GPU: its arguments are checked and named, it stops at once on a machine
without a GPU (writing nothing), and its pieces run on tiny shapes under the Triton interpreter: the layer's forward
+ backward and the backward alone give the same gradients, the deterministic switch is restored, and the bit
comparison tells equal from unequal outputs. What it measures (time, memory, run-to-run bits) needs a GPU."""
from __future__ import annotations

import pytest
import torch

import bench.bench_dsa_deterministic as bench
from tests.kernels.test_dsa import _interpreter_fixes  # noqa: F401  (triton 3.6's interpreter with numpy 2)


def test_arguments_are_checked_and_named(capsys):
    args = bench.parse_args([])
    assert args.L == [8192, 32768, 131072] and not args.quick
    assert bench.parse_args(["--L", "32768", "8192"]).L == [32768, 8192]
    for bad, said in ((["--L", "0"], "argument --L: 0 must be >= 1"),
                      (["--L", "1.5"], "argument --L: '1.5' is not an integer")):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU answers")
def test_without_a_gpu_it_stops_at_once(tmp_path):
    out = tmp_path / "o.json"
    with pytest.raises(SystemExit, match="bench_dsa_deterministic.py needs a CUDA GPU and none is visible here"):
        bench.main(["--out", str(out)])
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's dry run; a GPU runs the bench itself")
def test_the_pieces_on_tiny_shapes():
    from kernels.dsa import default_block_q

    torch.manual_seed(0)
    T, Hq, Hkv, D, HI, DI, topk = 29, 4, 2, 16, 2, 16, 8
    x = dict(q=torch.randn(1, T, Hq, D), k=torch.randn(1, T, Hkv, D), v=torch.randn(1, T, Hkv, D),
             q_idx=torch.randn(1, T, HI, DI).round(), w=torch.randn(1, T, HI).round(),
             k_idx=torch.randn(1, T, DI).round(), do=torch.randn(1, T, Hq, D))
    for n in ("q", "k", "v", "q_idx", "w", "k_idx"):
        x[n].requires_grad_(True)
    bq = default_block_q(Hq, Hkv)
    before = torch.are_deterministic_algorithms_enabled()
    with bench.torch_deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        full = bench.stage_fwd_bwd(x, topk, bq, 2048)      # P in 2 KB chunks: a few blocks each
        b = bench.backward_inputs(x, topk, bq)
        alone = bench.backward(b, 2048)
    assert torch.are_deterministic_algorithms_enabled() == before
    # the same kernels on the same plan: the same gradients (exact integer sums); the KL per token vs mean
    for name, a, c in zip(bench.OUTPUTS[:6], full[:6], alone[:6]):
        assert torch.equal(a, c), name
    assert torch.allclose(full[6], alone[6].mean(), rtol=1e-6, atol=0)  # a mean over 29 fp32 values, two ways
    assert bench.bitwise_repeat(alone, full[:6] + (alone[6],)) == dict.fromkeys(bench.OUTPUTS, True)
    changed = list(alone)
    changed[1] = changed[1].clone()
    changed[1].view(-1)[0] += 1e-3
    assert bench.bitwise_repeat(alone, changed) == {**dict.fromkeys(bench.OUTPUTS, True), "dk": False}
