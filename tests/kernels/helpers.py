"""Comparison helpers shared by kernel tests (flash-linear-attention style).

`assert_close(name, ref, tri, ratio)` checks the relative RMSE  rmse(ref - tri) / rms(ref) <= ratio
and fails on any NaN/Inf in `tri`, printing the name of the tensor that differs.
"""
import torch


def rel_rmse(ref: torch.Tensor, tri: torch.Tensor) -> float:
    ref = ref.detach().double()
    tri = tri.detach().double()
    err = (ref - tri).pow(2).mean().sqrt()
    base = ref.pow(2).mean().sqrt().clamp_min(1e-12)
    return (err / base).item()


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, ratio: float) -> None:
    assert ref.shape == tri.shape, f"{name}: shape {tuple(tri.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(tri).all(), f"{name}: non-finite values (unwritten output or overflow)"
    r = rel_rmse(ref, tri)
    assert r <= ratio, f"{name}: relative RMSE {r:.3e} exceeds {ratio:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh output buffer with NaN so an unwritten element fails the comparison."""
    return t.fill_(float("nan"))
