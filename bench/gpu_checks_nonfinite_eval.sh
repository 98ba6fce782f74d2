#!/usr/bin/env bash
# The non-finite step check, train.eval.only and the process groups' rebuild on one GPU (NCCL, CUDA tensors, bf16),
# where the CPU suite runs them on gloo: a NaN in the loss at step 3 stops the tiny LM (exit 4) with the message
# naming the rank and its data; a NaN in the gradients before the reduction at step 2 is skipped with one skip
# allowed; the multimodal tiny recipe trains 4 steps and train.eval.only scores each of its checkpoints; one process
# builds 3 trainers in turn (tests/dist/layouts_driver.py), each with its process groups, and reports what each held
# for training and the descriptors open after each. Needs $OUT. bench/RESULTS.md "The NaN check and train.eval.only
# on the GPU". A check, no speed claim. The multimodal cases make synthetic videos: PyAV must be installed (carried
# as a wheel, as megatron-core is, on a machine without network).
set -u
P="torchrun --standalone --nproc_per_node 1 launch/pretrain.py parallel=single train.wandb.enabled=false train.log_interval=1"
KEYE_FAULT=nan_in_step:step=3:rank=0 timeout 120 $P recipe=keye_tiny_lm train.steps=5 train.warmup_steps=1 \
  train.checkpoint.save_interval=2 run_dir=/tmp/g_nan > $OUT/g_nan.log 2>&1
echo "nan_in_step rc $?" >> $OUT/g_rc.txt
KEYE_FAULT=nan_backward_in_step:step=2:rank=0 timeout 120 $P recipe=keye_tiny_lm train.steps=4 train.warmup_steps=1 \
  train.skip_nonfinite_steps=1 train.checkpoint.enabled=false run_dir=/tmp/g_nan_bwd > $OUT/g_nan_bwd.log 2>&1
echo "nan_backward_in_step rc $?" >> $OUT/g_rc.txt
timeout 150 $P recipe=keye_tiny train.steps=4 train.warmup_steps=1 train.checkpoint.save_interval=2 \
  train.checkpoint.keep_every=2 train.eval.interval=2 run_dir=/tmp/g_vl > $OUT/g_vl.log 2>&1
echo "keye_tiny rc $?" >> $OUT/g_rc.txt
timeout 150 $P recipe=keye_tiny train.eval.only=true train.eval.checkpoints=all train.checkpoint.init_from=/tmp/g_vl \
  run_dir=/tmp/g_vl_scores > $OUT/g_vl_scores.log 2>&1
echo "keye_tiny eval.only rc $?" >> $OUT/g_rc.txt
Q="train.wandb.enabled=false train.warmup_steps=1 train.log_interval=1 train.steps=2 parallel=single"
S="a=recipe=keye_tiny_lm $Q run_dir=d;b=recipe=keye_tiny_lm $Q train.eval.only=true run_dir=d;c=recipe=keye_tiny_lm $Q"
timeout 150 torchrun --standalone --nproc_per_node 1 tests/dist/layouts_driver.py $OUT/g_layouts.json /tmp/g_layouts \
  "$S" > $OUT/g_layouts.log 2>&1
echo "layouts rc $?" >> $OUT/g_rc.txt
python3 -c "import json; d = json.load(open('$OUT/g_layouts.json')); print('held', d['held']); print('open descriptors after each', d['open_fds'])"
cat $OUT/g_rc.txt
grep -h "non-finite\|skipped\|eval \|scoring\|frozen" $OUT/g_*.log | cut -c1-400
