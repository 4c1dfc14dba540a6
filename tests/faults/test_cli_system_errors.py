"""System errors do not escape the CLIs (issue 16 item 8): a read-only or full output directory,
a damaged model directory and Ctrl-C give one line and a documented exit code, no traceback.

    python -m pytest tests/faults/test_cli_system_errors.py -q          # ~1 min
    python -m pytest tests/faults/test_cli_system_errors.py -q -m slow  # Ctrl-C of a 2-process run
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
from cli_support import REPO, environment, error_lines, run, run_with_failing_writes

from megatron_harpe import cli


@pytest.mark.parametrize(
    "code,says", [(errno.EROFS, "read-only: choose a writable directory"), (errno.ENOSPC, "the disk is full")]
)
def test_prepare_data_into_an_unwritable_directory(demo_data, tmp_path, code, says):
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(demo_data.corpus.read_text().splitlines(keepends=True)[:20]))
    output = tmp_path / "out"
    output.mkdir()
    completed = run_with_failing_writes(
        code,
        output,
        "tools/prepare_data.py",
        "tokenize",
        "--inputs",
        str(sample),
        "--tokenizer",
        str(demo_data.tokenizer),
        "--output",
        str(output / "train"),
        "--workers",
        "0",
    )
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert says in line and str(output) in line
    assert "Traceback" not in completed.stderr
    assert list(output.iterdir()) == []


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

    directory = tmp_path_factory.mktemp("damaged") / "hf"
    directory.mkdir()
    save_tiny_tokenizer(str(directory))
    save_tiny_llama(str(directory), seed=0)
    return directory


def _damaged_copy(source, target, damage):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    damage(target)
    return target


@pytest.mark.parametrize(
    "name,damage",
    [
        ("config.json", lambda d: (d / "config.json").write_text('{"hidden_size": 64,')),
        (
            "model.safetensors",
            lambda d: os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
        ),
    ],
)
def test_conversion_of_a_damaged_model_names_the_file(hf_model, tmp_path, name, damage):
    source = _damaged_copy(hf_model, tmp_path / "source", damage)
    completed = run(
        "tools/convert_checkpoint.py", "hf-to-megatron", "--input", str(source), "--output", str(tmp_path / "out")
    )
    assert completed.returncode == 2, completed.stderr  # the README promises 2 for bad input
    (line,) = error_lines(completed.stderr)
    assert str(source / name) in line
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_interrupt_exits_130_with_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cli.on_interrupt(lambda: "the last checkpoint is ckpt/iter_0000004")

    def interrupted(argv):
        raise KeyboardInterrupt

    try:
        assert cli.run(interrupted, []) == 130
    finally:
        cli.on_interrupt(lambda: None)
    assert capsys.readouterr().err == "interrupted: the last checkpoint is ckpt/iter_0000004\n"


def test_an_error_caused_by_the_interrupt_counts_as_the_interrupt(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def peer_gone(argv):  # Ctrl-C reached this rank while a collective failed because a peer had exited
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass
        raise RuntimeError("[gloo] Connection closed by peer")

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
    try:
        assert cli.run(peer_gone, []) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err.startswith("interrupted") and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_stops_a_two_process_run_with_one_line(demo_data, tmp_path):
    from megatron_harpe.parallel import free_port

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        str(REPO / "pretrain_harpe.py"), "--config", str(REPO / "configs" / "demo_cpu.yaml"),
        "--train.train_tokens", str(200 * 4096), "--train.warmup_steps", "0",
        "--checkpoint.save", str(tmp_path / "ckpt"), "--checkpoint.save_interval", "2",
        "--data.demo_workdir", str(demo_data.corpus.parent), "--logging.log_interval", "1",
        "--logging.tensorboard_dir", "null",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in process.stdout:
        if line.startswith("step 3/"):  # iteration 2 is saved
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
            break
    _, stderr = process.communicate(timeout=300)
    ours = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(ours) == 1, stderr
    assert "ckpt/iter_0000002" in ours[0] and "resumes" in ours[0]
    assert "KeyboardInterrupt" not in stderr and 'pretrain_harpe.py", line' not in stderr, stderr
    assert json.loads((tmp_path / "ckpt" / "iter_0000002" / "train_state.json").read_text())["iteration"] == 2
