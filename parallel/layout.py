"""The language model's parallel layout: its config schema and validation against world size and model.

Degrees (megatron order "tp-cp-ep-dp-pp"):
    world = tp * cp * dp * pp                 (attention / dense side)
    world = etp * ep * edp * pp               (expert side; edp = expert data parallel)
Every check raises ValueError naming the setting and showing the numbers, before any process group
is built.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

from models.config import LMConfig, ModelParallelSizes

DISPATCHERS = ("alltoall", "allgather")
RECOMPUTE = ("none", "selective", "full")
OFFLOAD = ("none", "activations")  # activations: saved tensors of decoder layers to host memory (parallel/offload.py)
CP_COMM = ("a2a", "allgather")  # dense attention under CP: Ulysses all-to-all, or all-gathered K/V
CP_SPLITS = ("document", "sequence")  # token layout under CP (parallel/context/split.py); first = default


VIT_LAYOUTS = ("spread", "replicated")
VIT_BALANCE = ("lpt", "round_robin")


@dataclass
class ViTParallelConfig:
    """`parallel.vit`: the vision tower's own layout. spread: the frames of a step are split over every
    rank that shares an LM sequence (TP x CP x PP of one data-parallel replica), balanced by cost;
    replicated: every LM-input rank encodes all frames itself (the usual layout, kept as a baseline)."""

    layout: str = "spread"
    balance: str = "lpt"  # lpt: longest-processing-time on per-frame FLOPs; round_robin: frame i -> rank i % n
    recompute: bool = False  # checkpoint each ViT block and keep no ViT activations between its forward and backward phases
    # Micro-batches per vision phase: 0 = all of a step's at once. N: the step runs rounds of (ViT forward, the LM's
    # forward + backward of N micro-batches, ViT backward), so the frames and embeddings of N sequences are alive
    # at a time instead of the whole step's; the LM's gradients are reduced once, after the last round. Must divide
    # the micro-batches per step (train/launch.py checks it).
    group: int = 0
    # Whether one rank of a data-parallel replica decodes its packs' frames and sends each other rank of the replica
    # the pixels of its ViT share, in the vision phase (docs/data.md "Decoding once per replica"), instead of every
    # rank decoding every pack itself. None: on with layout spread, off with replicated (where every LM-input rank
    # encodes every frame itself); true needs layout spread.
    decode_once: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.group < 0:
            raise ValueError(f"parallel.vit.group must be >= 0 (0: a step's micro-batches at once), got {self.group}")
        if self.layout not in VIT_LAYOUTS:
            raise ValueError(f"parallel.vit.layout must be one of {VIT_LAYOUTS}, got {self.layout!r}")
        if self.balance not in VIT_BALANCE:
            raise ValueError(f"parallel.vit.balance must be one of {VIT_BALANCE}, got {self.balance!r}")
        if self.decode_once is not None and not isinstance(self.decode_once, bool):
            raise ValueError(f"parallel.vit.decode_once must be true, false or null (by the layout), got "
                             f"{self.decode_once!r}")
        if self.decode_once and self.layout != "spread":
            raise ValueError(f"parallel.vit.decode_once=true needs parallel.vit.layout=spread, got layout "
                             f"{self.layout!r}: under replicated every LM-input rank encodes every frame itself, so "
                             f"every one of them needs every pixel (set decode_once=false or layout=spread)")
        if self.layout == "replicated" and self.balance != VIT_BALANCE[0]:
            warnings.warn(f"parallel.vit.balance={self.balance} is ignored: parallel.vit.layout=replicated splits no "
                          f"frames (every LM-input rank encodes all of them)")

    @property
    def decodes_once(self) -> bool:
        """decode_once with its default (null) resolved: on with layout spread."""
        return self.layout == "spread" if self.decode_once is None else self.decode_once


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per pipeline rank; 1 = no interleaving
    ep: int = 1
    etp: int = 1
    cp: int = 1
    sequence_parallel: bool = True  # used whenever tp > 1 (required by MoE with TP)
    moe_dispatcher: str = "alltoall"
    distributed_optimizer: bool = True
    recompute: str = "none"
    # "activations": what each decoder layer saves for backward goes to pinned host memory and is prefetched
    # back (parallel/offload.py); with recompute=full that is only each layer's input hidden state
    offload: str = "none"
    offload_layers: int = -1  # layers per model chunk (from the first) that offload; -1 = all but the last
    # (check_offload_layers: a value that offloads no layer is an error)
    cp_comm: str = "a2a"  # dense attention under CP: "a2a" (Ulysses all-to-all) or "allgather" (K/V gathered)
    # tokens per CP rank: "document" = chunks r and 2cp-1-r of EVERY packed document (balanced causal work
    # for any pack), "sequence" = chunks r and 2cp-1-r of the whole sequence (balanced for one document only)
    cp_split: str = "document"
    vit: ViTParallelConfig = field(default_factory=ViTParallelConfig)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vpp", "ep", "etp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.moe_dispatcher not in DISPATCHERS:
            raise ValueError(f"parallel.moe_dispatcher must be one of {DISPATCHERS}, got {self.moe_dispatcher!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"parallel.recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.offload not in OFFLOAD:
            raise ValueError(f"parallel.offload must be one of {OFFLOAD}, got {self.offload!r}")
        if self.offload_layers < -1:
            raise ValueError(f"parallel.offload_layers must be -1 (every layer of a model chunk but its last) or "
                             f">= 0, got {self.offload_layers}")
        if self.offload == "none" and self.offload_layers != -1:
            warnings.warn(f"parallel.offload_layers={self.offload_layers} is ignored: parallel.offload=none")
        if self.cp_comm not in CP_COMM:
            raise ValueError(f"parallel.cp_comm must be one of {CP_COMM}, got {self.cp_comm!r}")
        if self.cp_split not in CP_SPLITS:
            raise ValueError(f"parallel.cp_split must be one of {CP_SPLITS}, got {self.cp_split!r}")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"parallel.vpp ({self.vpp}) > 1 needs parallel.pp > 1 (got pp={self.pp})")


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    pp: int
    vpp: int
    ep: int
    etp: int
    cp: int
    dp: int
    edp: int
    world_size: int
    sequence_parallel: bool
    moe_dispatcher: str
    distributed_optimizer: bool
    recompute: str
    cp_comm: str = "a2a"
    cp_split: str = "document"
    offload: str = "none"
    offload_layers: int = -1

    @classmethod
    def build(cls, cfg: ParallelConfig, *, world_size: int, lm: LMConfig) -> "ParallelLayout":
        tp, pp, vpp, ep, etp, cp = cfg.tp, cfg.pp, cfg.vpp, cfg.ep, cfg.etp, cfg.cp
        model_par = tp * cp * pp
        if world_size % model_par:
            raise ValueError(
                f"world size ({world_size}) must be divisible by parallel.tp * parallel.cp * parallel.pp "
                f"({tp} * {cp} * {pp} = {model_par})")
        dp = world_size // model_par
        expert_par = etp * ep * pp
        if world_size % expert_par:
            raise ValueError(
                f"world size ({world_size}) must be divisible by parallel.etp * parallel.ep * parallel.pp "
                f"({etp} * {ep} * {pp} = {expert_par})")
        if lm.num_experts % ep:
            raise ValueError(f"parallel.ep ({ep}) must divide model.lm.num_experts ({lm.num_experts})")
        if ep * etp > tp * cp * dp:
            raise ValueError(
                f"parallel.ep * parallel.etp ({ep} * {etp}) must not exceed tp * cp * dp "
                f"({tp} * {cp} * {dp}) within a pipeline stage")
        if lm.num_attention_heads % tp:
            raise ValueError(f"parallel.tp ({tp}) must divide model.lm.num_attention_heads ({lm.num_attention_heads})")
        if lm.num_query_groups % tp:
            # megatron-core 0.16.1 splits the KV heads over the TP ranks (num_query_groups / tp per rank) and has no
            # replication of a KV head over several TP ranks
            fits = [t for t in range(1, lm.num_query_groups + 1) if lm.num_query_groups % t == 0
                    and lm.num_attention_heads % t == 0]
            sizes = ", ".join(map(str, fits))
            raise ValueError(f"parallel.tp ({tp}) must divide model.lm.num_query_groups ({lm.num_query_groups}, the "
                             f"KV heads): each tensor-parallel rank holds whole KV heads, none is replicated over TP "
                             f"ranks, so this model runs at tp {sizes}; parallel.ep, pp and cp take more ranks")
        if lm.vocab_size % tp:
            raise ValueError(f"parallel.tp ({tp}) must divide model.lm.vocab_size ({lm.vocab_size})")
        if lm.moe_ffn_hidden_size % etp:
            raise ValueError(f"parallel.etp ({etp}) must divide model.lm.moe_ffn_hidden_size ({lm.moe_ffn_hidden_size})")
        if lm.num_layers % (pp * vpp):
            raise ValueError(
                f"model.lm.num_layers ({lm.num_layers}) must be divisible by parallel.pp * parallel.vpp "
                f"({pp} * {vpp} = {pp * vpp})")
        if cfg.offload == "activations":
            check_offload_layers(cfg, lm)
        if cp > 1:
            check_context_parallel(cp, cfg.cp_comm, lm, tp=tp)
        warn_unused_cp_settings(cfg, lm)
        sp = tp > 1
        if tp > 1 and not cfg.sequence_parallel:
            warnings.warn("parallel.sequence_parallel=false is ignored: MoE layers with tp > 1 need "
                          "sequence parallelism, so it is on")
        return cls(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, cp=cp, dp=dp,
                   edp=world_size // expert_par, world_size=world_size, sequence_parallel=sp,
                   moe_dispatcher=cfg.moe_dispatcher, distributed_optimizer=cfg.distributed_optimizer,
                   recompute=cfg.recompute, cp_comm=cfg.cp_comm, cp_split=cfg.cp_split, offload=cfg.offload,
                   offload_layers=cfg.offload_layers)

    def check_seq_length(self, seq_length: int, lm: LMConfig) -> int:
        """The model's sequence length (text + KSA summaries) for `seq_length` text tokens, checked for cp and tp.

        ValueError when it is not divisible by 2 * cp (the load-balanced split cuts 2 * cp equal chunks), or when a
        context-parallel rank's tokens (all of them at cp=1) are not divisible by tp under sequence parallelism (on
        whenever tp > 1), which splits them over the TP ranks: megatron asserted that in the first step, the model
        built ("First dimension of the tensor should be divisible by tensor parallel size")."""
        model_len = lm.model_seq_length(seq_length)
        what = f"{seq_length} tokens + KSA summaries = {model_len}" if lm.uses_ksa else f"{seq_length}"
        if self.cp > 1 and model_len % (2 * self.cp):
            raise ValueError(f"train.seq_length ({what}) must be divisible by 2 * parallel.cp = {2 * self.cp}: "
                             "context parallelism cuts the sequence into 2 * cp equal chunks")
        if self.sequence_parallel and (model_len // self.cp) % self.tp:
            held = f"each context-parallel rank's {model_len // self.cp} tokens" if self.cp > 1 else "its tokens"
            raise ValueError(f"train.seq_length ({what}) must be divisible by "
                             + (f"parallel.cp * parallel.tp = {self.cp * self.tp}" if self.cp > 1 else
                                f"parallel.tp ({self.tp})")
                             + f": sequence parallelism (on whenever parallel.tp > 1) splits {held} over the "
                             f"{self.tp} tensor-parallel ranks")
        return model_len

    def row_length(self, tokens: int, model_len: int) -> int:
        """The length a packed row of `tokens` is padded to (one more segment of padding, which the core attentions
        and the chunked loss leave out) for this layout, at most `model_len` (check_seq_length's): the model's
        whole length under pipeline parallelism (the stages exchange activations of one fixed shape), else the
        next multiple of what context parallelism (2 * cp equal chunks) and sequence parallelism (each rank's
        tokens over tp) split evenly, so a row left short (data.video.pad_to_seq_len=false) costs no padding at
        tp = cp = pp = 1 and little otherwise."""
        if self.pp > 1:
            return model_len
        unit = 2 * self.cp if self.cp > 1 else 1
        if self.sequence_parallel:
            unit = math.lcm(unit, self.cp * self.tp)
        return min(model_len, -(-tokens // unit) * unit)

    def model_sizes(self) -> ModelParallelSizes:
        return ModelParallelSizes(tp=self.tp, pp=self.pp, vpp=self.vpp if self.vpp > 1 else None,
                                  ep=self.ep, etp=self.etp, cp=self.cp,
                                  sequence_parallel=self.sequence_parallel, moe_dispatcher=self.moe_dispatcher,
                                  cp_comm=self.cp_comm)

    def describe(self) -> str:
        return (f"world {self.world_size} = tp {self.tp} x cp {self.cp} x dp {self.dp} x pp {self.pp}"
                f"{f' (vpp {self.vpp})' if self.vpp > 1 else ''}; experts: etp {self.etp} x ep {self.ep} "
                f"x edp {self.edp} x pp {self.pp}; sequence parallel {'on' if self.sequence_parallel else 'off'}, "
                f"dispatcher {self.moe_dispatcher}"
                f"{f'; context parallel comm {self.cp_comm}, split {self.cp_split}' if self.cp > 1 else ''}")


def check_offload_layers(cfg: ParallelConfig, lm: LMConfig) -> None:
    """parallel.offload_layers against the layers of one model chunk (model.lm.num_layers / (pp * vpp)), whose first
    offload_layers layers offload (parallel/offload.py). ValueError where parallel.offload=activations would offload
    no layer (offload_layers=0, or -1 with one layer per chunk: -1 keeps each chunk's last layer); a warning where
    offload_layers is more than a chunk has (it counts per chunk, not over the model: every layer offloads)."""
    per_chunk = lm.num_layers // (cfg.pp * cfg.vpp)
    chunk = f"model.lm.num_layers {lm.num_layers} / (parallel.pp {cfg.pp} * parallel.vpp {cfg.vpp})"
    if cfg.offload_layers == 0:
        raise ValueError("parallel.offload_layers=0 offloads no layer, so parallel.offload=activations would do "
                         "nothing: use parallel.offload=none, or offload_layers >= 1 (layers per model chunk, from "
                         "the first) or -1 (all but each chunk's last)")
    if cfg.offload_layers == -1 and per_chunk == 1:
        raise ValueError(f"parallel.offload=activations with parallel.offload_layers=-1 (all but each model chunk's "
                         f"last layer) offloads no layer: a model chunk has 1 layer ({chunk}); set "
                         "parallel.offload_layers=1 to offload it, or parallel.offload=none")
    if cfg.offload_layers > per_chunk:
        warnings.warn(f"parallel.offload_layers={cfg.offload_layers} is more than the {per_chunk} layers of a model "
                      f"chunk ({chunk}): it counts per chunk, so every layer offloads, each chunk's last one too")


def check_context_parallel(cp: int, cp_comm: str, lm: LMConfig, *, tp: int) -> None:
    """Checks that every attention variant the model uses can run at context-parallel degree `cp`.

    Ulysses (dense with cp_comm=a2a, KSA always, the DSA dense warm-up with a2a) gives each CP rank
    Hq/cp query heads of the heads one TP rank holds, in whole GQA groups: Hq/tp divisible by cp, and
    Hkv/tp and cp dividing one another (KV heads are replicated when fewer than cp). All-gather-KV dense
    and DSA sparse attention have no head constraint. The sequence-length check (divisible by 2 * cp)
    needs the train config: `ParallelLayout.check_seq_length`.
    """
    variants = set(lm.layer_attention())
    ulysses = ("ksa" in variants or (cp_comm == "a2a" and ("dense" in variants or
                                                          ("dsa" in variants and lm.dsa.stage == "dense_warmup"))))
    if not ulysses:
        return
    hq, hkv = lm.num_attention_heads // tp, lm.num_query_groups // tp
    why = "KSA layers run by Ulysses" if "ksa" in variants else "parallel.cp_comm=a2a (Ulysses)"
    if hq % cp:
        raise ValueError(f"parallel.cp ({cp}) must divide the query heads per TP rank (model.lm.num_attention_heads "
                         f"{lm.num_attention_heads} / tp {tp} = {hq}): {why} splits heads over CP ranks"
                         + ("" if "ksa" in variants else "; or use parallel.cp_comm=allgather"))
    if hkv % cp and cp % hkv:
        raise ValueError(f"parallel.cp ({cp}) and the KV heads per TP rank (model.lm.num_query_groups "
                         f"{lm.num_query_groups} / tp {tp} = {hkv}) must divide one another: {why} sends whole GQA "
                         "groups to each CP rank" + ("" if "ksa" in variants else "; or use parallel.cp_comm=allgather"))


def warn_unused_cp_settings(cfg: ParallelConfig, lm: LMConfig) -> None:
    """A warning for a context-parallel setting given a value other than its default that nothing reads: any of them
    at parallel.cp=1, and parallel.cp_comm where no layer takes it (only dense layers and the DSA dense warm-up do:
    KSA layers always run Ulysses, DSA sparse layers all-gather K/V)."""
    changed = [f"parallel.{k}={getattr(cfg, k)}" for k, default in (("cp_comm", CP_COMM[0]), ("cp_split", CP_SPLITS[0]))
               if getattr(cfg, k) != default]
    if cfg.cp == 1 and changed:
        warnings.warn(f"{' and '.join(changed)} {'is' if len(changed) == 1 else 'are'} ignored: parallel.cp=1 splits "
                      "no sequence")
        return
    variants = set(lm.layer_attention())
    takes_comm = "dense" in variants or ("dsa" in variants and lm.dsa.stage == "dense_warmup")
    if cfg.cp > 1 and cfg.cp_comm != CP_COMM[0] and not takes_comm:
        warnings.warn(f"parallel.cp_comm={cfg.cp_comm} is ignored: model.lm has no layer that takes it (its attention: "
                      f"{', '.join(sorted(variants))}; KSA layers always run Ulysses, DSA sparse layers all-gather "
                      "K and V)")
