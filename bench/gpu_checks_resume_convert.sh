#!/usr/bin/env bash
# A resume past a checkpoint that fails to load, a resume with another learning rate, and the export paths, on one
# GPU (NCCL, CUDA tensors, bf16), where the CPU suite runs them on gloo:
# - the tiny LM saves at steps 3 and 6; step 6's checksum records are removed (as when a run ends before its save's
#   background checksum pass) and the first half of one shard zeroed: the relaunch logs that step 6 could not be
#   loaded and resumes from step 3 (exit 0);
# - the same run resumed once more with train.lr=1e-3: the logged lr follows the new schedule;
# - the run exports to HF twice into one directory, the second time in bf16 with small shards: the first export's
#   single file is removed, and `verify --checkpoint` of the bf16 export passes (the checkpoint's weights rounded to
#   bf16 first).
# Needs $OUT. bench/RESULTS.md "A checkpoint that fails to load, and the exports, on the GPU". A check, no speed claim.
set -u
P="torchrun --standalone --nproc_per_node 1 launch/pretrain.py recipe=keye_tiny_lm parallel=single"
P="$P train.wandb.enabled=false train.log_interval=1 train.warmup_steps=1 train.checkpoint.save_interval=3"
R=/tmp/g_rs
rm -rf $R /tmp/g_hf
timeout 150 $P train.steps=6 run_dir=$R > $OUT/g_rs_first.log 2>&1
echo "first rc $?" >> $OUT/g_rc.txt
rm -f $R/checkpoints/step_000006/CHECKSUMS.rank*.json
python3 - <<'EOF'
from pathlib import Path
p = sorted(Path("/tmp/g_rs/checkpoints/step_000006").glob("__0_*.distcp"))[0]
b = bytearray(p.read_bytes())
b[: len(b) // 2] = bytes(len(b) // 2)
p.write_bytes(bytes(b))
print("zeroed the first half of", p)
EOF
timeout 150 $P train.steps=8 run_dir=$R > $OUT/g_rs_fallback.log 2>&1
echo "fallback rc $?" >> $OUT/g_rc.txt
timeout 150 $P train.steps=10 train.lr=1e-3 train.min_lr=1e-4 run_dir=$R > $OUT/g_rs_lr.log 2>&1
echo "lr rc $?" >> $OUT/g_rc.txt
timeout 120 python3 launch/convert.py export $R /tmp/g_hf > $OUT/g_export1.log 2>&1
echo "export fp32 rc $?" >> $OUT/g_rc.txt
timeout 120 python3 launch/convert.py export $R /tmp/g_hf --dtype bf16 --max-shard-size 1MB > $OUT/g_export2.log 2>&1
echo "export bf16 over it rc $?" >> $OUT/g_rc.txt
ls /tmp/g_hf >> $OUT/g_rc.txt
timeout 150 python3 launch/convert.py verify /tmp/g_hf --checkpoint $R --model keye_tiny > $OUT/g_verify.log 2>&1
echo "verify bf16 export rc $?" >> $OUT/g_rc.txt
cat $OUT/g_rc.txt
grep -h "could not be loaded\|resumed from\|settings changed\|held an earlier save\|rounded\|exported" $OUT/g_*.log \
  | cut -c1-400
grep -h "step " $OUT/g_rs_lr.log | cut -c1-200
tail -2 $OUT/g_verify.log | cut -c1-600
