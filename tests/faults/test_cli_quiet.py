"""Quiet, quick command-line tools (issue 13 item 4): `--help` and argument errors import no
heavy library, and a real run of prepare_data / convert_checkpoint / evaluate / a 2-process
training run prints no third-party warning, only our one-line note on absent GPU libraries.

    python -m pytest tests/faults/test_cli_quiet.py -q
"""

from __future__ import annotations

import json

import pytest
from cli_support import REPO, error_lines, run, run_probing_imports, third_party_lines

ENTRY_POINTS = [
    "pretrain_harpe.py", "tools/prepare_data.py", "tools/convert_checkpoint.py", "tools/evaluate.py",
    "tools/select_bases.py", "tools/analyze_heads.py", "tools/plan_memory.py", "-mmegatron_harpe.launch",
]  # fmt: skip
NOTE = "note: Transformer Engine and Apex not installed"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_help_imports_no_heavy_library(entry_point):
    completed, heavy = run_probing_imports(entry_point, "--help")
    assert completed.returncode == 0, completed.stderr
    assert "--verbose" in completed.stdout and "--debug" in completed.stdout
    assert heavy == set(), f"{entry_point} --help imported {sorted(heavy)}"
    assert NOTE not in completed.stderr


@pytest.mark.parametrize(
    "entry_point,arguments",
    [
        ("tools/evaluate.py", ["--model", "m", "--task", "passkey"]),  # --lengths missing
        ("tools/convert_checkpoint.py", ["hf-to-megatron", "--input", "x"]),
        ("tools/analyze_heads.py", ["--model", "m"]),
        ("tools/prepare_data.py", ["tokenize"]),
    ],
)
def test_argument_errors_import_no_heavy_library(entry_point, arguments):
    completed, heavy = run_probing_imports(entry_point, *arguments)
    assert completed.returncode == 2
    assert "error:" in completed.stderr and "Traceback" not in completed.stderr
    assert heavy == set(), f"{entry_point} imported {sorted(heavy)} before rejecting its arguments"


def _only_our_lines(stderr: str) -> None:
    assert third_party_lines(stderr) == [], "third-party output leaked:\n" + stderr
    assert stderr.count(NOTE) <= 1


def test_prepare_data_is_quiet(demo_data, tmp_path):
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(demo_data.corpus.read_text().splitlines(keepends=True)[:50]))
    completed = run(
        "tools/prepare_data.py",
        "tokenize",
        "--inputs",
        str(sample),
        "--tokenizer",
        str(demo_data.tokenizer),
        "--output",
        str(tmp_path / "out"),
        "--workers",
        "0",
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout[completed.stdout.index("{") :])["documents"] == 50
    _only_our_lines(completed.stderr)
    assert NOTE not in completed.stderr  # data preparation does not care about GPU libraries


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny HF Llama converted by the CLI: the conversion run, and the checkpoint it wrote."""
    from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("quiet")
    source = root / "hf"
    source.mkdir()
    save_tiny_tokenizer(str(source))
    save_tiny_llama(str(source), seed=0)
    completed = run(
        "tools/convert_checkpoint.py",
        "hf-to-megatron",
        "--input",
        str(source),
        "--output",
        str(root / "megatron"),
        "--position.type",
        "harpe",
        "--position.strategy",
        "uniform",
        "--position.base_min",
        "1000",
        "--position.base_max",
        "100000",
    )
    return completed, source, root / "megatron"


def test_conversion_is_quiet(tiny_checkpoint):
    completed, _, _ = tiny_checkpoint
    assert completed.returncode == 0, completed.stderr
    _only_our_lines(completed.stderr)
    assert NOTE in completed.stderr  # this machine has neither TE nor Apex: said once, in our words


def test_conversion_verbose_shows_the_third_party_warnings(tiny_checkpoint, tmp_path):
    _, source, _ = tiny_checkpoint
    completed = run(
        "tools/convert_checkpoint.py",
        "hf-to-megatron",
        "--verbose",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "out"),
    )
    assert completed.returncode == 0, completed.stderr
    assert any("megatron/core" in line and "UserWarning" in line for line in completed.stderr.splitlines())


def test_evaluation_of_a_checkpoint_is_quiet(tiny_checkpoint, tmp_path):
    _, source, checkpoint = tiny_checkpoint
    completed = run(
        "tools/evaluate.py",
        "--model",
        str(checkpoint),
        "--tokenizer",
        str(source),
        "--task",
        "passkey",
        "--lengths",
        "256",
        "--samples",
        "1",
        "--no-progress",
        "--output-dir",
        str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr
    assert "| passkey |" in completed.stdout
    _only_our_lines(completed.stderr)


def test_two_process_training_is_quiet(demo_data, tmp_path):
    from megatron_harpe.parallel import free_port

    completed = run(
        "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        str(REPO / "pretrain_harpe.py"), "--config", str(REPO / "configs" / "demo_cpu.yaml"),
        "--train.train_tokens", "4096", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--train.warmup_steps", "0", "--checkpoint.save", str(tmp_path / "ckpt"),
        "--data.demo_workdir", str(demo_data.corpus.parent), "--logging.log_interval", "1",
        "--logging.tensorboard_dir", "null",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "step 2/2" in completed.stdout
    _only_our_lines(completed.stderr)
    assert completed.stderr.count(NOTE) == 1  # rank 0 only
    assert error_lines(completed.stderr) == []


def test_transformers_progress_bars_are_off_unless_verbose():
    """transformers' "Loading weights" bar reached the terminal during `convert_checkpoint.py verify`."""
    import os
    import subprocess
    import sys

    probe = "import megatron_harpe.cli; import transformers.utils.logging as l; print(l.is_progress_bar_enabled())"
    for extra_env, expected in (({}, "False"), ({"MEGATRON_HARPE_VERBOSE": "1"}, "True")):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
        out = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**env, **extra_env},
            check=True,
        ).stdout.split()
        assert out[-1] == expected, (extra_env, out)
