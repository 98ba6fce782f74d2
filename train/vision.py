"""The vision tower inside a training run: built replicated on every rank, run as a phase around the
LM's pipeline schedule on its own parallel layout (parallel/vit_layout.py), optimised by its own AdamW.

Per step (every rank), once, or once per round of parallel.vit.group micro-batches:
    embeds = forward(micro_batches)      plan -> (decode_once: this rank's frames' pixels from the group's
                                         rank 0, the one that decoded the packs) -> encode this rank's share
                                         of frames -> one all_to_all;
                                         the LM-input ranks (pipeline stage 0) get one leaf tensor of
                                         merged visual embeddings per micro-batch
    ... the LM schedule runs; its stage-0 forward writes embeds[i] over micro-batch i's placeholders ...
    backward()                           gradients back in one all_to_all -> ViT backward (accumulating)
then, once per step:
    reduce_grads(total_tokens)           one all_reduce over all ranks -> / tokens -> clip (-> its norm)
    update(step) or discard()            AdamW at the step's lr of each part, or no update (a step whose
                                         gradients are not finite)

Why its own optimizer: the ViT is replicated on every rank of every data-parallel replica and each
rank back-propagates only the frames it encoded, so its gradient is one sum over the whole world,
not megatron's per-group reduction; megatron's distributed optimizer shards by its own DP groups.
Gradient scale: the LM uses megatron's per-token loss (gradients of the summed loss, divided by the
global loss-token count in finalize_model_grads); the ViT's summed gradient is divided by the same count.
Clipping: by the ViT's own gradient norm with train.grad_clip (the LM's clip sees only LM parameters).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist

from models.vision import VisionModel
from models.ksa_tokens import build_summary_layout, pad_cu_seqlens
from parallel.groups import sequence_group
from parallel.layout import ParallelLayout
from parallel.vit_layout import allreduce_vit_grads, build_vision_phase
from train.optim import apply_lr, lr_at, part_lr_bounds

log = logging.getLogger("train")

VISION_SEED_OFFSET = 0x5EED  # the ViT's init stream: same on every rank, independent of the layout


def model_row(seq: int, cu: torch.Tensor | None, visual_pos: torch.Tensor, ksa: tuple | None, row_length=None):
    """(length, cu_seqlens, visual positions) of a packed row as the LM sees it. With KSA (`ksa` =
    (chunk, summaries per chunk, the model's row length)) the summary slots are inserted per document and
    the row padded with one more document to its fixed length, as train/trainer.py _forward_step does
    (insert_summary_slots + pad_packed_row); without, a packed row shorter than the layout takes is padded to
    `row_length(seq)` (the trainer's StepInputs.row_length); the context-parallel split is taken of that row."""
    if ksa is None:
        length = seq if cu is None or row_length is None else row_length(seq)
        return length, cu if length == seq else pad_cu_seqlens(cu, length), visual_pos
    chunk, num_summary, model_seq = ksa
    lay = build_summary_layout(seq, chunk=chunk, num_summary=num_summary, cu_seqlens=cu)
    return model_seq, pad_cu_seqlens(lay.cu_seqlens.to(torch.int64), model_seq), lay.text_index[visual_pos]


def vision_step_flops(model: VisionModel, micro_batches: list[dict]) -> float:
    """Model FLOPs of encoding the frames of `micro_batches` (models/vision frame_flops per frame):
    forward + backward (3x) when the ViT trains, the forward alone when it is frozen; the projector is
    counted with it. Recomputation is not counted (the MFU convention)."""
    cost = float(sum(model.frame_cost(mb["grid_thw"]).sum() for mb in micro_batches))
    return cost * (3.0 if any(p.requires_grad for p in model.vit.parameters()) else 1.0)


def clip_grads(params: list[torch.nn.Parameter], grad_clip: float) -> float:
    """Scales the gradients of `params` to a norm of at most `grad_clip` and returns their norm before; with
    grad_clip 0 (train.grad_clip=0: no clipping, as megatron's optimizer reads it for the LM) leaves them as they
    are. torch's clip_grad_norm_ with a max_norm of 0 would zero them, and AdamW's decoupled weight decay would then
    shrink the tower's weights at every step."""
    return float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Whether train.weight_decay applies to a parameter: megatron-core's rule for the language model's (its
    optimizer gives biases and every 1-D parameter, the norms' weights among them, no weight decay)."""
    return not (name.endswith(".bias") or param.dim() == 1)


def build_vision_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW over the vision tower's trainable parameters (`t`: the TrainConfig), train.weight_decay on the
    weight matrices and none on biases and norms (decays), as the language model's optimizer does; decaying the
    LayerNorm weights pulled the tower's normalisation gains towards zero at every step. One group per part (the
    ViT, `model.vit`, and the projector: everything else) and decay, each with its part's lr bounds (max_lr, min_lr:
    train.vision_lr / train.projector_lr, train/optim.part_lr_bounds) that train/optim.apply_lr follows per step."""
    vit = {id(p) for p in model.vit.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for part, peak in (("vit", t.vision_lr), ("projector", t.projector_lr)):
        hi, lo = part_lr_bounds(t, peak)
        for wd_mult in (1.0, 0.0):
            params = [p for n, p in named if (id(p) in vit) == (part == "vit") and decays(n, p) == bool(wd_mult)]
            groups.append({"params": params, "part": part, "max_lr": hi, "min_lr": lo, "lr": hi, "wd_mult": wd_mult,
                           "weight_decay": t.weight_decay * wd_mult})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_eps)


def pixel_ranks(v, data_kind: str, members: list[int], consumers: list[int]) -> list[int] | None:
    """The global ranks of a vision group (`members`; `consumers`: the indices of its LM-input ranks) whose loaders
    decode pixels, or None: a replica of one rank (or no video data), which settles with nobody. The others build the
    same packs without pixels (data/video_stream.DecodeOnce), and every rank of the group settles each round with
    the first (the ranks that decode follow its failed samples, or all stop naming the two: a decode that failed on
    one rank alone would make sequences differ that must be the same). Under parallel.vit.decode_once (`v`: its
    ViTParallelConfig) the group's first rank, which sends each rank its frames' pixels; under the replicated layout
    the LM-input ranks, each encoding every frame, and no later pipeline stage, which encodes none; under the spread
    layout without decode_once every rank, each encoding its share of the frames from its own pixels."""
    if data_kind != "video" or len(members) == 1:
        return None
    if v.decodes_once:
        return [members[0]]
    if v.layout == "replicated":
        return [members[i] for i in consumers]
    return list(members)


class VisionTower:
    def __init__(self, cfg, layout: ParallelLayout, pgs, device: torch.device, *, train_vit: bool, bf16: bool,
                 train_projector: bool = True):
        t = cfg.train
        vcfg = cfg.model.vision.build(cfg.model.lm.hidden_size)
        v = cfg.parallel.vit
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + VISION_SEED_OFFSET)
            # recompute: checkpoint every ViT block (only block inputs stay) and keep nothing of the ViT
            # between its forward phase and its backward phase (the LM's own activations peak then)
            self.model = VisionModel(vcfg, recompute=v.recompute).to(device)
        self.bf16 = bf16
        for p in self.model.vit.parameters():
            p.requires_grad_(train_vit)
        vit = {id(p) for p in self.model.vit.parameters()}
        for p in self.model.parameters():  # the projector: everything outside the ViT
            if id(p) not in vit:
                p.requires_grad_(train_projector)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_vision_optimizer(self.model, t) if self.params else None
        self.train_cfg = t
        self.grad_clip = t.grad_clip
        lm = cfg.model.lm  # KSA: (chunk, summaries per chunk, the model's row length), for the visual positions
        self.ksa = (lm.ksa.chunk, lm.ksa.num_summary, lm.model_seq_length(t.seq_length)) if lm.uses_ksa else None
        # the model's row length: a packed row shorter than the layout takes is padded towards it (as the trainer
        # pads it: the layout's row_length)
        self.model_len = lm.model_seq_length(t.seq_length)
        self.steps = 0
        # The ranks that share one LM sequence: TP x CP x PP of this data-parallel replica
        self.layout = layout
        group = sequence_group(layout, pgs)
        members = dist.get_process_group_ranks(group)
        per_stage = layout.tp * layout.cp * layout.dp
        consumers = [i for i, r in enumerate(members) if r // per_stage == 0]  # pipeline stage 0
        # each LM-input rank's context-parallel rank: it needs only the visual tokens of its sequence chunks
        self.consumer_cp_rank = {i: (members[i] // layout.tp) % layout.cp for i in consumers}
        self.my_consumer = members.index(dist.get_rank()) if dist.get_rank() in [members[i] for i in consumers] else None
        self.phase = build_vision_phase(v.layout, self.model, group, consumers, recompute=v.recompute,
                                        **({"balance": v.balance} if v.layout == "spread" else {}))
        self.group_size = len(members)
        self.group, self.members = group, members
        # parallel.vit.decode_once: the group's first rank (the replica's first, which writes its quarantine records)
        # alone decodes the packs, and sends each rank its frames' pixels in the phase (data/video_stream.DecodeOnce)
        self.decode_once = v.decodes_once and len(members) > 1 and cfg.data.kind == "video"
        self.pixel_ranks = pixel_ranks(v, cfg.data.kind, members, consumers)
        # the ranks of the group meet in the vision phase, each round (parallel/vit_layout.py raise_together): before
        # the pixel exchange under decode_once, at the end of the replicated layout's phase (no collective of its own)
        self.meets = self.decode_once or (v.layout == "replicated" and len(members) > 1)
        if dist.get_rank() == 0:
            log.info("vision tower: %.1fM parameters (%s), layout %s over %d ranks per LM sequence "
                     "(LM-input ranks %s), balance %s, recompute %s, %s", vcfg.num_params() / 1e6,
                     ("ViT " + ("trained" if train_vit else "frozen") + ", projector "
                      + ("trained" if train_projector else "frozen")), v.layout, len(members), consumers,
                     v.balance, v.recompute, "frames decoded once per replica (by its first rank; decode_once)"
                     if self.decode_once else "frames decoded by the LM-input ranks (the later pipeline stages encode "
                     "none)" if self.pixel_ranks and len(self.pixel_ranks) < len(members) else
                     "every rank decodes its replica's frames")

    def forward(self, micro_batches: list[dict], device, error: BaseException | None = None) -> list | None:
        """Embeddings for this rank's micro-batches (None off the LM-input ranks). Under context parallelism
        each micro-batch dict gets "visual_local_pos": where this rank's share of the visual tokens sits in
        its local sequence (the parallel.cp_split layout of parallel/context/split.py, which for "document"
        depends on the micro-batch's cu_seqlens); the embeddings returned are exactly those tokens.
        Where the group's ranks meet in the phase (`meets`: under decode_once before the pixels move, under the
        replicated layout at its end) an error of this rank (`error`, one it met since the round's settle, or one here:
        a device out-of-memory copying the pixels there) is raised on every rank of the group, naming it
        (VisionPhase.forward, ReplicatedVisionPhase.forward), instead of leaving the others waiting for the pixels or
        in the LM's step; elsewhere it is raised here."""
        try:
            if error is not None:
                raise error
            mbs, needs = self._inputs(micro_batches, device)
        except Exception as e:
            if not self.meets:
                raise
            mbs, needs, error = [], None, e
        kw = {"pixels_from": 0, "error": error} if self.decode_once else {"error": error} if self.meets else {}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            return self.phase.forward(mbs, needs, **kw)

    def _inputs(self, micro_batches: list[dict], device) -> tuple[list, dict | None]:
        """The phase's micro-batches (pixels on `device`, grids) and, under context parallelism, each LM-input rank's
        needs (see forward)."""
        mbs = [(mb["pixel_values"].to(device, non_blocking=True), mb["grid_thw"]) for mb in micro_batches]
        needs = None
        if self.layout.cp > 1:
            from parallel.context.split import cp_global_indices

            needs = {c: [] for c in self.consumer_cp_rank}
            for mb in micro_batches:
                cu = mb.get("cu_seqlens")
                seq, cu, vpos = model_row(mb["tokens"].shape[-1], None if cu is None else cu.reshape(-1),
                                          mb["visual_pos"], self.ksa,
                                          functools.partial(self.layout.row_length, model_len=self.model_len))
                for c, r in self.consumer_cp_rank.items():
                    local = cp_global_indices(seq, self.layout.cp, r, split=self.layout.cp_split, cu_seqlens=cu)
                    mine = torch.zeros(seq, dtype=torch.bool)
                    mine[local] = True
                    sel = mine[vpos].nonzero().flatten()
                    needs[c].append(sel)
                    if c == self.my_consumer:
                        inv = torch.empty(seq, dtype=torch.long)
                        inv[local] = torch.arange(local.numel())
                        mb["visual_local_pos"] = inv[vpos[sel]]
        return mbs, needs

    def step_flops(self, micro_batches: list[dict]) -> float:
        return vision_step_flops(self.model, micro_batches)

    def backward(self) -> None:
        """The ViT's backward of the last forward's micro-batches (collective); its gradients accumulate until
        `step`, so a step may run several forward / backward rounds (parallel.vit.group)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            self.phase.backward()

    def own_grads(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Whether this rank's own ViT gradients (of its frames, its replica's: the frames are spread over the ranks
        that share an LM sequence; before reduce_grads sums them over the world) are all finite, a 0-dim bool tensor
        on their device (no host wait; True without gradients), and their norm (a 0-dim tensor from the same norms,
        what a spiking step compares between ranks: train/spikes.py rank_suspects; None without gradients)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.tensor(True), None
        norms = torch.stack(torch._foreach_norm(grads))  # one fused launch, not one per tensor
        return torch.isfinite(norms).all(), torch.linalg.vector_norm(norms)

    def reduce_grads(self, total_tokens: float) -> float:
        """Sums the ViT's gradients over the world, scales them by the step's loss tokens and clips them; returns
        their norm before clipping (the same on every rank; NaN or Inf when a gradient is). `update` or `discard`
        follows."""
        if self.optimizer is None:
            return 0.0
        allreduce_vit_grads(self.model, None)  # every rank encoded different frames: sum over the world
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(max(total_tokens, 1.0))
        return clip_grads(self.params, self.grad_clip)

    def lrs(self, step: int) -> dict[str, float]:
        """The lr of each trained part at 0-based `step` whose peak is its own (train.vision_lr, train.projector_lr
        set): {"vision_lr": ..., "projector_lr": ...}, logged beside the LM's lr (a part without one has train.lr's)."""
        t = self.train_cfg
        own = {"vit": ("vision_lr", t.vision_lr), "projector": ("projector_lr", t.projector_lr)}
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        return {own[g["part"]][0]: lr_at(step, t, max_lr=g["max_lr"], min_lr=g["min_lr"])
                for g in groups if own[g["part"]][1] is not None}

    def lr_settings(self) -> tuple[str, ...]:
        """The own-peak lr settings of the parts this tower trains ("vision_lr", "projector_lr"), for a resume's
        warning of a moved lr (train/optim.schedule_jump)."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        return tuple(name for part, name in (("vit", "vision_lr"), ("projector", "projector_lr"))
                     if any(g["part"] == part for g in groups))

    def update(self, step: int) -> None:
        """The AdamW step on the reduced gradients, at 0-based `step`'s lr of each part (train/optim.apply_lr)."""
        if self.optimizer is None:
            return
        apply_lr(self.optimizer, step, self.train_cfg)
        self.optimizer.step()
        self.discard()
        self.steps += 1

    def discard(self) -> None:
        """Drops the step's gradients (a step skipped: no update)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    # -- checkpointing: replicated everywhere, written by rank 0 (replica_id 0), loaded by every rank
    def _ensure_state(self) -> None:
        for p in self.params:
            st = self.optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def sharded_state(self) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        replica = dist.get_rank()  # 0 on rank 0 only: one writer
        sd = {f"vision.{n}": ShardedTensor.from_rank_offsets(f"vision.{n}", p.data, replica_id=replica)
              for n, p in self.model.named_parameters()}
        if self.optimizer is not None:
            self._ensure_state()
            names = {id(p): n for n, p in self.model.named_parameters()}
            for p in self.params:
                for k in ("exp_avg", "exp_avg_sq"):
                    key = f"vision_optimizer.{names[id(p)]}.{k}"
                    sd[key] = ShardedTensor.from_rank_offsets(key, self.optimizer.state[p][k], replica_id=replica)
        return sd

    def restore_steps(self, steps: int) -> None:
        """After a resume: the tensors of `sharded_state()` were loaded in place by train.checkpoint; the
        step count (AdamW's bias correction) comes from the checkpoint's common state."""
        self.steps = steps
        if self.optimizer is not None:
            for p in self.params:
                self.optimizer.state[p]["step"] = torch.tensor(float(steps))
