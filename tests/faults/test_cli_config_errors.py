"""Errors that belong before the launch (issue 16 item 7): bad values, malformed or missing
config files, duplicate YAML keys and missing data stop `pretrain_harpe.py` (and so `--dry-run`)
in config validation, with one line naming the key, exit code 2, and no traceback unless --debug.

    python -m pytest tests/faults/test_cli_config_errors.py -q
"""

from __future__ import annotations

import pytest
from cli_support import REPO, error_lines, run

DEMO = str(REPO / "configs" / "demo_cpu.yaml")
DRY_RUN = ("--dry-run", "--world-size", "2")


@pytest.mark.parametrize(
    "overrides,names",
    [
        (["--train.lr", "-1e-4"], "train.lr=-0.0001"),
        (["--train.min_lr", "0.1"], "train.min_lr=0.1 is above train.lr"),
        (["--train.warmup_steps", "-5"], "train.warmup_steps=-5"),
        (["--data.seq_length", "0"], "data.seq_length=0"),
        (["--train.micro_batch_size", "0"], "train.micro_batch_size=0"),
        (["--train.global_batch_size", "0"], "train.global_batch_size=0"),
        (["--train.adam_beta2", "1.5"], "train.adam_beta2=1.5"),
        (["--parallel.timeout_minutes", "0"], "parallel.timeout_minutes=0.0 must be > 0.0"),
        (["--checkpoint.keep_last", "0"], "checkpoint.keep_last=0"),
    ],
)
def test_impossible_values_fail_the_dry_run_in_one_line(overrides, names):
    completed = run("pretrain_harpe.py", "--config", DEMO, *DRY_RUN, *overrides)
    assert completed.returncode == 2
    assert [line for line in completed.stderr.splitlines() if line.strip()] == error_lines(completed.stderr)
    assert len(error_lines(completed.stderr)) == 1 and names in completed.stderr
    assert "Traceback" not in completed.stderr and completed.stdout == ""


def test_missing_data_prefix_fails_before_launch(tmp_path):
    prefix = tmp_path / "nothing_here_text_document"
    completed = run(
        "pretrain_harpe.py", "--config", DEMO, "--dry-run", f"--data.prefixes=[{prefix}]", "--parallel.context", "1"
    )
    assert completed.returncode == 2
    (line,) = error_lines(completed.stderr)
    assert "data.prefixes[0]" in line and f"{prefix}.bin" in line and "prepare_data.py" in line
    assert "Traceback" not in completed.stderr


def test_missing_data_is_a_warning_when_planning_for_another_machine(tmp_path):
    completed = run("pretrain_harpe.py", "--config", DEMO, *DRY_RUN, f"--data.prefixes=[{tmp_path / 'x'}]")
    assert completed.returncode == 0 and "world size 2" in completed.stdout
    assert "warning: data.prefixes[0]" in completed.stderr


def test_only_rank_zero_reports_and_debug_shows_the_traceback():
    quiet = run("pretrain_harpe.py", "--config", DEMO, *DRY_RUN, "--train.lr", "-1", RANK="1", WORLD_SIZE="2")
    assert quiet.returncode == 2 and quiet.stderr == ""
    debug = run("pretrain_harpe.py", "--config", DEMO, *DRY_RUN, "--train.lr", "-1", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "error: train.lr=-1.0" in debug.stderr


@pytest.mark.parametrize(
    "text,names",
    [
        ("train:\n  lr: 1.0e-3\n  warmup_steps: 2\n  lr: 2.0e-3\n", ["duplicate key 'lr'", ":4:", "line 2"]),
        ("train:\n  lr: [1.0e-3\nmodel: {}\n", ["invalid YAML", "bad.yaml:"]),
        ("- just\n- a list\n", ["must hold a YAML mapping"]),
    ],
)
def test_bad_yaml_is_one_line_naming_the_file_and_line(tmp_path, text, names):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    completed = run("pretrain_harpe.py", "--config", str(config), *DRY_RUN)
    assert completed.returncode == 2
    (line,) = error_lines(completed.stderr)
    assert all(name in line for name in names), line
    assert "Traceback" not in completed.stderr


def test_missing_config_file_is_one_line(tmp_path):
    completed = run("pretrain_harpe.py", "--config", str(tmp_path / "absent.yaml"), *DRY_RUN)
    assert completed.returncode == 2
    (line,) = error_lines(completed.stderr)
    assert "absent.yaml not found" in line and "Traceback" not in completed.stderr


def test_duplicate_keys_are_refused_by_the_loader(tmp_path):
    from megatron_harpe.config import load_config

    config = tmp_path / "dup.yaml"
    config.write_text("model:\n  num_layers: 2\nmodel:\n  num_layers: 4\n")
    with pytest.raises(ValueError, match=r"dup.yaml:3: invalid YAML: duplicate key 'model' \(first given on line 1\)"):
        load_config(config)
    config.write_text("base: &base {num_layers: 2}\nmodel:\n  <<: *base\n  hidden_size: 64\n")  # merges are fine
    with pytest.raises(ValueError, match="unknown config key.*base"):
        load_config(config)
