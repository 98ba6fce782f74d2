#!/usr/bin/env bash
# What train.deterministic costs at full width, on one GPU: the Qwen3-30B-A3B-shaped language model (hidden 2048, 128
# experts, top-8; keye_30b_a3b_lm) cut to LAYERS (2) layers, one process, bf16, synthetic tokens, GBS (4)
# sequences a step (micro-batches of one: gradient accumulation as at scale), STEPS (8) steps, no checkpoint. Per
# sequence length in SEQS (8192 32768), one after the other (nothing shares the GPU): the mode off, on, and on again.
# Prints the median step time of steps 3..STEPS of each, on against off, and whether the two runs with the mode
# gave every logged value bit for bit (timings and peak memory left out), and whether off and on differ at all.
# bench/gpu_checks_determinism.sh is the tiny recipes' check (resume included); this one is the speed at full width.
# Needs $OUT; logs stay in /tmp/detc_logs, $OUT gets summary.txt, summary.json and rc.txt.
# DEVICE=cpu RECIPE=keye_tiny_lm LAYERS=1 SEQS=128 GBS=2 STEPS=3 checks the script on a CPU (fp32, gloo).
set -u
: "${OUT:?set OUT to a folder for the results}"
LAYERS=${LAYERS:-2}
SEQS=${SEQS:-8192 32768}
GBS=${GBS:-4}
STEPS=${STEPS:-8}
EXTRA=${EXTRA:-}
if [ "${DEVICE:-gpu}" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi
RECIPE=${RECIPE:-keye_30b_a3b_lm}
P="torchrun --standalone --nproc_per_node 1 launch/pretrain.py recipe=$RECIPE parallel=single"
P="$P train.wandb.enabled=false train.log_interval=1 train.memory_check=off train.checkpoint.enabled=false"
P="$P model.lm.num_layers=$LAYERS train.global_batch_size=$GBS train.micro_batch_size=1 train.stop_after=$STEPS"
P="$P train.warmup_steps=2 $EXTRA"
L=/tmp/detc_logs
rm -rf $L /tmp/detc_run_*; mkdir -p $L
start=$(date +%s)
for s in $SEQS; do
  for tag in off on on2; do
    case $tag in off) d=false ;; *) d=true ;; esac
    timeout 280 $P train.seq_length=$s train.deterministic=$d run_dir=/tmp/detc_run_${s}_$tag > $L/${s}_$tag.log 2>&1
    echo "$s $tag rc $?" >> $L/rc.txt
  done
done
echo "all runs: $(( $(date +%s) - start )) s" >> $L/rc.txt
cp $L/rc.txt $OUT/rc.txt
cat $OUT/rc.txt
for f in $L/*.log; do echo "== $f"; grep -E "Error|error:|Traceback" $f | head -5; done > $OUT/errors.txt

python3 - "$OUT" "$SEQS" "$STEPS" <<'PY' | tee $OUT/summary.txt
import json, math, statistics, sys
out, seqs, steps = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
TIMING = {"step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gb", "data_wait_s", "data_wait_rank"}

def records(seq, tag):
    try:
        rows = [json.loads(x) for x in open(f"/tmp/detc_run_{seq}_{tag}/metrics.jsonl")]
    except OSError:
        return {}
    return {r["step"]: r for r in rows if "loss" in r}

def first_difference(a, b):
    for s in range(1, steps + 1):
        if s not in a or s not in b:
            return f"step {s} missing"
        for k in sorted((set(a[s]) | set(b[s])) - TIMING):
            if a[s].get(k) != b[s].get(k):
                return f"step {s} {k}: {a[s].get(k)!r} vs {b[s].get(k)!r}"
    return None

def median(run, key):
    t = [r[key] for s, r in run.items() if s >= 3 and key in r]
    return statistics.median(t) if t else math.nan

summary = {}
for seq in seqs:
    runs = {t: records(seq, t) for t in ("off", "on", "on2")}
    res = {"steps": {t: len(r) for t, r in runs.items()},
           "step_s": {t: median(r, "step_time_s") for t, r in runs.items()},
           "peak_mem_gb": {t: max((x.get("peak_mem_gb") or 0 for x in r.values()), default=None)
                           for t, r in runs.items()},
           "on_run_to_run": first_difference(runs["on"], runs["on2"]),
           "off_vs_on": first_difference(runs["off"], runs["on"]),
           "loss_last": {t: r[max(r)]["loss"] if r else None for t, r in runs.items()}}
    off = res["step_s"]["off"]
    res["on_over_off"] = (min(res["step_s"]["on"], res["step_s"]["on2"]) / off) if off else math.nan
    summary[seq] = res
    print(f"seq {seq}: steps {res['steps']}")
    print(f"  median step time (steps 3..{steps}): off {off:.4f} s, on {res['step_s']['on']:.4f} / "
          f"{res['step_s']['on2']:.4f} s: on = {res['on_over_off']:.3f} x off; peak GB {res['peak_mem_gb']}")
    same = res["on_run_to_run"]
    print(f"  on, run to run: {'bit-identical' if same is None else 'DIFFERS: ' + same}")
    print(f"  off against on: {'the same' if res['off_vs_on'] is None else 'differ: ' + res['off_vs_on']}")
    print(f"  last loss: {res['loss_last']}")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
