#!/usr/bin/env bash
# This stop's data, evaluation and estimate changes on one GPU (NCCL, CUDA tensors, the GPU machine's torch), where
# the CPU suite runs them on gloo:
# - video data that ends before train.steps (data.video.num_epochs=1) saves the steps trained since the last
#   checkpoint before its config error (the rank's exit 2), and a relaunch with train.steps at the data's end
#   resumes from that checkpoint and finishes;
# - train.eval.only over a run directory whose newest checkpoint's shard was overwritten in place (same size): it
#   names that checkpoint corrupted and scores the next older one, whose val_loss the run's own evaluation logged;
# - the memory estimate of keye_tiny_dsa_sparse (launch/memory.py, the top-k buffer now charged by its shape)
#   against the peak the GPU run's metrics.jsonl records.
# The Hugging Face side (static-cache and assisted generation of the exports) is bench/hf_code_gpu.sh's.
# Written at f5c4a4d's tree; ran on an H100 at 062b0ea's (bench/RESULTS.md).
# Needs $OUT. A check, no speed claim. torchrun exits 1 whenever a rank fails; a rank's own exit code is in its
# log's "exitcode" line. bench/RESULTS.md "Data that ends, eval-only over a corrupted checkpoint, the exports'
# caches, on the GPU".
set -u
P="torchrun --standalone --nproc_per_node 1 launch/pretrain.py parallel=single train.wandb.enabled=false"
P="$P train.log_interval=1 train.warmup_steps=1"
rm -rf /tmp/g_end /tmp/g_ev /tmp/g_mem
timeout 200 $P recipe=keye_tiny data.video.num_epochs=1 train.steps=40 train.checkpoint.save_interval=4 \
  run_dir=/tmp/g_end > $OUT/g_end.log 2>&1
echo "data ends rc $? (1 from torchrun; the rank's exit 2 wanted)" >> $OUT/g_rc.txt
grep -h "exitcode" $OUT/g_end.log | tail -1 >> $OUT/g_rc.txt
ls /tmp/g_end/checkpoints >> $OUT/g_rc.txt 2>&1
last=$(ls -d /tmp/g_end/checkpoints/step_* 2>/dev/null | tail -1)
n=$((10#${last##*_}))
timeout 200 $P recipe=keye_tiny data.video.num_epochs=1 train.steps=$n train.checkpoint.save_interval=4 \
  run_dir=/tmp/g_end > $OUT/g_end_again.log 2>&1
echo "relaunch with train.steps=$n rc $? (0 wanted: nothing left to train)" >> $OUT/g_rc.txt
timeout 200 $P recipe=keye_tiny_lm train.steps=4 train.checkpoint.save_interval=2 train.eval.interval=2 \
  run_dir=/tmp/g_ev > $OUT/g_ev.log 2>&1
echo "eval run rc $?" >> $OUT/g_rc.txt
python3 - >> $OUT/g_rc.txt 2>&1 <<'EOF'
from pathlib import Path
p = sorted(Path("/tmp/g_ev/checkpoints/step_000004").glob("__0_*.distcp"))[0]
b = bytearray(p.read_bytes())
n = len(b) // 2
b[n:n + 4096] = bytes(x ^ 0xFF for x in b[n:n + 4096])   # same size, another content
p.write_bytes(bytes(b))
print("overwrote 4 KiB in the middle of", p)
EOF
timeout 200 $P recipe=keye_tiny_lm train.steps=4 train.eval.only=true run_dir=/tmp/g_ev > $OUT/g_evonly.log 2>&1
echo "eval-only rc $? (0 wanted: step 2 scored)" >> $OUT/g_rc.txt
grep -h '"step": 2,' /tmp/g_ev/eval.jsonl | cut -c1-200 >> $OUT/g_rc.txt
timeout 200 $P recipe=keye_tiny_dsa_sparse train.steps=3 train.precision=bf16 train.checkpoint.enabled=false \
  run_dir=/tmp/g_mem > $OUT/g_mem.log 2>&1
echo "dsa sparse rc $?" >> $OUT/g_rc.txt
python3 launch/memory.py recipe=keye_tiny_dsa_sparse world_size=1 parallel=single train.precision=bf16 \
  > $OUT/g_mem_estimate.txt 2>&1
python3 - >> $OUT/g_rc.txt 2>&1 <<'EOF'
import json
peak = max(json.loads(s).get("peak_mem_gb", 0) for s in open("/tmp/g_mem/metrics.jsonl"))
print(f"keye_tiny_dsa_sparse measured peak {peak * 1e9 / 2**30:.3f} GiB (metrics.jsonl peak_mem_gb {peak:.4f} GB)")
EOF
grep -h "transient\|predicted peak" $OUT/g_mem_estimate.txt >> $OUT/g_rc.txt
cat $OUT/g_rc.txt
grep -h "config error\|saved checkpoint\|resumed from\|nothing to train\|corrupted\|scoring\|eval " \
  $OUT/g_end*.log $OUT/g_evonly.log | cut -c1-400
