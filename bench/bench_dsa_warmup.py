"""DSA dense warm-up step of a Keye-30B-A3B slice: the indexer-only step against the backward through the frozen model.

Both sides: `train.trainer.Trainer` from the `keye_30b_a3b_dsa_warmup` recipe (every layer DSA, dense attention,
`train.trainable=indexer`), its language model alone on synthetic text (bench_spine.DSA_LM_SLICE), full width
cut to `--layers` layers, one sequence of `--seq` tokens per step, bf16, one GPU, the same pre-generated batches
(bench/bench_spine.py's harness: each case in its own process, median step time of `--steps` steps after
`--warmup`).
- "local": `train.indexer_backward=local` (the default): each DSA layer back-propagates its indexer KL in its
  forward and the step runs the frozen model forward only.
- "model": `train.indexer_backward=model`, the baseline (what every warm-up step did before): the KL's gradient
  is attached to the attention output and rides back through the frozen model's whole backward.
Each case also records parallel/memory.py's predicted peak (`estimate_gb`, 10^9 bytes like the measurement).
The indexers get the same gradients either way; the run checks it (the gradient norm of every step, and the loss,
equal to float rounding).

    python bench/bench_dsa_warmup.py --out $OUT/dsa_warmup.json              # GPU: 8K and 32K, 4 layers
    python bench/bench_dsa_warmup.py --smoke --out /tmp/dsa_warmup.json      # CPU: tiny recipe, checks the script
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_spine import dsa_slice, max_rel_diff, print_runs, run_grid, run_slice_child, slice_parser  # noqa: E402

MODES = ("local", "model")


def run_cases(args) -> dict:
    """Each (mode, seq) case in its own process."""
    seqs = [256] if args.smoke else args.seqs
    merged = run_grid(__file__, args, "--mode", "mode", list(MODES))
    by = {(r["mode"], r["seq"]): r for r in merged["runs"] if "error" not in r}
    merged["compare"] = {}
    for seq in seqs:
        a, b = by.get(("local", seq)), by.get(("model", seq))
        if a and b:
            merged["compare"][seq] = {"speedup": b["step_s"] / a["step_s"],
                                      "grad_norm_max_rel_diff": max_rel_diff(a["grad_norms"], b["grad_norms"]),
                                      "losses_equal": a["losses"] == b["losses"],
                                      "peak_gb": [a["peak_mem_gb"], b["peak_mem_gb"]],
                                      "estimate_gb": [a.get("estimate_gb"), b.get("estimate_gb")]}
    Path(args.out).write_text(json.dumps(merged, indent=1))
    print_runs(merged["runs"], "mode",
               f"\n{'mode':9} {'seq':>7} {'step ms':>9} {'peak GB':>8} {'est. GB':>8}  grad norms",
               lambda r: f"{r['mode']:9} {r['seq']:>7} {1e3 * r['step_s']:9.1f} {r['peak_mem_gb']:8.1f} "
                         f"{r['estimate_gb']:8.1f}  " + " ".join(f"{g:.6g}" for g in r["grad_norms"]))
    for seq, c in merged["compare"].items():
        print(f"{seq}: local is {c['speedup']:.2f}x the model-backward step; grad norms agree to "
              f"{c['grad_norm_max_rel_diff']:.1e}; losses equal: {c['losses_equal']}")
    return merged


def main() -> None:
    args = slice_parser(__doc__, "--mode", MODES, seqs=[8192, 32768]).parse_args()
    if not args.child:
        run_cases(args)
        return
    recipe, lm_slice = dsa_slice("warmup", args.smoke)
    run_slice_child(args, recipe, {"mode": args.mode}, lm_slice + [f"train.indexer_backward={args.mode}"])


if __name__ == "__main__":
    main()
