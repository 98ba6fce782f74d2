#!/usr/bin/env bash
# This stop's launch-side changes on one GPU (NCCL, CUDA tensors, bf16, the GPU machine's torch and torchrun), where
# the CPU suite runs them on gloo:
# - a skipped non-finite step (KEYE_FAULT nan at step 3, train.skip_nonfinite_steps=1): every line of metrics.jsonl
#   and nonfinite.jsonl is strict JSON (a parser refusing NaN reads them), the skipped values named in "nonfinite";
# - the settings check of the device lets a GPU run bf16 and the Triton experts (model.lm.experts_impl=triton);
# - launch/slurm/node.sh under this torchrun: SIGUSR1 to it reaches the worker, which stops at its step boundary
#   with a checkpoint (torchrun's own default for SIGUSR1 is to die, leaving the worker training);
# - a resume with another train.trainable is a config error (exit 2) before any process group;
# - video data that ends before train.steps (data.video.num_epochs=1) ends in a config error naming it (exit 2).
# Needs $OUT. A check, no speed claim. Run on one H100 at aa2dee9's tree (bench/RESULTS.md, "The record files, the
# device check and SIGUSR1 through node.sh, on the GPU"). torchrun itself exits 1 whenever a rank fails; the rank's
# exit code (2 for a config error) is in its log's "exitcode" line, which the last greps print.
set -u
P="torchrun --standalone --nproc_per_node 1 launch/pretrain.py parallel=single train.wandb.enabled=false"
P="$P train.log_interval=1 train.warmup_steps=1"
rm -rf /tmp/g_nf /tmp/g_dsa /tmp/g_tri /tmp/g_usr1 /tmp/g_end
KEYE_FAULT="nan_in_step:step=3" timeout 150 $P recipe=keye_tiny_lm train.steps=5 train.skip_nonfinite_steps=1 \
  run_dir=/tmp/g_nf > $OUT/g_nf.log 2>&1
echo "nonfinite rc $?" >> $OUT/g_rc.txt
python3 - >> $OUT/g_rc.txt 2>&1 <<'EOF'
import json
def strict(x):
    raise ValueError(f"not strict JSON: {x}")
for name in ("metrics.jsonl", "nonfinite.jsonl"):
    lines = open(f"/tmp/g_nf/{name}").read().splitlines()
    recs = [json.loads(s, parse_constant=strict) for s in lines]
    print(name, len(recs), "lines, strict JSON; nonfinite fields:",
          [r.get("nonfinite") for r in recs if "nonfinite" in r])
EOF
timeout 150 $P recipe=keye_tiny_lm train.steps=3 model.lm.experts_impl=triton run_dir=/tmp/g_tri > $OUT/g_tri.log 2>&1
echo "experts_impl=triton rc $?" >> $OUT/g_rc.txt
timeout 150 $P recipe=keye_tiny_dsa_warmup train.steps=3 run_dir=/tmp/g_dsa > $OUT/g_dsa.log 2>&1
echo "dsa warm-up rc $?" >> $OUT/g_rc.txt
timeout 150 $P recipe=keye_tiny_dsa_warmup train.steps=3 run_dir=/tmp/g_dsa train.trainable=all \
  > $OUT/g_trainable.log 2>&1
echo "resume with another trainable rc $? (1 from torchrun, the rank's exit 2 wanted)" >> $OUT/g_rc.txt
# node.sh as a one-node SLURM task, SIGUSR1 to it (its exec'd torchrun) once step 2's checkpoint is committed
env -u PET_SIGNALS_TO_HANDLE -u TORCHELASTIC_SIGNALS_TO_HANDLE SLURM_JOB_ID=77 SLURM_NNODES=1 SLURM_NODEID=0 \
  SLURM_JOB_NODELIST=localhost MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 GPUS_PER_NODE=1 RUN_LOG_DIR=/tmp/g_usr1/logs \
  launch/slurm/node.sh recipe=keye_tiny_lm parallel=single train.wandb.enabled=false train.steps=2000 \
  train.checkpoint.save_interval=2 run_dir=/tmp/g_usr1 > $OUT/g_usr1.log 2>&1 &
agent=$!
for _ in $(seq 300); do [ -e /tmp/g_usr1/checkpoints/step_000002/COMPLETE.json ] && break; sleep 0.5; done
workers=$(pgrep -P $agent | tr '\n' ' ')
kill -USR1 $agent
timeout 120 tail --pid=$agent -f /dev/null
wait $agent; echo "node.sh after SIGUSR1 rc $? (torchrun raises SignalException: 1)" >> $OUT/g_rc.txt
sleep 5
for w in $workers; do [ -e /proc/$w ] && echo "worker $w still running" >> $OUT/g_rc.txt && kill -9 $w; done
grep -h "stop requested\|checkpoint saved\|saved checkpoint" /tmp/g_usr1/logs/rank0.log 2>/dev/null | tail -2 \
  | cut -c1-300 >> $OUT/g_rc.txt
ls /tmp/g_usr1/checkpoints >> $OUT/g_rc.txt 2>&1
timeout 300 $P recipe=keye_tiny data.video.num_epochs=1 train.steps=40 train.checkpoint.enabled=false \
  run_dir=/tmp/g_end > $OUT/g_end.log 2>&1
echo "data ends rc $? (1 from torchrun, the rank's exit 2 wanted)" >> $OUT/g_rc.txt
cat $OUT/g_rc.txt
grep -h "config error" $OUT/g_trainable.log $OUT/g_end.log | sort -u | cut -c1-400
grep -h "exitcode" $OUT/g_trainable.log $OUT/g_end.log
grep -h "step .*loss" $OUT/g_nf.log $OUT/g_tri.log $OUT/g_dsa.log | cut -c1-160
