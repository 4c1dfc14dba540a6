#!/usr/bin/env bash
# Before a long job: run the preset's own training path at reduced size on this node (its parallel
# layout, attention backend, sequence parallelism, TE's p2p ring, recompute, the sharding engine) and
# print a PASS/FAIL table: logits, parity of each layout with one device, resume on another layout,
# in-training evaluation, peak memory against the planner, tokens/s and MFU; and document masking
# (packed documents against each alone, on sdpa and Transformer Engine's THD).
#   bash scripts/gpu_check.sh                                   # the HARPE 7B preset, every GPU here
#   bash scripts/gpu_check.sh --config configs/llama2_7b_128k_abf.yaml --gpus 8
#   bash scripts/gpu_check.sh --help                            # every check, the tolerances, the options
# Exit status 0 when nothing failed; docs/scale-out.md says what each FAIL means.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"  # megatron-core's import notes are not results
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # as pretrain_harpe.py runs
exec "${PYTHON:-python}" -m megatron_harpe.gpu_check "$@"
