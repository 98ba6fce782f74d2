"""train.deterministic (train/determinism.py): the mode sets what it says (torch's strict deterministic algorithms,
cuBLAS's workspace before CUDA is first used, NCCL_ALGO, cuDNN, megatron's deterministic_mode), the vision path's
deterministic replacement equals the op it replaces, the vision path then calls no op that has no deterministic CUDA
kernel, and settings that cannot be deterministic stop the run, named. On the CPU; bench/gpu_checks_determinism.sh
and bench/probe_determinism.py check the GPU."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.vision import VisionModel, tiny
from models.vision.vit import bilinear_matrix, interpolate_pos_embed
from train.determinism import CUBLAS_WORKSPACE, apply_deterministic, check_deterministic
from train.launch import compose_config, validate

# aten ops that have no deterministic CUDA kernel: torch raises on them in deterministic mode (its
# use_deterministic_algorithms list), so a run in the mode must never reach one
NO_DETERMINISTIC_CUDA_KERNEL = {
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward", "_upsample_bilinear2d_aa_backward", "_upsample_bicubic2d_aa_backward",
    "avg_pool3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
    "max_unpool2d", "max_unpool3d", "reflection_pad1d_backward", "reflection_pad2d_backward",
    "reflection_pad3d_backward", "nll_loss2d_forward", "_ctc_loss_backward", "_embedding_bag_backward",
    "put_", "histc", "median", "grid_sampler_2d_backward", "grid_sampler_3d_backward",
}


@pytest.fixture
def torch_flags():
    """Restores torch's deterministic and cuDNN flags the mode sets (they are process-wide)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def test_the_mode_sets_torch_strict_cublas_nccl_cudnn_and_megatron(torch_flags):
    env: dict[str, str] = {}
    assert apply_deterministic(False, environ=env) == [] and env == {}   # off: nothing touched
    assert not torch.are_deterministic_algorithms_enabled()
    assert apply_deterministic(True, environ=env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE, "NCCL_ALGO": "Ring"}
    # strict: with warn_only torch keeps SDPA's flash / memory-efficient backward nondeterministic
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    kept = {"NCCL_ALGO": "Tree", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    apply_deterministic(True, environ=kept)
    assert kept == {"NCCL_ALGO": "Tree", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}   # deterministic choices of the user

    from models.config import LMConfig, ModelParallelSizes
    from models.lm import transformer_config

    lm = LMConfig(vocab_size=96)
    on = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True, deterministic=True)
    off = transformer_config(lm, ModelParallelSizes(), bf16=False, use_cpu_initialization=True)
    assert on.deterministic_mode and not off.deterministic_mode


