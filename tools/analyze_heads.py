"""`python tools/analyze_heads.py ...` is `harpe-analyze-heads ...`: the tool lives in
megatron_harpe/commands/analyze_heads.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed

# main: for callers that load this file as a module (e.g. experiments/replicate/worker.py)
from megatron_harpe.commands.analyze_heads import entry_point, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(entry_point())
