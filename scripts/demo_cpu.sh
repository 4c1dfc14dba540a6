#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, narrated: data -> HARPE training with context
# parallelism on 2 processes -> needle/passkey evaluation with a plot -> export to Hugging Face
# format -> verification that transformers reproduces the megatron model.
#
#   bash scripts/demo_cpu.sh            # about 5 minutes on 2 cores; outputs under runs/demo_cpu/
#
# Re-running resumes: finished steps are skipped (data is prepared once, training resumes from
# its latest checkpoint). Delete runs/demo_cpu to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN=runs/demo_cpu

echo "== 1/4 train: a tiny 4-layer HARPE model (8 heads, 4 k/v groups, one base per group),"
echo "==     2 processes with context parallelism 2; the offline corpus is prepared on first use"
torchrun --standalone --nproc-per-node 2 pretrain_harpe.py --config configs/demo_cpu.yaml "$@"

echo "== 2/4 evaluate the megatron checkpoint: passkey and single-needle retrieval, with plots"
python tools/evaluate.py --model "$RUN/checkpoints" --task passkey,niah_single_1 --lengths 256,512 \
    --samples 4 --max-new-tokens 12 --output-dir "$RUN/eval" --overwrite --no-progress

echo "== 3/4 export to Hugging Face format (per-head bases in config.json, modeling code alongside)"
python tools/convert_checkpoint.py megatron-to-hf --input "$RUN/checkpoints" --output "$RUN/hf" --overwrite

echo "== 4/4 verify: transformers and megatron agree on logits and greedy tokens"
python tools/convert_checkpoint.py verify --megatron "$RUN/checkpoints" --hf "$RUN/hf"

echo "done: checkpoints, evaluation (results.md, PNG plots) and the HF export are under $RUN/"
