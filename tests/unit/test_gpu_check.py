"""scripts/gpu_check.sh's CPU-testable parts: arguments, comparisons, the table, and (slow) the
whole check on the CPU as its dry path.

    python -m pytest tests/unit/test_gpu_check.py -q            (-m slow for the full dry run)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_harpe import gpu_check
from megatron_harpe.gpu_check import CheckResult, compare, format_table, parse_args, visible_devices

REPO = Path(__file__).resolve().parents[2]


def test_compare_passes_within_tolerance_and_fails_beyond():
    assert compare("x", [1.0, 2.0], [1.0, 2.01], rtol=0.01, atol=0.0).status == "PASS"
    failed = compare("x", [1.0, 2.2], [1.0, 2.0], rtol=0.01, atol=0.0)
    assert failed.status == "FAIL" and "max |diff| 0.2" in failed.detail
    assert compare("x", [1.0], [1.0, 2.0], 0.1, 0.1).status == "FAIL"  # shapes differ
    assert compare("x", torch.tensor([float("nan")]), torch.tensor([1.0]), 1.0, 1.0).status == "FAIL"


def test_table_lists_every_check_and_the_verdict():
    table = format_table([CheckResult("logits", "PASS", "ok"), CheckResult("parity", "SKIP", "needs 2 GPUs"),
                          CheckResult("training", "FAIL", "drifted")])  # fmt: skip
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["check", "result"]
    assert any(line.startswith("parity") and "SKIP" in line and "needs 2 GPUs" in line for line in lines)
    assert lines[-1].split()[:2] == ["overall", "FAIL"] and "1 failed, 1 passed, 1 skipped" in lines[-1]
    assert format_table([CheckResult("a", "PASS", "")]).splitlines()[-1].split()[1] == "PASS"


def test_arguments(capsys):
    args = parse_args(["--device", "cpu"])
    assert (args.device, args.gpus, args.steps) == ("cpu", 2, 20)
    for bad, message in ((["--device", "cpu", "--steps", "3"], "even number"), (["--device", "cpu", "--gpus", "3"], "between 1 and"),
                         (["--only", "speed"], "invalid choice")):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_args(["--device", "cuda"])
        assert "no CUDA device is visible" in capsys.readouterr().err


def test_cpu_runs_hide_cuda_and_restore_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with visible_devices("cpu"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    with visible_devices("cuda"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_tiny_runs_start_from_the_reference_weights(tmp_path):
    tree = gpu_check.tiny_tree(tmp_path, 20, parallel={"tensor": 2})
    assert tree["checkpoint"]["pretrained"] == str(tmp_path / gpu_check.REFERENCE_CHECKPOINT)
    assert tree["train"]["train_tokens"] == 20 * 4 * gpu_check.SEQ_LENGTH and tree["parallel"] == {"tensor": 2}


def test_help_explains_the_checks():
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout  # fmt: skip
    for words in ("logits", "parity TP2 / CP2", "resume", "peak memory", "PASS/FAIL", "--device cpu", "Not run by this project"):
        assert words in out


@pytest.mark.slow
@pytest.mark.timeout(3000)  # 10 training runs, 2 of them with 2 ranks
def test_the_whole_check_runs_on_cpu(tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--steps", "4", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for row in ("logits: equal bases = stock RoPE (cpu)", "logits: sdpa on cpu vs cpu", "training: 4 steps",
                "resume: saved at step 2", "parity: TP2 vs 1 device", "parity: CP2 vs 1 device", "throughput"):  # fmt: skip
        assert row in out
    assert out.splitlines()[-1].split()[:2] == ["overall", "PASS"]