def test_the_launcher_sets_the_mode_before_cuda_is_first_used(monkeypatch, tmp_path, torch_flags):
    """train/launch.run: the environment and torch's flags are set before the first call that uses the device (the
    memory check's device properties; then the Trainer's NCCL and cuBLAS)."""
    import train.launch as launch

    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = validate(compose_config(["recipe=keye_tiny_lm", "parallel=single", "train.deterministic=true",
                                   f"run_dir={tmp_path}"]))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    seen = {}

    def first_use(device):
        seen.update(cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"), nccl=os.environ.get("NCCL_ALGO"),
                    strict=torch.are_deterministic_algorithms_enabled())
        raise ValueError("stopped at the first use of the device")

    monkeypatch.setattr(launch, "validate", lambda dcfg: cfg)
    for name in ("check_device", "check_wandb", "check_run_dir", "check_paths"):
        monkeypatch.setattr(launch, name, lambda *a, **k: None)
    monkeypatch.setattr(launch, "decode_once_unused", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", first_use)
    with pytest.raises(SystemExit):
        launch.run(None)
    assert seen == {"cublas": CUBLAS_WORKSPACE, "nccl": "Ring", "strict": True}


@pytest.mark.parametrize("grid,rows,cols", [(6, 4, 10), (6, 2, 2), (5, 12, 3), (16, 32, 48), (7, 7, 1)])
def test_the_deterministic_resize_equals_interpolate(grid, rows, cols, torch_flags):
    """The ViT's position table resized by two matrix products equals F.interpolate's bilinear resize (the
    reference), forward and backward. float64; tolerance 1e-14 absolute: the same weights summed in another order
    (measured at most 2e-15 here), where a wrong weight or index is off by ~1e-1."""
    torch.manual_seed(0)
    table = torch.randn(grid * grid, 5, dtype=torch.float64, requires_grad=True)
    img = table.t().reshape(1, 5, grid, grid)
    ref = F.interpolate(img, size=(rows, cols), mode="bilinear", align_corners=False).reshape(5, -1).t()
    g = torch.randn_like(ref)
    ref_grad, = torch.autograd.grad(ref, table, g)
    torch.use_deterministic_algorithms(True)
    out = interpolate_pos_embed(table, grid, rows, cols)
    out_grad, = torch.autograd.grad(out, table, g)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(out_grad, ref_grad, rtol=0, atol=1e-14)
    assert torch.allclose(bilinear_matrix(rows, grid, torch.float64).sum(1), torch.ones(rows, dtype=torch.float64))


def test_the_deterministic_resize_keeps_the_table_precision_under_autocast(torch_flags):
    """The ViT runs under bf16 autocast on a GPU, where F.interpolate keeps the fp32 table in fp32: the matrix
    products must not drop it to bf16 (positions off by ~4e-3 relative). CPU autocast lowers matmuls alike.
    Tolerance 1e-6 relative: fp32 sums in another order; bf16 would be ~1e-3."""
    torch.manual_seed(0)
    table = torch.randn(36, 8)
    ref = F.interpolate(table.t().reshape(1, 8, 6, 6), size=(4, 10), mode="bilinear", align_corners=False)
    ref = ref.reshape(8, -1).t()
    torch.use_deterministic_algorithms(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = interpolate_pos_embed(table, 6, 4, 10)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_vision_path_calls_no_op_without_a_deterministic_cuda_kernel(torch_flags):
    """ViT + projector forward and backward in the mode, frames of sizes other than the position table's (its
    resize) and of two sizes (the permutation into size groups): every aten op called has a deterministic CUDA
    kernel (the CPU runs the same ops)."""
    torch.manual_seed(0)
    model = VisionModel(tiny(24))
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 4, 6]])
    pixels = torch.randint(0, 256, (int(grid.prod(-1).sum()), 3 * 14 * 14), generator=g, dtype=torch.uint8)
    torch.use_deterministic_algorithms(True)
    with _Ops() as ops:
        model(pixels, grid).square().sum().backward()
    assert not ops.names & NO_DETERMINISTIC_CUDA_KERNEL, ops.names & NO_DETERMINISTIC_CUDA_KERNEL
    assert all(p.grad is not None for p in model.parameters())


def _cfg(*overrides, world_size=2):
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        return validate(compose_config(overrides))[0]
    finally:
        os.environ.pop("WORLD_SIZE") if old is None else os.environ.__setitem__("WORLD_SIZE", old)


def test_settings_that_cannot_be_deterministic_stop_the_run_named():
    from train.launch import check_device

    # DSA's Triton sparse stage has a deterministic backward under torch's switch (kernels/dsa, tested in
    # tests/kernels/test_dsa.py and tests/unit/test_dsa_core_attention.py): every backend and stage is accepted
    sparse = _cfg("recipe=keye_tiny_vl_dsa_sparse", "train.deterministic=true")
    assert sparse.model.lm.dsa.stage == "sparse" and sparse.model.lm.dsa.topk < sparse.train.seq_length
    check_device(sparse, cuda=True)    # auto: Triton on a GPU
    check_device(sparse, cuda=False)   # auto is the PyTorch reference on the CPU
    for backend in ("triton", "naive"):
        check_deterministic(_cfg("recipe=keye_tiny_vl_dsa_sparse", "train.deterministic=true",
                                 f"model.lm.dsa.backend={backend}"), cuda=True, environ={})
    check_deterministic(_cfg("recipe=keye_tiny_vl_dsa_warmup", "train.deterministic=true"), cuda=True, environ={})

    lm = _cfg("recipe=keye_tiny_lm", "train.deterministic=true")
    with pytest.raises(ValueError, match=r"NCCL_ALGO .* got 'NVLS'"):
        check_deterministic(lm, cuda=True, environ={"NCCL_ALGO": "NVLS"})
    with pytest.raises(ValueError, match=r"CUBLAS_WORKSPACE_CONFIG .* got ':0:0'"):
        check_deterministic(lm, cuda=True, environ={"CUBLAS_WORKSPACE_CONFIG": ":0:0"})
    check_deterministic(lm, cuda=True, environ={"NCCL_ALGO": "Tree", "CUBLAS_WORKSPACE_CONFIG": ":16:8"})
