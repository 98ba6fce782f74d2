"""The ViT's own parallel layout: frames spread over a model-parallel group, embeddings exchanged to
the LM ranks that consume them (DESIGN.md decision 7).

Legend: W = ranks in the group (group-local rank numbers throughout), T = merged visual tokens of
the step (all micro-batches), V_mb = tokens of one micro-batch, H = lm_hidden.

Why. All TP x CP x PP ranks of one data-parallel replica hold the same batch. The usual layouts run
the ViT on every TP rank (TP-fold duplicate work) or only on pipeline stage 0 (the other stages
idle while it runs). Here every rank of the group encodes a share of the step's frames, and the
merged embeddings go to the consumers (e.g. the TP ranks of stage 0) in one all_to_all. So ViT time
per step drops by up to W, at the price of one exchange per direction of T x H values per consumer.

Plan. Every frame of every micro-batch of the step gets a cost (VisionModel.frame_cost: FLOPs,
quadratic in the frame's patches), and frames are assigned by greedy longest-processing-time
(largest cost first, to the least-loaded rank; ties by frame order and lowest rank). The plan is a
pure function of the grids, which every rank holds, so all ranks compute the same plan without
communicating. LPT is within 4/3 of the optimal makespan; round-robin is not bounded (a few big
frames can land on one rank), see `plan_balance` in the tests.

Phase. Under pipeline parallelism the LM's schedule runs forward/backward micro-batch by
micro-batch on different stages at different times, so the ViT cannot live inside it as a
collective-calling autograd node (stages > 0 would never reach it). `VisionPhase` therefore runs
around the schedule:

    embeds = phase.forward(microbatches, needs)  # all group ranks: plan, encode share, all_to_all
    ... LM schedule; stage-0 consumers insert embeds[i] (leaves, requires_grad) into micro-batch i ...
    phase.backward()                            # all group ranks: grads all_to_all back, ViT backward
    allreduce_vit_grads(model, group)           # ViT params are replicated in the group: sum grads

`recompute=True` keeps nothing of the forward but the plan and the local frames' pixels: backward
re-encodes them with grad (a second ViT forward for the memory of the whole step's ViT activations).
Both of its encodes run over at most `chunk_patches` patches at a time (frames are independent: a
frame is never split), the backward one chunk's forward and backward before the next, so the ViT's
memory is one chunk's however many frames the step holds (32 sequences of 8K tokens are ~1M patches).

Pixels from one rank (`forward(..., pixels_from=s)`, parallel.vit.decode_once): when only group rank s decoded the
step's packs (data/video_stream.py DecodeOnce; the other ranks hold the same grids and no pixel rows), s sends every
rank the patch rows of the frames the plan gives it, in the order it encodes them, in one all_to_all over the group
(`scatter_pixels`): each pixel crosses the network once, to the one rank that encodes it. The plan is made from the
grids alone, so it is the same as with every rank's own pixels, and so are the encoded rows. Right before that
all_to_all the ranks meet (`raise_together`, one all_reduce of one number a round): a rank's error up to there is raised
on every rank, naming it, instead of leaving the others in the all_to_all until the job's timeout.

The replicated layout (`ReplicatedVisionPhase`, every consumer encodes every frame, nothing is exchanged) has no
collective of its own: where its group has several ranks they meet at the end of its forward (`raise_together`, the
same one number), so that an error of one rank there or before it (a later pipeline stage rebuilding a pack after the
round's settle) is raised on every rank rather than leaving the others in the LM's step (a pipeline send, a
tensor-parallel all_reduce) until the job's timeout.

Gradients of tokens needed by several consumers: `grad_mode="replicated"` (TP consumers: after
megatron's sequence-parallel scatter every TP rank holds the same full gradient of the inserted
embeddings) takes each token's gradient from exactly one of the consumers that hold it, spread
over them by token index (so backward traffic is T x H, not TP x T x H); `grad_mode="partial"`
(each consumer's gradient is a partial sum, e.g. different losses) sums them, which is the exact
adjoint of the forward copy.
"""

from __future__ import annotations

import heapq
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

GradMode = Literal["replicated", "partial"]
Balance = Literal["lpt", "round_robin"]


# ---------------------------------------------------------------------------------------------
# the plan (pure functions: identical on every rank)
# ---------------------------------------------------------------------------------------------

