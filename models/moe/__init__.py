"""Fast MoE experts and a memory-lean LM loss, as drop-in modules for megatron-core 0.16.1.

- `grouped_experts.GroupedExperts`: all local experts as grouped GEMMs (torch._grouped_mm / Triton / loop),
  checkpoint-compatible with megatron's SequentialMLP.
- `spec.moe_module_spec`: megatron's local MoE layer spec with GroupedExperts in the experts slot.
- `chunked_ce.chunked_cross_entropy`: vocab-parallel cross-entropy that never holds the logits of the
  whole sequence; `chunked_loss_gpt` makes any megatron GPTModel (subclass) use it.

Submodules are imported lazily: `models.moe.chunked_ce` needs torch only.
"""

import importlib

_EXPORTS = {
    "GroupedExperts": "models.moe.grouped_experts",
    "grouped_swiglu_experts": "models.moe.grouped_experts",
    "moe_module_spec": "models.moe.spec",
    "chunked_cross_entropy": "models.moe.chunked_ce",
    "ChunkedLossMixin": "models.moe.chunked_loss_gpt",
    "ChunkedLossGPTModel": "models.moe.chunked_loss_gpt",
    "enable_chunked_loss": "models.moe.chunked_loss_gpt",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models.moe' has no attribute {name!r}")
