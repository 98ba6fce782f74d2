#!/usr/bin/env bash
# Activation offload on one GPU after this stop's changes to parallel/offload.py (a saved tensor's version is checked
# when backward reads it back; each stored handle keeps a weak reference to the device tensor it copied): the 30B-A3B
# language model's full width cut to $LAYERS layers of $EXPERTS experts (default 16 of 8), $SEQ tokens (131072), full
# recompute, 3 steps, without and with parallel.offload=activations (train.memory_check=warn: the estimate's 10%
# margin over the one without offload is more than an H100 holds). Reads each run's metrics.jsonl (losses, s/step,
# torch.cuda.max_memory_allocated) and launch/memory.py's prediction for the same command. Needs $OUT. A check, no
# speed claim (bench/RESULTS.md, "Activation offload on one GPU after the in-place check").
set -u
A="recipe=keye_30b_a3b_lm parallel=single model.lm.num_layers=${LAYERS:-16} model.lm.num_experts=${EXPERTS:-8}"
A="$A train.seq_length=${SEQ:-131072} train.micro_batch_size=1 train.global_batch_size=1 parallel.recompute=full"
for off in none activations; do
  rm -rf /tmp/g_off_$off
  timeout 280 torchrun --standalone --nproc_per_node 1 launch/pretrain.py $A parallel.offload=$off train.steps=3 \
    train.warmup_steps=1 train.log_interval=1 train.checkpoint.enabled=false train.wandb.enabled=false \
    train.memory_check=warn run_dir=/tmp/g_off_$off > $OUT/off_$off.log 2>&1
  echo "offload=$off rc $?" >> $OUT/off_rc.txt
  python3 launch/memory.py $A parallel.offload=$off world_size=1 > $OUT/off_${off}_predicted.txt 2>&1
done
python3 - > $OUT/offload.json <<'PY'
import json
out = {}
for off in ("none", "activations"):
    try:
        recs = [json.loads(s) for s in open(f"/tmp/g_off_{off}/metrics.jsonl")]
    except OSError as e:
        out[off] = {"error": str(e)}
        continue
    steps = [r for r in recs if "loss" in r]
    out[off] = {"losses": [r["loss"] for r in steps], "step_time_s": [r["step_time_s"] for r in steps],
                "peak_mem_gb": max(r.get("peak_mem_gb", 0) for r in steps)}
print(json.dumps(out, indent=1))
PY
cat $OUT/offload.json
