"""tools/convert_checkpoint.py end to end: a tiny GQA Llama with a sentencepiece tokenizer goes
HF -> megatron (HARPE bases from the command line, --verify) -> HF (--verify: the export is
loaded in that fresh process with trust_remote_code and its cached greedy decoding must give the
megatron model's tokens); bad input exits with code 2 and writes nothing.

    python -m pytest tests/e2e/test_convert_cli.py -q
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from megatron_harpe.convert.hf_files import copy_tokenizer_files
from megatron_harpe.convert.hf_harpe.configuration_harpe_llama import TRANSFORMERS_MINIMUM
from megatron_harpe.data.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
TEXT = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "One of the special magic numbers for long-context is: 1234567.",
] * 150


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TOOL), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _load_cli():
    module = importlib.import_module("megatron_harpe.commands.convert_checkpoint")
    return module


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    source = root / "source"
    source.mkdir()
    copy_tokenizer_files(train_sentencepiece(TEXT, root / "sp", vocab_size=300), source)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.15, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(source)
    return source


def test_hf_to_megatron_to_hf_with_verification(hf_source: Path, capsys: pytest.CaptureFixture) -> None:
    root = hf_source.parent
    to_megatron = _run(
        "hf-to-megatron", "--input", str(hf_source), "--output", str(root / "megatron"), "--tensor-parallel", "2",
        "--position.type", "harpe", "--position.strategy", "uniform",
        "--position.base_min", "1000", "--position.base_max", "100000", "--verify",
    )  # fmt: skip
    assert to_megatron.returncode == 0, to_megatron.stderr[-4000:]
    assert "verify: OK" in to_megatron.stdout and "greedy continuations agree" in to_megatron.stdout

    to_hf = _run("megatron-to-hf", "--input", str(root / "megatron"), "--output", str(root / "hf"), "--verify")
    assert to_hf.returncode == 0, to_hf.stderr[-4000:]
    assert "verify: OK" in to_hf.stdout and "greedy continuations agree" in to_hf.stdout

    exported = root / "hf"
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "harpe_llama" and config["rope_bases"] == [1000.0, 1000.0, 100000.0, 100000.0]
    assert config["harpe_transformers_minimum"] == TRANSFORMERS_MINIMUM  # the range the code shipped with needs
    assert (exported / "modeling_harpe_llama.py").is_file() and (exported / "configuration_harpe_llama.py").is_file()
    reference = sentencepiece.SentencePieceProcessor(model_file=str(hf_source / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    assert tokenizer(TEXT[1]).input_ids == [1] + reference.encode(TEXT[1])

    # bad input is rejected before any process group or file: run main() in this process
    cli = _load_cli()
    assert cli.main(["megatron-to-hf", "--input", str(root / "megatron"), "--output", str(exported)]) == 2
    assert "not empty" in capsys.readouterr().err
    bad_tp = ["hf-to-megatron", "--input", str(hf_source), "--output", str(root / "x"), "--tensor-parallel", "3"]
    assert cli.main(bad_tp) == 2
    assert "does not divide" in capsys.readouterr().err and not (root / "x").exists()
    typo = ["megatron-to-hf", "--input", str(root / "megatron"), "--output", str(root / "y"), "--oops", "1"]
    with pytest.raises(SystemExit) as exit_info:  # a usage error, like any unknown flag
        cli.main(typo)
    assert exit_info.value.code == 2 and "unrecognised argument" in capsys.readouterr().err
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "configuration_harpe_llama.py",
         "modeling_harpe_llama.py", "tokenizer.model", "tokenizer_config.json"]
    )  # fmt: skip
