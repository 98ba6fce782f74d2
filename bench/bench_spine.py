"""Training-step throughput of a Keye-30B-A3B slice: our trainer against plain megatron-core, same run.

Both sides: the full-width language model (hidden 2048, 32 q / 4 kv heads, 128 experts top-8, expert FFN
768, vocab 151,936) cut to `--layers` layers, one sequence of `--seq` tokens per step, bf16 compute with
fp32 master weights, megatron's distributed optimizer (AdamW) and DDP, one GPU.
- "ours": train.trainer.Trainer built from the keye_30b_a3b recipe (SDPA flash attention, our RMSNorm,
  layout-invariant init; experts are still megatron's SequentialMLP until issue 3 replaces them).
- "plain": megatron-core GPTModel from `get_gpt_layer_local_spec` (DotProductAttention, torch norms,
  SequentialMLP), the same TransformerConfig, optimizer and data.
Batches are generated before timing (same synthetic token stream for both) so data generation stays
out of the step time. Step time: median of `--steps` steps after `--warmup`, CUDA-synchronised.
FLOPs per token: models.config.lm_flops_per_token (6 x active matmul parameters, embedding lookup
excluded, plus causal attention 6 * 2 * s * q_dim / 2 per layer); MFU against 775 TFLOP/s, the bf16
dense matmul rate measured on an H200 (torch 2.11).

    python bench/bench_spine.py --out $OUT/spine.json                 # GPU: 8K and 32K, 4 layers
    python bench/bench_spine.py --smoke --out /tmp/spine.json         # CPU: tiny recipe, checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.cli import SMOKE, require_gpus  # noqa: E402

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()

import torch  # noqa: E402

from train.launch import compose_config, validate  # noqa: E402

PEAK_TFLOPS = 775.0


def slice_overrides(recipe: str, seq: int, layers: int, steps: int, warmup: int, run_dir: str,
                    smoke: bool = False) -> list[str]:
    """The benchmarks' model slice: `recipe` cut to `layers` layers, one sequence of `seq` tokens per step, one
    GPU, enough steps for `warmup` + `steps` timed ones, no checkpoints."""
    ov = [f"recipe={recipe}", "parallel=single", f"model.lm.num_layers={layers}",
          f"train.seq_length={seq}", "train.global_batch_size=1", "train.micro_batch_size=1",
          f"train.steps={steps + warmup + 1}", "train.warmup_steps=1",
          "train.checkpoint.enabled=false", "train.wandb.enabled=false", f"run_dir={run_dir}"]
    if seq > 4096 and not smoke:
        ov.append(f"model.lm.max_position_embeddings={max(seq, 262144)}")
    return ov


# The 30B DSA stage recipes train the multimodal model on video shards; their slice benchmarks time the language
# model alone, as bench_dsa.py's attention does, on the project's synthetic text (no shards, no ViT).
DSA_LM_SLICE = ["model=keye_30b_a3b_dsa", "data=synthetic_tokens"]


def dsa_slice(stage: str, smoke: bool) -> tuple[str, list[str]]:
    """(recipe, overrides) of a DSA stage's slice benchmark: keye_30b_a3b_dsa_<stage>'s language model on synthetic
    text, or with --smoke the tiny recipe, already that."""
    return (f"keye_tiny_dsa_{stage}", []) if smoke else (f"keye_30b_a3b_dsa_{stage}", list(DSA_LM_SLICE))


def print_runs(runs: list[dict], label: str, header: str, row) -> None:
    """A benchmark's table: `header`, then per run its `label` column and seq, and `row(run)` or its error."""
    print(header)
    for r in runs:
        print(f"{r[label]:9} {r['seq']:>7}  {r['error'][:120]}" if "error" in r else row(r))


def compose_cfg(overrides: list[str]):
    return validate(compose_config(overrides))


class Pregenerated:
    """Yields pre-built micro-batches (so batch generation is not timed)."""

    def __init__(self, stream, n_steps: int):
        self.batches = [next(stream) for _ in range(n_steps * stream.num_microbatches)]
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_mem():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


def run_ours(cfg, layout, steps: int, warmup: int, prepare=None) -> dict:
    """`steps` timed training steps after `warmup`; prepare(trainer), if given, runs once the trainer is built."""
    from train.trainer import Trainer

    _reset_mem()
    tr = Trainer(cfg, layout)
    if prepare is not None:
        prepare(tr)
    tr.streams = [Pregenerated(tr.streams[0], steps + warmup)]
    for m in tr.model:
        m.train()
    times, losses, norms, extras = [], [], [], []
    for i in range(steps + warmup):
        s = tr.train_step()
        if i >= warmup:
            times.append(s.seconds)
            losses.append(s.loss)
            norms.append(s.grad_norm)
            extras.append(s.extra)
    out = {"step_s": statistics.median(times), "step_times_s": times, "losses": losses, "grad_norms": norms,
           "extra": extras, "peak_mem_gb": _peak_gb()}
    tr.close()
    del tr
    return out


