#!/usr/bin/env bash
# train.batch_rampup on one GPU (bf16, NCCL, one process), with train.deterministic so that runs can be compared bit
# for bit: RECIPE (keye_tiny: global batch 4) ramped from START (2) by INC (2) over SAMPLES (24) sequences, STEPS (20)
# steps, run whole ("whole") and stopped after STOP (8) steps mid-ramp then resumed to STEPS ("resumed"). Prints each
# step's global batch and whether every logged value of the resumed run equals the whole run's at every step
# (timings, the decode counters a resumed launch starts at zero, and peak memory left out).
# Needs $OUT; logs stay in /tmp/ramp_logs, $OUT gets summary.txt and rc.txt.
# DEVICE=cpu RECIPE=keye_tiny_lm START=4 INC=4 SAMPLES=16 STEPS=6 STOP=2 checks the script on a CPU (fp32, gloo).
set -u
: "${OUT:?set OUT to a folder for the results}"
RECIPE=${RECIPE:-keye_tiny}
START=${START:-2}
INC=${INC:-2}
SAMPLES=${SAMPLES:-24}
STEPS=${STEPS:-20}
STOP=${STOP:-8}
if [ "${DEVICE:-gpu}" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi
P="torchrun --standalone --nproc_per_node 1 launch/pretrain.py recipe=$RECIPE parallel=single train.wandb.enabled=false"
P="$P train.log_interval=1 train.memory_check=off train.deterministic=true train.batch_rampup.start=$START"
P="$P train.batch_rampup.increment=$INC train.batch_rampup.samples=$SAMPLES"
L=/tmp/ramp_logs
rm -rf $L /tmp/ramp_run_*; mkdir -p $L
start=$(date +%s)
timeout 200 $P run_dir=/tmp/ramp_run_whole train.stop_after=$STEPS train.checkpoint.enabled=false > $L/whole.log 2>&1
echo "whole rc $?" >> $L/rc.txt
timeout 200 $P run_dir=/tmp/ramp_run_resumed train.stop_after=$STOP train.checkpoint.save_interval=1000 \
  > $L/first.log 2>&1
echo "resumed, first part rc $?" >> $L/rc.txt
timeout 200 $P run_dir=/tmp/ramp_run_resumed train.stop_after=$((STEPS - STOP)) train.checkpoint.save_interval=1000 \
  > $L/second.log 2>&1
echo "resumed, second part rc $?" >> $L/rc.txt
echo "all runs: $(( $(date +%s) - start )) s" >> $L/rc.txt
cp $L/rc.txt $OUT/rc.txt
cat $OUT/rc.txt
grep -h "batch_rampup" $L/*.log | head -8

python3 - "$STEPS" <<'PY' | tee $OUT/summary.txt
import json, sys
steps = int(sys.argv[1])
SKIP = {"step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "data_wait_s", "data_wait_rank", "data_decode_s",
        "data_frames_decoded", "data_images_decoded", "peak_mem_gb"}

def records(run):
    try:
        rows = [json.loads(x) for x in open(f"/tmp/ramp_run_{run}/metrics.jsonl")]
    except OSError:
        return {}
    return {r["step"]: r for r in rows if "loss" in r}

whole, resumed = records("whole"), records("resumed")
print("global batch by step (whole):", [whole[s].get("global_batch") for s in sorted(whole)])
print("consumed samples (whole):", [whole[s].get("consumed_samples") for s in sorted(whole)])
diff = None
for s in range(1, steps + 1):
    if s not in whole or s not in resumed:
        diff = f"step {s} missing"
        break
    for k in sorted((set(whole[s]) | set(resumed[s])) - SKIP):
        if whole[s].get(k) != resumed[s].get(k):
            diff = f"step {s} {k}: {whole[s].get(k)!r} vs {resumed[s].get(k)!r}"
            break
    if diff:
        break
print("resumed against whole:", "bit-identical at every step" if diff is None else "DIFFERS, first at " + diff)
print("last loss:", {k: r[max(r)]["loss"] for k, r in (("whole", whole), ("resumed", resumed)) if r})
PY
