"""The chunked loss for megatron GPTModels: a mixin that replaces the logits + loss step of `_postprocess`.

Override point: `GPTModel._postprocess` (megatron-core 0.16.1), which otherwise runs the output layer on
the whole sequence and then `compute_language_model_loss` on the full [s, b, V/tp] logits. With the mixin
on and labels given (training or eval), the final hidden states go through the same tensor-parallel region
the output layer would apply (sequence-parallel all-gather, or copy-to-TP with an all-reduce of the input
gradient), then straight into `chunked_cross_entropy` with the output layer's weight (or the shared
embedding). It returns the per-token loss [b, s] exactly as GPTModel does. Without labels, with MTP, at
inference, with an output-layer bias, with megatron's config logger, or with `loss_chunk_tokens` unset,
it defers to the model's own `_postprocess`.

Three ways in (the first two keep any GPTModel subclass, e.g. models.lm.KeyeLM, intact):

    class KeyeLM(ChunkedLossMixin, GPTModel): ...          # mixed in; off until loss_chunk_tokens is set
    model.loss_chunk_tokens = 4096                         # the config flag: None/0 = megatron's loss

    model = enable_chunked_loss(build_lm(...), loss_chunk_tokens=4096)   # an already built model, in place

    ChunkedLossGPTModel(config=..., transformer_layer_spec=..., ..., loss_chunk_tokens=4096)   # plain GPTModel
"""

from __future__ import annotations

from megatron.core.config_logger import has_config_logger_enabled
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

from models.attention.dense import local_documents, with_padding_rows
from models.moe.chunked_ce import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy


class ChunkedLossMixin:
    """Put before GPTModel (or its subclass) in the bases. `loss_chunk_tokens` None or 0: megatron's loss."""

    loss_chunk_tokens: int | None = None

    def _uses_chunked_loss(self, labels, kwargs) -> bool:
        inference = kwargs.get("inference_context") is not None and not self.training
        return (bool(self.loss_chunk_tokens) and labels is not None and self.post_process
                and not kwargs.get("mtp_in_postprocess") and self.config.mtp_num_layers is None and not inference
                and getattr(self.output_layer, "bias", None) is None and not has_config_logger_enabled(self.config))

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if not self._uses_chunked_loss(labels, kwargs):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        tp_group = self.pg_collection.tp
        if self.output_layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                                 group=tp_group)
        elif tp_group.size() > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        # hidden [s, b, h]; labels [b, s] -> loss [s, b] -> [b, s] (GPTModel's convention). The padding the
        # trainer names at the row's end (models/attention/dense.py documents_part; under context parallelism the
        # part of it that ends this rank's share) gets no logits: a loss of 0
        s = hidden_states.shape[0]
        n = local_documents(s, kwargs.get("packed_seq_params"), self.config.context_parallel_size > 1)
        loss = chunked_cross_entropy(hidden_states[:n], weight, labels.transpose(0, 1)[:n], tp_group=tp_group,
                                     chunk_tokens=int(self.loss_chunk_tokens))
        return with_padding_rows(loss, s, 0).transpose(0, 1).contiguous()


class ChunkedLossGPTModel(ChunkedLossMixin, GPTModel):
    def __init__(self, *args, loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS, **kwargs):
        _check(loss_chunk_tokens)
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = int(loss_chunk_tokens)


_MIXED: dict[type, type] = {}


def enable_chunked_loss(model: GPTModel, *, loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> GPTModel:
    """Switches a built GPTModel (any subclass) to the chunked loss in place; returns the same object.

    Parameters, hooks and state are untouched: only the class gains the mixin (a cached subclass
    `ChunkedLoss<Class>` of the model's own class) and `loss_chunk_tokens` is set. None or 0 switches it off.
    """
    if not isinstance(model, GPTModel):
        raise TypeError(f"expected a megatron GPTModel, got {type(model).__name__}")
    if loss_chunk_tokens:
        _check(loss_chunk_tokens)
    if not isinstance(model, ChunkedLossMixin):
        cls = type(model)
        if cls not in _MIXED:
            _MIXED[cls] = type(f"ChunkedLoss{cls.__name__}", (ChunkedLossMixin, cls), {"__module__": __name__})
        model.__class__ = _MIXED[cls]
    model.loss_chunk_tokens = int(loss_chunk_tokens) if loss_chunk_tokens else None
    return model


def _check(loss_chunk_tokens) -> None:
    if int(loss_chunk_tokens) <= 0:
        raise ValueError(f"loss_chunk_tokens must be positive, got {loss_chunk_tokens}")
