"""Corrections to megatron-core 0.16.1 that apply on every device (GPU or CPU), each shown necessary
by a parity test in tests/dist. Applied once by `parallel.groups.init_distributed`.

1. `te_general_gemm` must exist (as None) in the MoE utilities without TransformerEngine: 0.16.1 reads
   the name unconditionally in every MoE router forward and raises NameError otherwise.
2. Load-balancing loss under sequence / context parallelism with per-token loss: the router multiplies
   its (partial, rank-local) aux loss by the LOCAL token count before the trainer divides all gradients
   by the GLOBAL token count, so at TP=2 with sequence parallelism the balancing loss acts with half
   its configured strength (TP=4: a quarter). The partial losses of the TP x CP ranks already add up
   to the full-sequence loss, so the right multiplier is the full sequence's token count:
   local tokens x TP (when sequence parallel) x CP.
"""

from __future__ import annotations

import functools

_APPLIED = False


def apply_megatron_fixes() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    original = TopKRouter.attach_and_log_load_balancing_loss

    @functools.wraps(original)
    def attach(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
               reduce_group_has_dp=False, valid_token_count=None):
        if self.calculate_per_token_loss:
            local = valid_token_count if valid_token_count is not None else activation.shape[0]
            factor = self.config.context_parallel_size
            if self.config.sequence_parallel:
                factor *= self.config.tensor_model_parallel_size
            valid_token_count = local * factor
        return original(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                        reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    TopKRouter.attach_and_log_load_balancing_loss = attach
    _APPLIED = True
