#!/usr/bin/env bash
# DSA and KSA models through the Hugging Face layout on one GPU: the tiny recipes train (bf16, Triton kernels) and
# checkpoint; the checkpoints export; transformers loads each export through the directory's own code
# (trust_remote_code) on the GPU, with the machine's transformers and with the pinned 5.24 (bench/hf_code_gpu.py).
# Needs $OUT (a folder for the logs and hf.jsonl) and, for the pinned run, the transformers 5.24 wheel in
# .device/whl_hf/ (the GPU machine has no network). bench/RESULTS.md "DSA and KSA models run by transformers".
set -u
C="parallel=single train.precision=bf16 train.seq_length=256 train.micro_batch_size=1 train.global_batch_size=4 train.warmup_steps=1 train.wandb.enabled=false train.log_interval=1 train.checkpoint.init_from= train.steps=3 train.checkpoint.save_interval=3"
for v in dsa ksa; do
  R=keye_tiny_dsa_sparse; [ $v = ksa ] && R=keye_tiny_ksa
  timeout 200 torchrun --standalone --nproc_per_node 1 launch/pretrain.py recipe=$R $C run_dir=/tmp/a_$v > $OUT/a_$v.log 2>&1
  echo "a_$v rc $?" >> $OUT/rc.txt
  timeout 120 python3 launch/convert.py export /tmp/a_$v /tmp/hf_$v > $OUT/export_$v.log 2>&1
  echo "export_$v rc $?" >> $OUT/rc.txt
done
timeout 240 python3 bench/hf_code_gpu.py image >> $OUT/hf.jsonl 2> $OUT/hf_image.err
echo "hf image rc $?" >> $OUT/rc.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_hf .device/whl_hf/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site_hf:$PYTHONPATH timeout 240 python3 bench/hf_code_gpu.py pinned >> $OUT/hf.jsonl 2> $OUT/hf_pinned.err
echo "hf pinned rc $?" >> $OUT/rc.txt
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
