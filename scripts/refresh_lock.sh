#!/usr/bin/env bash
# Regenerate requirements/lock.txt: the exact versions a fresh install resolves today, which the
# README's set-up commands then install (`pip install -c requirements/lock.txt ...`).
#
#   bash scripts/refresh_lock.sh [PYTHON]     # PYTHON: the interpreter to build the venv with (default python3)
#
# Builds a throw-away venv, installs the project with its dev and examples extras and no lock, freezes it
# (minus the project itself) and writes the lock. Then run the suite and the matrix on it:
#   pip install -c requirements/lock.txt torch==2.13.0 -e ".[dev]" && python -m pytest -q
#   python scripts/compat_matrix.py --versions minimum tested newest
# and bump TRANSFORMERS_TESTED_UP_TO in megatron_harpe/convert/hf_harpe/configuration_harpe_llama.py
# if the lock moved transformers and the matrix passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
VENV=$(mktemp -d)/lock-venv
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0 -e ".[dev,examples]"
{
    echo "# Exact versions of the last fresh install that passed the suite; refresh: bash scripts/refresh_lock.sh"
    echo "# Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d)."
    echo "# torch is pinned without its local build tag, so the CPU (+cpu) and CUDA builds both satisfy it."
    "$VENV/bin/pip" freeze --exclude-editable --disable-pip-version-check \
        | grep -v -i '^megatron[_-]harpe' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
rm -rf "$(dirname "$VENV")"
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
