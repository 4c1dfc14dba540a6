"""Self-Extend on the megatron backend: equals the plain model when the window covers the
sequence, equals the Hugging Face backend on the checkpoint's own export (HARPE with per-group and
per-query-head bases, YaRN), is unchanged by TP=2 and CP=2, and tools/evaluate.py gives the same
scores and answers on both backends.

Run: pytest tests/distributed/test_self_extend_megatron.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_harpe import parallel
from megatron_harpe.eval.self_extend.core import SelfExtendSettings
from megatron_harpe.eval.testing import save_tiny_tokenizer

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = {
    "harpe": ["position.type=harpe", "position.bases=[100.0, 5000.0]"],
    "harpe_per_query_head": ["position.type=harpe", "position.gqa_bases=per_query_head",
                             "position.bases=[10.0, 300.0, 3000.0, 90000.0]"],
    "yarn": ["position.type=yarn", "position.base=100.0", "position.scaling_factor=4.0",
             "position.original_max_position=16"],
}  # fmt: skip
SHORT = SelfExtendSettings(window=8, group=4)
IDS = torch.randint(5, 500, (37,), generator=torch.Generator().manual_seed(3)).tolist()


def _convert_all(source: str, root: str) -> None:
    from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf

    for name, overrides in CASES.items():
        convert_hf_to_megatron(source, f"{root}/{name}/megatron", overrides=overrides)
        convert_megatron_to_hf(f"{root}/{name}/megatron", f"{root}/{name}/hf")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    """A random Llama (wide init, so attention depends on position) converted with each case's
    position encoding, and each checkpoint exported back to Hugging Face."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("self_extend")
    source = str(root / "source")
    save_tiny_tokenizer(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.15, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(source)  # fmt: skip
    parallel.run_on_ranks(_convert_all, 1, source, str(root))
    return str(root)


def _megatron_outputs(root: str, tp: int, cp: int, runs: list[tuple[str, SelfExtendSettings | None]]) -> list:
    """Logits and a short greedy continuation of IDS for each (case, settings), in one world."""
    from megatron_harpe.eval.backends import load_backend

    outputs = []
    for name, settings in runs:
        backend = load_backend(
            f"{root}/{name}/megatron",
            tensor_parallel=tp,
            context_parallel=cp,
            tokenizer=f"{root}/{name}/hf",
            self_extend=settings,
        )
        outputs.append({"logits": backend.logits(IDS).cpu(), "generated": backend.generate(IDS, 4)})
    return outputs


def _hf_outputs(directory: str, settings: SelfExtendSettings) -> dict:
    from megatron_harpe.eval.backends import load_backend

    backend = load_backend(directory, trust_remote_code=True, self_extend=settings)
    with torch.no_grad():
        logits = backend.model(torch.tensor([IDS]), use_cache=False).logits[0]
    return {"logits": logits, "generated": backend.generate(IDS, 4)}


@pytest.fixture(scope="module")
def single_process(checkpoints) -> dict:
    """Per case: megatron at TP=1 plain, with a window covering the sequence, and with SHORT."""
    covering = SelfExtendSettings(window=len(IDS), group=4)
    runs = [(name, settings) for name in CASES for settings in (None, covering, SHORT)]
    outputs = parallel.run_on_ranks(_megatron_outputs, 1, checkpoints, 1, 1, runs)[0]
    return {name: outputs[3 * index : 3 * index + 3] for index, name in enumerate(CASES)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_megatron_equals_plain_with_a_covering_window_and_the_hf_export_with_a_short_one(
    checkpoints, single_process, name
):
    plain, covering, short = single_process[name]
    torch.testing.assert_close(covering["logits"], plain["logits"], atol=2e-5, rtol=1e-5)
    assert (short["logits"] - plain["logits"]).abs().max() > 1e-3  # the short window changes the model
    hf = _hf_outputs(f"{checkpoints}/{name}/hf", SHORT)
    torch.testing.assert_close(short["logits"], hf["logits"], atol=1e-4, rtol=1e-4)
    assert short["generated"] == hf["generated"]


def test_tensor_and_context_parallel_equal_one_process(checkpoints, single_process):
    reference = single_process["harpe_per_query_head"][2]
    for tp, cp in [(2, 1), (1, 2)]:
        result = parallel.run_on_ranks(
            _megatron_outputs, tp * cp, checkpoints, tp, cp, [("harpe_per_query_head", SHORT)]
        )[0][0]
        torch.testing.assert_close(result["logits"], reference["logits"], atol=1e-5, rtol=1e-5)
        assert result["generated"] == reference["generated"]


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=600,
    )


def test_evaluate_cli_gives_the_same_scores_on_both_backends(checkpoints, tmp_path):
    common = [
        "--task",
        "niah_single_1,passkey",
        "--lengths",
        "512",
        "--samples",
        "1",
        "--max-new-tokens",
        "6",
        "--self-extend",
        "window=32,group=4",
        "--save-predictions",
        "--no-progress",
    ]
    hf_dir, megatron_dir = f"{checkpoints}/harpe/hf", f"{checkpoints}/harpe/megatron"
    runs = {
        "hf": _run_tool("--model", hf_dir, "--trust-remote-code", "--output-dir", str(tmp_path / "hf"), *common),
        "megatron": _run_tool("--model", megatron_dir, "--tokenizer", hf_dir,
                              "--output-dir", str(tmp_path / "megatron"), *common),
    }  # fmt: skip
    results, outputs = {}, {}
    for backend, completed in runs.items():
        assert completed.returncode == 0, completed.stderr
        results[backend] = json.loads((tmp_path / backend / "results.json").read_text())
        outputs[backend] = [json.loads(line)["output"] for line in (tmp_path / backend / "predictions.jsonl").open()]
        assert results[backend]["self_extend"] == {"window": 32, "group": 4}
        assert "Self-Extend window 32 group 4" in (tmp_path / backend / "results.md").read_text()
    assert results["hf"]["tasks"] == results["megatron"]["tasks"]
    assert outputs["hf"] == outputs["megatron"] and any(outputs["hf"])
