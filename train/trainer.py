"""Builds a run from its typed config and runs the step loop on megatron-core's schedules.

Order of construction (each part receives only its own sub-config):
    layout (validated before any process group) -> process groups -> seeds -> model chunks
    (layout-invariant init) -> megatron DDP -> distributed optimizer -> data stream -> resume.
One step: set lr for the step -> forward/backward over the micro-batches (pipeline-aware schedule)
-> finalize grads (DP reduce-scatter, SP norms, embeddings) -> clip -> AdamW -> log -> maybe save.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from torch.distributed.checkpoint.api import CheckpointException

from data.held_out import WHOLE, eval_plan, parse_set_batches
from data.sample_position import counters_of_rank, format_runs
from data.video.packing import DOC_KINDS
from models.config import lm_flops_per_token, lm_param_count
from models.init import init_layout_invariant
from models.ksa_tokens import insert_summary_slots, interleaved_length, pad_cu_seqlens
from models.attention.dsa import record_kls, use_local_kl_backward
from models.lm import build_lm, copy_text_qkv_to_summary, freeze_for_stage, transformer_config
from models.moe.router import PackedSeqDocuments
from parallel.groups import build_process_groups, init_distributed, seed_all
from parallel.layout import ParallelLayout
from parallel.megatron_compat import set_balancing_tokens, set_balancing_tokens_in_backward
from parallel.offload import attach_activation_offload
from train import checkpoint as ckpt
from train.config import (Config, DistillConfig, SettingsError, config_changes, held_out_moved,
                          ignored_on_resume, rampup_changed, saved_consumed_samples)
from train.data_streams import (check_data_state, check_same_data, eval_streams, restore_data_state, text_streams,
                                training_exclude, video_stream)
from train.determinism import apply_deterministic
from train.distill import AttentionMatch, distill_losses
from train.faults import (fault_args, maybe_fail, planned, poison_gradients, poisoned_indexers, poisoned_loss,
                          requested, scale_gradients)
from train.metrics import (NONFINITE_RECORDS, SPIKE_RECORDS, Meter, StepStats, Timer, data_metrics_from_table,
                           data_metrics_table, device_peak_tflops, json_record, set_aside_redone, sum_over_world)
from train.loss_groups import GROUPS_KEY, group_metrics, group_sums, token_groups
from train.moe_stats import RouterStats
from train.nonfinite import (GradsBeforeReduction, NonFinite, NonFiniteStepError, grad_norms, nonfinite_micro_batches,
                             hosts_of, nonfinite_parts, part_ids, PARTS_KEY, record_nonfinite_step)
from train.optim import (apply_lr, build_optimizer, ensure_adam_state, keep_configured_hyperparameters,
                         patch_step_restore, schedule_jump, untie_adam_steps)
from train.preemption import StopRequests, restart_checkpoint_helpers
from train.profiling import StepProfiler
from train.spikes import (PART_LOSS_KEY, SpikeStepError, SpikeWindow, apply_step, describe_suspect,
                          micro_batch_losses, norm_before_step, part_losses, rank_suspects, record_spike_step,
                          sample_words)
from train.tensorboard import resolved_dir as resolved_tb_dir

log = logging.getLogger("train")


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor, *, parts: torch.Tensor | None = None,
               n_parts: int = 0, groups: torch.Tensor | None = None, n_groups: int = 0, part_loss: bool = False):
    """Per-token loss sum and token count (megatron's calculate_per_token_loss convention); with `parts` (part_ids
    of the tokens, as this rank holds them) also which of the micro-batch's n_parts documents or rows held a token
    whose loss was not finite (train/nonfinite.py: a non-finite step names them), and with `part_loss` (train.spike
    on) each part's loss sum and tokens (train/spikes.py: a spiking step ranks them); with `groups` (each token's
    group of source and kind, train/loss_groups.py) each of the n_groups' loss sum and tokens."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"lm_loss": torch.stack([loss_sum.detach().double(), mask.sum().double()])}
    flags = None if parts is None else nonfinite_parts(output, parts, n_parts)
    if flags is not None:
        report[PARTS_KEY] = flags
    sums = None if parts is None or not part_loss else part_losses(output, loss_mask, parts, n_parts)
    if sums is not None:
        report[PART_LOSS_KEY] = sums
    if groups is not None and groups.shape == output.shape:
        report[GROUPS_KEY] = group_sums(output.detach(), loss_mask, groups, n_groups)
    return loss_sum, num_tokens, report


def _distill_loss_func(num_tokens: torch.Tensor, report: torch.Tensor, output: torch.Tensor):
    return output, num_tokens, {"lm_loss": report[:2], "distill": report[2:]}


@dataclass(frozen=True)
class StepInputs:
    """How a text micro-batch becomes model inputs (fixed for a run)."""

    device: torch.device
    vocab_size: int
    ksa_chunk: int = 0  # > 0: insert KSA summary slots
    ksa_summary: int = 1
    model_seq: int = 0  # tokens per row the model sees (text + KSA summaries); packed KSA rows are padded to it
    # packed rows (not KSA's) shorter than the layout takes are padded to row_length(tokens, model_seq)
    # (parallel/layout.py ParallelLayout.row_length); None: as they come
    row_length: object = None
    distill: DistillConfig | None = None
    attention_match: object = None  # with distill: train/distill.AttentionMatch, the KSA layers' attention term
    tp_group: object = None
    sequence_parallel: bool = False
    cp_group: object = None  # set when parallel.cp > 1: the micro-batch is split over it
    cp_split: str = "document"  # parallel.cp_split: the token layout (the model's CP attention uses the same)
    loss_groups: int = 0  # > 0: the loss of each of this many groups of source and kind (train/loss_groups.py)
    part_loss: bool = False  # each document's or row's loss sum and tokens in the loss report (train.spike on)


VISION_KEYS = ("pixel_values", "grid_thw", "visual_pos", "visual_embeds", "visual_local_pos")


def _forward_step(inputs: StepInputs, data_iterator, model):
    raw = next(data_iterator)
    batch = {k: v.to(inputs.device, non_blocking=True) for k, v in raw.items() if k not in VISION_KEYS}
    pos = batch["position_ids"]
    if pos.dim() == 2:  # [b, s] text positions -> the [3, b, s] rows of multimodal RoPE
        batch["position_ids"] = pos = pos.unsqueeze(0).expand(3, -1, -1)
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    visual_pos = raw.get("visual_pos")
    teacher = None
    real_segments = None   # a packed row's segments before the KSA padding (the rest: padding)
    # the row's segments on the host (no device sync): their lengths, and which are padding
    lengths, padding = segments_on_host(raw.get("cu_seqlens"), raw.get("doc_groups"))
    if inputs.ksa_chunk:
        cu = batch["cu_seqlens"].reshape(-1) if "cu_seqlens" in batch else None
        sb = insert_summary_slots(tokens, chunk=inputs.ksa_chunk, num_summary=inputs.ksa_summary, labels=labels,
                                  loss_mask=mask, position_ids=pos, slot_ids_from=inputs.vocab_size, ignore_index=0,
                                  cu_seqlens=cu)
        if inputs.distill is not None:  # the dense teacher reads the row as it came: its documents, its frames
            teacher_kwargs, text_documents = {}, None
            if cu is not None:   # and each token's document (padding -1: no expert's, no attention term's)
                text_documents = token_documents(part_ids(tokens.shape, cu, tokens.device), cu.numel() - 1,
                                                 real_segments=None, doc_groups=batch.get("doc_groups"))
                teacher_kwargs["packed_seq_params"] = packed_params(cu, text_documents,
                                                                    tail=trailing_padding(lengths, padding))
            if raw.get("visual_embeds") is not None:
                teacher_kwargs["visual"] = (raw["visual_embeds"], visual_pos.to(inputs.device))
            teacher = (tokens, pos, teacher_kwargs)
        tokens, labels, mask, pos = sb.input_ids, sb.labels, sb.loss_mask, sb.position_ids
        if cu is not None:  # packed documents: summaries follow each document's chunks; pad to the fixed length
            real_segments = sb.cu_seqlens.numel() - 1
            tokens, labels, mask, pos, batch["cu_seqlens"] = pad_packed_row(tokens, labels, mask, pos, sb.cu_seqlens,
                                                                            inputs.model_seq)
            lengths = [interleaved_length(n, chunk=inputs.ksa_chunk, num_summary=inputs.ksa_summary) for n in lengths]
            if inputs.model_seq > sum(lengths):  # pad_packed_row's segment
                lengths, padding = lengths + [inputs.model_seq - sum(lengths)], padding + [True]
        if visual_pos is not None:
            visual_pos = sb.layout.text_index[visual_pos.to(sb.layout.text_index.device)]
    elif inputs.row_length is not None and "cu_seqlens" in batch:
        # a packed row shorter than the layout takes (data.video.pad_to_seq_len=false): padded to it
        s = tokens.shape[-1]
        length = inputs.row_length(s, inputs.model_seq)
        if length > s:
            real_segments = batch["cu_seqlens"].numel() - 1
            tokens, labels, mask, pos, batch["cu_seqlens"] = pad_packed_row(tokens, labels, mask, pos,
                                                                            batch["cu_seqlens"], length)
            lengths, padding = lengths + [length - s], padding + [True]
    kwargs = {}
    if "cu_seqlens" in batch:  # packed documents: attention stays within each (sbhd layout, batch 1)
        # the core attentions leave out the padding at the row's end (under CP, the dense and KSA ones: the whole
        # row's, as their context-parallel functions see it)
        kwargs["packed_seq_params"] = packed_params(batch["cu_seqlens"], tail=trailing_padding(lengths, padding))
    # the micro-batch's LM-loss tokens over its whole sequence (before a CP split): its routers weigh their balancing
    # loss by them, so that model.lm.moe_aux_loss_coeff acts at its strength against the mean LM loss whatever share
    # of the tokens carries loss (none: no balancing gradient from this micro-batch; parallel/megatron_compat.py fix 2)
    loss_tokens = mask.sum().to(torch.int64)
    set_balancing_tokens(loss_tokens)
    cu = batch.get("cu_seqlens")
    parts, n_parts = part_ids(tokens.shape, cu, tokens.device), tokens.shape[0] if cu is None else cu.numel() - 1
    groups = None
    if inputs.loss_groups and "doc_groups" in batch and cu is not None:
        groups = token_groups(parts, batch["doc_groups"])
    if inputs.cp_group is not None:
        from parallel.context.batch import cp_share, split_batch_for_cp

        tokens, labels, mask, pos, kwargs = split_batch_for_cp(tokens, labels, mask, pos, kwargs, inputs.cp_group,
                                                               split=inputs.cp_split)
        parts = cp_share(parts, kwargs, inputs.cp_group, split=inputs.cp_split)
        if groups is not None:
            groups = cp_share(groups, kwargs, inputs.cp_group, split=inputs.cp_split)
    if cu is not None:  # each token's document, as this rank holds them (padding -1: no expert's, no indexer's)
        documents = token_documents(parts, n_parts, real_segments=real_segments, doc_groups=batch.get("doc_groups"))
        kwargs["packed_seq_params"] = replace(kwargs["packed_seq_params"], documents=documents, num_documents=n_parts)
    if raw.get("visual_embeds") is not None:  # LM-input ranks of a multimodal model
        # CP: the vision tower already placed this rank's share (in the model's, i.e. interleaved, sequence)
        where = raw["visual_local_pos"] if "visual_local_pos" in raw else visual_pos
        kwargs["visual"] = (raw["visual_embeds"], where.to(inputs.device))
    if teacher is not None:  # KSA conversion stage 1: the student is the row as the model trains on it
        loss_sum, n, report = distill_losses(model, batch, teacher, (tokens, pos, kwargs), sb.layout.text_index,
                                             inputs.distill, inputs.attention_match, tp_group=inputs.tp_group,
                                             text_documents=text_documents)
        set_balancing_tokens_in_backward(loss_sum, loss_tokens)
        return loss_sum, functools.partial(_distill_loss_func, n, report)
    output = model(tokens, pos, None, labels=labels, **kwargs)
    set_balancing_tokens_in_backward(output, loss_tokens)  # recompute: the routers run again in the backward
    return output, functools.partial(_loss_func, mask, parts=parts, n_parts=n_parts, groups=groups,
                                     n_groups=inputs.loss_groups, part_loss=inputs.part_loss)


def _without_filler(kls: list, padding: list[bool] | None) -> list:
    """A DSA layer's indexer KLs without those of filler micro-batches (an evaluation of a whole held-out set):
    `padding` has one flag per micro-batch, in the order its model chunk drew them, as the layer computed one KL per
    forward; None keeps them all."""
    if padding is None:
        return kls
    if len(kls) != len(padding):
        raise RuntimeError(f"a DSA layer computed {len(kls)} indexer KLs over {len(padding)} held-out micro-batches")
    return [kl for kl, pad in zip(kls, padding) if not pad]


def pad_packed_row(tokens, labels, mask, pos, cu_seqlens, length: int):
    """Pads a packed row (batch 1) to `length` tokens with one more document of padding (token 0, no
    loss): packed KSA rows have a summary count that depends on their documents, while the pipeline
    schedule and the context-parallel split need one fixed length."""
    cu = pad_cu_seqlens(cu_seqlens, length)
    n = length - tokens.shape[-1]
    if n == 0:
        return tokens, labels, mask, pos, cu

    def pad(x, value):
        return torch.cat([x, x.new_full((*x.shape[:-1], n), value)], dim=-1)

    ramp = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
    return pad(tokens, 0), pad(labels, 0), pad(mask, 0), torch.cat([pos, ramp], dim=-1), cu


