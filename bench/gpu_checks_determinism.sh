#!/usr/bin/env bash
# train.deterministic on one GPU (bf16, megatron's mixed-precision optimizer, NCCL, one process). Per recipe (RECIPES,
# default the four below), STEPS (10) steps: the mode off twice ("off1", "off2"), on once ("on"), and on stopped after
# STOP (5) steps and resumed to STEPS ("resumed", which also serves as the second run of the mode). Prints per recipe
# whether off1 == off2, and whether "on" equals "resumed" at every step before the stop (run to run) and after it
# (across the stop and resume): every logged value of every step, bit for bit (loss, grad_norm, vit_grad, the routers'
# and DSA's metrics), timings, decode counters and peak memory left out; and the speed of on against off.
# The DSA sparse stage runs its mode "on" with the Triton kernels' deterministic backward (kernels/dsa/README.md;
# DSA_ON_BACKEND=naive runs the reference instead, as the results in bench/RESULTS.md from before it did, when the
# mode refused the Triton backward), so its speed ratio is the deterministic kernels' against the atomics'.
# To stay within ~3 minutes the runs go in three phases, all recipes side by side: off1 and off2; on and the first
# half of resumed; its second half. Speed is the median step time of steps 3 to STOP, while each phase's 8 tiny
# processes share the GPU alike (one mode per phase): a ratio under sharing, not a single run's speed.
# Needs $OUT; logs stay in /tmp/det_logs, $OUT gets summary.txt, summary.json, rc.txt and logs.tgz.
# DEVICE=cpu RECIPES=keye_tiny_lm STEPS=2 STOP=1 checks the script on a CPU (fp32, gloo). bench/RESULTS.md.
set -u
: "${OUT:?set OUT to a folder for the results}"
RECIPES=${RECIPES:-keye_tiny keye_tiny_lm keye_tiny_vl_dsa_sparse keye_tiny_vl_ksa}
STEPS=${STEPS:-10}
STOP=${STOP:-5}
if [ "${DEVICE:-gpu}" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi
P="torchrun --standalone --nproc_per_node 1 launch/pretrain.py parallel=single train.wandb.enabled=false"
P="$P train.log_interval=1 train.memory_check=off"
L=/tmp/det_logs
rm -rf $L /tmp/det_run_*; mkdir -p $L

mode_args() {   # recipe, variant, tag -> that run's settings
  case $3 in
    off*) echo "train.deterministic=false train.stop_after=$STEPS train.checkpoint.enabled=false" ;;
    on) echo "train.deterministic=true train.stop_after=$STEPS train.checkpoint.enabled=false" ;;
    resumed_first) echo "train.deterministic=true train.stop_after=$STOP" ;;
    resumed_second) echo "train.deterministic=true train.stop_after=$((STEPS - STOP))" ;;
  esac
  case $3 in resumed*) echo "train.checkpoint.save_interval=1000" ;; esac
  case $1-$2 in
    keye_tiny_vl_dsa_sparse-on|keye_tiny_vl_dsa_sparse-resumed) echo "model.lm.dsa.backend=${DSA_ON_BACKEND:-auto}" ;;
  esac
}

phase() {   # variant:tag ...: every recipe's run of each, side by side
  local vt v tag r
  for vt in "$@"; do
    v=${vt%%:*}; tag=${vt#*:}
    for r in $RECIPES; do
      ( timeout 300 $P recipe=$r run_dir=/tmp/det_run_${r}_$v $(mode_args $r $v $tag) > $L/${r}_$tag.log 2>&1
        echo "$r $tag rc $?" >> $L/rc.txt ) &
    done
  done
  wait
}

start=$(date +%s)
phase off1:off1 off2:off2
phase on:on resumed:resumed_first     # resumed stops after STOP steps with a checkpoint
phase resumed:resumed_second          # resumes it (settings changed: stop_after alone) to STEPS
echo "all runs: $(( $(date +%s) - start )) s" >> $L/rc.txt
cp $L/rc.txt $OUT/rc.txt
cat $OUT/rc.txt

python3 - "$OUT" "$RECIPES" "$STEPS" "$STOP" <<'PY' | tee $OUT/summary.txt
import json, math, statistics, sys
out, recipes, steps, stop = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), int(sys.argv[4])
# left out: timings, and what each launch counts afresh or its allocator holds (a resumed launch's decode counters
# start at zero: docs/data.md "What the training log shows"; its peak memory need not be the uninterrupted run's)
TIMING = {"step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "data_wait_s", "data_wait_rank", "data_decode_s",
          "data_frames_decoded", "data_images_decoded", "peak_mem_gb"}

def records(recipe, v):
    try:
        rows = [json.loads(x) for x in open(f"/tmp/det_run_{recipe}_{v}/metrics.jsonl")]
    except OSError:
        return {}
    return {r["step"]: r for r in rows if "loss" in r}

def first_difference(a, b, wanted):
    for s in wanted:
        if s not in a or s not in b:
            return f"step {s} missing in {'the first' if s not in a else 'the second'}"
        for k in sorted((set(a[s]) | set(b[s])) - TIMING):
            if a[s].get(k) != b[s].get(k):
                return f"step {s} {k}: {a[s].get(k)!r} vs {b[s].get(k)!r}"
    return None

def speed(run):
    t = [r["step_time_s"] for s, r in run.items() if 3 <= s <= stop and "step_time_s" in r]
    return statistics.median(t) if t else math.nan

summary = {}
for recipe in recipes:
    runs = {v: records(recipe, v) for v in ("off1", "off2", "on", "resumed")}
    before, after = range(1, stop + 1), range(stop + 1, steps + 1)
    res = {"steps": {v: len(r) for v, r in runs.items()},
           "off_run_to_run": first_difference(runs["off1"], runs["off2"], range(1, steps + 1)),
           "on_run_to_run": first_difference(runs["on"], runs["resumed"], before),
           "on_across_resume": first_difference(runs["on"], runs["resumed"], after),
           "step_s_off": (speed(runs["off1"]), speed(runs["off2"])), "step_s_on": speed(runs["on"])}
    off = min(res["step_s_off"])
    res["on_over_off"] = res["step_s_on"] / off if off else math.nan
    summary[recipe] = res
    print(f"{recipe}: steps {res['steps']}")
    for k in ("off_run_to_run", "on_run_to_run", "on_across_resume"):
        print(f"  {k:17} {'bit-identical' if res[k] is None else 'DIFFERS, first at ' + res[k]}")
    print(f"  median step time: off {res['step_s_off'][0]:.4f} / {res['step_s_off'][1]:.4f} s, on "
          f"{res['step_s_on']:.4f} s ({res['on_over_off']:.2f} x off)")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
tar czf $OUT/logs.tgz -C /tmp det_logs $(cd /tmp && ls -d det_run_*/metrics.jsonl 2>/dev/null)
