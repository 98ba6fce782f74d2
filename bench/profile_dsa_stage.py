"""GPU: where a DSA sparse-stage training step of the Keye-30B-A3B slice spends its time, against dense attention.

bench/bench_dsa_stage.py's slice and step (keye_30b_a3b_dsa_sparse's language model cut to `--layers` layers, full
recompute, one sequence of `--seq` tokens, one H200). Per (attention, seq) case, in its own process:
- CUDA time per kernel name over one profiled step (torch.profiler, after `--warmup` steps), largest first;
- for DSA, the selection the trainer's indexer makes on its first layer (inputs captured at the layer's first
  call, in the first warm-up step's forward): the union plan's mean distinct keys per block, the top-k's
  exact-fallback rows, and the DSA forward+backward of those captured tensors against bench_dsa.py's smooth-noise
  and iid inputs at the same length, timed in the same process (what the selection's overlap costs, apart from
  the rest of the step).

    python bench/profile_dsa_stage.py --out $OUT/dsa_stage_profile.json
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_dsa_stage import ATTENTION  # noqa: E402
from bench.bench_spine import (Pregenerated, compose_cfg, dsa_slice, record_case, run_grid,  # noqa: E402
                               slice_overrides, slice_parser)


def selection_stats(cap: dict, quick: bool) -> dict:
    """The captured first-layer tensors' selection, and their DSA forward+backward against the benchmark's
    synthetic inputs at the same length."""
    import torch

    from bench.bench_dsa import HKV, HQ, dsa_fwd_bwd, make_inputs, timed
    from kernels.dsa import build_sparse_plan, default_block_q, dsa_topk

    block_q = default_block_q(HQ, HKV)
    L = cap["q"].shape[1]
    out = {}
    inputs = {"trainer": None, "smooth": make_inputs(L, "smooth"), "iid": make_inputs(L, "iid")}
    x = dict(inputs["smooth"])  # trainer: q / k / v and the indexer tensors as the first layer saw them
    for name in ("q", "k", "v", "q_idx", "w", "k_idx"):
        x[name] = cap[name].detach().clone().requires_grad_(True)
    inputs["trainer"] = x
    for name, xin in inputs.items():
        stats = {}
        with torch.no_grad():
            idx = dsa_topk(xin["q_idx"], xin["w"], xin["k_idx"], 2048, stats=stats)
            plan = build_sparse_plan(idx, block_q)
        out[name] = {"mean_union_per_block": plan.mean_union(), "fallback_rows": stats.get("fallback_rows"),
                     "fwd_bwd_ms": timed(lambda xin=xin: dsa_fwd_bwd(xin, block_q), quick=quick),
                     "rms": {n: float(xin[n].detach().float().pow(2).mean().sqrt()) for n in ("q", "k", "q_idx", "w", "k_idx")}}
        del idx, plan
        torch.cuda.empty_cache()
    return out


def profile_step(cfg, layout, warmup: int, capture: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from models.attention.dsa import DSACoreAttention
    from train.trainer import Trainer

    tr = Trainer(cfg, layout)
    tr.streams = [Pregenerated(tr.streams[0], warmup + 2)]
    for m in tr.model:
        m.train()
    cap: dict = {}
    if capture:
        core = next(m for chunk in tr.model for m in chunk.modules() if isinstance(m, DSACoreAttention))

        def hook(mod, args, kwargs):
            if not cap:
                qkv = [*args, *(kwargs[n] for n in ("query", "key", "value") if n in kwargs)][:3]
                q, k, v = (a.detach().transpose(0, 1).contiguous() for a in qkv)
                q_idx, w, k_idx = (t.detach().contiguous() for t in mod.indexer_out)
                cap.update(q=q, k=k, v=v, q_idx=q_idx, w=w, k_idx=k_idx)
        handle = core.register_forward_pre_hook(hook, with_kwargs=True)
    for _ in range(warmup):
        tr.train_step()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        s = tr.train_step()
        torch.cuda.synchronize()
    per: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA or not torch.cuda.is_available():
            e = per.setdefault(ev.name, [0.0, 0])
            e[0] += (ev.device_time_total if torch.cuda.is_available() else ev.self_cpu_time_total) / 1e3
            e[1] += 1
    rows = sorted(({"kernel": k, "ms": v[0], "launches": v[1]} for k, v in per.items()), key=lambda r: -r["ms"])
    res = {"step_s": s.seconds, "kernel_ms_total": sum(r["ms"] for r in rows), "kernels": rows[:40]}
    if capture:
        handle.remove()
        res["captured"] = {n: list(t.shape) for n, t in cap.items()}
    tr.close()
    del tr
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if capture:
            res["selection"] = selection_stats(cap, quick=True)
    return res


def main() -> None:
    cases = ATTENTION[:2]  # dsa and dense: the trainer's two attentions (dsa_kl_twice is bench_dsa_stage's baseline)
    args = slice_parser(__doc__, "--attention", cases, seqs=[32768, 131072], layers=2, steps=1, warmup=1,
                        smoke_help="tiny recipe on CPU: checks the script (no selection part)").parse_args()
    if not args.child:
        merged = run_grid(__file__, args, "--attention", "attention", list(cases))
        for r in merged["runs"]:
            if "error" in r:
                print(r["attention"], r["seq"], r["error"][:200])
                continue
            print(f"\n{r['attention']} {r['seq']}: step {1e3 * r['step_s']:.1f} ms, kernels {r['kernel_ms_total']:.1f} ms")
            for k in r["kernels"][:15]:
                print(f"  {k['ms']:9.2f} ms x{k['launches']:<5d} {k['kernel'][:110]}")
            for name, st in r.get("selection", {}).items():
                print(f"  selection {name:8}: union/block {st['mean_union_per_block']:.0f}, fallback rows "
                      f"{st['fallback_rows']}, DSA f+b {st['fwd_bwd_ms']:.2f} ms, rms {st['rms']}")
        return
    import torch

    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ["WANDB_MODE"] = "disabled"
    results = {"env": {"torch": torch.__version__, "layers": args.layers,
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}, "runs": []}
    recipe, lm_slice = dsa_slice("sparse", args.smoke)
    for seq in ([256] if args.smoke else args.seqs):
        cfg, layout = compose_cfg(slice_overrides(recipe, seq, args.layers, args.steps + 1, args.warmup,
                                                  f"/tmp/profile_dsa_stage/{args.attention}{seq}", args.smoke)
                                  + lm_slice
                                  + [f"model.lm.attention={args.attention}", "parallel.recompute=full"])
        record_case(results, {"attention": args.attention, "seq": seq, "layers": args.layers},
                    lambda: profile_step(cfg, layout, args.warmup, capture=args.attention == "dsa"), args.out)
    from parallel.groups import teardown

    teardown()


if __name__ == "__main__":
    main()
