"""Small helpers shared by the DSA Triton wrappers: argument checks, document starts, sizes; a NaN-keeping ReLU; the
fixed-point scales of the deterministic backward."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(int(x)))


def maxnreg(limit: int | None) -> dict:
    """Launch keyword capping a kernel's registers per thread (more programs per SM, some spills);
    nothing when `limit` is None or under the interpreter, which has no registers."""
    return {} if limit is None or interpreting() else {"maxnreg": int(limit)}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact (IEEE) dot products so fp32 tests are tight; 16-bit inputs use MMA."""
    return "ieee" if dtype == torch.float32 else "tf32"


def validate_cu_seqlens(cu_seqlens: torch.Tensor | None, B: int, T: int) -> int:
    """Check packed-document boundaries; return the longest document's length (T without them),
    the widest key range any query can reach. One host sync when cu_seqlens lives on the GPU:
    the check needs the values, so the length comes from the same copy."""
    if cu_seqlens is None:
        return T
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed input with batch size 1, got B={B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [num_docs + 1]")
    cu = cu_seqlens.detach().to("cpu", torch.long)
    if cu[0].item() != 0 or cu[-1].item() != T or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, end at T={T} and be non-decreasing, "
                         f"got {cu.tolist()[:8]}...")
    return int(cu.diff().max().item())


def row_doc_start(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[B * T] int32: first position (within its batch row) of each token's document."""
    if cu_seqlens is None:
        return torch.zeros(B * T, dtype=torch.int32, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    pos = torch.arange(T, device=device)
    seg = torch.searchsorted(cu[1:], pos, right=True)
    return cu[seg].to(torch.int32).repeat(B)


# The deterministic backward (torch's deterministic algorithms on: train.deterministic) adds its dK / dV, head-summed P
# and dk_idx contributions as int64 fixed-point values with integer atomics: an integer sum is exact, so it does not
# depend on the order the GPU adds in. Each sum's scale is a power of two 2^e with bound * 2^e <= 2^FIXED_POINT_BITS,
# `bound` a bound on the sum of the absolute contributions to any one element (taken from the inputs, below), so no
# partial sum can overflow int64 (2^63: the 8x headroom covers fp32 rounding in the bound and in the contributions).
# Resolution: bound * 2^-60 (about 1e-18 of the bound) per contribution, far below fp32's rounding of the sums.
FIXED_POINT_BITS = 60


def fixed_point_scales(bounds: list[torch.Tensor | float], device) -> torch.Tensor:
    """[len(bounds)] fp32 powers of two 2^e with bound * 2^e <= 2^FIXED_POINT_BITS (e in [-126, 126]: fp32's normal
    powers of two), one per bound (0-dim tensors or numbers), computed on the device (no host sync; torch's
    reductions that made the bounds are run-to-run deterministic, so the scales are too). A bound that is not finite
    (a NaN or inf among the inputs it reads) gives a NaN scale, so every value of that sum comes out NaN, as the fp32
    atomics would give it."""
    b = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device).reshape(()) for x in bounds])
    _, e = torch.frexp(b)  # b = m * 2^e with m in [0.5, 1): b < 2^e
    s = torch.ldexp(torch.ones_like(b), (FIXED_POINT_BITS - e).clamp(-126, 126))
    return torch.where(torch.isfinite(b), s, torch.full_like(s, float("nan")))


def from_fixed_point(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int64 fixed-point sums `acc` as `dtype` (one rounding to fp32, then an exact division by the power of two
    `scale`, a 1-element tensor: NaN for a non-finite bound)."""
    return (acc.to(torch.float32) / scale).to(dtype)


@triton.jit
def to_fixed_point(x, s):
    """fp32 x -> the nearest int64 of x * s (s a power of two: the product is exact)."""
    return tl.floor(x * s + 0.5).to(tl.int64)


def check_same_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")


@triton.jit
def relu_nan(x):
    """ReLU that keeps a NaN, as torch.relu (the references') does: tl.maximum's default drops it on the GPU (PTX
    max.f32 of NaN and 0 is 0) while the interpreter's numpy keeps it, so an index score over a NaN input was
    finite on the GPU and NaN in the reference and under the interpreter, and the top-k ranked it otherwise (found
    by bench/bench_topk_nan.py on an H100; tests/kernels/test_dsa.py checks the compiled PTX)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


def check_triton_device(x: torch.Tensor) -> None:
    """The Triton kernels run on CUDA tensors, or on any device under Triton's interpreter: TRITON_INTERPRET=1 when
    this module was imported, which is when triton.jit decides (relu_nan above is then an interpreted function)."""
    if x.device.type != "cuda" and type(relu_nan).__name__ != "InterpretedFunction":
        raise ValueError(f"backend='triton' needs CUDA tensors, got {x.device} (or TRITON_INTERPRET=1 set before "
                         "kernels.dsa is imported); on CPU use backend='naive'")
    if type(relu_nan).__name__ == "InterpretedFunction":
        fix_interpreter_loop_bounds()


def fix_interpreter_loop_bounds() -> None:
    """Lets Triton's interpreter take a runtime loop bound (`range(lo, hi, BS)`), as the GPU compiler does.

    The interpreter keeps a scalar as a 1-element numpy array and its `__index__` calls int() on it, which numpy >= 2
    refuses ("only 0-dimensional arrays can be converted to Python scalars"): every DSA kernel loops over runtime
    bounds, so none ran interpreted outside the kernel tests, which patched this themselves. Patches the interpreter's
    tensor once (idempotent) to take the array's element; results are unchanged, and compiled kernels are untouched."""
    import triton.runtime.interpreter as ti

    patch = getattr(ti, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_keye_index_fix", False):
        return

    def patch_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_tensor._keye_index_fix = True
    ti._patch_lang_tensor = patch_tensor
