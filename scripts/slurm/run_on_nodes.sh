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
# time limit. Requeue the job; Slurm then stops the step and starts the job again later, with the
# same id and SLURM_RESTART_COUNT+1, and the trainer resumes from its latest complete checkpoint
# (work since the last `checkpoint.save_interval` step is redone). Preemption by the scheduler
# itself requeues without this handler, thanks to `#SBATCH --requeue`.
requeue() {
    interrupted=1
    echo "[slurm] time limit near: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
}
interrupted=0
trap requeue USR1

srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE" \
     --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 ${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"} \
     "$PYTHON" -m megatron_harpe.launch --nproc-per-node "$GPUS_PER_NODE" -- \
     pretrain_harpe.py --config "$CONFIG" "$@" &
SRUN_PID=$!
# A trapped signal makes `wait` return early: wait again for srun's own exit status.
status=0
wait "$SRUN_PID" || status=$?
while (( interrupted )); do
    interrupted=0
    status=0
    wait "$SRUN_PID" || status=$?
done
exit "$status"
