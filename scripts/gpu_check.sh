#!/usr/bin/env bash
# Accept a GPU install before a long job: logits, TP2/CP2 parity, 20 training steps against the
# CPU, checkpoint resume, tokens/s, MFU and peak memory, document masking (sdpa and TE's THD), as
# a PASS/FAIL table.
#   bash scripts/gpu_check.sh            # all visible GPUs (1, 2 or 8)
#   bash scripts/gpu_check.sh --help     # what each check does, and the options
# Exit status 0 when nothing failed. The checks live in megatron_harpe/gpu_check.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"  # megatron-core's import notes are not results
exec "${PYTHON:-python}" -m megatron_harpe.gpu_check "$@"
