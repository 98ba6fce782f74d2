"""The language model's parallel layout: its config schema and validation against world size and model.

Degrees (megatron order "tp-cp-ep-dp-pp"):
    world = tp * cp * dp * pp                 (attention / dense side)
    world = etp * ep * edp * pp               (expert side; edp = expert data parallel)
Every check raises ValueError naming the setting and showing the numbers, before any process group
is built.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from models.config import LMConfig, ModelParallelSizes

DISPATCHERS = ("alltoall", "allgather")
RECOMPUTE = ("none", "selective", "full")


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

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vpp", "ep", "etp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.moe_dispatcher not in DISPATCHERS:
            raise ValueError(f"parallel.moe_dispatcher must be one of {DISPATCHERS}, got {self.moe_dispatcher!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"parallel.recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
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
        if lm.num_attention_heads % tp or lm.num_query_groups % tp:
            raise ValueError(
                f"parallel.tp ({tp}) must divide model.lm.num_attention_heads ({lm.num_attention_heads}) "
                f"and model.lm.num_query_groups ({lm.num_query_groups})")
        if lm.vocab_size % tp:
            raise ValueError(f"parallel.tp ({tp}) must divide model.lm.vocab_size ({lm.vocab_size})")
        if lm.moe_ffn_hidden_size % etp:
            raise ValueError(f"parallel.etp ({etp}) must divide model.lm.moe_ffn_hidden_size ({lm.moe_ffn_hidden_size})")
        if lm.num_layers % (pp * vpp):
            raise ValueError(
                f"model.lm.num_layers ({lm.num_layers}) must be divisible by parallel.pp * parallel.vpp "
                f"({pp} * {vpp} = {pp * vpp})")
        if cp > 1:
            raise ValueError(
                f"parallel.cp ({cp}) > 1 needs context-parallel attention, which this build does not have yet")
        sp = tp > 1
        if tp > 1 and not cfg.sequence_parallel:
            warnings.warn("parallel.sequence_parallel=false is ignored: MoE layers with tp > 1 need "
                          "sequence parallelism, so it is on")
        return cls(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, cp=cp, dp=dp,
                   edp=world_size // expert_par, world_size=world_size, sequence_parallel=sp,
                   moe_dispatcher=cfg.moe_dispatcher, distributed_optimizer=cfg.distributed_optimizer,
                   recompute=cfg.recompute)

    def model_sizes(self) -> ModelParallelSizes:
        return ModelParallelSizes(tp=self.tp, pp=self.pp, vpp=self.vpp if self.vpp > 1 else None,
                                  ep=self.ep, etp=self.etp, cp=self.cp,
                                  sequence_parallel=self.sequence_parallel, moe_dispatcher=self.moe_dispatcher)

    def describe(self) -> str:
        return (f"world {self.world_size} = tp {self.tp} x cp {self.cp} x dp {self.dp} x pp {self.pp}"
                f"{f' (vpp {self.vpp})' if self.vpp > 1 else ''}; experts: etp {self.etp} x ep {self.ep} "
                f"x edp {self.edp} x pp {self.pp}; sequence parallel {'on' if self.sequence_parallel else 'off'}, "
                f"dispatcher {self.moe_dispatcher}")
