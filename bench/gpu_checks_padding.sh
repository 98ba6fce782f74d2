#!/usr/bin/env bash
# Two GPUs (GPUS="0 0" runs part 2 on one): the padding at a packed row's end under context parallelism, and the
# tiny recipe's GPU curve against another tree's. Needs $OUT; BASE: a checkout of the tree to compare with (its own
# launch/pretrain.py runs there).
#  1. bench/bench_padding_tail_cp.py (CP 2 over both GPUs): $OUT/padding_tail_cp.json.
#  2. keye_tiny (40 steps, one GPU each, one process) on ONE set of synthetic videos made here (a set made twice is
#     not the same bytes: tests/dist/test_vision_layout_parity.py): BASE's tree and this one side by side with
#     train.deterministic=true (reproducible on the GPU, bench/RESULTS.md "train.deterministic on the GPU"), then
#     this tree twice side by side with the mode off (its run-to-run spread). metrics.jsonl of each run under
#     $OUT/tiny_<name>.jsonl and a table of the loss at steps 10, 20, 30, 40 in $OUT/tiny_summary.txt.
#  3. (PART=3 only) the 30B recipe cut to 2 LM layers (as bench/smoke_gpu_recipes.py --set 30b cuts it) on one GPU,
#     STEPS30 (10) steps with data.video.pad_to_seq_len=true (the default) and then false, one after the other on the
#     same synthetic videos: the median step time of steps 3 on and the peak memory ($OUT/slice_summary.txt).
#     tokens/s counts train.seq_length per row either way, so step times are compared.
# PART=1, 2 or 3 runs one part ("all": 1 and 2). DEVICE=cpu checks part 2's commands on a CPU (2 steps, gloo).
set -u
: "${OUT:?set OUT to a folder for the results}"
: "${BASE:?set BASE to the other tree}"
PART=${PART:-all}
STEPS=${STEPS:-40}
if [ "${DEVICE:-gpu}" = cpu ]; then STEPS=2; EXTRA="train.warmup_steps=1"; fi
if [ "$PART" = all ] || [ "$PART" = 1 ]; then
  python3 bench/bench_padding_tail_cp.py --out "$OUT/padding_tail_cp.json" > "$OUT/padding_tail_cp.log" 2>&1
  echo "padding_tail_cp rc=$?" | tee -a "$OUT/rc.txt"
fi
if [ "$PART" = 3 ]; then
  V=/tmp/pad_videos_30b
  rm -rf $V /tmp/pad_slice_*
  python3 launch/make_synthetic_videos.py --out $V --n 32 --shards > "$OUT/videos_30b.log" 2>&1 \
    || { echo "videos_30b rc=$?" | tee -a "$OUT/rc.txt"; exit 1; }
  for pad in true false; do
    CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node 1 launch/pretrain.py recipe=keye_30b_a3b \
      parallel=single train.wandb.enabled=false parallel.vit.recompute=true model.lm.num_layers=2 \
      data.video.shards=$V/shards train.global_batch_size=2 train.warmup_steps=1 train.log_interval=1 \
      train.steps=${STEPS30:-10} train.checkpoint.enabled=false data.video.pad_to_seq_len=$pad \
      run_dir=/tmp/pad_slice_$pad > "$OUT/slice_$pad.log" 2>&1
    echo "slice_$pad rc=$?" >> "$OUT/rc.txt"
    cp /tmp/pad_slice_$pad/metrics.jsonl "$OUT/slice_$pad.jsonl" 2>/dev/null
  done
  python3 bench/gpu_checks_padding_summary.py slice "$OUT" | tee "$OUT/slice_summary.txt"
  exit 0
fi
[ "$PART" = all ] || [ "$PART" = 2 ] || exit 0
V=/tmp/pad_videos
rm -rf $V /tmp/pad_run_*
python3 -c "from data.video_stream import ensure_synthetic_shards as e; print(e('$V', 24, 1234, rank=0))" \
  > "$OUT/videos.log" 2>&1 || { echo "videos rc=$?" | tee -a "$OUT/rc.txt"; exit 1; }
SHARDS=$(tail -1 "$OUT/videos.log")
ARGS="recipe=keye_tiny parallel=single train.wandb.enabled=false train.log_interval=1 train.memory_check=off"
ARGS="$ARGS data.video.shards=$SHARDS train.steps=$STEPS ${EXTRA:-}"
run() {   # name, gpu, tree, extra settings
  local name=$1 gpu=$2 tree=$3
  shift 3
  if [ "${DEVICE:-gpu}" = cpu ]; then gpu=""; fi
  (cd "$tree" && CUDA_VISIBLE_DEVICES=$gpu PYTHONPATH="${SITE:+$SITE:}$tree" torchrun --standalone --nproc_per_node 1 \
     launch/pretrain.py $ARGS run_dir=/tmp/pad_run_$name "$@" > "$OUT/tiny_$name.log" 2>&1)
  echo "tiny_$name rc=$?" >> "$OUT/rc.txt"
  cp /tmp/pad_run_$name/metrics.jsonl "$OUT/tiny_$name.jsonl" 2>/dev/null
}
read -r G0 G1 <<< "${GPUS:-0 1}"   # GPUS="0 0": both runs of a pair on one GPU
run base_det "$G0" "$BASE" train.deterministic=true & run this_det "$G1" "$PWD" train.deterministic=true & wait
run this_off1 "$G0" "$PWD" & run this_off2 "$G1" "$PWD" & wait
python3 bench/gpu_checks_padding_summary.py tiny "$OUT" | tee "$OUT/tiny_summary.txt"