def lpt_assign(costs: Sequence[float], num_ranks: int) -> list[int]:
    """Greedy longest-processing-time: frames by decreasing cost (ties: lower index first) each go
    to the rank with the least load so far (ties: lower rank). Deterministic."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(num_ranks)]
    owner = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owner


def round_robin_assign(costs: Sequence[float], num_ranks: int) -> list[int]:
    """Frame i -> rank i % W (the cost-blind baseline)."""
    return [i % num_ranks for i in range(len(costs))]


@dataclass(frozen=True)
class FrameRef:
    """One frame of the step: where its patches and merged tokens sit in its micro-batch."""
    mb: int
    frame: int
    patch_start: int
    num_patches: int
    token_start: int       # within the micro-batch's V_mb tokens
    num_tokens: int
    cost: float


@dataclass
class VisionPlan:
    frames: list[FrameRef]           # every frame of the step, micro-batch by micro-batch
    owner: list[int]                 # group rank that encodes frames[i]
    num_ranks: int
    mb_tokens: list[int]             # V_mb per micro-batch

    def rank_frames(self, rank: int) -> list[int]:
        return [i for i, o in enumerate(self.owner) if o == rank]

    def loads(self) -> list[dict[str, float]]:
        out = [dict(frames=0, patches=0, cost=0.0) for _ in range(self.num_ranks)]
        for f, o in zip(self.frames, self.owner):
            out[o]["frames"] += 1
            out[o]["patches"] += f.num_patches
            out[o]["cost"] += f.cost
        return out

    def imbalance(self) -> float:
        """max / mean of the per-rank cost (1.0 = perfect; 0 frames -> 1.0)."""
        costs = [x["cost"] for x in self.loads()]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def describe(self) -> str:
        per = ", ".join(f"r{r}: {int(x['frames'])} fr / {int(x['patches'])} pat / {x['cost'] / 1e9:.3g} GF"
                        for r, x in enumerate(self.loads()))
        return (f"vit plan: {len(self.frames)} frames, {sum(self.mb_tokens)} tokens, {self.num_ranks} ranks "
                f"[{per}], imbalance (max/mean cost) {self.imbalance():.3f}")


def frames_of(mb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, grid_thw) of a micro-batch: a PackedSample-like object, a dict, or a pair."""
    if hasattr(mb, "pixel_values"):
        return mb.pixel_values, mb.grid_thw
    if isinstance(mb, Mapping):
        return mb["pixel_values"], mb["grid_thw"]
    pv, grid = mb
    return pv, grid


def _check_pixel_dtypes(pvs: Sequence[torch.Tensor]) -> None:
    """Frames of several micro-batches are encoded in one call, so their pixels must agree in kind
    (uint8 pixels are normalised, floats are taken as normalised: mixing would silently mis-scale)."""
    kinds = {pv.dtype for pv in pvs}
    if len(kinds) > 1:
        raise ValueError(f"micro-batches have pixel_values of different dtypes {sorted(map(str, kinds))}; "
                         f"give all uint8 or all the same floating dtype")