def run_plain(cfg, layout, steps: int, warmup: int) -> dict:
    """Plain megatron-core: GPTModel with the local spec, same config, optimizer and batches."""
    import functools

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from data.synthetic_tokens import SyntheticTokenStream
    from models.lm import transformer_config
    from parallel.groups import build_process_groups, init_distributed, seed_all
    from train.optim import apply_lr, build_optimizer
    from train.trainer import StepInputs, _forward_step

    _reset_mem()
    lm, t = cfg.model.lm, cfg.train
    device = init_distributed()
    pgs = build_process_groups(layout)
    seed_all(cfg.seed, pgs)
    bf16 = torch.cuda.is_available()
    tc = transformer_config(lm, layout.model_sizes(), bf16=bf16, use_cpu_initialization=False)
    spec = get_gpt_layer_local_spec(num_experts=lm.num_experts, moe_grouped_gemm=False, qk_layernorm=True,
                                    normalization="RMSNorm")
    model = GPTModel(config=tc, transformer_layer_spec=spec, vocab_size=lm.vocab_size,
                     max_sequence_length=lm.max_position_embeddings, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", rotary_base=int(lm.rope_theta), pg_collection=pgs).to(device)
    ddp = DistributedDataParallel(config=tc, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=model, pg_collection=pgs)
    tc.no_sync_func = ddp.no_sync
    tc.finalize_model_grads_func = finalize_model_grads
    opt = build_optimizer([ddp], t, bf16=bf16, distributed=True, pg_collection=pgs)
    stream = Pregenerated(SyntheticTokenStream(cfg.data, vocab_size=lm.vocab_size, seq_length=t.seq_length,
                                               micro_batch_size=t.micro_batch_size,
                                               global_batch_size=t.global_batch_size, dp_rank=0, dp_size=1),
                          steps + warmup)
    fwd_bwd = get_forward_backward_func()
    times, losses = [], []
    for i in range(steps + warmup):
        _sync()
        t0 = time.perf_counter()
        apply_lr(opt, i, t)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = fwd_bwd(forward_step_func=functools.partial(_forward_step, StepInputs(device=device, vocab_size=lm.vocab_size)),
                      data_iterator=stream, model=ddp,
                      num_microbatches=1, seq_length=t.seq_length, micro_batch_size=1, forward_only=False,
                      pg_collection=pgs)
        opt.step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            d = out[0]["lm_loss"]
            losses.append((d[0] / d[1]).item())
    res = {"step_s": statistics.median(times), "losses": losses, "peak_mem_gb": _peak_gb()}
    del ddp, model, opt
    return res


def run_child(script: str, flags: list[str], part: str, label: dict, merged: dict, out: str) -> None:
    """One case in its own process (`script --child FLAGS --out part`), so one case's memory (or OOM) cannot
    affect the next: its runs (or, if it died, an error record labelled `label`) go into merged["runs"], its
    env into merged["env"], and `out` is rewritten."""
    import subprocess

    cmd = [sys.executable, script, "--child", *flags, "--out", part]
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not Path(part).exists():
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        merged["runs"].append({**label, "error": f"exit {proc.returncode}: {tail}"[:300]})
    else:
        d = json.loads(Path(part).read_text())
        merged["env"] = merged.get("env") or d["env"]
        merged["runs"] += d["runs"]
    Path(out).write_text(json.dumps(merged, indent=1))


def record_case(results: dict, rec: dict, fn, out: str) -> None:
    """rec updated with fn()'s dict, or with the error if it raised (OOM or anything else: the run goes on);
    appended to results["runs"], `out` rewritten, the GPU cache freed."""
    try:
        rec.update(fn())
    except Exception as e:
        rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
    results["runs"].append(rec)
    Path(out).write_text(json.dumps(results, indent=1))
    _reset_mem()


def run_grid(script: str, args, flag: str, key: str, values: list[str]) -> dict:
    """Every (value, seq) case of a step benchmark in its own process (run_child): `script --child flag value
    --seqs seq` with the run's layers, steps, warm-up and smoke flag; returns the merged runs (error records
    labelled {key: value, "seq": seq, "layers": ...}). Without a GPU only --smoke runs: every full-size case would
    fail in its child (bf16 needs a GPU), after minutes."""
    if not args.smoke:
        require_gpus(script, hint=SMOKE)
    merged = {"env": {}, "runs": []}
    for seq in ([256] if args.smoke else args.seqs):
        for v in values:
            flags = [flag, v, "--seqs", str(seq), "--layers", str(args.layers), "--steps", str(args.steps),
                     "--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else [])
            run_child(script, flags, f"{args.out}.{v}.{seq}.json", {key: v, "seq": seq, "layers": args.layers},
                      merged, args.out)
    return merged


def max_rel_diff(xs, ys) -> float:
    """The largest |x - y| / |y| over two runs' per-step values (losses, gradient norms)."""
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(xs, ys))


def slice_parser(doc: str, case_flag: str, choices, *, seqs: list[int], layers: int = 4, steps: int = 4,
                 warmup: int = 2, smoke_help: str = "tiny recipe on CPU: checks the script, not speed"):
    """The command line every slice step benchmark shares (this file, bench_dsa_warmup.py, bench_dsa_stage.py,
    profile_dsa_stage.py): lengths, layers, steps, warm-up, --smoke, --child, --out, and its case flag
    (`case_flag` with `choices`; run_grid hands one value to each child)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=seqs)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument(case_flag, choices=choices, default=None)
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--child", action="store_true", help="run exactly one case (one value of the case flag and "
                                                         "one length) in this process")
    ap.add_argument("--out", required=True)
    return ap


def run_slice_child(args, recipe: str, label: dict, extra: list[str], prepare=None) -> None:
    """The child side of a slice step benchmark (bench_dsa_warmup.py, bench_dsa_stage.py): each length of the
    run (256 with --smoke, where `recipe` is the tiny one) as `recipe` cut by slice_overrides plus `extra`,
    trained by run_ours (with `prepare`) and recorded into args.out under `label`, with parallel/memory.py's
    predicted peak (`estimate_gb`, 10^9 bytes like the measurement) beside it."""
    from parallel.groups import teardown
    from parallel.memory import estimate, inputs_from_config

    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ["WANDB_MODE"] = "disabled"
    results = {"env": {"torch": torch.__version__, "layers": args.layers,
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}, "runs": []}
    tag = "_".join(str(v) for v in label.values())
    for seq in ([256] if args.smoke else args.seqs):
        cfg, layout = compose_cfg(slice_overrides(recipe, seq, args.layers, args.steps, args.warmup,
                                                  f"/tmp/{Path(sys.argv[0]).stem}/{tag}{seq}", args.smoke) + extra)
        est = estimate(inputs_from_config(cfg, layout))
        record_case(results, {**label, "seq": seq, "layers": args.layers, "estimate_gb": est.total / 1e9},
                    lambda: run_ours(cfg, layout, args.steps, args.warmup, prepare), args.out)
    teardown()


def run_cases(args) -> None:
    """Each (impl, seq) case in its own process."""
    print_table(run_grid(__file__, args, "--only", "impl", [args.only] if args.only else ["ours", "plain"]))


def print_table(results: dict) -> None:
    print_runs(results["runs"], "impl",
               f"\n{'impl':9} {'seq':>7} {'step ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8}",
               lambda r: f"{r['impl']:9} {r['seq']:>7} {1e3 * r['step_s']:9.1f} {r['tokens_per_s']:9,.0f} "
                         f"{r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {r['peak_mem_gb']:8.1f}")


def main() -> None:
    args = slice_parser(__doc__, "--only", ["ours", "plain"], seqs=[8192, 32768]).parse_args()
    if not args.child:
        return run_cases(args)
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ["WANDB_MODE"] = "disabled"
    from models.config import lm_flops_per_token

    recipe = "keye_tiny_lm" if args.smoke else "keye_30b_a3b_lm"
    seqs = [256] if args.smoke else args.seqs
    results = {"env": {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "layers": args.layers, "peak_tflops": PEAK_TFLOPS}, "runs": []}
    for seq in seqs:
        cfg, layout = compose_cfg(slice_overrides(recipe, seq, args.layers, args.steps, args.warmup,
                                                  f"/tmp/bench_spine/{seq}", args.smoke))
        fpt = lm_flops_per_token(cfg.model.lm, seq)
        for name, fn in (("ours", run_ours), ("plain", run_plain)):
            if args.only and name != args.only:
                continue
            def case(fn=fn):
                r = fn(cfg, layout, args.steps, args.warmup)
                tok_s = seq / r["step_s"]
                tflops = fpt * tok_s / 1e12
                return dict(r, tokens_per_s=tok_s, tflops=tflops, mfu=tflops / PEAK_TFLOPS)
            record_case(results, {"impl": name, "seq": seq, "layers": args.layers}, case, args.out)
    from parallel.groups import teardown

    teardown()


if __name__ == "__main__":
    main()
