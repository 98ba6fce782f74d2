#!/usr/bin/env bash
# train.eval.only's peak memory on one GPU against training's, both against launch/memory.py's predictions: the
# 30B language model (keye_30b_a3b_lm: full width, 128 experts) cut to 2 layers, synthetic text at the recipe's 8K
# tokens, bf16. A 2-step run writes a checkpoint (its step lines give training's peak); train.eval.only scores it
# from another run directory (its eval line gives the process's peak). Needs $OUT. bench/RESULTS.md "train.eval.only
# on fewer GPUs". RECIPE=keye_tiny_lm runs the same on a CPU (a check of the script: no memory figures there).
set -u
C="parallel=single train.wandb.enabled=false model.lm.num_layers=2 train.micro_batch_size=1 train.global_batch_size=2
 train.warmup_steps=1 train.log_interval=1 train.eval.batches=1"
for what in train eval; do
  X="train.steps=2 train.checkpoint.save_interval=2 run_dir=/tmp/eo_train"
  [ $what = eval ] && X="train.eval.only=true train.checkpoint.init_from=/tmp/eo_train run_dir=/tmp/eo_eval"
  python3 launch/memory.py recipe=${RECIPE:-keye_30b_a3b_lm} $C $X world_size=1 > $OUT/eo_predicted_$what.txt 2>&1
  timeout 240 torchrun --standalone --nproc_per_node 1 launch/pretrain.py recipe=${RECIPE:-keye_30b_a3b_lm} $C $X \
    > $OUT/eo_$what.log 2>&1
  echo "$what rc $?" >> $OUT/eo_rc.txt
done
grep -h "predicted peak" $OUT/eo_predicted_*.txt; grep -h "mem " $OUT/eo_*.log | cut -c1-300