def make_plan(grids: Sequence[torch.Tensor], cost_fn, num_ranks: int, merge_tokens: int,
              balance: Balance = "lpt") -> VisionPlan:
    """The step's frames (from each micro-batch's grid_thw [F, 3]) assigned to `num_ranks` ranks."""
    frames: list[FrameRef] = []
    mb_tokens: list[int] = []
    for mb, grid in enumerate(grids):
        g = grid.cpu()
        costs = cost_fn(g).tolist() if g.shape[0] else []
        ps = ts = 0
        for f, (t, r, c) in enumerate(g.tolist()):
            n = t * r * c
            frames.append(FrameRef(mb, f, ps, n, ts, n // merge_tokens, float(costs[f])))
            ps += n
            ts += n // merge_tokens
        mb_tokens.append(ts)
    costs = [f.cost for f in frames]
    if balance == "lpt":
        owner = lpt_assign(costs, num_ranks)
    elif balance == "round_robin":
        owner = round_robin_assign(costs, num_ranks)
    else:
        raise ValueError(f"balance must be 'lpt' or 'round_robin', got {balance!r}")
    return VisionPlan(frames, owner, num_ranks, mb_tokens)


# ---------------------------------------------------------------------------------------------
# exchange specs: who sends which rows to whom (pure functions of plan + needs)
# ---------------------------------------------------------------------------------------------

@dataclass
class ExchangeSpec:
    """One direction of the exchange, seen from this rank.

    send rows `source[send_idx]` (grouped by destination rank, send_counts[d] rows to rank d);
    receive recv_counts[s] rows from rank s, concatenated by source rank; received row j lands in
    row recv_place[j] of the target (assigned in the forward, accumulated in the backward)."""
    send_idx: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_place: torch.Tensor


@dataclass
class _Layout:
    """Per consumer: the global token ids it receives (its output rows, in order), their owners and
    the rows of the owners' local encoder output they come from, and its grad mask."""
    tokens: torch.Tensor
    owner: torch.Tensor
    local_row: torch.Tensor
    grad_mask: torch.Tensor
    mb_lengths: list[int] = field(default_factory=list)


def _token_tables(plan: VisionPlan) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """owner[T] and local_row[T] of every global token id (mb offset + token index); plus each
    rank's number of local tokens and the micro-batch token offsets."""
    W = plan.num_ranks
    nt = torch.tensor([f.num_tokens for f in plan.frames], dtype=torch.long)
    own = torch.tensor(plan.owner, dtype=torch.long)
    gstart = torch.cumsum(nt, 0) - nt
    loc_start = torch.zeros_like(nt)
    local_tokens = [0] * W
    for i, (f, o) in enumerate(zip(plan.frames, plan.owner)):     # frames of a rank in step order
        loc_start[i] = local_tokens[o]
        local_tokens[o] += f.num_tokens
    T = int(nt.sum())
    owner = torch.repeat_interleave(own, nt)
    local_row = torch.repeat_interleave(loc_start - gstart, nt) + torch.arange(T)
    mb_off = [0]
    for v in plan.mb_tokens[:-1]:
        mb_off.append(mb_off[-1] + v)
    return owner, local_row, local_tokens, mb_off


def _layouts(plan: VisionPlan, consumers: Sequence[int], needs: Mapping[int, Sequence[torch.Tensor | None]] | None,
             grad_mode: GradMode) -> tuple[dict[int, _Layout], list[int]]:
    owner, local_row, local_tokens, mb_off = _token_tables(plan)
    n_mb = len(plan.mb_tokens)
    layouts: dict[int, _Layout] = {}
    for c in consumers:
        per_mb = (needs or {}).get(c) if needs is not None else None
        if per_mb is not None and len(per_mb) != n_mb:
            raise ValueError(f"needs[{c}] has {len(per_mb)} entries, the step has {n_mb} micro-batches")
        toks, lens = [], []
        for mb in range(n_mb):
            V = plan.mb_tokens[mb]
            idx = None if per_mb is None else per_mb[mb]
            if idx is None:
                idx = torch.arange(V)
            else:
                idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
                    raise ValueError(f"needs[{c}][{mb}] has token indices outside [0, {V}) (micro-batch {mb} "
                                     f"has {V} visual tokens)")
                if torch.unique(idx).numel() != idx.numel():
                    raise ValueError(f"needs[{c}][{mb}] has repeated token indices")
            toks.append(idx + mb_off[mb])
            lens.append(int(idx.numel()))
        t = torch.cat(toks) if toks else torch.zeros(0, dtype=torch.long)
        layouts[c] = _Layout(t, owner[t], local_row[t], torch.ones(t.numel(), dtype=torch.bool), lens)
    if grad_mode == "replicated":
        # each token's gradient comes from one consumer holding it: the (token % holders)-th of them
        T = owner.numel()
        holders = torch.zeros(T, dtype=torch.long)
        for c in consumers:
            holders[layouts[c].tokens] += 1
        pick = torch.arange(T) % holders.clamp_min(1)
        seen = torch.zeros(T, dtype=torch.long)
        for c in consumers:
            t = layouts[c].tokens
            layouts[c].grad_mask = seen[t] == pick[t]
            seen[t] += 1
    elif grad_mode != "partial":
        raise ValueError(f"grad_mode must be 'replicated' or 'partial', got {grad_mode!r}")
    return layouts, local_tokens


def _grouped(owner: torch.Tensor, W: int) -> tuple[torch.Tensor, list[int]]:
    """Positions sorted by owner (stable: ascending inside an owner) and the count per owner."""
    order = torch.sort(owner, stable=True).indices
    return order, torch.bincount(owner, minlength=W).tolist()


def build_specs(rank: int, W: int, layouts: Mapping[int, _Layout]) -> tuple[ExchangeSpec, ExchangeSpec]:
    """(forward, backward) specs of `rank`. Forward: local encoder rows -> consumers' output rows.
    Backward: consumers' output-row gradients (grad-masked) -> local encoder rows."""
    empty = torch.zeros(0, dtype=torch.long)
    f_send, f_send_n = [], [0] * W
    b_recv_place, b_recv_n = [], [0] * W
    f_recv_n, f_recv_place = [0] * W, empty
    b_send_n, b_send_idx = [0] * W, empty
    for c in sorted(layouts):
        lay = layouts[c]
        order, counts = _grouped(lay.owner, W)
        start = sum(counts[:rank])
        mine = order[start:start + counts[rank]]                       # positions of c's rows I encode
        f_send.append(lay.local_row[mine])
        f_send_n[c] = counts[rank]
        gpos = torch.nonzero(lay.grad_mask).flatten()
        g_order, g_counts = _grouped(lay.owner[gpos], W)
        g_start = sum(g_counts[:rank])
        g_mine = gpos[g_order[g_start:g_start + g_counts[rank]]]
        b_recv_place.append(lay.local_row[g_mine])
        b_recv_n[c] = g_counts[rank]
        if c == rank:
            f_recv_n, f_recv_place = counts, order
            b_send_n, b_send_idx = g_counts, gpos[g_order]
    fwd = ExchangeSpec(torch.cat(f_send) if f_send else empty, f_send_n, f_recv_n, f_recv_place)
    bwd = ExchangeSpec(b_send_idx, b_send_n, b_recv_n, torch.cat(b_recv_place) if b_recv_place else empty)
    return fwd, bwd


# ---------------------------------------------------------------------------------------------
# communication
# ---------------------------------------------------------------------------------------------

def _all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """One all_to_all_single of rows with variable split sizes (python lists: gloo rejects tensors)."""
    x = x.contiguous()
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return out


def pixel_rows(plan: VisionPlan) -> list[int]:
    """Patch rows of the frames each rank encodes under `plan`."""
    rows = [0] * plan.num_ranks
    for f, o in zip(plan.frames, plan.owner):
        rows[o] += f.num_patches
    return rows


# raise_together's `where`: what the other ranks of the group would have waited in
PIXEL_EXCHANGE = ("before the pixel exchange (parallel.vit.decode_once: the group's first rank sends each rank its "
                  "frames' pixels in one all_to_all, which every rank of the group would wait in)")
REPLICATED_STEP = ("in the vision phase (parallel.vit.layout=replicated: the vision phase has no collective of its "
                   "own, and the language model's step that follows, its first pipeline send or tensor-parallel "
                   "collective, is what every rank of the group would wait in)")


def raise_together(error: BaseException | None, group, device, *, where: str = PIXEL_EXCHANGE) -> None:
    """Collective over `group`: returns where no rank met an error; else raises on every rank of the group, the
    rank's own error where it met one, on the others a RuntimeError naming the first rank that did (its global rank
    and host), `where` it failed (what the others would have waited in) and its error. Called right before a collective
    that a rank's error would otherwise leave the others waiting in until the job's timeout. The cost where all is
    well: one all_reduce of one int32 on `device` and the host's read of it (the messages travel, in an
    all_gather_object, only after a rank failed)."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    got: list = [None] * dist.get_world_size(group)
    mine = None if error is None else (dist.get_rank(), socket.gethostname(), f"{type(error).__name__}: {error}")
    dist.all_gather_object(got, mine, group=group)
    if error is not None:
        raise error
    rank, host, what = next(m for m in got if m is not None)
    more = sum(m is not None for m in got) - 1
    raise RuntimeError(f"vision phase: rank {rank} on {host}{f' (and {more} more of the group)' if more else ''} "
                       f"failed {where}: {what}")


def _pixel_transfer(pvs: Sequence[torch.Tensor], plan: VisionPlan, src: int,
                    rank: int) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
    """scatter_pixels' buffers, before anything is sent: (the rows this rank sends, their counts per rank, the counts
    it receives per rank, the tensor it receives into). On `src`, each micro-batch's pixel rows must be its grid's
    patches (a ValueError naming it otherwise: the counts sent would not be the plan's)."""
    rows = pixel_rows(plan)
    if rank == src:
        want = [0] * len(pvs)
        for f in plan.frames:
            want[f.mb] += f.num_patches
        for mb, (pv, n) in enumerate(zip(pvs, want)):
            if pv.shape[0] != n:
                raise ValueError(f"scatter_pixels: micro-batch {mb} holds {pv.shape[0]} pixel rows, but its "
                                 f"grid_thw has {n} patches")
        frames = [plan.frames[i] for r in range(plan.num_ranks) for i in plan.rank_frames(r)]
        send = [pvs[f.mb][f.patch_start:f.patch_start + f.num_patches] for f in frames]
        x, send_counts = (torch.cat(send) if send else pvs[0][:0]), rows
    else:
        x, send_counts = pvs[0][:0], [0] * plan.num_ranks
    recv = [0] * plan.num_ranks
    recv[src] = rows[rank]
    x = x.contiguous()
    return x, send_counts, recv, x.new_empty((rows[rank],) + tuple(x.shape[1:]))


def scatter_pixels(pvs: Sequence[torch.Tensor], plan: VisionPlan | None, src: int, rank: int, group, *,
                   device=None, error: BaseException | None = None) -> torch.Tensor | None:
    """This rank's frames' patch rows (plan.rank_frames(rank), in that order), from group rank `src`, which alone holds
    every micro-batch's pixels `pvs` (the others' are [0, D] tensors of the same dtype): one all_to_all (collective);
    None where the plan has no frame (nothing is sent). Before it the ranks meet (raise_together, on `device`: the
    group's, the model's; pvs' by default): an error of any rank (`error`, this rank's earlier one, whose plan may then
    be None; or one making its buffers: a device out-of-memory, a micro-batch whose pixel rows are not its grid's) stops
    every rank of the group there, naming that rank, instead of leaving the others in the all_to_all until the job's
    timeout."""
    buffers = None
    if error is None:
        try:
            buffers = _pixel_transfer(pvs, plan, src, rank) if plan.frames else None
        except Exception as e:  # noqa: BLE001 - raised on every rank by raise_together
            error = e
    raise_together(error, group, device if device is not None else pvs[0].device if pvs else None)
    if buffers is None:
        return None
    x, send_counts, recv_counts, out = buffers
    dist.all_to_all_single(out, x, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return out


def exchange_forward(x: torch.Tensor, fwd: ExchangeSpec, n_target: int, group) -> torch.Tensor:
    """Rows of the local encoder output -> this rank's [n_target, H] consumer rows (collective)."""
    recv = _all_to_all_rows(x.index_select(0, fwd.send_idx.to(x.device)), fwd.send_counts, fwd.recv_counts, group)
    out = x.new_zeros((n_target,) + tuple(x.shape[1:]))
    out[fwd.recv_place.to(x.device)] = recv
    return out


def exchange_backward(g: torch.Tensor, bwd: ExchangeSpec, n_source: int, group) -> torch.Tensor:
    """Gradients of this rank's consumer rows -> gradient of its local encoder rows (collective)."""
    recv = _all_to_all_rows(g.index_select(0, bwd.send_idx.to(g.device)), bwd.send_counts, bwd.recv_counts, group)
    out = g.new_zeros((n_source,) + tuple(g.shape[1:]))
    return out.index_add_(0, bwd.recv_place.to(g.device), recv)


class ExchangeRows(torch.autograd.Function):
    """Autograd-connected exchange: forward = `exchange_forward`, backward = `exchange_backward`
    (one all_to_all each). Every rank of the group must run this node's backward at the same point
    (VisionPhase.backward does; inside a pipeline schedule it would deadlock, see the module doc).
    With grad_mode "partial" the backward is the exact adjoint of the forward."""

    @staticmethod
    def forward(ctx, x, fwd: ExchangeSpec, bwd: ExchangeSpec, n_target: int, group):
        ctx.bwd, ctx.n_source, ctx.group = bwd, x.shape[0], group
        return exchange_forward(x.detach(), fwd, n_target, group)

    @staticmethod
    def backward(ctx, g):
        return exchange_backward(g.contiguous(), ctx.bwd, ctx.n_source, ctx.group), None, None, None, None


def allreduce_vit_grads(model: torch.nn.Module, group=None) -> None:
    """Sums the gradients of `model`'s trainable parameters over `group` in one all_reduce.

    Needed after VisionPhase.backward: the ViT and projector are replicated on every rank of the
    group, but each rank back-propagated only the frames it encoded, so each holds a partial sum.
    Missing grads (a rank with no frames) count as zeros, so every rank sends the same buffer shape.
    The data-parallel reduction over replicas is separate (the trainer's DDP)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    off = 0
    for p in params:
        n = p.numel()
        g = flat[off:off + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        off += n


# ---------------------------------------------------------------------------------------------
# the phases
# ---------------------------------------------------------------------------------------------

def _trainable(model: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


def _check_consumers(consumers: Sequence[int], W: int) -> list[int]:
    cons = sorted(set(int(c) for c in consumers))
    if not cons or cons[0] < 0 or cons[-1] >= W or len(cons) != len(consumers):
        raise ValueError(f"consumers must be distinct group ranks in [0, {W}), got {list(consumers)}")
    return cons


# Patches per encode chunk under recompute: at the SigLIP-so400m sizes, with block recompute, a chunk's backward holds
# its 27 block inputs and one block's activations, ~5.5 GB counted (bench/RESULTS.md: no step-time cost).
CHUNK_PATCHES = 32768


def frame_chunks(grid: torch.Tensor, chunk_patches: int) -> list[tuple[int, int, int, int]]:
    """Consecutive frames of `grid` ([F, 3] t, h, w) in chunks of at most `chunk_patches` patches (a larger
    frame alone): (first frame, end frame, first patch row, end patch row) of each."""
    sizes = grid.prod(-1).tolist()
    out, f0, p0, n = [], 0, 0, 0
    for i, s in enumerate(sizes):
        if n and n + s > chunk_patches:
            out.append((f0, i, p0, p0 + n))
            f0, p0, n = i, p0 + n, 0
        n += s
    if sizes:
        out.append((f0, len(sizes), p0, p0 + n))
    return out


def encode_chunked(model, pv: torch.Tensor, grid: torch.Tensor, chunk_patches: int) -> torch.Tensor:
    """model(pv, grid) as the concatenation of its chunks' outputs (rows in frame order, as the whole call). One chunk,
    or none (a step of text-only packs: no frame), is the whole call, which gives the model's own empty output."""
    chunks = frame_chunks(grid, chunk_patches)
    if len(chunks) <= 1:
        return model(pv, grid)
    return torch.cat([model(pv[p0:p1], grid[f0:f1]) for f0, f1, p0, p1 in chunks])


def backward_chunked(model, pv: torch.Tensor, grid: torch.Tensor, grad: torch.Tensor, chunk_patches: int) -> None:
    """Back-propagates `grad` (rows of model(pv, grid)) through the model chunk by chunk: each chunk's forward
    with grad, then its backward, before the next (parameter gradients accumulate)."""
    m2 = model.cfg.merge_tokens
    for f0, f1, p0, p1 in frame_chunks(grid, chunk_patches):
        out = model(pv[p0:p1], grid[f0:f1])
        if out.requires_grad:
            torch.autograd.backward(out, grad[p0 // m2:p1 // m2])


class VisionPhase:
    """Spread layout: frames spread over the group by cost, embeddings exchanged to the consumers.

    model: a VisionModel (or anything with forward(pixel_values, grid_thw) -> [P/m^2, H], a `cfg`
    with merge_tokens and lm_hidden, and frame_cost(grid_thw)), replicated on every group rank.
    group: the model-parallel group (None = WORLD); consumers: group ranks that get embeddings.
    All calls are collective over the group; every rank must pass the same micro-batch grids and needs.
    """

    def __init__(self, model, group=None, consumers: Sequence[int] | None = None, *, recompute: bool = False,
                 grad_mode: GradMode = "replicated", balance: Balance = "lpt", check: bool = False,
                 log_every: int = 0, chunk_patches: int = CHUNK_PATCHES):
        self.model, self.group = model, group
        self.chunk_patches = chunk_patches
        self.W = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.consumers = _check_consumers(range(self.W) if consumers is None else consumers, self.W)
        if grad_mode not in ("replicated", "partial"):
            raise ValueError(f"grad_mode must be 'replicated' or 'partial', got {grad_mode!r}")
        self.recompute, self.grad_mode, self.balance, self.check = recompute, grad_mode, balance, check
        self.log_every = log_every      # log the plan at INFO every N steps (0: first step only)
        self.steps = 0
        self.last_plan: VisionPlan | None = None
        self.pixel_bytes = 0     # pixel bytes this rank sent to other ranks (scatter_pixels) since it started
        self._state: dict | None = None

    # -- helpers
    def _device_dtype(self):
        """The parameters' device, and the dtype of the rows the group exchanges: the model's output dtype, under
        autocast (the trainer's bf16 on a GPU) autocast's, not the parameters'. Every rank must send and receive in
        one dtype, and a rank that encodes no frame (a step with fewer frames than ranks) has no output to take it
        from, nor a non-consumer leaves to take its gradients' from."""
        p = next(self.model.parameters())
        if torch.is_autocast_enabled(p.device.type):
            return p.device, torch.get_autocast_dtype(p.device.type)
        return p.device, p.dtype

    def _log_plan(self, plan: VisionPlan) -> None:
        if self.steps == 0 or (self.log_every and self.steps % self.log_every == 0):
            log.info(plan.describe())
        else:
            log.debug(plan.describe())

    def _verify_same_inputs(self, grids: Sequence[torch.Tensor]) -> None:
        """Debug check (2 tiny all_reduces): every rank sees the same micro-batch grids."""
        fp = torch.tensor([float(len(grids))] + [float((g.cpu().double() * torch.arange(1, g.numel() + 1,
                          dtype=torch.float64).view_as(g)).sum()) for g in grids], dtype=torch.float64)
        n = torch.tensor([fp.numel()], dtype=torch.float64)
        both = torch.cat([n, -n])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if both[0] != -both[1]:
            raise RuntimeError("VisionPhase: ranks of the group were given different numbers of micro-batches")
        both = torch.cat([fp, -fp])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(both[:fp.numel()], -both[fp.numel():]):
            raise RuntimeError("VisionPhase: ranks of the group were given different grid_thw (the group must "
                               "hold the same batch)")

    def _encode_local(self, pvs, grids, plan: VisionPlan, chunked: bool = False, got: torch.Tensor | None = None):
        """Encodes this rank's frames of `plan`: their pixel rows from `pvs`, or `got` (received from the rank that
        holds them: scatter_pixels)."""
        device, dtype = self._device_dtype()
        mine = plan.rank_frames(self.rank)
        H = self.model.cfg.lm_hidden
        if not mine:
            return None, None, torch.zeros(0, H, device=device, dtype=dtype)
        pv = (got if got is not None else
              torch.cat([pvs[plan.frames[i].mb][plan.frames[i].patch_start:
                                               plan.frames[i].patch_start + plan.frames[i].num_patches]
                         for i in mine])).to(device, non_blocking=True)
        grid = torch.stack([grids[plan.frames[i].mb][plan.frames[i].frame] for i in mine])
        return pv, grid, (encode_chunked(self.model, pv, grid, self.chunk_patches) if chunked else self.model(pv, grid))

    # -- the phase
    def forward(self, microbatches: Sequence[Any],
                needs: Mapping[int, Sequence[torch.Tensor | None]] | None = None,
                pixels_from: int | None = None, error: BaseException | None = None) -> list[torch.Tensor] | None:
        """Plans, encodes this rank's frames and exchanges. Returns on a consumer one [len(need), H]
        tensor per micro-batch (all V_mb tokens in ViT-output order when its need is None), leaves
        that require grad when the model trains; None on other ranks.
        needs: {consumer: [per micro-batch: token indices (into that micro-batch's V_mb) or None]}.
        pixels_from: the group rank that alone holds the micro-batches' pixels (scatter_pixels); None: every rank
        holds them all. The ranks then meet before the pixels move, every call (raise_together: one all_reduce of one
        number): an error of a rank up to there (in planning, making the buffers, or `error`, one it met before the
        phase, e.g. copying its pixels to the device; `microbatches` is then not read) is raised on every rank of the
        group, naming it, rather than leaving the others in the all_to_all until the job's timeout."""
        if self._state is not None:
            raise RuntimeError("VisionPhase.forward called twice without backward() in between")
        if pixels_from is not None and not 0 <= pixels_from < self.W:
            raise ValueError(f"pixels_from={pixels_from} is not a rank of the group (size {self.W})")
        if error is not None and pixels_from is None:
            raise error
        plan = got = None
        try:
            if error is None:
                pvs, grids = zip(*(frames_of(mb) for mb in microbatches)) if microbatches else ((), ())
                _check_pixel_dtypes(pvs)
                cfg = self.model.cfg
                plan = make_plan(grids, self.model.frame_cost, self.W, cfg.merge_tokens, self.balance)
                self.last_plan = plan
                self._log_plan(plan)
                layouts, local_tokens = _layouts(plan, self.consumers, needs, self.grad_mode)
                fwd, bwd = build_specs(self.rank, self.W, layouts)
        except Exception as e:  # noqa: BLE001 - under pixels_from raised on every rank by scatter_pixels
            if pixels_from is None:
                raise
            error = e
        if pixels_from is not None:  # collective: every rank, even one that encodes nothing or failed
            got = scatter_pixels(pvs if error is None else (), plan, pixels_from, self.rank, self.group,
                                 device=self._device_dtype()[0], error=error)
            if self.rank == pixels_from and got is not None:
                self.pixel_bytes += (sum(pixel_rows(plan)) - got.shape[0]) * got.shape[1] * got.element_size()
        if self.check:
            self._verify_same_inputs(grids)
        trainable = _trainable(self.model) and torch.is_grad_enabled()
        mine = layouts.get(self.rank)
        n_target = 0 if mine is None else mine.tokens.numel()
        dtype = self._device_dtype()[1]            # one dtype on every rank, in both directions
        if trainable and not self.recompute:
            pv, grid, local = self._encode_local(pvs, grids, plan, got=got)
            local = local.to(dtype)
            if not local.requires_grad:            # no frames here: a leaf so the exchange node exists
                local = local.detach().requires_grad_()
            out = ExchangeRows.apply(local, fwd, bwd, n_target, self.group)
            self._state = dict(out=out, bwd=bwd, local=None, pv=None, grid=None, dtype=dtype)
        else:
            with torch.no_grad():
                pv, grid, local = self._encode_local(pvs, grids, plan, chunked=True, got=got)
                out = exchange_forward(local.to(dtype), fwd, n_target, self.group)
            if trainable:
                self._state = dict(out=None, bwd=bwd, local=local.shape[0], pv=pv, grid=grid, dtype=dtype)
        self.steps += 1
        if mine is None:
            if self._state is not None:
                self._state["leaves"] = []
            return None
        parts = list(torch.split(out.detach(), mine.mb_lengths))
        if trainable:
            parts = [p.requires_grad_() for p in parts]
            self._state["leaves"] = parts
        return parts

    def backward(self) -> None:
        """Collective: sends the consumers' embedding gradients (`.grad` of the returned tensors; None
        counts as zero) back to the encoding ranks and back-propagates through their ViT. No-op when
        the model is frozen. Follow with `allreduce_vit_grads(model, group)`."""
        st, self._state = self._state, None
        if st is None:
            return
        device, dtype = self._device_dtype()[0], st["dtype"]
        H = self.model.cfg.lm_hidden
        leaves = st["leaves"]
        g = (torch.cat([p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves])
             if leaves else torch.zeros(0, H, device=device, dtype=dtype)).to(dtype)
        if st["out"] is not None:                 # graph kept: the exchange node's backward communicates
            torch.autograd.backward(st["out"], g)
            return
        g_local = exchange_backward(g, st["bwd"], st["local"], self.group)
        if st["pv"] is not None:                  # recompute with grad, one chunk of frames at a time
            backward_chunked(self.model, st["pv"], st["grid"], g_local, self.chunk_patches)


class ReplicatedVisionPhase:
    """The anchors' layout behind the same interface: every consumer encodes all frames of every
    micro-batch itself (non-consumers, e.g. later pipeline stages, encode nothing). No exchange.

    For `allreduce_vit_grads` to give the same result as the spread layout, the backward scales each
    token's gradient by 1/(consumers holding it) in "replicated" grad mode (TP copies of one gradient
    count once) and leaves it as is in "partial" mode."""

    def __init__(self, model, group=None, consumers: Sequence[int] | None = None, *, recompute: bool = False,
                 grad_mode: GradMode = "replicated", log_every: int = 0, chunk_patches: int = CHUNK_PATCHES):
        self.model, self.group = model, group
        self.chunk_patches = chunk_patches
        self.W = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.consumers = _check_consumers(range(self.W) if consumers is None else consumers, self.W)
        if grad_mode not in ("replicated", "partial"):
            raise ValueError(f"grad_mode must be 'replicated' or 'partial', got {grad_mode!r}")
        self.recompute, self.grad_mode = recompute, grad_mode
        self.log_every, self.steps = log_every, 0
        self.last_plan: VisionPlan | None = None
        self._state: dict | None = None

    def forward(self, microbatches: Sequence[Any], needs: Mapping[int, Sequence[torch.Tensor | None]] | None = None,
                error: BaseException | None = None) -> list[torch.Tensor] | None:
        """Every consumer encodes every frame (VisionPhase.forward's interface, no pixels_from). With several ranks in
        the group they meet at the end, every call (raise_together: one all_reduce of one number): nothing here is a
        collective, and the LM's step that follows is (a later pipeline stage's first receive, a tensor-parallel
        all_reduce), so an error of one rank (`error`, one it met before the phase, e.g. rebuilding a pack after the
        round's settle, `microbatches` then not read; or one here: pixels that cannot be copied or encoded) is raised
        on every rank of the group, naming it, instead of leaving the others waiting in that step."""
        if self._state is not None:
            raise RuntimeError("ReplicatedVisionPhase.forward called twice without backward() in between")
        if self.W == 1:
            if error is not None:
                raise error
            return self._forward(microbatches, needs)
        out = None
        if error is None:
            try:
                out = self._forward(microbatches, needs)
            except Exception as e:  # noqa: BLE001 - raised on every rank by raise_together
                error = e
        try:
            raise_together(error, self.group, next(self.model.parameters()).device, where=REPLICATED_STEP)
        except BaseException:
            self._state = None      # a failed round keeps nothing for a backward
            raise
        return out

    def _forward(self, microbatches, needs) -> list[torch.Tensor] | None:
        pvs, grids = zip(*(frames_of(mb) for mb in microbatches)) if microbatches else ((), ())
        _check_pixel_dtypes(pvs)
        cfg = self.model.cfg
        plan = make_plan(grids, self.model.frame_cost, 1, cfg.merge_tokens)
        self.last_plan = plan
        (log.info if self.steps == 0 or (self.log_every and self.steps % self.log_every == 0) else log.debug)(
            "vit replicated: %d consumers each encode %d frames, %d tokens", len(self.consumers),
            len(plan.frames), sum(plan.mb_tokens))
        self.steps += 1
        layouts, _ = _layouts(plan, self.consumers, needs, "partial")
        if self.rank not in self.consumers:
            return None
        lay = layouts[self.rank]
        p = next(self.model.parameters())
        trainable = _trainable(self.model) and torch.is_grad_enabled()
        scale = torch.ones(lay.tokens.numel(), dtype=p.dtype)
        if self.grad_mode == "replicated":
            holders = torch.zeros(sum(plan.mb_tokens), dtype=p.dtype)
            for c in self.consumers:
                holders[layouts[c].tokens] += 1
            scale = 1.0 / holders[lay.tokens]
        pv = torch.cat(pvs).to(p.device) if pvs else torch.zeros(0, cfg.patch_dim, device=p.device)
        grid = torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.long)
        if trainable and not self.recompute:
            out = self.model(pv, grid).index_select(0, lay.tokens.to(p.device))
        else:
            with torch.no_grad():
                out = encode_chunked(self.model, pv, grid, self.chunk_patches).index_select(0, lay.tokens.to(p.device))
        parts = list(torch.split(out.detach(), lay.mb_lengths))
        if trainable:
            parts = [q.requires_grad_() for q in parts]
            self._state = dict(out=out, leaves=parts, scale=scale.to(p.device), pv=pv, grid=grid, rows=lay.tokens)
        return parts

    def backward(self) -> None:
        st, self._state = self._state, None
        if st is None:
            return
        g = torch.cat([q.grad if q.grad is not None else torch.zeros_like(q) for q in st["leaves"]])
        g = g * st["scale"][:, None]
        if self.recompute:  # one chunk of frames at a time, with each row's gradient where the chunk puts it
            rows = st["rows"].to(g.device)
            full = g.new_zeros(int(st["grid"].prod(-1).sum()) // self.model.cfg.merge_tokens, g.shape[1])
            backward_chunked(self.model, st["pv"], st["grid"], full.index_add_(0, rows, g), self.chunk_patches)
        elif st["out"].requires_grad:
            torch.autograd.backward(st["out"], g)


def build_vision_phase(layout: Literal["spread", "replicated"], model, group=None,
                       consumers: Sequence[int] | None = None, **kwargs) -> VisionPhase | ReplicatedVisionPhase:
    """The ViT layout by name: "spread" (this module's layout) or "replicated" (the baseline: every
    consumer encodes everything). kwargs go to the phase (recompute, grad_mode; balance/check for spread)."""
    if layout == "spread":
        return VisionPhase(model, group, consumers, **kwargs)
    if layout == "replicated":
        return ReplicatedVisionPhase(model, group, consumers, **kwargs)
    raise ValueError(f"vit layout must be 'spread' or 'replicated', got {layout!r}")
