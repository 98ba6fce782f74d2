"""Measures the host memory one forward + backward of a cross-entropy over logits costs, per logit element, for
tests/unit/test_chunked_ce.py.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/unit/ce_memory_worker.py  -> prints one JSON line

The peak is the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) above its
resident size before the call: every byte the CPU allocator handed out and touched, transient buffers
included. The fixed mmap threshold makes glibc map every large tensor on its own and unmap it when freed, so
freed memory does not stay resident and a later allocation is not served from it; transparent huge pages are
switched off for the process (prctl PR_SET_THP_DISABLE), so resident sizes count 4 KiB pages, not tensors rounded
up to 2 MiB. Each figure is a slope:
the peak at two sizes, its difference divided by the difference in logit elements, so everything that does
not grow with the logits (the weights, their gradients, the fp32 dW accumulator, hidden states) cancels.

- `chunked_<dtype>`: models.moe.chunked_ce.chunked_cross_entropy, 4096 tokens in chunks of 512 and 1024
  (bytes per element of one chunk's [chunk, V] logits).
- `megatron_bf16`: the logits of all tokens (one matmul) and megatron's vocab_parallel_cross_entropy, 1024 and
  2048 tokens (bytes per element of the [tokens, V] logits).
"""
import ctypes
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

V, H, N = 8192, 64, 4096


def _resident() -> tuple[int, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024  # "<n> kB"
    return fields["VmRSS"], fields["VmHWM"]


def _peak(fn) -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _resident()[0]
    fn()
    return _resident()[1] - base


def _step_fn(dtype, tokens: int, chunk: int | None):
    import torch

    from models.moe.chunked_ce import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.05).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (tokens,), generator=g)

    def step():
        if chunk is None:
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            loss = vocab_parallel_cross_entropy((h @ w.t())[:, None, :], labels[:, None])
        else:
            loss = chunked_cross_entropy(h, w, labels, chunk_tokens=chunk)
        loss.sum().backward()
        h.grad = w.grad = None

    return step


def _min_peak(dtype, tokens: int, chunk: int | None) -> int:
    step = _step_fn(dtype, tokens, chunk)
    step()  # first call: lazy initialisations out of the measurement
    return min(_peak(step) for _ in range(2))


def main() -> None:
    import torch

    from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron

    torch.set_num_threads(1)
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE (a no-op where the kernel lacks it)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        small, large = _min_peak(dtype, N, 512), _min_peak(dtype, N, 1024)
        out[f"chunked_{name}"] = (large - small) / (512 * V)
    init_one_process_megatron(0)  # megatron's loss reads its tensor-parallel group
    try:
        small, large = _min_peak(torch.bfloat16, 1024, None), _min_peak(torch.bfloat16, 2048, None)
        out["megatron_bf16"] = (large - small) / (1024 * V)
    finally:
        destroy_one_process_megatron()
    print(json.dumps(out))


if __name__ == "__main__":
    assert os.environ.get("MALLOC_MMAP_THRESHOLD_"), "run with MALLOC_MMAP_THRESHOLD_=65536 (see the docstring)"
    main()
