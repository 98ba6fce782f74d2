"""Test-wide settings: Triton kernels run under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any module that defines a `@triton.jit` kernel is imported,
because triton decides between compiled and interpreted functions at decoration time.
"""
import os
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# transformers copies a directory's own modeling code (a DSA export's, trust_remote_code) into this cache; read when
# transformers is imported, so set here, before any test imports it: a folder of the run, not the user's home
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))


def pytest_collection_modifyitems(session, config, items):
    """The multi-process and long files first (`slow` mark), the rest after, each group in collection order.

    pytest.ini runs the suite in two pytest-xdist workers, one test file per unit (`--dist loadfile`: a file's
    module fixtures, such as the layout-parity runs, are built once), handed out in this order as a worker comes
    free. A file of a few minutes handed out last would leave the other core idle while it ran; the short files
    at the end fill the gaps. The order of tests within a file is unchanged."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: False (slow files) first


@pytest.fixture(autouse=True)
def _moe_process_state_reset():
    """The MoE routers' process-wide state, reset before each test. megatron keeps the auxiliary losses' backward
    scale in a class attribute (MoEAuxLossAutoScaler; its pipeline schedule sets loss_scale / num_microbatches there
    at every forward) and never resets it: a test that trained with 4 micro-batches left 1/4 for a later test's plain
    backward in the same worker, whose balancing-loss gradients then came out a quarter (test_moe_reference's d_input
    0.187 relative RMSE off). Each test starts from megatron's default (None: a scale of 1 at the first backward);
    nothing is imported here that the test did not import."""
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
    # likewise the routers' loss-token count that train/trainer._forward_step sets for its micro-batch
    # (parallel/megatron_compat.set_balancing_tokens, process-wide until the next step): a test that ran
    # _forward_step (test_loss_groups.py) left its count for test_moe_balance.py's routers after it in one worker
    # (their dL/dlogits 0.58 relative RMSE off)
    compat = sys.modules.get("parallel.megatron_compat")
    if compat is not None:
        compat.set_balancing_tokens(None)
    yield