def token_documents(parts: torch.Tensor, n_parts: int, *, real_segments: int | None,
                    doc_groups: torch.Tensor | None) -> torch.Tensor:
    """Each token's document for the routers' balancing per document (models/moe/router.py PackedSeqDocuments): its
    segment of the packed row (`parts`, part_ids of the tokens as this rank holds them), -1 for padding: the segments
    from `real_segments` on (a KSA row's padding to the model's length) and those whose group is -1 (`doc_groups`, a
    video pack's padding segment)."""
    pad = torch.zeros(n_parts, dtype=torch.bool, device=parts.device)
    if real_segments is not None:
        pad[real_segments:] = True
    if doc_groups is not None:
        groups = doc_groups.reshape(-1).to(parts.device)
        pad[:groups.numel()] |= groups < 0
    return torch.where(pad[parts], -1, parts)


def packed_params(cu_seqlens: torch.Tensor, documents: torch.Tensor | None = None,
                  tail: tuple[int, int, int] | None = None):
    """PackedSeqParams for one packed row in megatron's sbhd layout: rotary embeddings use the explicit
    positions (no per-document restart, which the thd path would do), the core attention the bounds, and the
    layers each token's `documents` where given (token_documents; _forward_step adds them after a CP split, for
    this rank's tokens). tail (trailing_padding, from the host's copy of the bounds): the padding at the row's end,
    which the core attentions leave out, and the longest segment before it (read from cu_seqlens without)."""
    cu = cu_seqlens.reshape(-1).to(torch.int32)
    if tail is None:
        tail = (0, 0, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0)
    pad_tail, pad_segments, longest = tail
    return PackedSeqDocuments(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                              max_seqlen_kv=longest, documents=documents,
                              num_documents=0 if documents is None else cu.numel() - 1, pad_tail=pad_tail,
                              pad_tail_segments=pad_segments)


def segments_on_host(cu_seqlens, doc_groups) -> tuple[list[int] | None, list[bool] | None]:
    """(lengths, padding): each segment's tokens of a packed row's `cu_seqlens` as the loader gave them (host
    tensors: no device sync) and whether it is padding (its `doc_groups` entry < 0: a video pack's padding
    segment); (None, None) for a row without bounds."""
    if cu_seqlens is None:
        return None, None
    cu = cu_seqlens.reshape(-1).tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    padding = [False] * len(lengths)
    if doc_groups is not None:
        for i, g in enumerate(doc_groups.reshape(-1).tolist()[:len(lengths)]):
            padding[i] = g < 0
    return lengths, padding


def trailing_padding(lengths: list[int] | None, padding: list[bool] | None) -> tuple[int, int, int] | None:
    """(tokens, segments, longest) for packed_params: the padding segments at a row's end (never all of its
    segments) and the longest segment before them; padding None: no padding named (the longest of all). None
    without lengths (the bounds are then read from the device)."""
    if lengths is None:
        return None
    k = 0
    if padding is not None:
        while k < len(lengths) - 1 and padding[len(lengths) - 1 - k]:
            k += 1
    kept = lengths[:len(lengths) - k]
    return sum(lengths[len(kept):]), k, max(kept, default=0)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def code_version() -> str:
    try:
        here = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _drop_stale_graphs(chunks) -> None:
    """Detaches what modules keep of their last forward with its autograd graph attached: megatron-core's MoE
    token dispatcher keeps the last micro-batch's routing probabilities (with parallel/megatron_compat.py fix 3
    only when that forward stopped between its dispatch and its combine). After a schedule's backwards that graph
    only holds on to what its AccumulateGrad nodes own: every parameter's node (with DDP's hooks, which close over
    the DDP module: a cycle through C++ that keeps a dropped trainer alive) and the leaves the micro-batch read,
    such as its visual embeddings and their gradients."""
    seen = set()  # objects shared by every layer (the transformer config, process groups) are read once
    for m in chunks:
        for mod in m.modules():
            # the module and the plain objects it holds (not its submodules, nor its parameter / hook dicts)
            for owner in [mod, *(v for v in vars(mod).values()
                                 if hasattr(v, "__dict__") and not isinstance(v, (torch.nn.Module, dict)))]:
                if id(owner) in seen:
                    continue
                seen.add(id(owner))
                for k, v in list(vars(owner).items()):
                    if torch.is_tensor(v) and v.grad_fn is not None:
                        setattr(owner, k, v.detach())


def record_config(run_dir: str, resolved_yaml: str, step: int) -> None:
    """<run_dir>/config.yaml: the resolved config of the launch now running. A launch that resumes with other
    settings keeps the one before it, which ran the steps up to `step`, as config_history/until_step_<step>.yaml
    (-2, -3, ... when several launches stopped at the same step), so every setting a run's steps ran under stays
    on disk beside the checkpoints, which record their own."""
    path = Path(run_dir, "config.yaml")
    if path.is_file() and path.read_text() != resolved_yaml:
        history = Path(run_dir, "config_history")
        history.mkdir(exist_ok=True)
        keep, n = history / f"until_step_{step:06d}.yaml", 1
        while keep.exists():
            n += 1
            keep = history / f"until_step_{step:06d}-{n}.yaml"
        path.replace(keep)
    path.write_text(resolved_yaml)


