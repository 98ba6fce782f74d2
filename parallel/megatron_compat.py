"""Corrections to megatron-core 0.16.1 that apply on every device (GPU or CPU), each shown necessary
by a parity test in tests/dist. Applied once by `parallel.groups.init_distributed`.

1. `te_general_gemm` must exist (as None) in the MoE utilities without TransformerEngine: 0.16.1 reads
   the name unconditionally in every MoE router forward and raises NameError otherwise.
2. Load-balancing loss with per-token loss (calculate_per_token_loss): megatron multiplies each router's balancing
   loss by the tokens it routed, and the trainer divides every gradient by the step's tokens that carry LM loss, so
   the balancing acted with strength coeff x routed tokens / loss tokens: 1x for text whose every token carries
   loss, several times the configured coefficient for a vision-language row whose vision tokens (and a
   conversation's prompt, a pack's padding, KSA's summary slots) carry none, varying from step to step; and under
   sequence / context parallelism the rank-local token count halved it again at TP=2 (a quarter at TP=4). Here the
   multiplier is the LM-loss tokens of the micro-batch (its whole sequence's, over the TP x CP ranks, whose partial
   losses add up to the full sequence's), which the trainer sets for each micro-batch (`set_balancing_tokens`, and
   again when its backward begins: a recomputed layer's routers attach their loss there). The gradient is then
   coeff x the loss-token-weighted mean of the micro-batches' switch losses, added to the mean LM loss, as
   transformers' Qwen3-MoE adds coeff x its balancing loss to the mean LM loss: the configured coefficient acts at
   its strength whatever share of the tokens carries loss, and a micro-batch without a loss token adds no balancing
   gradient. Without a count set (a model run outside the trainer's step) the multiplier is the full sequence's
   routed tokens: local tokens x TP (when sequence parallel) x CP. The logged balancing loss is the unweighted
   switch loss either way.
3. The MoE token dispatchers keep the routing probabilities of their layer's last forward as an attribute (alltoall:
   `probs`, allgather: `local_probs`), read only for their dtype before the combine, until the layer's next forward
   replaces them. Under full recompute the last forward is the one run again in backward, whose probabilities hang on
   a graph that reaches the recomputed layer's detached input: its AccumulateGrad node keeps that input (the saved
   [s, b, h] checkpoint input, which would be freed once the layer's backward ends) and its [s, b, h] gradient
   alive, two [s, b, h] tensors per MoE layer from its backward until its forward in the next step (at 64K tokens,
   hidden 2048, bf16: 0.5 GiB per layer, growing through the backward). Each dispatcher now drops them when its
   combine ends; the values computed are unchanged (tests/unit/test_recompute_memory.py).
"""

from __future__ import annotations

import functools

import torch

_APPLIED = False
# the LM-loss tokens of the micro-batch whose routers run now (fix 2); None outside the trainer's schedule
_balancing_tokens: torch.Tensor | None = None


def set_balancing_tokens(count: torch.Tensor | None) -> None:
    """The micro-batch about to run (forward, or backward with recompute) has `count` tokens carrying LM loss over its
    whole sequence (a 0-dim integer tensor, on the device); its routers weigh their balancing loss by it (fix 2).
    None: no micro-batch of the trainer's (the full sequence's routed tokens are used)."""
    global _balancing_tokens
    _balancing_tokens = count


def set_balancing_tokens_in_backward(output: torch.Tensor, count: torch.Tensor) -> None:
    """Sets `count` again when the backward of `output` (a micro-batch's forward output) begins: with recompute its
    layers' routers run again there, after later micro-batches' forwards have set theirs."""
    if output.requires_grad:
        def hook(grad):
            set_balancing_tokens(count)
        output.register_hook(hook)


def apply_megatron_fixes() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    original = TopKRouter.attach_and_log_load_balancing_loss

    @functools.wraps(original)
    def attach(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
               reduce_group_has_dp=False, valid_token_count=None):
        if self.calculate_per_token_loss and _balancing_tokens is not None:
            valid_token_count = _balancing_tokens
        elif self.calculate_per_token_loss:
            local = valid_token_count if valid_token_count is not None else activation.shape[0]
            factor = self.config.context_parallel_size
            if self.config.sequence_parallel:
                factor *= self.config.tensor_model_parallel_size
            valid_token_count = local * factor
        return original(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                        reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    TopKRouter.attach_and_log_load_balancing_loss = attach

    for dispatcher, held in ((MoEAlltoAllTokenDispatcher, "probs"), (MoEAllGatherTokenDispatcher, "local_probs")):
        dispatcher.combine_postprocess = _dropping(dispatcher.combine_postprocess, held)
    _APPLIED = True


def _dropping(combine_postprocess, held: str):
    """`combine_postprocess` (a dispatcher's last step of a forward) that then drops the dispatcher's attribute
    `held`, the routing probabilities with their graph (fix 3)."""
    @functools.wraps(combine_postprocess)
    def wrapped(self, *args, **kwargs):
        out = combine_postprocess(self, *args, **kwargs)
        setattr(self, held, None)
        return out
    return wrapped
