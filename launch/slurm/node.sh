#!/usr/bin/env bash
# One SLURM task per node: starts torchrun with the rendezvous taken from the SLURM environment.
# Called by pretrain.sbatch through srun; every argument is passed to launch/pretrain.py.
#   SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST   set by SLURM
#   GPUS_PER_NODE   processes per node (default: the GPUs this node shows, else 1)
#   MASTER_ADDR / MASTER_PORT   rendezvous host / port (default: first node of the job / 29400)
#   KEYE_LAUNCH_STARTED   when the job step began, seconds since the epoch (pretrain.sbatch sets it; default: now)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT   seconds torchrun gives its workers to exit after it passes them a stop signal
#                   (SIGTERM, SIGUSR1) before it kills them (default here: 600; torchrun's own: 30)
# torchrun tees each worker's stdout and stderr into <RUN_LOG_DIR>/torchrun-node<K>/<job id>_*/attempt_<N>/<local
# rank>/ (RUN_LOG_DIR: pretrain.sbatch's run directory; default: <repo>/runs/slurm-<job id>), lines on the console
# prefixed [default<local rank>]:.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
: "${SLURM_JOB_ID:?not inside a SLURM job (SLURM_JOB_ID unset)}"
: "${SLURM_NNODES:?SLURM_NNODES unset}"
: "${SLURM_NODEID:?SLURM_NODEID unset}"
if [[ -z "${MASTER_ADDR:-}" ]]; then
  MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
fi
MASTER_PORT="${MASTER_PORT:-29400}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE="$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
# torchrun forwards these signals to its workers; SIGUSR1 (SLURM's early warning, `--signal=USR1@<seconds>` delivered
# to the tasks) is not among its defaults and would kill torchrun itself, leaving the workers to be killed with the
# job step before they checkpoint. PET_SIGNALS_TO_HANDLE is its --signals-to-handle, which then sets
# TORCHELASTIC_SIGNALS_TO_HANDLE (what its process context reads) over any value given.
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCHELASTIC_SIGNALS_TO_HANDLE="$PET_SIGNALS_TO_HANDLE"
# Having passed a stop signal on, torchrun kills the workers that have not exited TORCH_ELASTIC_SHUTDOWN_TIMEOUT s later
# (torch.distributed.launcher.api; the --shutdown-timeout flag, PET_SHUTDOWN_TIMEOUT, wins over it): 30 s by default,
# less than a large model's step plus its stop checkpoint (37 s for a 30B save, README), which was then lost. The
# default here leaves that time; a stuck worker then holds the node longer, until SLURM ends the job step at its end.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
if [[ ! "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" =~ ^[0-9]+$ ]]; then
  echo "node.sh: TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT is not a whole number of seconds;" \
       "set it to the time a step and a checkpoint save take at most (or unset it: 600)" >&2
  exit 2
fi
torch_dir="$(python3 -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])' \
  2>/dev/null || true)"
launcher="$torch_dir/distributed/launcher/api.py"   # where torch reads it; older torch has 30 s fixed
if [[ -n "$torch_dir" && -f "$launcher" ]] && ! grep -q TORCH_ELASTIC_SHUTDOWN_TIMEOUT "$launcher"; then
  echo "node.sh: this torch ($torch_dir) has no TORCH_ELASTIC_SHUTDOWN_TIMEOUT: torchrun kills the workers 30 s after" \
       "it passes them SIGTERM or SIGUSR1, which may cut a stop's checkpoint short; pretrain.sbatch's warning (a STOP" \
       "file, --signal=B:USR1) has no such limit" >&2
fi
# the trainer removes a STOP file older than its launch as an earlier launch's (train/preemption.py), and its own
# start comes later than this: a STOP touched meanwhile is this launch's
export KEYE_LAUNCH_STARTED="${KEYE_LAUNCH_STARTED:-$(date +%s.%N)}"
# NVLink multicast stays off (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
mkdir -p "${RUN_LOG_DIR:-$repo/runs/slurm-$SLURM_JOB_ID}"
exec python3 -m torch.distributed.run \
  --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
  --tee=3 --log_dir="${RUN_LOG_DIR:-$repo/runs/slurm-$SLURM_JOB_ID}/torchrun-node$SLURM_NODEID" \
  "$repo/launch/pretrain.py" "$@"