class DataEnded(Exception):
    """The training data of `ranks` ended in a step (every rank raises it together: Trainer._video_round)."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__(f"the training data of rank(s) {format_runs(ranks)} ended")
        self.ranks = ranks


def rerun_hint(t, run_dir) -> str:
    """What rerunning the same command does after a stop (`t`: train settings): resume from the run's last checkpoint,
    or start over."""
    latest = ckpt.find_latest(run_dir) if t.checkpoint.enabled else None
    if latest is not None:
        return f"The last checkpoint is {latest.path}: rerunning the same command resumes from it."
    if t.checkpoint.enabled:
        return "No checkpoint was written yet: rerunning the same command starts the run over."
    return "Checkpoints are off (train.checkpoint.enabled=false): rerunning starts the run over."


def first_readers(texts: Sequence[str], ranks) -> dict[str, int]:
    """Each data of a step once, by the first of `ranks` whose data it is (`texts`: every rank's, as worded): the TP,
    CP and PP ranks of a replica read the same."""
    first: dict[str, int] = {}
    for r in ranks:
        first.setdefault(texts[r], r)
    return first


def named_data(texts: Sequence[str], ranks: Sequence[int], me: int) -> tuple[dict[int, str], str, str]:
    """For the log lines of a step: the data of the first 4 of `ranks` (distinct: first_readers) as worded, by rank,
    how many more there are, and all of those but this rank's (`me`) as a line's tail."""
    named = {r: f"rank {r}'s data in the step: {texts[r]}" for r in ranks[:4]}
    more = f" (and {len(ranks) - len(named)} more ranks': their logs name it)" if ranks[4:] else ""
    return named, more, "".join(f"; {text}" for r, text in named.items() if r != me) + more


class Trainer:
    def __init__(self, cfg: Config, layout: ParallelLayout, *, resolved_config_yaml: str = "",
                 launched: float | None = None):
        """`launched`: when this launch began (time.time(); default now): a STOP file older than that is stale."""
        self.launched = time.time() if launched is None else launched
        self.cfg, self.layout = cfg, layout
        self.run_dir = cfg.resolved_run_dir()
        self.determinism = apply_deterministic(cfg.train.deterministic)  # before CUDA and NCCL are first used
        self.device = init_distributed()
        self.rank = dist.get_rank()
        self.pgs = build_process_groups(layout)
        seed_all(cfg.seed, self.pgs)
        t, lm = cfg.train, cfg.model.lm
        self.hosts = [""] * layout.world_size   # each rank's host (check_shared_run_dir), for the messages naming ranks
        if t.eval.only:   # a training launch checks it in _claim_run_dir, once it holds the directory
            self.hosts = ckpt.check_shared_run_dir(self.run_dir, checkpoints=False)
        self.resume_ref = None if t.eval.only else self._claim_run_dir()
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and torch.cuda.is_available())
        if self.bf16 and not torch.cuda.is_available():
            raise SettingsError("train.precision=bf16 needs a GPU; use fp32 (or auto) on the CPU")
        self.exclude = training_exclude(cfg)   # data.exclude's samples; none for held-out sets or eval-only
        if self.resume_ref is not None:   # a resume of another model, or that cannot continue its data, stops here
            self._check_resume_point(self.resume_ref)

        # train.trainable=indexer (the DSA warm-up): only the indexers train, and their one loss, each DSA layer's
        # KL, never reaches the rest of the model (models/attention/dsa.py). With indexer_backward=local each
        # layer back-propagates its KL in its forward and the step runs the model forward only: the backward
        # through the frozen model reaches no trainable parameter. Nothing is then kept for a backward, so
        # recompute and activation offload have nothing to do and are off.
        self.indexer_step = t.indexer_step
        recompute = None if layout.recompute == "none" or self.indexer_step else layout.recompute
        self.tconfig = transformer_config(lm, layout.model_sizes(), bf16=self.bf16, use_cpu_initialization=False,
                                          recompute=recompute, deterministic=t.deterministic)
        # megatron's own initialisation stays on although init_layout_invariant overwrites every value: with
        # perform_initialization=False megatron 0.16.1 never tags TP-sharded weights `tensor_model_parallel`,
        # and gradient clipping then counts them on TP rank 0 only (a wrong grad norm at TP > 1).
        pp_rank = self.pgs.pp.rank()
        vpp = layout.vpp if layout.vpp > 1 else None
        # context parallelism: the model's attention gets parallel/context's functions injected (models/ never
        # imports parallel/), with the token layout the micro-batches are split with (StepInputs.cp_split)
        cp_ops = None
        if layout.cp > 1:
            from parallel.context import ContextParallelAttention

            cp_ops = ContextParallelAttention(split=layout.cp_split)
        chunks = [build_lm(lm, self.tconfig, pg_collection=self.pgs, pp_rank=pp_rank, pp_size=layout.pp,
                           vp_stage=v, vpp_size=vpp, cp_ops=cp_ops) for v in (range(vpp) if vpp else [None])]
        for c in chunks:
            c.to(self.device)
        init_layout_invariant(chunks, seed=cfg.seed, std=lm.init_std, num_layers=lm.num_layers)
        if self.indexer_step:
            use_local_kl_backward(chunks)
        # each micro-batch's indexer KL, for the step's mean (_loss_vector), per model chunk
        self.dsa_by_chunk = [record_kls([c]) for c in chunks]
        # parallel.offload=activations: what decoder layers save for backward lives in host memory (with
        # recompute=full: each layer's input hidden state); hooks only, the values are unchanged
        self.offloaders = (attach_activation_offload(chunks, num_layers=layout.offload_layers)
                           if layout.offload == "activations" and not self.indexer_step else [])
        # the experts' share of each step's tokens and the balancing loss (train/moe_stats.py): forward hooks only
        self.router_stats = RouterStats(chunks, num_layers=lm.num_layers, num_experts=lm.num_experts,
                                        dp_size=self.pgs.dp.size(), device=self.device)
        # Before DDP and the optimizer exist: both take the parameters' values and trainability as they are.
        # train.eval.only loads each checkpoint it scores in evaluate_only
        self.eval_only = t.eval.only
        if t.checkpoint.init_from and self.resume_ref is None and not self.eval_only:
            self._init_weights_from(chunks, t.checkpoint.init_from)
        if t.trained in ("projector", "none"):
            # the alignment stage (ViT and LM frozen, only the projector trains), or train.eval.only (nothing
            # trains): DDP allocates no gradient buffer and the optimizer holds no state for the LM
            frozen = sum(1 for c in chunks for p in c.parameters())
            for c in chunks:
                c.requires_grad_(False)
        else:
            frozen = freeze_for_stage(chunks, t.trainable)
        # a frozen LM (projector alignment) has no optimizer state to save or restore
        self.lm_trainable = any(p.requires_grad for c in chunks for p in c.parameters())
        self.vision = None
        if cfg.model.vision.enabled:
            from train.vision import VisionTower

            # the projector trains with the whole model and in the alignment stage; the KSA and DSA conversion
            # stages (trainable=summary / indexer) keep everything but their own parameters frozen
            self.vision = VisionTower(cfg, layout, self.pgs, self.device,
                                      train_vit=t.trained == "all", train_projector=t.trained in ("all", "projector"),
                                      bf16=self.bf16)
            setting = "vision_init_from" if t.checkpoint.vision_init_from else "init_from"
            source = getattr(t.checkpoint, setting)
            if source and self.resume_ref is None and not self.eval_only:
                self._check_frozen_vision_filled(self._init_vision_from(source, setting), f"{setting}={source!r}")
        # megatron's own NaN check (check_for_nan_in_grad) raises on the ranks whose local gradients hold one, before
        # the reduction, while the others wait in it; the trainer checks the whole world's instead (_nonfinite), and
        # notes each rank's own before the reduction (GradsBeforeReduction)
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=layout.distributed_optimizer)
        self.model = [DistributedDataParallel(config=self.tconfig, ddp_config=ddp_cfg, module=c,
                                              disable_bucketing=i > 0, pg_collection=self.pgs)
                      for i, c in enumerate(chunks)]
        self.tconfig.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        # this rank's LM gradients before their reduction; its experts' are its own data's where they are not
        # spread over ranks (and shard as the dense parameters do: its peers hold the same experts)
        self.own_grads = GradsBeforeReduction(self.rank, experts_own=layout.ep == 1 and layout.etp in (1, layout.tp))
        self.tconfig.finalize_model_grads_func = self.own_grads
        self.vit_own_norm = None   # the vision tower's own gradient norm in a step (VisionTower.own_grads)
        self.p2p = P2PCommunicator(pp_group=self.pgs.pp, config=self.tconfig) if layout.pp > 1 else None
        # train.eval.only steps nothing: no optimizer (megatron's would be an empty one, and warn that it is)
        self.optimizer = None if self.eval_only else build_optimizer(
            self.model, t, bf16=self.bf16, distributed=layout.distributed_optimizer, pg_collection=self.pgs)

        # KSA lengthens every sequence by its summary slots; packed rows are padded to this length
        self.model_seq_length = lm.model_seq_length(t.seq_length)
        # video data: the step's loss of each source (data.video.sources()) and kind of document, apart
        self.loss_sources = [name for name, *_ in cfg.data.video.sources()] if cfg.data.kind == "video" else []
        self.step_inputs = StepInputs(
            device=self.device, vocab_size=lm.vocab_size, ksa_chunk=lm.ksa.chunk if lm.uses_ksa else 0,
            ksa_summary=lm.ksa.num_summary, model_seq=self.model_seq_length, row_length=layout.row_length,
            distill=t.distill if t.distill.enabled else None,
            attention_match=AttentionMatch([m.module for m in self.model], tp_group=self.pgs.tp,
                                           sequence_parallel=layout.sequence_parallel) if t.distill.enabled else None,
            tp_group=self.pgs.tp, sequence_parallel=layout.sequence_parallel,
            cp_group=self.pgs.cp if layout.cp > 1 else None, cp_split=layout.cp_split,
            loss_groups=len(self.loss_sources) * len(DOC_KINDS), part_loss=bool(t.spike.factor))

        dp_rank, dp_size = self.pgs.dp.rank(), self.pgs.dp.size()
        if cfg.data.kind == "video":
            # One stream; a step's micro-batches are drawn up front (the vision phase needs them all) and
            # every model chunk iterates the same list.
            self.streams = [self._video_stream(cfg, dp_rank, dp_size)]
        else:
            self.streams = self._text_streams(cfg.data)
        check_same_data(self.streams[0], self.hosts)   # every node sees the same data files
        self.num_microbatches = self.streams[0].num_microbatches
        if cfg.data.kind == "video" and (t.eval.interval or self.eval_only):
            self._check_held_out_videos()
        # video data with data.video.num_epochs set ends: every round's ranks then agree whether any rank's ended
        # (_video_round), and each step starts with what a checkpoint of the step before it holds (_loop)
        self.data_can_end = cfg.data.kind == "video" and (cfg.data.video.num_epochs is not None
                                                          or planned("data_end_in_step"))
        if self.exclude and self.rank == 0:
            v = cfg.data.video
            token_documents = cfg.data.kind == "tokens" or (cfg.data.kind == "video" and bool(v.text_tokens)
                                                             and v.text_tokens_fraction > 0)
            log.info("data.exclude: %s, left out of the training data where met",
                     self.exclude.describe(token_documents=token_documents))
            unmatched = self.streams[0].unmatched_exclusions
            if unmatched:
                log.warning("data.exclude: %d of the samples named are in none of this run's training data, so "
                            "nothing is left out for them (first: %s)", len(unmatched), ", ".join(unmatched[:5]))

        pc = lm_param_count(lm)
        # a step of the DSA warm-up's local indexer backward runs the frozen model forward only; a stage that
        # trains part of the model computes no weight gradient for the rest
        flops = lm_flops_per_token(lm, t.seq_length, backward=not self.indexer_step, trainable=t.trainable,
                                   teacher=t.distill.enabled)
        self.meter = Meter(flops_per_token=flops, world_size=layout.world_size,
                           peak_tflops=device_peak_tflops(t.peak_tflops), total_steps=t.steps)
        self.step = 0
        # packed sequences of the steps so far (their global batches: train.batch_rampup's size of each step), and the
        # global batch the streams draw now (set before each step: _set_global_batch)
        self.consumed_samples, self.global_batch = 0, t.global_batch_size
        self.nonfinite_in_row = 0  # steps in a row whose gradients were not finite (train.skip_nonfinite_steps)
        self.skipped_steps = 0  # such steps the run skipped (both kept in its checkpoints)
        # train.spike: the last applied steps' gradient norms, the steps in a row whose norm spiked, and those skipped
        self.spikes = SpikeWindow(t.spike.factor, t.spike.window) if t.spike.factor else None
        self.spike_in_row = self.spike_skipped = 0
        self._whole_logged: set[tuple[str, str]] = set()   # held-out sets scored whole whose size was logged
        self._repeats_checked: set[tuple[str, str]] = set()  # held-out sets checked for fewer sequences than scored
        self.eval_history: list[dict] = []  # train.eval's results of this invocation, {"step", "val_loss", ...}
        self.async_queue = AsyncCallsQueue() if t.checkpoint.async_save else None
        if t.checkpoint.enabled:
            restart_checkpoint_helpers()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            log.info("model %s: %s parameters, %s active per token", cfg.model.name, _count(pc.total), _count(pc.active))
            log.info("backends: %s; attention %s; experts %s; loss %s; optimizer: %s",
                     "NCCL" if torch.cuda.is_available() else "gloo (CPU mode)", "/".join(sorted(set(lm.layer_attention()))),
                     "megatron SequentialMLP" if lm.experts_impl == "sequential" else f"GroupedExperts({lm.experts_impl})",
                     f"chunked cross-entropy ({lm.loss_chunk_tokens} tokens)" if lm.loss_chunk_tokens else "megatron's",
                     "none (train.eval.only)" if self.optimizer is None
                     else f"torch AdamW ({'distributed' if layout.distributed_optimizer else 'replicated'})")
            if self.determinism:
                log.info("train.deterministic: %s", ", ".join(self.determinism))
            if frozen:
                log.info("%s: %d parameter tensors frozen", "train.eval.only=true" if self.eval_only
                         else f"train.trainable={t.trainable}", frozen)
            if frozen and not self.eval_only and self.resume_ref is None and not t.checkpoint.init_from:
                # a stage that trains a few parameters on top of a model it starts at random (a forgotten init_from)
                log.warning("train.trainable=%s keeps %d of the language model's parameter tensors frozen, and this "
                            "fresh run has no train.checkpoint.init_from: they stay at their random initialisation "
                            "for the whole run%s. The stage recipes start from a trained model: "
                            "train.checkpoint.init_from=<its run directory or Hugging Face checkpoint>", t.trainable,
                            frozen, " (and the distillation's teacher is that random model)" if t.distill.enabled
                            else "")
            if self.indexer_step:
                log.info("train.indexer_backward=local: each DSA layer back-propagates its indexer KL in its forward; "
                         "the step runs the frozen model forward only%s",
                         "" if layout.recompute == "none" and layout.offload != "activations"
                         else f" (parallel.recompute={layout.recompute} and parallel.offload={layout.offload} "
                              "have nothing to keep for a backward and are off)")
            if self.spikes is not None:
                log.info("train.spike: a step whose gradient norm before clipping exceeds %g x the median of the "
                         "last %d applied steps' updates no weight (%s)", t.spike.factor, t.spike.window,
                         f"skipped up to {t.spike.skip_steps} in a row, then the run stops" if t.spike.skip_steps
                         else "the first such step stops the run: train.spike.skip_steps=0")
            if self.offloaders:
                log.info("activation offload: the first %d of each model chunk's %d layers keep what they save for "
                         "backward (recompute %s: %s) in %s", self.offloaders[0].layers_to_offload,
                         self.offloaders[0].num_block_layers, layout.recompute,
                         "their input hidden state" if layout.recompute == "full" else "every saved tensor",
                         "pinned host memory" if torch.cuda.is_available() else "separate CPU tensors (CPU run)")
            log.info("run directory %s; %d micro-batches of %d per step per data-parallel rank (dp %d)",
                     self.run_dir, self.num_microbatches, t.micro_batch_size, dp_size)
            version = code_version()  # this launch's; the log keeps every launch's, the file the latest
            log.info("code version %s", version)
            if not self.eval_only:  # the file names the code that trained the run's latest steps
                Path(self.run_dir, "code_version.txt").write_text(version + "\n")
        if self.eval_only:  # nothing trains: no optimizer state, data position or config history to restore
            return
        self._resume()
        if self.rank == 0:
            self._log_rampup(dp_size)
            for note in set_aside_redone(self.run_dir, self.step):
                log.info("%s", note)
            if resolved_config_yaml:
                record_config(self.run_dir, resolved_config_yaml, self.step)

    def _log_rampup(self, dp_size: int) -> None:
        """train.batch_rampup's steps from where this launch starts (a resumed run: its checkpoint's position; one
        past the ramp takes train.global_batch_size, whatever the ramp's settings and this layout)."""
        t = self.cfg.train
        r, per_rank = t.batch_rampup, t.micro_batch_size * dp_size
        if not r.start:
            return
        if self.consumed_samples >= r.samples:
            log.info("train.batch_rampup: over (%d of its %d sequences consumed): global batch %d, %d micro-batches "
                     "per step and data-parallel rank", self.consumed_samples, r.samples, t.global_batch_size,
                     t.global_batch_size // per_rank)
            return
        batch, end = t.batch_size_at(self.consumed_samples), t.batches_from(self.step, self.consumed_samples)[-1][0]
        log.info("train.batch_rampup: the global batch grows from %d to %d sequences by %d over the first %d "
                 "sequences (micro-batches per step and data-parallel rank: %d to %d; steps %d to %d ramp%s)",
                 r.start, t.global_batch_size, r.increment, r.samples, batch // per_rank,
                 t.global_batch_size // per_rank, self.step + 1, end - 1,
                 f", from batch {batch} after the {self.consumed_samples} sequences consumed" if self.step else "")

    # ----------------------------------------------------------------------------------------------
    def _video_stream(self, cfg, dp_rank: int, dp_size: int, *, held_out: bool = False, shards: str = "",
                      set_name: str = "", one_epoch: bool = False):
        """This rank's packed video micro-batches: the training data, or (held_out) train.eval's data from its
        start (train/data_streams.video_stream). The first rank of each data-parallel replica records its bad
        samples."""
        return video_stream(cfg, run_dir=self.run_dir, rank=self.rank, dp_rank=dp_rank, dp_size=dp_size,
                            records_bad_samples=self._replica_first(), exclude=self.exclude, held_out=held_out, shards=shards,
                            set_name=set_name, one_epoch=one_epoch, decode_once=self._decode_once())

    def _check_held_out_videos(self) -> None:
        """Plans the first epoch of each held-out video set at start-up (the plans are kept in the index directory
        for the evaluations): a set none of whose samples can be planned stops the launch as a config error naming
        data.video.eval_shards, instead of failing at the first evaluation, which in a resumed run came only after
        train.eval.interval steps."""
        from data.video.loader import NothingPlanned

        for name, paths, _ in self._eval_sets():
            stream = self._video_stream(self.cfg, self.pgs.dp.rank(), self.pgs.dp.size(), held_out=True,
                                        shards=paths, set_name=name)
            try:
                stream.samples_per_epoch
            except NothingPlanned as e:
                raise SettingsError(str(e)) from None
            finally:
                stream.close()

    def _text_streams(self, data, *, held_out: bool = False, paths: str = "", one_epoch: bool = False) -> list:
        """This rank's text micro-batches from `data` (a DataConfig), one stream per model chunk
        (train/data_streams.text_streams)."""
        return text_streams(self.cfg, data, run_dir=self.run_dir, rank=self.rank, dp_rank=self.pgs.dp.rank(),
                            dp_size=self.pgs.dp.size(), chunks=len(self.model), exclude=self.exclude,
                            held_out=held_out, paths=paths, one_epoch=one_epoch)

    def _eval_sets(self) -> list[tuple[str, str, int]]:
        """train.eval's held-out sets as (name, paths, global batches): one set named "" unless
        data.video.eval_shards or data.tokens.eval_paths names several (data/held_out.py), each with
        train.eval.batches unless train.eval.set_batches gives it its own count (WHOLE: the set whole, once).
        Synthetic text: [("", "", n)]."""
        e = self.cfg.train.eval
        return eval_plan(self.cfg.data, e.batches, e.set_batches)

    def _eval_streams(self, name: str, paths: str, whole: bool) -> list:
        """One held-out set's data from its start, fresh streams per evaluation (train/data_streams.eval_streams)."""
        return eval_streams(self.cfg, name, paths, whole, run_dir=self.run_dir, rank=self.rank,
                            dp_rank=self.pgs.dp.rank(), dp_size=self.pgs.dp.size(), chunks=len(self.model),
                            records_bad_samples=self._replica_first(), decode_once=self._decode_once())

    def _decode_once(self):
        """The replica's data/video_stream.DecodeOnce where it has several ranks (train/vision.py pixel_ranks): they
        settle each round's packs with its vision group's first rank. Under parallel.vit.decode_once that rank alone
        decodes the packs and sends each rank its frames' pixels in the vision phase; under the replicated layout the
        later pipeline stages decode none; where several ranks decode, a sample that fails on one of them alone stops
        them all in settle. None: a replica of one rank."""
        from data.video_stream import DecodeOnce

        v = self.vision
        if v is None or v.pixel_ranks is None:
            return None
        return DecodeOnce(group=v.group, src=v.members[0], rank=self.rank, pixels=self.rank in v.pixel_ranks)

    def _replica_first(self) -> bool:
        """Whether this rank is its data-parallel replica's first: its tensor, context and pipeline ranks read the
        same packs and meet the same bad samples, which the first records, once."""
        return all(g.rank() == 0 for g in (self.pgs.tp, self.pgs.cp, self.pgs.pp))

    def _claim_run_dir(self) -> ckpt.CheckpointRef | None:
        """Collective, before the model is built, for a training launch: rank 0 takes the run directory's lock (every
        rank raises RunDirInUse if another launch holds it: the ranks agree through one broadcast, so none waits in a
        collective for a rank that stopped); every rank sees the directory rank 0 sees (ckpt.check_shared_run_dir:
        SettingsError otherwise); the checkpoint to resume from, verified (sizes and checksums), or None
        (a run directory whose every checkpoint is damaged raises CheckpointLoadError instead of starting over); then
        rank 0 removes the torn saves of the launches before."""
        busy = [""]
        if self.rank == 0:
            try:
                ckpt.lock_run_dir(self.run_dir)
            except ckpt.RunDirInUse as e:
                busy = [str(e)]
        dist.broadcast_object_list(busy, src=0)
        if busy[0]:
            raise ckpt.RunDirInUse(busy[0])
        # one directory for every rank, before any rank reads a checkpoint there (SettingsError naming the ranks that
        # see another one: a node's own disk)
        self.hosts = ckpt.check_shared_run_dir(self.run_dir, checkpoints=self.cfg.train.checkpoint.enabled)
        ref = ckpt.find_resume_point(self.run_dir) if self.cfg.train.checkpoint.resume else None
        if self.rank == 0:
            torn = ckpt.remove_torn_saves(self.run_dir)
            if torn:
                log.info("removed the torn save(s) of a launch that did not finish them: %s", ", ".join(torn))
        return ref

    def _check_resume_point(self, ref: ckpt.CheckpointRef) -> None:
        """Collective, before the model is built: the launcher's judgement of a resumed checkpoint
        (train/checkpoint.check_resume_point: its model, stage and optimizer layout), made of `ref`, the checkpoint the
        resume takes (the launcher judged the newest one whose files have their sizes: one whose checksums fail, or
        whose state cannot be read, gave way to an older one, judged by nobody); then whether every rank's training data
        can continue the data state of `ref`, the SettingsError _resume's load would raise after the model, optimizer
        and checkpoint were built and loaded (train/data_streams.check_data_state). Rank 0 reads the common state and
        sends it to the others; the ranks agree, so that none builds the model while another stops: each raises the same
        error, or the first failing rank's. A state that cannot be read, or a data check that fails otherwise, is left
        to _resume, which loads the checkpoint (or an older one, where this one fails to load) and its data state as
        before."""
        common: list = [None]
        if self.rank == 0:
            common = [ckpt.saved_common(ref) or {}]
        dist.broadcast_object_list(common, src=0)
        try:   # the same common state and settings on every rank: every rank raises it
            ckpt.check_resume_point(self.cfg, self.layout, ref, common[0])
        except ValueError as e:
            raise SettingsError(str(e)) from None
        state = common[0].get("data")
        failure = ""
        if state is not None:
            try:
                check_data_state(self.cfg, state, checkpoint=ref.path, run_dir=self.run_dir, rank=self.rank,
                                 dp_rank=self.pgs.dp.rank(), dp_size=self.pgs.dp.size(), exclude=self.exclude)
            except SettingsError as e:
                failure = str(e)
            except Exception:  # noqa: BLE001 - the streams' own fault, met again where the trainer builds them
                log.debug("the data state's early check could not run", exc_info=True)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, failure)
        first = next((f for f in gathered if f), "")
        if first:
            raise SettingsError(first)

    def _common_state(self, data: dict | None = None) -> dict:
        return {"step": self.step, "data": data if data is not None else self.streams[0].state_dict(),
                "consumed_samples": self.consumed_samples,
                "layout": ckpt.layout_record(self.layout),
                "recipe": self.cfg.recipe_name, "seed": self.cfg.seed, "config": asdict(self.cfg),
                "launch_dir": os.getcwd(),   # what the config's relative paths are relative to (launch/convert.py)
                "vision_steps": self.vision.steps if self.vision is not None else 0,
                "nonfinite": {"in_row": self.nonfinite_in_row, "skipped": self.skipped_steps},
                "spike": {"in_row": self.spike_in_row, "skipped": self.spike_skipped,
                          **({"window": self.spikes.state_dict()} if self.spikes is not None else {})}}

    def _resume(self) -> None:
        ref = self.resume_ref
        if ref is None:
            return
        if self.lm_trainable:
            ensure_adam_state(self.optimizer)
            patch_step_restore(self.optimizer)
        # the optimizer's moments and step come from the checkpoint, its hyper-parameters from this launch's config
        with keep_configured_hyperparameters(self.optimizer):
            ref, saved, same_layout, common = self._load_resume_point(ref)
        if self.vision is not None:
            self.vision.restore_steps(int(common.get("vision_steps", 0)))
        if self.lm_trainable:
            untie_adam_steps(self.optimizer)
        self.step = int(common["step"])
        self.consumed_samples = saved_consumed_samples(common, saved.get("config"))
        nonfinite = common.get("nonfinite", {})  # absent from a checkpoint written before the check existed
        self.nonfinite_in_row, self.skipped_steps = int(nonfinite.get("in_row", 0)), int(nonfinite.get("skipped", 0))
        self._restore_spike_state(common)
        # each data-parallel rank's own counts; at another data-parallel size their sums on its rank 0. A checkpoint
        # from before they were kept gives every rank the saving rank's (those of its data state)
        counters = common.get("data_counters")
        restore_data_state(self.streams, common["data"], checkpoint=ref.path, run_dir=self.run_dir)
        for s in self.streams:
            if counters is not None:
                s.load_counters(counters_of_rank(counters, self.pgs.dp.rank(), self.pgs.dp.size()))
        log.info("resumed from %s at step %d%s", ref.path, self.step,
                 "" if same_layout else f" (resharded from layout {saved['layout']}; RNG state not restored)")
        if "config" in saved and self.rank == 0:  # the model's own settings were checked by the launcher
            changed = self._changed_since(saved)
            if changed:
                log.info("settings changed since that checkpoint was written: %s", changed)
            parts = self.vision.lr_settings() if self.vision is not None else ()
            for note in (schedule_jump(saved["config"].get("train") or {}, self.cfg.train, self.step, parts=parts),
                         held_out_moved(saved["config"].get("train") or {}, self.cfg.train),
                         rampup_changed(saved["config"].get("train") or {}, self.cfg.train, self.consumed_samples),
                         *ignored_on_resume(saved["config"], self.cfg, rng_restored=same_layout)):
                if note:
                    log.warning("%s", note)

    def _restore_spike_state(self, common: dict) -> None:
        """train.spike's counts and window from a checkpoint's common state; one written before train.spike existed,
        or with it off, holds no window: it starts empty (a log line says so)."""
        spike = common.get("spike", {})
        self.spike_in_row, self.spike_skipped = int(spike.get("in_row", 0)), int(spike.get("skipped", 0))
        if self.spikes is not None:
            if "window" in spike:
                self.spikes.load_state_dict(spike["window"])
            elif self.rank == 0:
                log.info("train.spike: the checkpoint holds no window of gradient norms (written with train.spike off, "
                         "or before it existed): the window starts empty, and no step is judged before %d applied "
                         "steps fill it", self.spikes.window)

    def _changed_since(self, saved: dict) -> str:
        """The settings of this launch that differ from the config the checkpoint's common state `saved` recorded,
        "key old -> new; ..." (run_dir aside: the same run may be reached by another path); "" when none. A setting
        added to the schema since the checkpoint and left at its default is none."""
        changed = [c for c in config_changes(saved["config"], asdict(self.cfg), defaults=asdict(Config()))
                   if c[0] != "run_dir"]
        return "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed)

    def _load_resume_point(self, ref: ckpt.CheckpointRef):
        """Collective: loads `ref` (model, optimizer, RNG, the vision tower's state); returns the checkpoint loaded,
        its common state as saved, whether it was saved at this layout, and the common state loaded. A shard damaged
        while its checksum records were missing (the run ended before its save's background checksum pass) passes
        the checks of find_resume_point and fails here: every rank learns of a failure on any rank, and they take
        the next older verified checkpoint together (its load writes every tensor and optimizer entry the failed one
        may have written in part); CheckpointLoadError when none is left, naming each one's error (a failed load is
        not called damage: a setting of this launch may not fit the checkpoint)."""
        tried: list[str] = []
        problems: list[str] = []
        changed = ""   # the settings this launch changed since the newest checkpoint that failed to load
        layout = ckpt.layout_record(self.layout)   # what _common_state records (not its data state and config)
        while True:
            failure, saved, common, same_layout = None, None, None, False
            try:
                saved = self._saved_common(ref)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - judged just below, on every rank
                failure = e
            if saved is not None:
                same_layout = saved["layout"] == layout
                ckpt.check_resumable(saved, layout, ref.path)  # a config error, not damage
                try:
                    common = ckpt.load_checkpoint(
                        ref, self.model, self.optimizer, dp_cp_group=self.pgs.dp_cp, load_rng=same_layout,
                        load_optimizer=self.lm_trainable,
                        extra=self.vision.sharded_state() if self.vision is not None else None)
                except (Exception, CheckpointException) as e:  # noqa: BLE001 - judged just below, on every rank
                    failure = e
            why = ckpt.agree_on_failure(ckpt.load_failure(failure))
            if not why:
                return ref, saved, same_layout, common
            log.error("checkpoint %s could not be loaded, looking for an older one: %s", ref.path, why)
            problems.append(f"{ref.path.name}: could not be loaded: {why}")
            if not tried and saved is not None and "config" in saved and (diff := self._changed_since(saved)):
                changed = f"settings changed since {ref.path.name}: {diff}"
            tried.append(ref.path.name)
            ref = ckpt.find_latest_verified(self.run_dir, problems, exclude=tried, mark=True)
            if ref is None:
                raise ckpt.damaged_everywhere(self.run_dir, problems, unloaded=tried, changed=changed)

    def _init_weights_from(self, chunks, source: str, ref: ckpt.CheckpointRef | None = None) -> None:
        """Model weights from another run's newest checkpoint (or `ref`, one of its checkpoints), or from a Hugging
        Face Qwen3-MoE directory (config.json + safetensors, read slice by slice for this rank's shards);
        parameters the source lacks keep their init."""
        from models.hf import is_hf_checkpoint, load_hf_into

        if is_hf_checkpoint(source):
            from models.hf import lm_checkpoint

            # a plain Qwen3-MoE directory starts a DSA or KSA model too: the variant's own parameters keep their init
            stats = load_hf_into(chunks, lm_checkpoint(source), lm=self.cfg.model.lm, keep_init=True)
            kept = stats.pop("kept")
            what = f"the Hugging Face checkpoint {source}: {stats}"
        else:
            src = ref or ckpt.find_latest_verified(source)   # its newest checkpoint whose checksums agree
            if src is None:
                raise SettingsError(f"train.checkpoint.init_from={source!r} holds no complete checkpoint whose "
                                    f"files verify (the log names what is wrong with each)")
            kept = sorted(set(ckpt.load_model_weights(src, chunks, dp_cp_group=self.pgs.dp_cp)))
            what = str(src.path)
        copied = any("linear_qkv_summary" in k for k in kept)
        if copied:
            copy_text_qkv_to_summary(chunks)
        log.info("initialised model weights from %s%s%s%s", what,
                 "" if self.eval_only else " (fresh optimizer, step 0)",
                 f"; not in that checkpoint, kept at init: {kept}" if kept else "",
                 " (the summary QKV as a copy of the text QKV)" if copied else "")
        if self.cfg.model.lm.dsa.stage == "sparse" and any(".indexer." in k for k in kept):
            log.warning("model.lm.dsa.stage=sparse starts with DSA indexers at their init (%s has none): they select "
                        "the top-k keys at random until the KL trains them. DeepSeek-V3.2 and Keye-VL-2.0 run the dense "
                        "warm-up first (recipe keye_30b_a3b_dsa_warmup, then init_from its run)", source)

    def _init_vision_from(self, source: str, setting: str, ref: ckpt.CheckpointRef | None = None) -> list[str]:
        """The vision tower's weights from a Keye-VL HF directory or from one of our checkpoints that holds
        `vision.*` tensors (`setting`: the train.checkpoint field that named it); returns the `vision.*` keys the
        source does not hold (all of them for a source without a vision tower), which keep their init."""
        from models.hf import is_hf_checkpoint, is_multimodal, load_keye_vision_into, projector_width

        keys = [f"vision.{n}" for n, _ in self.vision.model.named_parameters()]
        if is_hf_checkpoint(source):
            hf_config = json.loads(Path(source, "config.json").read_text())
            if not is_multimodal(hf_config):
                log.info("%s has no vision tower: the ViT and projector keep their initialisation", source)
                return keys
            # a projector that feeds another language model (Keye-VL-1.5-8B's: 4096 wide) is not ours to take
            ours, theirs = self.vision.model.cfg.lm_hidden, projector_width(hf_config)
            fits = theirs in (None, ours)
            stats = load_keye_vision_into(self.vision.model, source, projector=fits)  # each tensor, or an error
            log.info("initialised the vision tower from the Hugging Face checkpoint %s: %s%s", source, stats,
                     "" if fits else f"; its projector maps to {theirs} dims, this language "
                     f"model has {ours}: the projector keeps its initialisation")
            return [] if fits else [k for k in keys if k.startswith("vision.projector.")]
        src = ref or ckpt.find_latest_verified(source)
        if src is None:
            raise SettingsError(f"train.checkpoint.{setting}={source!r} holds no complete checkpoint whose files "
                                f"verify (the log names what is wrong with each)")
        sd = {k: v for k, v in self.vision.sharded_state().items() if k.startswith("vision.")}
        # as from a Hugging Face directory: a projector that maps to another language model's width is not ours to
        # take (its shapes would stop every rank in the load); the ViT's own sizes were checked at launch
        shapes = ckpt.saved_shapes(src)
        projector = sorted(k for k in sd if k.startswith("vision.projector."))
        other = projector if any(sd[k].key in shapes and shapes[sd[k].key] != tuple(sd[k].global_shape)
                                 for k in projector) else []
        for k in other:   # the whole projector: its first layers were trained to feed that other width
            del sd[k]
        missing = ckpt.load_extra_weights(src, sd) + other
        log.info("initialised the vision tower from %s%s%s", src.path,
                 f"; its projector maps to another language model's width ({self.vision.model.cfg.lm_hidden} here), "
                 "so the projector keeps its initialisation" if other else "",
                 f"; not in that checkpoint, kept at init: {len(missing) - len(other)} tensors"
                 if len(missing) > len(other) else "")
        return missing

    def _check_frozen_vision_filled(self, missing: list[str], named: str) -> None:
        """A fresh run started from another's weights whose source lacks vision tensors that this stage keeps
        frozen (the ViT in every stage but trainable=all, the projector but in all / projector) would train
        against a random vision tower for its whole length: stop before the first step, naming the fix."""
        missing = set(missing)
        unfilled = [f"vision.{n}" for n, p in self.vision.model.named_parameters()
                    if not p.requires_grad and f"vision.{n}" in missing]
        if unfilled:
            raise SettingsError(
                f"train.checkpoint.{named} holds no weights for {len(unfilled)} of the vision tower's tensors (e.g. "
                f"{unfilled[0]}), and train.trainable={self.cfg.train.trainable} keeps them frozen: they would stay "
                "at their random initialisation. Set train.checkpoint.vision_init_from to a Keye-VL Hugging Face "
                "directory, or to a run or an import (launch/convert.py import) that holds the vision tower.")

    @staticmethod
    def _saved_common(ref: ckpt.CheckpointRef) -> dict:
        import megatron.core.dist_checkpointing as dcp

        return dcp.load_common_state_dict(str(ref.path))["common"]

    def _save(self, *, blocking: bool = False, data: tuple[dict, dict] | None = None) -> None:
        """A checkpoint of the current step; `data`: the stream's state_dict() and counters() to record instead of
        its own (those it had when the step began, once a step drew data and ended)."""
        c = self.cfg.train.checkpoint
        self._finish_saves(blocking=True)  # one save in flight at a time
        queue = None if blocking else self.async_queue
        timer = Timer()
        timer.start()
        if self.lm_trainable:
            # a parameter without Adam state (no optimizer step yet: the run's steps so far skipped as not finite)
            # gets AdamW's own first state (zero moments, step 0), as megatron's distributed optimizer cannot
            # describe an empty one; a no-op once it has stepped
            ensure_adam_state(self.optimizer)
        # the common state is the saving rank's: every data-parallel rank's own counts beside it (_data_counters)
        common = {**self._common_state(data and data[0]), "data_counters": self._data_counters(data and data[1])}
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model,
                                    self.optimizer if self.lm_trainable else None, common,
                                    keep_last=c.keep_last, keep_every=c.keep_every, dp_cp_group=self.pgs.dp_cp,
                                    async_queue=queue, optimizer_format=c.optimizer_format,
                                    extra=self.vision.sharded_state() if self.vision is not None else None)
        self._inflight = (self.step, path)
        log.info("%s checkpoint %s (training blocked %.2f s)", "saved" if queue is None else "saving (async)", path,
                 timer.stop())

    def _data_counters(self, own: dict | None = None) -> list[dict]:
        """Every data-parallel rank's own data counts since the run began (the stream's `counters()`: samples
        served, failed, left out, ...), by data-parallel rank, for the checkpoint: the data position is the same on
        every rank, these are not, and the metrics report their sums over the ranks. Collective over the
        data-parallel group."""
        out: list = [None] * self.pgs.dp.size()
        dist.all_gather_object(out, own if own is not None else self.streams[0].counters(), group=self.pgs.dp)
        return out

    def _finish_saves(self, *, blocking: bool) -> None:
        """Commits async saves whose writers are done on every rank (all of them with blocking=True).
        A writer's failure (disk full, I/O error) surfaces here as CheckpointSaveError."""
        if self.async_queue is None:
            return
        try:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except ckpt.CheckpointSaveError:
            raise
        except (Exception, ckpt.CheckpointException) as e:
            step, final = self._inflight
            raise ckpt.CheckpointSaveError(
                ckpt.save_failure_message(step, final.with_name(final.name + ".partial"), e)) from e

    def _abandon_saves(self) -> None:
        """Ends the writer of an asynchronous save in flight without its commit, and says so. For a rank that leaves
        the run on an error it may have met alone, mid-step (SIGINT, or an exception of its own): the commit is
        collective, and it waited there for the other ranks, which were in a collective of the step it left, until
        the process group's timeout (the run hung where it was to end at once). The save's `.partial` directory stays
        uncommitted; the next launch removes it."""
        if self.async_queue is None or not self.async_queue.get_num_unfinalized_calls():
            return
        for call in self.async_queue.async_calls:
            call.async_caller.close(abort=True)
        self.async_queue.async_calls.clear()
        step, final = self._inflight
        log.warning("the asynchronous save of step %d was in flight: not committed (%s.partial); a rerun resumes "
                    "from the checkpoint before it", step, final)

    # ----------------------------------------------------------------------------------------------
    def _loss_tokens(self, losses: list[dict]) -> torch.Tensor:
        """This rank's loss-token count over the step's micro-batches (megatron's total_num_tokens; only the
        last pipeline stage has losses, finalize_model_grads broadcasts its count)."""
        if not losses:
            return torch.zeros([], dtype=torch.int, device=self.device)
        # summed on the device: no host sync per micro-batch
        return torch.stack([d["lm_loss"][1].to(self.device) for d in losses]).sum().to(torch.int)

    def _loss_vector(self, losses: list[dict], padding: list[list[bool]] | None = None,
                     layer_kls: list | None = None) -> torch.Tensor:
        """This rank's share of the step's loss sums, on the device, to be summed over the world (_loss_from):
        [LM loss, loss tokens, distillation KL, attention MSE, DSA indexer KL x its tokens, those tokens, then each
        group of source and kind's loss and tokens (train/loss_groups.py; video data)]. padding (an evaluation
        of a whole held-out set): per model chunk, which of its micro-batches were filler, whose indexer KLs are left
        out (their loss tokens are masked already). layer_kls: filled with each DSA layer's KLs, one per
        micro-batch in order (train/nonfinite.py nonfinite_micro_batches reads them)."""
        total = torch.zeros(6 + 2 * self.step_inputs.loss_groups, dtype=torch.float64, device=self.device)
        # Only the last pipeline stage has losses; every TP rank there holds the same values, so count tp rank 0.
        if losses and self.pgs.tp.rank() == 0:
            for d in losses:
                total[:2] += d["lm_loss"].to(self.device)
                if "distill" in d:
                    total[2:4] += d["distill"].to(self.device)
                if GROUPS_KEY in d:
                    total[6:] += d[GROUPS_KEY].to(self.device)
        # DSA indexer KL: every micro-batch's of this rank's DSA layers since the last call (each layer's per-token
        # mean over the tokens it attended), weighed by those tokens, so that the world's sum over them is the mean
        # over every token of every layer, whatever the micro-batches' padding or the context-parallel ranks' shares
        # of it (summed on the device: no host wait per layer)
        flags = padding or [None] * len(self.dsa_by_chunk)
        by_layer = [_without_filler(m.take_kls(), pad) for layers, pad in zip(self.dsa_by_chunk, flags) for m in layers]
        if layer_kls is not None:
            layer_kls.extend([kl for kl, _ in layer] for layer in by_layer)
        kls = [pair for layer in by_layer for pair in layer]
        if kls:
            total[4] = torch.stack([kl.to(self.device, torch.float64) * tokens for kl, tokens in kls]).sum()
            total[5] = sum(tokens for _, tokens in kls)
        return total

    def _loss_from(self, total: torch.Tensor) -> tuple[float, dict]:
        """Global per-token mean loss over all micro-batches and data-parallel ranks (+ distillation terms, the DSA
        indexer KL, with video data the loss of each source and kind of document: train/loss_groups.py) from the
        world's sum of _loss_vector."""
        n = total[1].clamp_min(1)
        extra = {"kl": float(total[2] / n), "attn_mse": float(total[3] / n)} if self.step_inputs.distill else {}
        if total[5] > 0:
            extra["indexer_kl"] = float(total[4] / total[5])
        if self.step_inputs.loss_groups:
            extra.update(group_metrics(total[6:], self.loss_sources))
        return float(total[0] / n), extra

    def _reduce_loss(self, losses: list[dict]) -> tuple[float, dict]:
        """_loss_vector summed over the world on its own, then _loss_from. Collective."""
        (total,) = sum_over_world([self._loss_vector(losses)], self.device)
        return self._loss_from(total)

    def _set_global_batch(self) -> int:
        """The global batch of the next step, by the sequences consumed so far (train.batch_rampup), set on the
        streams between steps: their micro-batches per step. Logged where it changes."""
        batch = self.cfg.train.batch_size_at(self.consumed_samples)
        if batch != self.global_batch:
            if self.rank == 0 and self.step:
                log.info("train.batch_rampup: global batch %d from step %d on (%d sequences consumed)", batch,
                         self.step + 1, self.consumed_samples)
            for s in self.streams:
                s.set_global_batch_size(batch)
            self.global_batch, self.num_microbatches = batch, self.streams[0].num_microbatches
        return batch

    def train_step(self) -> StepStats:
        t = self.cfg.train
        timer = Timer()
        timer.start()
        batch = self._set_global_batch()
        lr = apply_lr(self.optimizer, self.step, t)
        self.own_grads.step, self.own_grads.finite, self.own_grads.own_norm = self.step + 1, None, None
        self.vit_own_norm = None
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        vit_flops = 0.0
        rounds = self._rounds()
        # several rounds: the LM's gradients accumulate over them and are reduced once, after the last, with the
        # step's loss-token count, as one schedule over every micro-batch would (finalize_model_grads)
        finalize = self.tconfig.finalize_model_grads_func
        if len(rounds) > 1:
            self.tconfig.finalize_model_grads_func = None
        losses, loss_mask_sum, vit_cost, done = [], 0.0, 0.0, 0
        fault = fault_args("nan_in_step", step=self.step + 1, rank=self.rank)
        try:
            for n in rounds:
                if self.cfg.data.kind == "video":
                    mbs = self._video_round(self.streams[0], n)
                    if self.vision is not None:
                        loss_mask_sum += float(sum(mb["loss_mask"].sum() for mb in mbs))
                        vit_cost += self.vision.step_flops(mbs)
                    iters = [iter(mbs) for _ in self.model]
                else:
                    iters = self.streams
                losses += self._schedule(iters, n, self.step_inputs, forward_only=self.indexer_step, poison=fault,
                                         first=done)
                done += n
                _drop_stale_graphs(self.model)
                if self.vision is not None:
                    self.vision.backward()  # this round's frames; the ViT's gradients accumulate until its step
                # this round's embeddings and their gradients (4 GiB per GPU in the 30B DSA sparse recipe's rounds
                # of 16) are not needed any more: not through the optimizer steps, nor the next round's ViT forward
                mbs = iters = None
        finally:
            self.tconfig.finalize_model_grads_func = finalize
        if self.indexer_step or len(rounds) > 1:  # what the schedule does after a backward: DP / TP sums, / tokens
            self.own_grads(self.model, self._loss_tokens(losses), pg_collection=self.pgs)
        maybe_fail("kill_in_step", step=self.step + 1, rank=self.rank)
        if requested("nan_grad_in_step", step=self.step + 1, rank=self.rank):
            poison_gradients(self.model)
        if requested("spike_grad_in_step", step=self.step + 1, rank=self.rank):
            scale_gradients(self.model)
        vit_norm, own_grads_finite = 0.0, self.own_grads.finite
        if own_grads_finite is None:  # a frozen LM (projector alignment): no gradient buffer
            own_grads_finite = torch.tensor(True, device=self.device)
        if self.vision is not None:
            # loss tokens of this replica's micro-batches, summed over replicas: megatron's per-token scale
            # (and the ViT FLOPs of the step, for the throughput line)
            tok = torch.tensor([loss_mask_sum, vit_cost], dtype=torch.float64, device=self.device)
            dist.all_reduce(tok, group=self.pgs.dp)  # every CP rank holds the whole micro-batches: dp, not dp_cp
            vit_finite, self.vit_own_norm = self.vision.own_grads()
            own_grads_finite = own_grads_finite & vit_finite.to(self.device)
            vit_norm = self.vision.reduce_grads(float(tok[0].item()))
            vit_flops = float(tok[1].item())
        layer_kls: list[list[torch.Tensor]] = []
        loss_vector = self._loss_vector(losses, layer_kls=layer_kls)
        own_loss_finite = torch.isfinite(loss_vector[[0, 2, 3, 4]]).all()
        if losses and self.pgs.tp.rank() != 0:   # its losses, which loss_vector counts on TP rank 0 alone
            own_loss_finite = own_loss_finite & torch.isfinite(torch.cat(
                [d[k].reshape(-1) for d in losses for k in ("lm_loss", "distill") if k in d])).all()
        bad = self._nonfinite(vit_norm, own_loss_finite=own_loss_finite, own_grads_finite=own_grads_finite)
        spikes = []
        if bad:  # no update: the weights stay those of the last step
            grad_norm = float("nan")
            if self.vision is not None:
                self.vision.discard()
        elif self.spikes is not None:
            grad_norm, spikes = self._step_unless_spike(vit_norm)
        else:
            if self.vision is not None:
                self.vision.update(self.step)   # each part's lr at this step (train.vision_lr, projector_lr)
            ok, grad_norm, _ = self.optimizer.step()
            if not ok:
                raise FloatingPointError(f"optimizer step {self.step} was skipped (non-finite gradients)")
        # the step's loss, router statistics and every rank's loader metrics: one all-reduce, one host copy
        parts = [loss_vector, self.router_stats.step_vector()]
        # every rank's loader (video, token files): the slowest wait, the failures of all replicas, ...
        data_local = self.streams[0].step_metrics()
        if data_local is not None:
            for other in self.streams[1:]:   # the interleaved schedule's other chunks read their own token rows
                data_local["data_wait_s"] += other.step_metrics()["data_wait_s"]
            sources = self.streams[0].stats.get("sources") if self.cfg.data.kind == "video" else None
            parts.append(data_metrics_table(data_local, device=self.device, sources=sources))
        sums = sum_over_world(parts, self.device)
        loss, extra = self._loss_from(sums[0])
        extra.update(self.router_stats.metrics_from(sums[1], self.num_microbatches))
        if self.cfg.model.lm.moe_expert_bias and not bad and not spikes:
            # auxiliary-loss-free balancing: the bias moves once per applied step, from the loads of all its
            # micro-batches and ranks (identical everywhere); a skipped step leaves it as it leaves the weights
            self.router_stats.update_biases(sums[1], self.cfg.model.lm.moe_bias_update_rate)
        if self.vision is not None:
            extra["vit_grad"] = vit_norm
            extra.update(self.vision.lrs(self.step))   # the parts with an lr of their own, beside the LM's
        if data_local is not None:
            extra.update(data_metrics_from_table(data_local, sums[2], dp_group=self.pgs.dp, sources=sources))
        self.step += 1
        self.consumed_samples += batch   # a skipped step's data is consumed too
        if t.batch_rampup.start:
            extra.update(global_batch=batch, consumed_samples=self.consumed_samples)
        self._skipped_in_row(bad, spikes, loss, extra, grad_norm,
                             micro=nonfinite_micro_batches(losses, layer_kls) if bad else {}, losses=losses)
        if self.skipped_steps:
            extra["skipped_steps"] = self.skipped_steps
        if self.spike_skipped:
            extra["spike_skipped_steps"] = self.spike_skipped
        return StepStats(step=self.step, loss=loss, grad_norm=float(grad_norm or 0.0), lr=lr,
                         seconds=timer.stop(), tokens=batch * t.seq_length, extra=extra,
                         flops=vit_flops)

    def _skipped_in_row(self, bad: NonFinite, spikes: list, loss: float, extra: dict, grad_norm: float, *,
                        micro: dict, losses: list[dict] = ()) -> None:
        """After a step: a non-finite one (`bad`) or a spiking one (`spikes`) is skipped or stops the run
        (_skip_or_stop, _spike_skip_or_stop), each adding to its own count of steps in a row; an applied step ends
        both counts. A skipped step of one kind neither ends nor adds to the other kind's count: it updated no
        weight and put no norm in the spike window, so the steps on either side of it met the same weights (and
        window), which is what "in a row" stands for (spikes in a row point at the weights, not at the data)."""
        if bad:
            self._skip_or_stop(bad, loss, extra, micro)
        if spikes:
            self._spike_skip_or_stop(spikes, loss, {"grad_norm": grad_norm, **extra}, losses)
        if not bad and not spikes:
            self.nonfinite_in_row = self.spike_in_row = 0

    def _step_unless_spike(self, vit_norm: float) -> tuple[float, list]:
        """train.spike's step (finite gradients): the global gradient norms before clipping, the language model's and
        the trained vision tower's, judged against the window (train/spikes.py); a spike updates nothing, else the
        step is applied and its norms join the window. Megatron's optimizer step split in two around the decision,
        with no collective of its own (unless train.grad_clip=0: norm_before_step): the same update as
        optimizer.step(). Returns (the LM's norm, the spikes)."""
        norms = {}
        if self.lm_trainable:
            lm_norm = norm_before_step(self.optimizer)
            if lm_norm is None:
                raise FloatingPointError(f"optimizer step {self.step} was skipped (non-finite gradients)")
            norms["grad_norm"] = lm_norm
        if self.vision is not None and self.vision.optimizer is not None:
            norms["vit_grad"] = vit_norm
        spikes = self.spikes.check(norms)
        if spikes:
            if self.vision is not None:
                self.vision.discard()
            return norms.get("grad_norm", 0.0), spikes
        if self.vision is not None:
            self.vision.update(self.step)
        # a frozen LM (projector alignment): megatron's step, which updates nothing, as without train.spike
        ok = apply_step(self.optimizer, norms["grad_norm"]) if self.lm_trainable else self.optimizer.step()[0]
        if not ok:
            raise FloatingPointError(f"optimizer step {self.step} was skipped (non-finite gradients)")
        self.spikes.add(norms)
        return norms.get("grad_norm", 0.0), []

    def _spike_skip_or_stop(self, spikes: list, loss: float, extra: dict, losses: list[dict] = ()) -> None:
        """A step whose gradient norm spiked (and updated nothing): every rank logs it with its data in the step, the
        data of the first ranks (gathered: a collective on this path alone, which every rank takes, the decision being
        the world's) is named beside it, with the suspects (_spike_suspects: the micro-batches of the largest own
        gradient norms and losses, and their samples), and rank 0 records the step in spikes.jsonl with every rank's
        data and the suspects; the run skips the step while it has skipped fewer than train.spike.skip_steps in a
        row, and stops (SpikeStepError) otherwise. The skipped step's data is consumed and the LR schedule moves on,
        as for a non-finite step."""
        sp = self.cfg.train.spike
        self.spike_in_row += 1
        what = f"step {self.step}: " + " and ".join(s.describe(sp.factor, sp.window) for s in spikes) + \
            f" (the step's loss {loss:.6g})"
        data = "; ".join(s.describe_step(None, None) for s in self.streams)
        record = {"micro_batches": None, "streams": [s.step_record(None, None) for s in self.streams]}
        # the loss is counted once per replica's token: by the last pipeline stage's TP rank 0 (as _loss_vector)
        counts = bool(losses) and self.pgs.tp.rank() == 0
        own, vit = self.own_grads.own_norm, self.vit_own_norm
        # peers: the same model shard and the same share of their replica's tokens (CP rank): the CP ranks of one
        # replica are not peers, or one replica's own norm would stand out against itself
        numbers = (micro_batch_losses(losses) if counts else [], None if own is None else float(own),
                   (self.pgs.pp.rank(), self.pgs.tp.rank(), self.pgs.cp.rank()), None if vit is None else float(vit))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (data, record, numbers))
        texts, records, numbers = zip(*gathered)
        first = first_readers(texts, range(len(texts)))
        distinct = sorted(first.values())
        suspects, replicas = self._spike_suspects([first[t] for t in texts], numbers)
        named, more, others = named_data(texts, distinct, self.rank)
        ranked = ("; the suspects, by their replica's own gradient norm, then loss: " +
                  "; ".join(f"{k}) {s['words']}" for k, s in enumerate(suspects, 1))) if suspects else ""
        skip = self.spike_in_row <= sp.skip_steps
        if self.rank == 0:
            record_spike_step(self.run_dir, self.step, spikes, {"loss": loss, **extra},
                              {r: texts[r] for r in distinct}, {r: records[r] for r in distinct},
                              "skipped" if skip else "stopped", suspects=suspects, replicas=replicas)
        if skip:
            self.spike_skipped += 1
            log.warning("%s: skipped, no weight updated (%d in a row of the %d train.spike.skip_steps allows)%s; "
                        "this rank's data in the step: %s%s", what, self.spike_in_row, sp.skip_steps, others, data,
                        ranked)
            return
        log.error("%s%s; this rank's data in the step: %s%s", what, others, data, ranked)
        self._finish_saves(blocking=True)  # an asynchronous save of an earlier step commits first
        resume = rerun_hint(self.cfg.train, self.run_dir)
        exclude = ("" if self.cfg.data.kind == "synthetic_tokens" else
                   f"data.exclude={Path(self.run_dir) / SPIKE_RECORDS} leaves the samples it names out of the data "
                   "(the whole step's; with data.exclude_spikes=suspect, only the first suspect's); ")
        where_data = "; ".join(named.values()) + more
        # (a setting's name starts a sentence as it is written; "a larger" does not)
        advice = f"{exclude}{'a' if exclude else 'A'} larger train.spike.factor (or train.spike.factor=0: off) lets " \
            "such steps through"
        # steps in a row, each on other data, judged against the same window (a skipped step's norm never joins
        # it): the weights give every batch such a norm (measured on a GPU: the multimodal tiny recipe's norm rose
        # from 2.7 to 79 with its warm-up's last step and stayed there while no update was applied), and a resume
        # judges them against the same saved window again
        weights = (f" {self.spike_in_row} steps in a row, each on other data, spiking against the same window point "
                   f"at the weights (the last applied step, its learning rate) more than at the data: a resume "
                   f"judges them against the same window and stops again unless train.spike.factor changes."
                   if self.spike_in_row > 1 else "")
        raise SpikeStepError(
            f"{what}, so no weight was updated and the run stops after {self.spike_in_row} such step"
            f"{'s' if self.spike_in_row > 1 else ''} in a row (train.spike.skip_steps={sp.skip_steps} skips up to "
            f"that many in a row).{weights} {resume} {where_data[0].upper()}{where_data[1:]}{ranked}. {advice}")

    def _spike_suspects(self, owners: list[int], numbers: tuple) -> tuple[list[dict], dict]:
        """The suspects of a spiking step (train/spikes.py rank_suspects) from every rank's gathered (micro-batch
        losses, own gradient norm, pipeline, tensor and CP rank, own vision-tower gradient norm), each with its
        samples: the owner of a suspect's data names them (its stream's step_record of that micro-batch, narrowed to
        the document or row of the highest loss where known), gathered again (a second collective on this path
        alone). Every rank computes the same."""
        shares, norms, peers, vit_norms = zip(*numbers)
        suspects, replicas = rank_suspects(owners, shares, norms, peers, vit_norms=vit_norms)
        mine = {}
        for k, s in enumerate(suspects):
            if s["rank"] == self.rank:
                i = s["micro_batch"]
                which = ([i], None if s["part"] is None else {i: [s["part"]]})
                mine[k] = {"micro_batches": [i], "streams": [st.step_record(*which) for st in self.streams]}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        for k, s in enumerate(suspects):
            s["samples"] = gathered[s["rank"]][k]
            s["words"] = describe_suspect(s, sample_words(s["samples"]["streams"]))
        return suspects, {str(r): v for r, v in sorted(replicas.items())}

    def _nonfinite(self, vit_norm: float, *, own_loss_finite: torch.Tensor,
                   own_grads_finite: torch.Tensor) -> NonFinite:
        """Whether the step's gradients hold a NaN or an Inf anywhere in the world (a norm that overflows counts),
        after the reduction over data-parallel ranks, and where it arose: the ranks whose own losses
        (own_loss_finite) or own gradients before the reduction (own_grads_finite: the LM's, noted by
        GradsBeforeReduction, and the vision tower's) were not finite. Every rank returns the same: one norm per
        gradient buffer, one all-reduce over the world of 2 + 2 x world flags, one host copy."""
        world = dist.get_world_size()
        flags = torch.zeros(2 + 2 * world, device=self.device)
        norms = grad_norms(self.model)
        if norms:
            flags[0] = (~torch.isfinite(torch.stack(norms))).any().float()
        flags[1] = float(not math.isfinite(vit_norm))
        flags[2 + self.rank] = (~own_loss_finite.to(self.device)).float()
        flags[2 + world + self.rank] = (~own_grads_finite.to(self.device)).float()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        f = flags.tolist()
        return NonFinite(grads=["the language model's"] * bool(f[0]) + ["the vision tower's"] * bool(f[1]),
                         loss_ranks=[r for r in range(world) if f[2 + r]],
                         grad_ranks=[r for r in range(world) if f[2 + world + r]])

    def _skip_or_stop(self, bad: NonFinite, loss: float, extra: dict, micro: dict[int, list[int] | None]) -> None:
        """A step whose gradients were not finite (and updated nothing): every rank logs where it arose and the data
        it trained on in the step (of its micro-batches whose loss was not finite, `micro`, when only some were, and
        of their documents or rows whose tokens' loss was not finite, where only some were), and the data of the
        ranks where it arose (gathered: a collective on this path alone, which every rank takes), and rank 0 records
        the step in nonfinite.jsonl; the run skips the step while it has skipped fewer than
        train.skip_nonfinite_steps in a row, and stops (NonFiniteStepError) otherwise."""
        t = self.cfg.train
        self.nonfinite_in_row += 1
        kl = f", its indexer KL {extra['indexer_kl']:.6g}" if "indexer_kl" in extra else ""
        what = (f"step {self.step}: {' and '.join(bad.grads)} gradients hold a NaN or an Inf "
                f"(the step's loss {loss:.6g}{kl})")
        n = self.num_microbatches
        parts = {i: p for i, p in micro.items() if p is not None}
        narrowed = bool(micro) and (len(micro) < n or bool(parts))   # some micro-batches (or parts) alone
        which = (list(micro), parts) if narrowed else (None, None)
        data = "; ".join(s.describe_step(*which) for s in self.streams)
        if narrowed:
            data = (f"its micro-batch{'es' if len(micro) > 1 else ''} {format_runs(list(micro))} of {n}, whose loss "
                    f"was not finite: {data}")
        record = {"micro_batches": which[0], "streams": [s.step_record(*which) for s in self.streams]}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (data, record))
        texts, records = zip(*gathered)
        origin = sorted(first_readers(texts, bad.origin).values())
        named, more, others = named_data(texts, origin, self.rank)
        skip = self.nonfinite_in_row <= t.skip_nonfinite_steps
        if self.rank == 0:
            record_nonfinite_step(self.run_dir, self.step, bad, {"loss": loss, **extra}, texts, records,
                                  "skipped" if skip else "stopped", ranks=origin)
        if skip:
            self.skipped_steps += 1
            log.warning("%s: skipped, no weight updated (%d in a row of the %d train.skip_nonfinite_steps allows); "
                        "%s%s; this rank's data in the step: %s", what, self.nonfinite_in_row, t.skip_nonfinite_steps,
                        bad.where(self.hosts), others, data)
            return
        log.error("%s; %s%s; this rank's data in the step: %s", what, bad.where(self.hosts), others, data)
        self._finish_saves(blocking=True)  # an asynchronous save of an earlier step commits first
        where_data = ("; ".join(named.values()) + more + "." if named else
                      "each rank's log (logs/rank<N>.log) names the data it trained on in the step; "
                      f"rank {self.rank}'s: {data}.")
        resume = rerun_hint(self.cfg.train, self.run_dir)
        exclude = ("" if self.cfg.data.kind == "synthetic_tokens" else   # rows of a Markov chain name no samples
                   f"data.exclude={Path(self.run_dir) / NONFINITE_RECORDS} leaves the samples it names out of the "
                   "data; ")
        raise NonFiniteStepError(
            f"{what}, so no weight was updated and the run stops; {bad.where(self.hosts)}. {resume} "
            f"{where_data[0].upper()}{where_data[1:]} {exclude}train.skip_nonfinite_steps=N skips up to N such steps "
            "in a row"
            + (f" ({self.nonfinite_in_row} in a row now)" if self.nonfinite_in_row > 1 else ""))

    def _rounds(self, n: int | None = None) -> list[int]:
        """Micro-batches per round of a step (or of an evaluation's batch, of n micro-batches: its streams' own, at
        train.global_batch_size while a ramp's steps take fewer): all at once, or parallel.vit.group at a time (the
        vision phase runs per round)."""
        n = self.num_microbatches if n is None else n
        g = self.cfg.parallel.vit.group if self.vision is not None else 0
        return [g] * (n // g) if g else [n]

    def _video_round(self, stream, n: int) -> list[dict]:
        """A round's n micro-batches, with the vision tower's embeddings of their frames on the LM-input ranks.
        DataEnded on every rank when any rank's data ended (data that can end: the ranks agree before the round's
        first collective, which a rank without data would never reach)."""
        ended = requested("data_end_in_step", step=self.step + 1, rank=self.rank)
        try:
            mbs = [] if ended else stream.take(n)
        except StopIteration:
            ended = True
        if self.data_can_end:
            flags = torch.zeros(dist.get_world_size(), device=self.device)
            flags[self.rank] = float(ended)
            dist.all_reduce(flags)
            ranks = [r for r, f in enumerate(flags.tolist()) if f]
            if ranks:
                raise DataEnded(ranks)
        elif ended:
            raise StopIteration
        error = None
        try:
            mbs = stream.settle(mbs)   # under parallel.vit.decode_once collective over the replica's ranks
        except Exception as e:
            if self.vision is None or not self.vision.meets:
                raise
            # an error of this rank after settle's exchange (rebuilding a pack without the failed samples) stops the
            # group where it meets in the vision phase: before the pixel exchange (decode_once), or at the end of the
            # replicated layout's, before the LM's step (VisionTower.forward); the others would wait in either
            mbs, error = [], e
        if self.vision is None:
            return mbs
        embeds = self.vision.forward(mbs, self.device, error=error)
        return [{**mb, "visual_embeds": embeds[i] if embeds is not None else None} for i, mb in enumerate(mbs)]

    def _schedule(self, iters: list, n: int, inputs: StepInputs, *, forward_only: bool, poison: dict | None = None,
                  first: int = 0) -> list:
        """megatron's schedule over n micro-batches (each model chunk drawing from its iterator), the step's `first`
        ones run before them; returns the last stage's loss dicts. poison (train/faults.py nan_in_step's arguments):
        the loss is NaN, or in the DSA warm-up's forward-only step the indexers' inputs; in every micro-batch, or
        with `micro` in that one of the step's (none of these n when it is not among them)."""
        fwd_bwd = get_forward_backward_func(pp_size=self.layout.pp,
                                            vp_size=self.layout.vpp if self.layout.vpp > 1 else None)
        extra = {"p2p_communicator": self.p2p} if self.layout.pp > 1 else {}
        step_func = functools.partial(_forward_step, inputs)
        micro = poison["micro"] - first if poison is not None and "micro" in poison else None
        if poison is not None and not forward_only:
            step_func = poisoned_loss(step_func, micro, poison.get("doc"))
        poisoned = (poisoned_indexers([m.module for m in self.model], micro)
                    if poison is not None and forward_only else None)
        with poisoned or contextlib.nullcontext():
            try:
                return fwd_bwd(forward_step_func=step_func,
                               data_iterator=iters if len(self.model) > 1 else iters[0],
                               model=self.model if len(self.model) > 1 else self.model[0], num_microbatches=n,
                               seq_length=self.model_seq_length, micro_batch_size=self.cfg.train.micro_batch_size,
                               forward_only=forward_only, pg_collection=self.pgs, **extra)
            finally:
                set_balancing_tokens(None)  # no micro-batch of a step runs now

    def evaluate(self) -> dict:
        """train.eval: the loss on held-out data, forward only and without gradients, over train.eval.batches
        global batches (or the set's train.eval.set_batches) from the start of each held-out set, or a set whole,
        once (WHOLE: its first epoch's sequences, the last global batch filled up with others that count for
        nothing). Collective.
        Returns val_loss (the LM loss per supervised token, as the training loss), val_indexer_kl with DSA layers
        (the mean over the layers' micro-batches), in KSA distillation val_kl and val_attn_mse (the teacher runs
        too: the stage's own objective on held-out data, as the step logs kl and attn_mse), the seconds it took
        (val_seconds) and the held-out sequences it scored over all sets (val_sequences); with video data where the
        held-out tokens are of more than one kind of document, val_loss_kind/<kind> and val_loss_kind_tokens/<kind>
        (train/loss_groups.py). With named sets, each
        value also per set as "<key>/<set>"; the plain keys are over all the sets' tokens together."""
        timer = Timer()
        timer.start()
        inputs = self.step_inputs
        sets = self._eval_sets()
        vectors, sequences = [], 0
        for m in self.model:
            m.eval()
        try:
            with torch.no_grad():
                for name, paths, batches in sets:     # one set's loader at a time
                    whole = batches == WHOLE
                    streams, losses = self._eval_streams(name, paths, whole), []
                    try:
                        if whole:
                            samples = streams[0].samples_per_epoch
                            batches = self._whole_batches(name, paths, samples)
                            sequences += samples
                        else:
                            sequences += batches * self.cfg.train.global_batch_size
                            self._warn_repeats(name, paths, streams[0], batches)
                        for _ in range(batches):   # each of train.global_batch_size, whatever the step's batch
                            for n in self._rounds(streams[0].num_microbatches):
                                if self.cfg.data.kind == "video":  # every model chunk iterates the same micro-batches
                                    mbs = self._video_round(streams[0], n)
                                    iters = [iter(mbs) for _ in self.model]
                                else:
                                    iters = streams
                                losses += self._schedule(iters, n, inputs, forward_only=True)
                    finally:
                        for stream in streams:  # the held-out loader's workers, not left to the garbage collector
                            getattr(stream, "close", lambda: None)()
                    padding = None
                    if whole:  # per model chunk; with video every chunk drew the one stream's micro-batches
                        padding = ([streams[0].padding] * len(self.model) if self.cfg.data.kind == "video" else
                                   [s.padding for s in streams])
                    vectors.append(self._loss_vector(losses, padding))
        finally:
            for m in self.model:
                m.train()
        totals = sum_over_world(vectors, self.device)     # every set's sums in one collective
        out = self._eval_values(torch.stack(totals).sum(0))
        if sets[0][0]:
            for (name, _, _), total in zip(sets, totals):
                out.update({f"{k}/{name}": v for k, v in self._eval_values(total).items()})
        out["val_seconds"] = timer.stop()
        out["val_sequences"] = sequences
        return out

    def _whole_batches(self, name: str, paths: str, samples: int) -> int:
        """Global batches that score a held-out set of `samples` sequences whole, once (the last one filled up);
        ValueError naming the set when it has none."""
        gbs = self.cfg.train.global_batch_size
        what = f"held-out set {name!r} ({paths})" if name else f"the held-out set ({paths or 'synthetic'})"
        if samples < 1:
            raise ValueError(f"{what} has no sequence to score whole (train.eval.batches=0 / set_batches NAME=all)")
        batches = -(-samples // gbs)
        if self.rank == 0 and (name, paths) not in self._whole_logged:
            self._whole_logged.add((name, paths))
            log.info("evaluation: %s scored whole: %d sequences in %d global batch(es), the last filled up with %d "
                     "that count for nothing", what, samples, batches, batches * gbs - samples)
        return batches

    def _warn_repeats(self, name: str, paths: str, stream, batches: int) -> None:
        """A warning, once per held-out set of files (token files, shards), when it holds fewer sequences than each
        evaluation scores (`batches` global batches): its streams go on into further epochs, so some sequences
        count more than once in val_loss, and the log's count of held-out sequences is more than the set holds."""
        if (name, paths) in self._repeats_checked or self.cfg.data.kind not in ("video", "tokens"):
            return
        self._repeats_checked.add((name, paths))
        gbs = self.cfg.train.global_batch_size
        samples = stream.samples_per_epoch
        if self.rank == 0 and samples < batches * gbs:
            what = f"held-out set {name!r} ({paths})" if name else f"the held-out set ({paths or 'synthetic'})"
            given = (f"train.eval.set_batches {name}={batches}" if name and name in parse_set_batches(
                self.cfg.train.eval.set_batches) else f"train.eval.batches={batches}")
            log.warning("evaluation: %s holds %d sequences, fewer than the %d each evaluation scores (%s x "
                        "train.global_batch_size=%d): some are scored more than once each time, weighing more in "
                        "val_loss. Score it whole, once, with %s", what, samples, batches * gbs, given, gbs,
                        f"train.eval.set_batches={name}=all" if name else "train.eval.batches=0")

    def _eval_values(self, total: torch.Tensor) -> dict:
        """evaluate's values from a world's sum of _loss_vector."""
        loss, parts = self._loss_from(total)
        out = {"val_loss": loss}
        if self.step_inputs.distill is not None:
            out["val_kl"], out["val_attn_mse"] = parts["kl"], parts["attn_mse"]
        if "indexer_kl" in parts:
            out["val_indexer_kl"] = parts["indexer_kl"]
        # a held-out set is one source: its loss per kind of document, where it mixes kinds
        kinds = group_metrics(total[6:], self.loss_sources, by_source=False, prefix="val_") if len(total) > 6 else {}
        if sum(k.startswith("val_loss_kind/") for k in kinds) > 1:
            out.update(kinds)
        return out

    def train(self, *, keep_history: bool = True) -> list[StepStats]:
        """Trains to train.steps (or a stop); returns every step's StepStats, or with keep_history=False (the
        launcher's, which reads none: metrics.jsonl holds them) the last step's alone. Kept, they grew the memory of
        every rank by about 1 kB a step (the step's metrics) for as long as the run went on."""
        t = self.cfg.train
        if self.eval_only:  # built without an optimizer; evaluate_only is its entry point
            raise RuntimeError("a trainer built with train.eval.only=true scores checkpoints (evaluate_only) and "
                               "cannot train")
        start = self.step
        if self.rank == 0:
            self.meter.start_wandb(enabled=t.wandb.enabled, mode=t.wandb.mode, project=t.wandb.project,
                                   run_dir=self.run_dir, name=self.cfg.recipe_name, config=asdict(self.cfg))
            if t.tensorboard.enabled:   # the steps after `start` train again: their old values are dropped
                self.meter.start_tensorboard(resolved_tb_dir(self.run_dir, t.tensorboard.dir),
                                             purge_step=start + 1 if start else 0)
        history: list[StepStats] | deque[StepStats] = [] if keep_history else deque(maxlen=1)
        if start >= t.steps:   # a finished run launched again, or one whose train.steps was lowered below its step
            log.info("nothing to train: the checkpoint resumed is at step %d, and train.steps is %d (raise "
                     "train.steps to train on)", start, t.steps)
        for m in self.model:
            m.train()
        stops = StopRequests(self.run_dir, rank=self.rank)
        if self.rank == 0:   # before the first step's collectives, so no rank reads a stale file
            stops.drop_stale(self.launched)
        self.profiler = StepProfiler(t.profile, self.run_dir, self.rank, first_step=start + 1, last_step=t.steps)
        alone = False   # an error this rank may have met alone (train/launch.py: its teardown skips the barrier)
        try:
            self._loop(history, start, stops)
        except (SettingsError, ckpt.CheckpointSaveError, ckpt.CheckpointLoadError, NonFiniteStepError):
            raise    # met by every rank alike: an asynchronous save in flight is committed (data that ended keeps it)
        except BaseException:   # SIGINT reaching this rank, or an error of its own (a bug, memory, a peer gone)
            alone = True
            raise
        finally:
            if self.rank == 0:
                self.meter.close_tensorboard()   # its values so far, however the loop ended
            self.profiler.finish()
            stops.restore()
            if alone:
                self._abandon_saves()
            else:
                self._finish_saves(blocking=True)
            ckpt.CHECKSUMS.wait()
        if self.rank == 0:
            self.meter.finish()
        return list(history)

    def evaluate_only(self) -> list[dict]:
        """train.eval.only: each checkpoint train.eval.checkpoints picks (train/checkpoint.py eval_checkpoints),
        oldest first, or a Hugging Face source once: its weights loaded (the language model's and the vision
        tower's; no optimizer state), then evaluate, logged at its step as training logs an evaluation (console,
        <run_dir>/eval.jsonl, wandb). Returns the evaluations. Collective."""
        t = self.cfg.train
        source, refs = ckpt.eval_checkpoints(self.cfg)
        refs = self._verified(source, refs)
        chunks = [m.module for m in self.model]
        self.meter.total_steps = refs[-1].step if refs else 0  # the eval line's "step/of": the newest scored
        if self.rank == 0:
            self.meter.start_wandb(enabled=t.wandb.enabled, mode=t.wandb.mode, project=t.wandb.project,
                                   run_dir=self.run_dir, name=self.cfg.recipe_name, config=asdict(self.cfg),
                                   eval_only=True)
            if t.tensorboard.enabled:   # a run of its own, as in wandb: TensorBoard's loaders drop a tag's values
                # logged after a step that is logged again, and the training may still be writing to its own
                self.meter.start_tensorboard(
                    os.path.join(resolved_tb_dir(self.run_dir, t.tensorboard.dir), "eval_only",
                                 time.strftime("%Y%m%d-%H%M%S")), purge_step=None)
            log.info("train.eval.only: scoring %s on the held-out data; no step trains and nothing is saved",
                     f"{len(refs)} checkpoint(s) of {source} (steps {', '.join(str(r.step) for r in refs)})" if refs
                     else f"the Hugging Face checkpoint {source} (logged at step 0)")
        try:
            for ref in refs or [None]:
                if ref is None:
                    self._init_weights_from(chunks, source)
                    if self.vision is not None:
                        self._init_vision_from(t.checkpoint.vision_init_from or source, "init_from")
                else:
                    ref = self._load_for_eval(chunks, source, ref)
                    if ref is None:
                        continue
                self.step = ref.step if ref is not None else 0
                # a newer checkpoint taken in place of a removed newest is the newest scored
                self.meter.total_steps = max(self.meter.total_steps, self.step)
                self._eval_and_log()
        finally:
            if self.rank == 0:
                self.meter.finish()
        if refs and not self.eval_history:
            raise ckpt.CheckpointLoadError(
                f"train.eval.only: every checkpoint of {source} chosen to score (steps "
                f"{', '.join(str(r.step) for r in refs)}) was removed before it could be read (the log names each)")
        return self.eval_history

    def _gone(self, ref: ckpt.CheckpointRef) -> bool:
        """Collective: whether `ref` is no longer a committed checkpoint on some rank (its directory removed)."""
        gone = torch.tensor([0.0 if (ref.path / ckpt.COMPLETE).is_file() else 1.0], device=self.device)
        dist.all_reduce(gone, op=dist.ReduceOp.MAX)
        return bool(gone.item())

    def _load_for_eval(self, chunks, source: str, ref: ckpt.CheckpointRef) -> ckpt.CheckpointRef | None:
        """Collective, train.eval.only: loads the weights of `ref`, one of the checkpoints of the run directory
        `source` listed when the scoring began; returns the checkpoint loaded, or None when it is not to be scored.
        A run that trains there meanwhile removes its older checkpoints (train.checkpoint.keep_last): one removed
        before or while it is read is named in a warning and not scored (the newest, train.eval.checkpoints="",
        gives way to the newest then in that directory), where its load failed with a traceback on every rank and
        nothing after it was scored. Any other load failure is a CheckpointLoadError naming the checkpoint."""
        newest = not self.cfg.train.eval.checkpoints
        while True:
            why = ""
            if not self._gone(ref):
                failure = None
                try:
                    self._init_weights_from(chunks, source, ref)
                    if self.vision is not None:
                        self._init_vision_from(source, "init_from", ref)
                except SettingsError:   # the settings' fault, the same on every rank: a config error
                    raise
                except (Exception, CheckpointException) as e:  # noqa: BLE001 - judged just below, on every rank
                    failure = e
                why = ckpt.agree_on_failure(ckpt.load_failure(failure))
                if not why:
                    return ref
                if not self._gone(ref):
                    raise ckpt.CheckpointLoadError(f"train.eval.only: checkpoint {ref.path} could not be loaded: {why}")
            log.warning("checkpoint %s was removed before it could be scored (a run training in %s keeps only its "
                        "newest checkpoints, train.checkpoint.keep_last): not scored%s", ref.path, source,
                        f" ({why})" if why else "")
            if not newest:
                return None
            ref = ckpt.find_latest_verified(source)
            if ref is None:
                return None

    def _verified(self, source: str, refs: list[ckpt.CheckpointRef]) -> list[ckpt.CheckpointRef]:
        """train.eval.only's checkpoints whose files match the checksums their save recorded (eval_checkpoints
        checked only that they are complete): a corrupted one is named in the log and not scored, and the newest
        (train.eval.checkpoints="") gives way to the next older one that verifies, as a resume's does. A Hugging
        Face source ([]) has no checksums. CheckpointLoadError when none is left. Collective."""
        if not refs:
            return refs
        problems: list[str] = []
        if not self.cfg.train.eval.checkpoints:
            newest = ckpt.find_latest_verified(source, problems)
            kept = [newest] if newest is not None else []
        else:
            kept = []
            for ref in refs:
                if self._gone(ref):  # _load_for_eval names it
                    kept.append(ref)
                    continue
                bad = ckpt.verify_checksums(ref)
                if bad:
                    log.error("checkpoint %s is corrupted and is not scored: %s", ref.path, "; ".join(bad))
                    problems.append(f"{ref.path.name}: {'; '.join(bad)}")
                else:
                    kept.append(ref)
        if not kept:
            raise ckpt.CheckpointLoadError(
                f"train.eval.only: no checkpoint of {source} to score: {'; '.join(problems)}. Restore the damaged "
                f"files from a copy")
        return kept

    def close(self) -> None:
        """Let the model, its gradients and optimizer state be freed once the caller drops the trainer.

        megatron-core's DDP hooks its gradients on each parameter's AccumulateGrad node, closing over the DDP
        module; a graph that outlives its step (`_drop_stale_graphs`) reaches those nodes, and the garbage
        collector cannot follow the graph's C++ edges. A dropped trainer therefore stayed alive with every tensor
        it owned (about 35 GB at the ViT benchmark's 2-layer 30B-width slice); tests/dist/test_trainer_lifetimes.py."""
        _drop_stale_graphs(self.model)
        self.router_stats.remove()

    def _eval_and_log(self) -> None:
        ev = self.evaluate()
        self.eval_history.append({"step": self.step, **ev})
        if self.rank == 0:
            line = {"step": self.step, **ev}
            if self.eval_only:  # its lines say so, beside the training's
                line["eval_only"] = True
            with open(Path(self.run_dir, "eval.jsonl"), "a") as f:
                f.write(json_record(line) + "\n")
            self.meter.log_eval(self.step, ev)

    def _data_ended(self, ranks: list[int], saved: int, began: tuple[dict, dict, dict]) -> None:
        """The training data ended in step self.step + 1 (on `ranks`; every rank is here): with checkpoints on, the
        steps trained since the last checkpoint (of step `saved`) are saved first, with the data position, counts and
        RNG state the step began with (`began`: it may have drawn some of its data, and trained nothing); then
        SettingsError, naming the setting, the step and the checkpoint. Collective."""
        t = self.cfg.train
        epochs = self.cfg.data.video.num_epochs
        where = "" if len(ranks) == dist.get_world_size() else \
            f" (on rank{'s' if len(ranks) > 1 else ''} {format_runs(ranks)}{hosts_of(ranks, self.hosts)}; the other " \
            f"ranks' had data left)"
        kept = ""
        if t.checkpoint.enabled and self.step > saved:
            self._finish_saves(blocking=True)   # an asynchronous save of an earlier step commits first
            state, counters, rng = began
            ckpt.set_rng_state(rng)
            self._save(blocking=True, data=(state, counters))
            kept = f"; the steps trained are saved: checkpoint {self._inflight[1]} (step {self.step})"
        elif t.checkpoint.enabled and self.step:
            self._finish_saves(blocking=True)
            latest = ckpt.find_latest(self.run_dir)
            kept = f"; the steps trained are in checkpoint {latest.path if latest is not None else '?'}"
        elif self.step:
            kept = "; checkpoints are off (train.checkpoint.enabled=false): the steps trained are not saved"
        raise SettingsError(f"data.video.num_epochs={epochs}: the training data ended in step {self.step + 1} "
                            f"of train.steps={t.steps}{where}, its {epochs} epoch(s) holding fewer global batches "
                            f"than the run's steps (no weight was updated in that step){kept}. Leave "
                            f"data.video.num_epochs unset (epochs without end)"
                            + (f", or train at most train.steps={self.step}" if self.step else "")) from None

    def _loop(self, history: list[StepStats] | deque[StepStats], start: int, stops: StopRequests) -> None:
        t = self.cfg.train
        if t.eval.interval and self.step == 0:  # a fresh run: the held-out loss of the weights it starts from
            self._eval_and_log()
        saved = start if self.resume_ref is not None else 0   # the last step a checkpoint holds
        while self.step < t.steps:
            self.profiler.before_step(self.step + 1)
            # what a checkpoint of the last step records, should this step's data end after some of it was drawn
            began = (self.streams[0].state_dict(), self.streams[0].counters(), ckpt.rng_state()) \
                if self.data_can_end else None
            try:
                stats = self.train_step()
            except DataEnded as e:
                self._data_ended(e.ranks, saved, began)
            self.profiler.after_step(stats.step)
            self._finish_saves(blocking=False)
            history.append(stats)
            if self.rank == 0:
                rates = self.meter.rates(stats)
                with open(Path(self.run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json_record({"step": stats.step, **rates}) + "\n")
                # wandb gets every step's values, as metrics.jsonl does; the console a line per log_interval
                self.meter.log(stats, rates, console=stats.step % t.log_interval == 0 or stats.step == t.steps
                               or stats.step == start + 1)
            if t.eval.interval and (self.step % t.eval.interval == 0 or self.step == t.steps):
                self._eval_and_log()
            reason = stops.requested(self.device)
            if reason:
                log.info("stop requested (%s): %s", reason,
                         f"saving a checkpoint at step {self.step}; rerun or requeue the same command to resume"
                         if t.checkpoint.enabled else f"stopping at step {self.step}, without a checkpoint "
                         "(train.checkpoint.enabled=false): a rerun starts over")
                if t.checkpoint.enabled:
                    restart_checkpoint_helpers()  # a signal may have killed the old one with the process group
                    self._save(blocking=True)
                    saved = self.step
                if self.rank == 0:
                    stops.clear_stop_file()
                break
            stopping = t.stop_after and self.step - start >= t.stop_after
            if t.checkpoint.enabled and (self.step % t.checkpoint.save_interval == 0 or self.step == t.steps or stopping):
                self._save(blocking=self.step == t.steps or bool(stopping))
                saved = self.step
            if stopping:
                log.info("stopping after %d steps of this run (train.stop_after); rerun the same command to resume",
                         t.stop_after)
                break
