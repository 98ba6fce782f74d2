"""DSA sparse-training step of a Keye-30B-A3B slice against the same slice with dense attention, by sequence length.

What the sparse stage costs a training step, not one attention call: `train.trainer.Trainer` from the
`keye_30b_a3b_dsa_sparse` recipe (every layer DSA, top-2048, LM loss + the indexer KL over the selected set, all
parameters train; its language model alone on synthetic text, bench_spine.DSA_LM_SLICE) against the same recipe
with `model.lm.attention=dense` (the trainer's SDPA call: cuDNN on the H200), full width cut to `--layers` layers,
full recomputation as the one-node recipes run, one sequence of `--seq` tokens per step, bf16, one GPU, the same
pre-generated batches (bench/bench_spine.py's harness: each case in its own process, median step time of `--steps`
steps after `--warmup`). The synthetic text is one document per sequence, so every token past
2,048 runs the sparse path. Each case also records parallel/memory.py's predicted peak (`estimate_gb`).

    python bench/bench_dsa_stage.py --out $OUT/dsa_stage.json                 # GPU: 8K, 32K, 128K, 4 layers
    python bench/bench_dsa_stage.py --smoke --out /tmp/dsa_stage.json         # CPU: tiny recipe, checks the script
    python bench/bench_dsa_stage.py --seqs 131072 --cases dsa dsa_kl_twice --out $OUT/kl_skip.json
        # the DSA step against its baseline that also computes the KL in full recompute's first pass
    python bench/bench_dsa_stage.py --seqs 32768 131072 --cases dsa dsa_kl_apart --out $OUT/kl_apart.json
        # the DSA step against its baseline whose KL has a forward of its own (kernels/dsa/fused.py)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_spine import dsa_slice, max_rel_diff, print_runs, run_grid, run_slice_child, slice_parser  # noqa: E402

ATTENTION = ("dsa", "dense", "dsa_kl_twice", "dsa_kl_apart")


def kl_in_every_pass(trainer) -> None:
    """The baseline "dsa_kl_twice": every DSA layer computes its KL in full recompute's first pass too (what it
    did before it learnt to skip it; DSACoreAttention.skip_kl_without_grad)."""
    from models.attention.dsa import DSACoreAttention

    cores = [m for chunk in trainer.model for m in chunk.modules() if isinstance(m, DSACoreAttention)]
    assert cores, "no DSA layer to switch"
    for m in cores:
        m.skip_kl_without_grad = False


def kl_apart(trainer) -> None:
    """The baseline "dsa_kl_apart": every DSA layer runs its KL with a forward of its own and attaches it to the
    output (what it did before the attention backward took the KL's target; DSACoreAttention.kl_in_attention_backward)."""
    from models.attention.dsa import DSACoreAttention

    cores = [m for chunk in trainer.model for m in chunk.modules() if isinstance(m, DSACoreAttention)]
    assert cores, "no DSA layer to switch"
    for m in cores:
        m.kl_in_attention_backward = False


BASELINES = {"dsa_kl_twice": kl_in_every_pass, "dsa_kl_apart": kl_apart}


def run_cases(args) -> dict:
    """Each (attention, seq) case in its own process; the dense / DSA step-time ratio per length."""
    merged = run_grid(__file__, args, "--attention", "attention", args.cases or list(ATTENTION[:2]))
    by = {(r["attention"], r["seq"]): r for r in merged["runs"] if "error" not in r}
    merged["compare"] = {}
    for seq in sorted({r["seq"] for r in merged["runs"]}):
        a, d, twice = by.get(("dsa", seq)), by.get(("dense", seq)), by.get(("dsa_kl_twice", seq))
        apart = by.get(("dsa_kl_apart", seq))
        c = merged["compare"][seq] = {}
        if a and d:
            c.update(dense_over_dsa=d["step_s"] / a["step_s"],
                     peak_gb={"dsa": a["peak_mem_gb"], "dense": d["peak_mem_gb"]},
                     estimate_gb={"dsa": a["estimate_gb"], "dense": d["estimate_gb"]})
        if a and twice:  # the skipped KL trained nothing: losses and gradient norms agree up to fp32 atomics' order
            c.update(kl_twice_over_dsa=twice["step_s"] / a["step_s"],
                     max_rel_diff={key: max_rel_diff(a[key], twice[key]) for key in ("losses", "grad_norms")})
        if a and apart:  # the same gradients, the KL's target summed over KV groups in another order
            c.update(kl_apart_over_dsa=apart["step_s"] / a["step_s"],
                     peak_gb_apart={"dsa": a["peak_mem_gb"], "dsa_kl_apart": apart["peak_mem_gb"]},
                     max_rel_diff_apart={key: max_rel_diff(a[key], apart[key]) for key in ("losses", "grad_norms")})
    Path(args.out).write_text(json.dumps(merged, indent=1))
    print_runs(merged["runs"], "attention",
               f"\n{'attention':9} {'seq':>7} {'step ms':>9} {'tok/s':>8} {'peak GB':>8} {'est. GB':>8}  "
               "LM loss / indexer KL",
               lambda r: f"{r['attention']:9} {r['seq']:>7} {1e3 * r['step_s']:9.1f} {r['seq'] / r['step_s']:8,.0f} "
                         f"{r['peak_mem_gb']:8.1f} {r['estimate_gb']:8.1f}  {r['losses'][-1]:.4f} / "
                         f"{r['extra'][-1].get('indexer_kl')}")
    for seq, c in merged["compare"].items():
        if "dense_over_dsa" in c:
            print(f"{seq}: the DSA step is {c['dense_over_dsa']:.2f}x as fast as the dense one")
        if "kl_twice_over_dsa" in c:
            print(f"{seq}: skipping the KL in the recompute's first pass: {c['kl_twice_over_dsa']:.3f}x; losses / "
                  f"gradient norms apart by {c['max_rel_diff']['losses']:.1e} / {c['max_rel_diff']['grad_norms']:.1e}")
        if "kl_apart_over_dsa" in c:
            print(f"{seq}: the KL's target from the attention backward: {c['kl_apart_over_dsa']:.3f}x; peak GB "
                  f"{c['peak_gb_apart']}; losses / gradient norms apart by {c['max_rel_diff_apart']['losses']:.1e} / "
                  f"{c['max_rel_diff_apart']['grad_norms']:.1e}")
    return merged


def main() -> None:
    ap = slice_parser(__doc__, "--attention", ATTENTION, seqs=[8192, 32768, 131072], steps=3, warmup=1)
    ap.add_argument("--cases", choices=ATTENTION, nargs="+", default=None,
                    help="which cases to run (default: dsa and dense; dsa_kl_twice is the recompute baseline)")
    args = ap.parse_args()
    if not args.child:
        run_cases(args)
        return
    attention = "dsa" if args.attention in BASELINES else args.attention
    recipe, lm_slice = dsa_slice("sparse", args.smoke)
    run_slice_child(args, recipe, {"attention": args.attention},
                    lm_slice + [f"model.lm.attention={attention}", "parallel.recompute=full"],
                    BASELINES.get(args.attention))


if __name__ == "__main__":
    main()
