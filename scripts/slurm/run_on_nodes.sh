#!/usr/bin/env bash
# The body every sbatch script here shares: environment, preemption handling, and one
# `python -m megatron_harpe.launch` per node (which execs torchrun with a c10d rendezvous on the
# job's first node). Called from an sbatch script, inside the allocation:
#
#   bash scripts/slurm/run_on_nodes.sh configs/X.yaml [--section.key value ...]
#
# Knobs (environment variables, all optional):
#   GPUS_PER_NODE    processes per node            (default: SLURM_GPUS_ON_NODE, else 8)
#   PYTHON           interpreter with megatron_harpe installed (default: python)
#   CONTAINER_IMAGE  run inside this image with pyxis/enroot, e.g. an image built from ./Dockerfile
#   STOP_GRACE       seconds the trainer gets to save and exit after USR1 before the job is
#                    requeued anyway (default 480; keep it below the --signal lead time)
#   NCCL_*           anything below can be overridden from the submitting shell
set -euo pipefail
CONFIG=${1:?usage: run_on_nodes.sh CONFIG.yaml [--section.key value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-$PWD}"  # sbatch runs a copy of the script; work from the repository

# ---- NCCL and PyTorch distributed settings (adjust to your fabric; `ibv_devices` lists HCAs)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=ib0,bond0     # interface(s) for NCCL bootstrap and socket traffic
# export NCCL_IB_HCA=mlx5_0,mlx5_1        # InfiniBand adapters NCCL may use
# export NCCL_IB_GID_INDEX=3              # RoCE fabrics usually need the RoCEv2 GID index
# export NCCL_IB_TIMEOUT=22               # larger IB retry timeout on big or busy fabrics
# export NCCL_NVLS_ENABLE=0               # if NVLink SHARP initialisation fails on your nodes
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the job instead of hanging it
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}        # megatron-core's TP/SP overlap relies on ordered kernel launch
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONUNBUFFERED=1

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
PYTHON=${PYTHON:-python}
CONTAINER_ARGS=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$PWD:$PWD" --container-workdir="$PWD")
fi

echo "[slurm] job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}:" \
     "${SLURM_NNODES:-1} node(s) x ${GPUS_PER_NODE} GPU(s) on ${SLURM_JOB_NODELIST:-?}; config $CONFIG"

# ---- preemption: `#SBATCH --signal=B:USR1@<seconds>` sends USR1 to this shell that long before the
# time limit. The shell creates the trainer's stop file (checkpoint.stop_file): every rank saves a
# checkpoint after its current step, the trainer deletes the file and exits, and the job is
# requeued. Slurm starts it again later (same id, SLURM_RESTART_COUNT+1) and the trainer resumes
# from that checkpoint, so no step is redone. If the trainer has not exited STOP_GRACE seconds
# after USR1, the job is requeued anyway and resumes from its latest complete checkpoint.
# Preemption by the scheduler itself requeues without this handler, thanks to `#SBATCH --requeue`;
# its SIGTERM (like that of scancel or the time limit) makes the trainer save after its current
# step, within the cluster's KillWait (docs/slurm.md).
STOP_FILE="$PWD/.harpe_stop_${SLURM_JOB_ID:-$$}"
STOP_GRACE=${STOP_GRACE:-480}
rm -f "$STOP_FILE"  # left over from a run that was killed before it could delete it
stop_and_requeue() {
    interrupted=1
    echo "[slurm] time limit near: asking the trainer to save and exit (${STOP_FILE})"
    touch "$STOP_FILE"
    ( trap 'kill "$SLEEPER" 2>/dev/null; exit 0' TERM  # the watchdog is cancelled when the trainer exits in time
      sleep "$STOP_GRACE" >/dev/null 2>&1 & SLEEPER=$!
      wait "$SLEEPER"
      echo "[slurm] trainer still running ${STOP_GRACE}s after USR1: requeueing job ${SLURM_JOB_ID} now"
      scontrol requeue "${SLURM_JOB_ID}" ) &
    WATCHDOG_PID=$!
}
interrupted=0
stopping=0
trap stop_and_requeue USR1

srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE" \
     --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 ${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"} \
     "$PYTHON" -m megatron_harpe.launch --nproc-per-node "$GPUS_PER_NODE" -- \
     pretrain_harpe.py --config "$CONFIG" --checkpoint.stop_file "$STOP_FILE" "$@" &
SRUN_PID=$!
# A trapped signal makes `wait` return early: wait again for srun's own exit status.
status=0
wait "$SRUN_PID" || status=$?
while (( interrupted )); do
    interrupted=0
    stopping=1
    status=0
    wait "$SRUN_PID" || status=$?
done
if (( stopping )); then
    kill "$WATCHDOG_PID" 2>/dev/null || true
    if [[ "$status" == 0 && ! -e "$STOP_FILE" ]]; then  # the trainer saved, deleted the file and exited
        echo "[slurm] trainer saved and exited: requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    rm -f "$STOP_FILE"  # still there: training finished (or failed) before it saw the file
fi
exit "$status"
