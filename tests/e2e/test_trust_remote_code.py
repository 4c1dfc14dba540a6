"""`--trust-remote-code` reaches every loader, the tokenizer included: evaluating our HARPE
export (config.json with `auto_map`) with stdin closed must not ask "Do you wish to run the
custom code?" (on a terminal that question blocks the run; transformers asks it when
AutoTokenizer reads such a config without the flag).

Run: pytest tests/e2e/test_trust_remote_code.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_harpe.eval.testing import save_tiny_harpe_llama, save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "Do you wish to run the custom code"


@pytest.fixture(scope="module")
def harpe_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("harpe_export"))
    save_tiny_tokenizer(directory)
    save_tiny_harpe_llama(directory, bases=[1e4, 1e4, 5e5, 5e5])
    return directory


def _run(*args: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )


def test_evaluate_with_trust_remote_code_never_prompts(harpe_dir, tmp_path):
    result = _run(
        "tools/evaluate.py",
        "--model",
        harpe_dir,
        "--trust-remote-code",
        "--task",
        "passkey",
        "--lengths",
        "256",
        "--samples",
        "1",
        "--scoring",
        "teacher_forcing",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "eval"),
    )
    assert result.returncode == 0, result.stderr
    assert PROMPT not in result.stdout + result.stderr


def test_oracle_tokenizer_from_a_remote_code_directory_never_prompts(harpe_dir, tmp_path):
    result = _run(
        "tools/evaluate.py",
        "--model",
        "oracle",
        "--tokenizer",
        harpe_dir,
        "--trust-remote-code",
        "--task",
        "passkey",
        "--lengths",
        "256",
        "--samples",
        "1",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "eval"),
    )
    assert result.returncode == 0, result.stderr
    assert PROMPT not in result.stdout + result.stderr
