#!/usr/bin/env bash
# train.spike on one GPU (bf16, megatron's mixed-precision optimizer, NCCL), where the CPU suite runs it in fp32 on
# gloo. The tiny LM, 10 steps: "off" (train.spike off), "on" (factor 20, window 3: nothing spikes, so its losses must
# be the off run's: the step split around the decision is megatron's step; factor 20 as the multimodal recipe's own
# early norms jump by more than 5 x), "spike" (the gradients of step 6 x 1000, KEYE_FAULT=spike_grad_in_step)
# against "nan" (step 6's gradients NaN, skipped by train.skip_nonfinite_steps=1): the skipped step updates nothing
# in both, so steps 7-10 must match. The multimodal tiny recipe the same way (its vision tower's update is discarded
# too). FACTOR (20) and RECIPES (both) may be set. Needs $OUT. bench/RESULTS.md "train.spike on the GPU". A check,
# no speed claim.
set -u
P="torchrun --standalone --nproc_per_node 1 launch/pretrain.py parallel=single train.wandb.enabled=false"
P="$P train.log_interval=1"
S="train.spike.factor=${FACTOR:-20} train.spike.window=3"
L=/tmp/sp_logs; mkdir -p $L   # the logs stay there: $OUT brings back few files
for recipe in ${RECIPES:-keye_tiny_lm keye_tiny}; do
  C="recipe=$recipe train.stop_after=10 train.checkpoint.enabled=false"
  timeout 150 $P $C run_dir=/tmp/sp_${recipe}_off > $L/${recipe}_off.log 2>&1; echo "$recipe off rc $?" >> $OUT/rc.txt
  timeout 150 $P $C $S run_dir=/tmp/sp_${recipe}_on > $L/${recipe}_on.log 2>&1; echo "$recipe on rc $?" >> $OUT/rc.txt
  KEYE_FAULT=spike_grad_in_step:step=6 timeout 150 $P $C $S run_dir=/tmp/sp_${recipe}_spike \
    > $L/${recipe}_spike.log 2>&1
  echo "$recipe spike rc $?" >> $OUT/rc.txt
  KEYE_FAULT=nan_grad_in_step:step=6 timeout 150 $P $C train.skip_nonfinite_steps=1 run_dir=/tmp/sp_${recipe}_nan \
    > $L/${recipe}_nan.log 2>&1; echo "$recipe nan rc $?" >> $OUT/rc.txt
  for v in off on spike nan; do cp /tmp/sp_${recipe}_$v/metrics.jsonl $OUT/${recipe}_$v.metrics.jsonl 2>/dev/null; done
  cp /tmp/sp_${recipe}_spike/spikes.jsonl $OUT/${recipe}_spikes.jsonl 2>/dev/null
done
cat $OUT/rc.txt
python3 - "$OUT" "${RECIPES:-keye_tiny_lm keye_tiny}" <<'PY'
import json, sys
out = sys.argv[1]
for recipe in sys.argv[2].split():
    runs = {}
    for v in ("off", "on", "spike", "nan"):
        try:
            rows = [json.loads(x) for x in open(f"{out}/{recipe}_{v}.metrics.jsonl")]
        except OSError:
            continue
        runs[v] = {r["step"]: r for r in rows if "loss" in r}
    loss = {v: {s: r["loss"] for s, r in rs.items()} for v, rs in runs.items()}
    print(recipe, {v: len(x) for v, x in loss.items()})
    if "off" in loss and "on" in loss:
        print("  on == off, every step:", loss["on"] == loss["off"])
    if "spike" in loss and "nan" in loss:
        late = [s for s in loss["spike"] if s > 6]
        print("  spike == nan after step 6:", [loss["spike"][s] == loss["nan"].get(s) for s in late])
        early = [s for s in loss["spike"] if s <= 6]
        print("  spike == off up to step 6:", all(loss["spike"][s] == loss["off"].get(s) for s in early))
        r6 = runs["spike"].get(6, {})
        print("  step 6:", {k: r6.get(k) for k in ("loss", "grad_norm", "spike_skipped_steps")},
              "off step 6 grad_norm:", runs["off"].get(6, {}).get("grad_norm"))
PY
