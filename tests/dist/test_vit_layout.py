"""The ViT's spread layout (parallel/vit_layout.py) against one process encoding everything.

On 2 and 4 gloo processes (ranks forked by tests/launch_util.run_ranks, one job per world size running every case:
starting processes costs more than the cases), float64 tiny ViT, uint8 frames of skewed sizes over
two micro-batches. Per case each consumer checks its embeddings and their gradients, and every rank
checks the ViT + projector gradients after `allreduce_vit_grads`, against a single-process
VisionModel with the same weights and the same total loss.

Loss on a consumer: sum over its tokens t of  w_t . e_t + 0.25 |e_t|^2  (fixed random w), so the
embedding gradient w_t + 0.5 e_t depends on the embedding (a wrong embedding shows in it). In grad
mode "replicated" consumers holding the same token hold the same gradient and the reference counts
each token once; in "partial" the reference sums every consumer's loss.

Tolerance: relative RMSE 1e-10 per tensor. Everything is float64 (eps 2.2e-16); layouts differ only
in summation order (frames batched in other SDPA/GEMM groupings, per-rank partial gradients summed by
all_reduce), a few hundred roundings deep. A missing, duplicated or misplaced token gives errors of
order 1e-2 to 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.launch_util import run_ranks  # noqa: E402

from models.vision import VisionModel, tiny  # noqa: E402
from parallel.vit_layout import make_plan  # noqa: E402

TOL = 1e-10
LM_HIDDEN = 24
# micro-batch -> frame grids (rows, cols) in patches: skewed, sizes repeated and interleaved
GRIDS = [[(2, 2), (8, 8), (2, 2), (4, 6), (2, 2), (6, 4)],
         [(10, 10), (2, 4), (2, 4), (4, 2), (6, 6)]]
FEW = [[(4, 4)], [(2, 6)]]           # fewer frames than ranks: some ranks encode nothing
ONE = [[(4, 4)]]                     # one frame in the step: every other rank encodes nothing
NONE = [[], []]                      # text-only packs: no frame in the step at all
# bf16 autocast (the trainer's tower on a GPU; the CPU's autocast casts alike), float32 weights: bf16 keeps 8
# significant bits (eps 3.9e-3) and the layouts round in other places (GEMMs over other row counts, gradients summed
# over ranks), so relative RMSE 3e-2; rows of another dtype read as this one are off by orders of magnitude (or inf)
BF16_TOL = 3e-2

# name -> (world sizes, options)
CASES = {
    "tp_all": ({2, 4}, dict(consumers="all", needs="all", grad_mode="replicated")),
    "pp_stage0": ({2, 4}, dict(consumers=[0], needs="all", grad_mode="replicated")),
    "pp2_tp2_stage0": ({4}, dict(consumers=[0, 1], needs="all", grad_mode="replicated")),
    "cp_disjoint_recompute": ({2}, dict(consumers="all", needs="disjoint", grad_mode="partial", recompute=True)),
    "tp2_cp2_subsets": ({4}, dict(consumers="all", needs="tp_cp", grad_mode="replicated")),
    "tp2_cp2_subsets_recompute": ({4}, dict(consumers="all", needs="tp_cp", grad_mode="replicated", recompute=True)),
    "overlap_partial": ({4}, dict(consumers=[1, 3], needs="random", grad_mode="partial", check=True)),
    "round_robin": ({4}, dict(consumers=[2], needs="all", grad_mode="replicated", balance="round_robin")),
    "few_frames": ({4}, dict(consumers=[3], needs="random", grad_mode="replicated", few=True)),
    "frozen_vit": ({2}, dict(consumers="all", needs="all", grad_mode="replicated", freeze="vit")),
    "frozen_all": ({2}, dict(consumers="all", needs="all", grad_mode="replicated", freeze="all")),
    "replicated_tp_all": ({2, 4}, dict(consumers="all", needs="all", grad_mode="replicated", layout="replicated")),
    "replicated_tp_cp": ({4}, dict(consumers="all", needs="tp_cp", grad_mode="replicated", layout="replicated")),
    "replicated_partial": ({4}, dict(consumers=[1, 3], needs="random", grad_mode="partial", layout="replicated",
                                     recompute=True)),
    # recompute over chunks of at most 20 patches: the 4-16-patch frames grouped, the 36-100-patch ones alone
    "cp_disjoint_recompute_chunked": ({2}, dict(consumers="all", needs="disjoint", grad_mode="partial", recompute=True,
                                                chunk_patches=20)),
    "frozen_vit_recompute_chunked": ({2}, dict(consumers="all", needs="all", grad_mode="replicated", freeze="vit",
                                               recompute=True, chunk_patches=20)),
    "replicated_partial_chunked": ({4}, dict(consumers=[1, 3], needs="random", grad_mode="partial",
                                             layout="replicated", recompute=True, chunk_patches=20)),
    # a step of text-only packs: the replicated layout's chunked encode (recompute; a frozen tower or held-out
    # scoring without grad) had no chunk to concatenate and raised
    "replicated_no_frames_recompute": ({2}, dict(consumers="all", needs="all", grad_mode="replicated",
                                                 layout="replicated", recompute=True, none=True)),
    "replicated_no_frames_frozen": ({2}, dict(consumers="all", needs="all", grad_mode="replicated",
                                              layout="replicated", freeze="all", none=True)),
    "no_frames_recompute": ({2}, dict(consumers=[0], needs="all", grad_mode="replicated", recompute=True, none=True)),
    # under autocast the rows exchanged are bf16: a rank that encodes no frame made its (empty) rows in the weights'
    # float32 and received bf16 rows as half as many float32 values; a non-consumer received bf16 gradients so
    # (recompute) and the ViT's gradients came out inf. Last: on a mismatch gloo aborts the job
    "bf16_one_frame": ({2, 4}, dict(consumers="all", needs="all", grad_mode="replicated", one=True, bf16=True)),
    "bf16_stage0_recompute": ({2, 4}, dict(consumers=[0], needs="all", grad_mode="replicated", recompute=True,
                                           bf16=True)),
    # parallel.vit.decode_once: one rank holds the step's pixels, the others the same grids and no pixel rows; it
    # sends each rank its frames' rows (scatter_pixels). The same embeddings and gradients as every rank's own pixels
    "pixels_from_1": ({2, 4}, dict(consumers="all", needs="all", grad_mode="replicated", pixels_from=1)),
    "pixels_from_0_tp_cp_recompute": ({4}, dict(consumers="all", needs="tp_cp", grad_mode="replicated",
                                                recompute=True, pixels_from=0)),
    "pixels_from_1_one_frame_bf16": ({2, 4}, dict(consumers=[0], needs="all", grad_mode="replicated", one=True,
                                                  bf16=True, pixels_from=1)),
    "pixels_from_0_no_frames": ({2}, dict(consumers="all", needs="all", grad_mode="replicated", none=True,
                                          pixels_from=0)),
    # an error of one rank between the round's settle and the pixel all_to_all (a micro-batch whose pixel rows are not
    # its grid's on the sending rank; a device out-of-memory on another copying its pixels): it stopped alone, the
    # others waited in the all_to_all until the job's timeout. Every rank now raises, naming it; the group goes on
    "pixels_from_0_faults": ({2}, dict(consumers="all", needs="all", grad_mode="replicated", pixels_from=0,
                                       faults=True)),
    # the replicated layout under PP2 (stage 0 encodes every frame, stage 1 none): an error of one stage after the
    # round's settle (the later stage rebuilding a pack; stage 0's pixels that cannot be encoded) stopped it alone,
    # the other waited in the LM's first pipeline send or receive until the job's timeout. Every rank now raises at
    # the end of the phase, naming it; the group goes on
    "replicated_pp2_faults": ({2}, dict(consumers=[0], needs="all", grad_mode="replicated", layout="replicated",
                                        faults=True)),
}


# --------------------------------------------------------------------------------------------- data
def _model(freeze: str | None = None, dtype: torch.dtype = torch.float64) -> VisionModel:
    torch.manual_seed(7)
    m = VisionModel(tiny(LM_HIDDEN)).to(dtype)
    with torch.no_grad():
        for p in m.parameters():            # move off the default init (LayerNorm = 1/0 would hide bugs)
            p.add_(0.1 * torch.randn_like(p))
    if freeze == "vit":
        m.vit.requires_grad_(False)
    elif freeze == "all":
        m.requires_grad_(False)
    return m


def _microbatches(grids) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for frames in grids:
        grid = torch.tensor([[1, r, c] for r, c in frames], dtype=torch.long).reshape(-1, 3)
        P = int(grid.prod(-1).sum())
        out.append(dict(pixel_values=torch.randint(0, 256, (P, 3 * 14 * 14), generator=g, dtype=torch.uint8),
                        grid_thw=grid))
    return out


def _needs(kind: str, consumers: list[int], W: int, V: list[int]) -> dict | None:
    if kind == "all":
        return None
    g = torch.Generator().manual_seed(11)
    if kind == "disjoint":                                  # CP-like: consumer c gets shard c of a shuffle
        out = {c: [] for c in consumers}
        for v in V:
            perm = torch.randperm(v, generator=g)
            for i, c in enumerate(consumers):
                out[c].append(perm[i::len(consumers)])
        return out
    if kind == "tp_cp":                                     # ranks (cp, tp) = divmod(rank, 2): tp pairs share a shard
        out = {c: [] for c in consumers}
        for v in V:
            perm = torch.randperm(v, generator=g)
            for c in consumers:
                out[c].append(perm[c // 2::2])
        return out
    if kind == "random":                                    # overlapping random subsets, some mbs whole
        out = {}
        for c in consumers:
            out[c] = [torch.randperm(v, generator=g)[:max(1, v // 2 + c)] if (c + mb) % 3 else None
                      for mb, v in enumerate(V)]
        return out
    raise ValueError(kind)


def _idx(needs, c, mb, V):
    if needs is None or needs[c][mb] is None:
        return torch.arange(V)
    return needs[c][mb]


def _weights(V: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(v, LM_HIDDEN, generator=g, dtype=torch.float64) for v in V]


def _token_loss(e, w):
    return (w * e).sum() + 0.25 * (e * e).sum()


def _rel(ref: torch.Tensor | None, got: torch.Tensor) -> float:
    if ref is None:                    # a parameter the reference's loss does not reach (no frame): its gradient is 0
        ref = torch.zeros_like(got)
    if ref.shape != got.shape:
        return float("inf")
    ref, got = ref.detach().double(), got.detach().double()
    if not bool(got.isfinite().all()):
        return float("inf")
    denom = ref.pow(2).mean().sqrt().clamp_min(1e-30) if ref.numel() else torch.tensor(1.0)
    return float((ref - got).pow(2).mean().sqrt() / denom) if ref.numel() else 0.0


# --------------------------------------------------------------------------------------------- worker
def _run_case(name: str, opt: dict, rank: int, W: int) -> dict[str, float]:
    consumers = list(range(W)) if opt["consumers"] == "all" else opt["consumers"]
    grids = FEW if opt.get("few") else ONE if opt.get("one") else NONE if opt.get("none") else GRIDS
    mbs = _microbatches(grids)
    V = [int(mb["grid_thw"].prod(-1).sum()) // 4 for mb in mbs]
    needs = _needs(opt["needs"], consumers, W, V)
    w = _weights(V)
    dtype = torch.float32 if opt.get("bf16") else torch.float64
    model = _model(opt.get("freeze"), dtype)
    ref = _model(opt.get("freeze"), dtype)
    trains = any(p.requires_grad for p in ref.parameters())
    if opt.get("faults"):
        (_run_replicated_faults if opt.get("layout") == "replicated" else _run_faults)(opt, rank, W, consumers, mbs,
                                                                                       model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opt.get("bf16", False)):
        return _run_phase(opt, rank, W, consumers, mbs, V, needs, w, model, ref, trains)


def _run_faults(opt, rank, W, consumers, mbs, model) -> None:
    """Two rounds that fail on one rank before the pixels move (pixels_from), then a good one: every rank must raise in
    the first two, the failing one its own error, the others a RuntimeError naming its rank, host and error. Over a
    group whose collectives time out after 10 s, so that a rank left waiting in the all_to_all (as before) fails the
    case rather than hang the job."""
    import datetime
    import socket

    import torch.distributed as dist

    from parallel.vit_layout import VisionPhase

    group = dist.new_group(list(range(W)), backend="gloo", timeout=datetime.timedelta(seconds=10))
    src = opt["pixels_from"]
    empty = [dict(mb, pixel_values=mb["pixel_values"][:0]) for mb in mbs]
    short = [dict(mb, pixel_values=mb["pixel_values"][:-1]) for mb in mbs]     # one pixel row short of its grid
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    n = int(mbs[0]["grid_thw"].prod(-1).sum())
    for bad, kw, own in ((src, {}, f"ValueError: scatter_pixels: micro-batch 0 holds {n - 1} pixel rows, but its "
                                   f"grid_thw has {n} patches"),
                         (W - 1, {"error": oom}, f"OutOfMemoryError: {oom}")):
        mine = (short if bad == src else mbs) if rank == src else empty
        try:
            VisionPhase(model, group, consumers).forward(mine, None, pixels_from=src, **(kw if rank == bad else {}))
            got = "no error"
        except Exception as e:
            got = f"{type(e).__name__}: {e}"
        want = own if rank == bad else (
            f"RuntimeError: vision phase: rank {bad} on {socket.gethostname()} failed before the pixel exchange "
            f"(parallel.vit.decode_once: the group's first rank sends each rank its frames' pixels in one all_to_all, "
            f"which every rank of the group would wait in): {own}")
        assert got == want, f"rank {rank}, rank {bad} failing: {got}"
    with torch.no_grad():   # the group goes on: a good round after them
        out = VisionPhase(model, group, consumers).forward(mbs if rank == src else empty, None, pixels_from=src)
    assert [e.shape[0] for e in out] == [int(mb["grid_thw"].prod(-1).sum()) // 4 for mb in mbs]


def _run_replicated_faults(opt, rank, W, consumers, mbs, model) -> None:
    """The replicated layout's phase with a later stage (the non-consumers): two rounds that fail on one rank (a later
    stage's error met after settle, passed as `error`; a consumer's micro-batches whose pixels cannot be encoded
    together), then a good one, over a group whose collectives time out after 10 s (a rank left waiting, as before,
    fails the case in a pipeline send below rather than hang the job). Every rank must raise in the first two, the
    failing one its own error, the others a RuntimeError naming its rank, host and error."""
    import datetime
    import socket

    import torch.distributed as dist

    from parallel.vit_layout import REPLICATED_STEP, ReplicatedVisionPhase

    group = dist.new_group(list(range(W)), backend="gloo", timeout=datetime.timedelta(seconds=10))
    later, first = max(r for r in range(W) if r not in consumers), consumers[0]
    rebuild = RuntimeError("video loader: rebuilding epoch 0 pack 3 without its failed samples: token file t.bin is "
                           "gone")
    mixed = [mbs[0], dict(mbs[1], pixel_values=mbs[1]["pixel_values"].double())]   # uint8 and float64 pixels
    for bad, kw, batch, own in (
            (later, {"error": rebuild}, mbs, f"RuntimeError: {rebuild}"),
            (first, {}, mixed, "ValueError: micro-batches have pixel_values of different dtypes ['torch.float64', "
                               "'torch.uint8']; give all uint8 or all the same floating dtype")):
        try:
            ReplicatedVisionPhase(model, group, consumers).forward(batch if rank == bad else mbs, None,
                                                                   **(kw if rank == bad else {}))
            # as the LM's step would: stage 0 sends micro-batch 0's activations to the later stage
            t = torch.zeros(4)
            if rank == first:
                dist.send(t, later, group=group)
            elif rank == later:
                dist.recv(t, first, group=group)
            got = "no error"
        except Exception as e:
            got = f"{type(e).__name__}: {e}"
        want = own if rank == bad else (
            f"RuntimeError: vision phase: rank {bad} on {socket.gethostname()} failed {REPLICATED_STEP}: {own}")
        assert got == want, f"rank {rank}, rank {bad} failing: {got}"
    with torch.no_grad():   # the group goes on: a good round after them
        out = ReplicatedVisionPhase(model, group, consumers).forward(mbs, None)
    assert out is None if rank not in consumers else (
        [e.shape[0] for e in out] == [int(mb["grid_thw"].prod(-1).sum()) // 4 for mb in mbs])


def _run_phase(opt, rank, W, consumers, mbs, V, needs, w, model, ref, trains) -> dict[str, float]:
    """One case's phase against the single-process reference (under the case's autocast, as _run_case enters it)."""
    import torch.distributed as dist

    from parallel.vit_layout import ReplicatedVisionPhase, VisionPhase, allreduce_vit_grads

    # reference: one process encodes every micro-batch whole
    ref_e = [ref(mb["pixel_values"], mb["grid_thw"]) for mb in mbs]
    total = 0.0
    for mb in range(len(mbs)):
        if opt["grad_mode"] == "replicated":               # each token held by some consumer counts once
            held = torch.zeros(V[mb], dtype=torch.bool)
            for c in consumers:
                held[_idx(needs, c, mb, V[mb])] = True
            t = torch.nonzero(held).flatten()
            total = total + _token_loss(ref_e[mb][t], w[mb][t])
        else:
            for c in consumers:
                t = _idx(needs, c, mb, V[mb])
                total = total + _token_loss(ref_e[mb][t], w[mb][t])
    if trains:
        total.backward()

    kw = dict(recompute=opt.get("recompute", False), grad_mode=opt["grad_mode"])
    if "chunk_patches" in opt:
        kw["chunk_patches"] = opt["chunk_patches"]
    if opt.get("layout") == "replicated":
        phase = ReplicatedVisionPhase(model, None, consumers, **kw)
    else:
        phase = VisionPhase(model, None, consumers, balance=opt.get("balance", "lpt"), check=opt.get("check", False), **kw)
    src = opt.get("pixels_from")
    if src is None:
        out = phase.forward(mbs, needs)
    else:                  # only rank src holds pixels: the others' are empty tensors of the same dtype and width
        mine = mbs if rank == src else [dict(mb, pixel_values=mb["pixel_values"][:0]) for mb in mbs]
        out = phase.forward(mine, needs, pixels_from=src)
    errs: dict[str, float] = {}
    if src is not None:    # what src sent other ranks: their frames' patch rows (3 x 14 x 14 bytes each), nothing else
        rows = [0] * W
        for f, o in zip(phase.last_plan.frames, phase.last_plan.owner):
            rows[o] += f.num_patches
        want = (sum(rows) - rows[src]) * 3 * 14 * 14 if rank == src else 0
        errs["pixel_bytes"] = 0.0 if phase.pixel_bytes == want else float(abs(phase.pixel_bytes - want) + 1)
    if rank in consumers:
        assert out is not None and len(out) == len(mbs)
        loss = 0.0
        for mb, e in enumerate(out):
            t = _idx(needs, rank, mb, V[mb])
            errs[f"emb{mb}"] = _rel(ref_e[mb][t], e)
            errs[f"emb{mb}_requires_grad_ok"] = 0.0 if e.requires_grad == trains else 1.0
            loss = loss + _token_loss(e, w[mb][t])
        if trains:
            loss.backward()
            for mb, e in enumerate(out):
                t = _idx(needs, rank, mb, V[mb])
                e_ref = ref_e[mb][t].detach().requires_grad_()
                (g_ref,) = torch.autograd.grad(_token_loss(e_ref, w[mb][t]), e_ref)
                errs[f"emb{mb}_grad"] = _rel(g_ref, e.grad)
    else:
        errs["non_consumer_gets_none"] = 0.0 if out is None else 1.0
    phase.backward()
    allreduce_vit_grads(model, None)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.requires_grad:
            errs[f"grad.{n}"] = _rel(q.grad, p.grad) if p.grad is not None else float("inf")
        else:
            errs[f"frozen_has_no_grad.{n}"] = 0.0 if p.grad is None else 1.0
    if phase.last_plan is not None and opt.get("layout") != "replicated":
        errs["plan_ranks_ok"] = 0.0 if phase.last_plan.num_ranks == W else 1.0
    dist.barrier()
    return errs


def rank_main(out_dir: str) -> None:
    """One rank of a job started by tests/launch_util.run_ranks (torchrun's environment variables)."""
    _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"]), out_dir)


def _worker(rank: int, W: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    results = {}
    for name, (worlds, opt) in CASES.items():
        if W in worlds:
            try:
                results[name] = _run_case(name, opt, rank, W)
            except Exception as exc:  # reported per case; later cases may then hang, so stop here
                results[name] = {"error": repr(exc)}
                Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
                raise
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- pytest
_RESULTS: dict[int, dict] = {}


def _results(W: int, tmp_path_factory) -> dict:
    if W not in _RESULTS:
        out = tmp_path_factory.mktemp(f"vit_layout_{W}")
        run_ranks(W, "tests.dist.test_vit_layout:rank_main", (str(out),), out / "logs", timeout=600)
        merged: dict[str, dict[str, float]] = {}
        for r in range(W):
            for case, errs in json.loads(Path(out, f"rank{r}.json").read_text()).items():
                for k, v in errs.items():
                    key = f"rank{r}.{k}"
                    merged.setdefault(case, {})[key] = v
        _RESULTS[W] = merged
    return _RESULTS[W]


@pytest.mark.slow
@pytest.mark.parametrize("W,case", [(W, c) for c, (ws, _) in CASES.items() for W in sorted(ws)])
def test_layout_matches_single_process(W, case, tmp_path_factory):
    errs = _results(W, tmp_path_factory)[case]
    tol = BF16_TOL if CASES[case][1].get("bf16") else TOL
    bad = {k: v for k, v in errs.items() if not (isinstance(v, float) and v <= tol)}
    assert not bad, f"W={W} {case}: above {tol} (or error): {bad}"


# --------------------------------------------------------------------------------------------- plan
def _skewed_grids() -> list[torch.Tensor]:
    # 4 big frames at indices 0, 4, 8, 12 of 16: round-robin puts them all on rank 0 of 4
    frames = [(16, 16) if i % 4 == 0 else (2, 2) for i in range(16)]
    return [torch.tensor([[1, r, c] for r, c in frames[:8]]), torch.tensor([[1, r, c] for r, c in frames[8:]])]


def test_plan_balance_lpt_beats_round_robin():
    model = VisionModel(tiny(LM_HIDDEN))
    grids = _skewed_grids()
    lpt = make_plan(grids, model.frame_cost, 4, 4, "lpt")
    rr = make_plan(grids, model.frame_cost, 4, 4, "round_robin")
    assert rr.imbalance() > 3.0, rr.describe()          # all 4 big frames on one rank
    assert lpt.imbalance() < 1.1, lpt.describe()        # one big frame per rank
    # LPT's bound: makespan <= 4/3 OPT, and OPT >= max(mean load, largest frame)
    costs = [f.cost for f in lpt.frames]
    opt_lb = max(sum(costs) / 4, max(costs))
    assert max(x["cost"] for x in lpt.loads()) <= 4 / 3 * opt_lb + 1e-9


def test_plan_is_deterministic_and_complete():
    model = VisionModel(tiny(LM_HIDDEN))
    grids = [torch.tensor([[1, r, c] for r, c in mb]) for mb in GRIDS]
    a = make_plan(grids, model.frame_cost, 3, 4)
    b = make_plan([g.clone() for g in grids], model.frame_cost, 3, 4)
    assert a.owner == b.owner
    assert sorted(i for r in range(3) for i in a.rank_frames(r)) == list(range(len(a.frames)))
    assert a.mb_tokens == [sum(r * c for r, c in mb) // 4 for mb in GRIDS]
    assert "imbalance" in a.describe()


def test_needs_and_inputs_are_validated():
    from parallel.vit_layout import _check_pixel_dtypes, _layouts, build_vision_phase

    model = VisionModel(tiny(LM_HIDDEN))
    grids = [torch.tensor([[1, r, c] for r, c in mb]) for mb in GRIDS]
    plan = make_plan(grids, model.frame_cost, 2, 4)
    V = plan.mb_tokens
    with pytest.raises(ValueError, match=rf"needs\[1\]\[0\] has token indices outside \[0, {V[0]}\)"):
        _layouts(plan, [0, 1], {1: [torch.tensor([0, V[0]]), None]}, "replicated")
    with pytest.raises(ValueError, match=r"needs\[0\]\[1\] has repeated token indices"):
        _layouts(plan, [0], {0: [None, torch.tensor([3, 3])]}, "partial")
    with pytest.raises(ValueError, match=r"needs\[0\] has 1 entries, the step has 2 micro-batches"):
        _layouts(plan, [0], {0: [None]}, "partial")
    with pytest.raises(ValueError, match=r"different dtypes"):
        _check_pixel_dtypes([torch.zeros(1, dtype=torch.uint8), torch.zeros(1)])
    with pytest.raises(ValueError, match=r"vit layout must be 'spread' or 'replicated'"):
        build_vision_phase("tp", model)


def test_frame_chunks_keep_frames_whole_and_cover_every_patch():
    from parallel.vit_layout import frame_chunks

    grid = torch.tensor([[1, 2, 2], [1, 2, 2], [1, 8, 8], [1, 2, 4], [1, 2, 2], [1, 2, 2], [1, 2, 2]])
    assert frame_chunks(grid, 20) == [(0, 2, 0, 8), (2, 3, 8, 72), (3, 7, 72, 92)]  # 8 + 4 + 4 + 4 = 20 fits
    assert frame_chunks(grid, 19) == [(0, 2, 0, 8), (2, 3, 8, 72), (3, 6, 72, 88), (6, 7, 88, 92)]
    assert frame_chunks(grid, 1000) == [(0, 7, 0, 92)] and frame_chunks(grid[:0], 20) == []
