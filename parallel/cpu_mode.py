"""CPU mode: lets megatron-core 0.16.1 run on a CPU-only torch with gloo.

megatron-core assumes CUDA everywhere. On a machine without CUDA (tests, the CPU demo) this module
redirects what it needs, and nothing else; on a machine with CUDA `enable_cpu_mode()` does nothing.
What is redirected, and why (each one was needed: turning it off breaks a known path):

- `torch.cuda.current_device()` answers with the CPU device, so megatron's ~100
  `device=torch.cuda.current_device()` arguments allocate on the CPU.
- `torch.cuda.Stream/Event/stream/synchronize/...` become no-ops: the MoE alltoall dispatcher creates
  a stream at construction, the schedules record events.
- the CUDA RNG functions megatron's RNG tracker uses are mapped onto the CPU default generator, so
  `model_parallel_cuda_manual_seed` and `get_cuda_rng_tracker().fork()` keep their meaning: a fork
  swaps the state of the generator the CPU ops actually draw from.
- a `TorchFunctionMode` rewrites `device="cuda"` arguments, `Tensor.cuda()` and `.to("cuda")` to the
  CPU, and makes `Tensor.type()` report `torch.cuda.*Tensor` names (the distributed optimizer and
  gradient clipping branch on those strings).
- gloo's `all_to_all_single` rejects split sizes given as tensors (the alltoall dispatcher passes
  them so): they are converted to lists.
- gloo's `all_gather` rejects output tensors of different sizes ("ProcessGroupGloo::allgather: invalid tensor
  size"), which the alltoall dispatcher gathers over the expert-TP group whenever parallel.ep > 1 and
  parallel.etp > 1 (each expert-TP rank holds another number of tokens for its experts): they are gathered
  padded to the largest and cut back.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ENABLED = False
_MODE: TorchFunctionMode | None = None
_CPU = torch.device("cpu")


def cpu_mode_active() -> bool:
    return _ENABLED


def _is_cuda_device(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True  # an int device index means a CUDA device to torch
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):  # no pinned allocator without an accelerator (megatron's CP RoPE slice asks)
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and len(args) > 1:
            args = tuple(_CPU if (i > 0 and _is_cuda_device(a) and not isinstance(a, int)) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class _NoOpStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _all_to_all_single_lists(orig):
    @functools.wraps(orig)
    def wrapper(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return orig(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    return wrapper


def _all_gather_uneven(orig):
    """dist.all_gather that also takes output tensors of different first-dimension sizes (megatron's
    `_gather_along_first_dim` with output_split_sizes): each rank's tensor is padded with zeros to the largest,
    gathered, and each output gets its rows. Every rank knows every size (the split sizes are the same
    everywhere), so no extra collective is needed. Equal sizes go to gloo unchanged."""
    @functools.wraps(orig)
    def wrapper(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list}
        if len(shapes) <= 1 or any(s[1:] != tuple(tensor.shape[1:]) for s in shapes):
            return orig(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(s[0] for s in shapes)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        orig(gathered, padded, group=group)
        for out, got in zip(tensor_list, gathered):
            out.copy_(got[:out.shape[0]])
        return _DoneWork() if async_op else None

    return wrapper


class _DoneWork:
    """The handle of a collective that has already finished (the padded all_gather runs synchronously)."""

    def wait(self, *a, **k):
        return True

    def is_completed(self):
        return True


def enable_cpu_mode() -> bool:
    """Installs the redirections; returns True if CPU mode is (now) active, False on a CUDA machine."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None

    # RNG: megatron's "CUDA" generator is the CPU default generator.
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = cuda.manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, clone=False, **k: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mp_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # A fork swaps the state of the CPU generator, which is exactly the state megatron's check
    # compares; the warning it then logs on every fork is expected here.
    logging.getLogger(mp_random.__name__).addFilter(
        lambda rec: "CPU RNG state changed within GPU RNG context" not in rec.getMessage()
    )

    dist.all_to_all_single = _all_to_all_single_lists(dist.all_to_all_single)
    dist.all_gather = _all_gather_uneven(dist.all_gather)

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    log.info("CPU mode: megatron-core CUDA calls are redirected to the CPU (gloo backend)")
    return True
