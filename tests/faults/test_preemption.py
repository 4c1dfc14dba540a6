"""Preemption loses nothing: a `torchrun --nproc-per-node 2 pretrain_harpe.py` run sent SIGTERM
between two checkpoints saves after its current step, and the next launch resumes to the losses
of a run that was never stopped.

    python -m pytest -q tests/faults/test_preemption.py

The first stop is a SIGTERM to torchrun alone (`kill <pid>`: torchrun forwards it to its ranks);
the second sends SIGTERM to every process of the run, as Slurm does when it stops a job
(torchrun, the ranks and their checkpoint-writer helper process all get it), three times: stock
torchrun exits on the third without waiting for its ranks, which must finish their save alone.
The last two tests check the launcher's torchrun (megatron_harpe/torchrun.py) on a toy rank.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_support import REPO, environment

from megatron_harpe.checkpointing.checkpoint import find_latest_checkpoint
from megatron_harpe.parallel import free_port

STEPS = 24
TINY = [
    "--model.num_layers", "2", "--model.hidden_size", "64", "--model.num_attention_heads", "4",
    "--model.num_query_groups", "2", "--model.ffn_hidden_size", "128", "--model.max_position_embeddings", "128",
    "--data.seq_length", "128", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
    "--train.warmup_steps", "0", "--train.train_tokens", str(STEPS * 4 * 128),
    "--logging.log_interval", "1", "--logging.tensorboard_dir", "null",
]  # fmt: skip
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| (loss \S+ \| lr \S+ \| grad norm \S+)", re.M)


def _command(demo_data, save: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            str(REPO / "pretrain_harpe.py"), "--config", str(REPO / "configs" / "demo_cpu.yaml"),
            "--data.demo_workdir", str(demo_data.corpus.parent), "--checkpoint.save", save,
            "--checkpoint.save_interval", "100", *TINY]  # fmt: skip


def _steps(log: str) -> dict[int, str]:
    return {int(step): values for step, values in STEP_LINE.findall(log)}


@pytest.fixture(scope="module")
def reference(demo_data) -> dict[int, str]:
    """The losses, learning rates and gradient norms of a run that is never stopped."""
    result = subprocess.run(_command(demo_data, "null"), cwd=REPO, env=environment(PYTHONUNBUFFERED="1"),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _steps(result.stdout)
    assert sorted(steps) == list(range(1, STEPS + 1))
    return steps


def _interrupt(command: list[str], after_step: int, every_process: bool) -> tuple[int, str]:
    """Start the run, SIGTERM it once step `after_step` is logged; returns (exit code, output)."""
    run = subprocess.Popen(command, cwd=REPO, env=environment(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    output = []
    for line in run.stdout:
        output.append(line)
        if line.startswith(f"step {after_step}/"):
            break
    if every_process:  # slurmstepd, srun, and once more
        for _ in range(3):
            os.killpg(run.pid, signal.SIGTERM)
            time.sleep(0.2)
    else:
        run.send_signal(signal.SIGTERM)
    output.extend(run.stdout)
    code = run.wait(timeout=300)
    deadline = time.monotonic() + 300  # the ranks outlive a torchrun that exits on the third signal
    while time.monotonic() < deadline:
        try:
            os.killpg(run.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("the ranks did not exit within 300 s of SIGTERM")
    return code, "".join(output)


def test_sigterm_between_checkpoints_saves_and_the_next_launch_resumes_exactly(demo_data, reference, tmp_path):
    save = tmp_path / "ckpt"
    command = _command(demo_data, str(save))

    code, first = _interrupt(command, after_step=3, every_process=False)
    stopped = re.search(r"stopping after step (\d+) \(SIGTERM received\); the next launch resumes", first)
    assert stopped and code != 0, first[-3000:]
    first_stop = int(stopped.group(1))
    assert 3 <= first_stop < STEPS and find_latest_checkpoint(save).name == f"iter_{first_stop:07d}"

    code, second = _interrupt(command, after_step=first_stop + 3, every_process=True)
    assert f"resumed from {save}/iter_{first_stop:07d} at step {first_stop}" in second, second[-3000:]
    stopped = re.search(r"stopping after step (\d+) \(SIGTERM received\)", second)
    assert stopped and code != 0, second[-3000:]
    second_stop = int(stopped.group(1))
    assert find_latest_checkpoint(save).name == f"iter_{second_stop:07d}", second[-3000:]
    assert not list(save.glob("*.tmp")), "a save was cut short"

    last = subprocess.run(
        command, cwd=REPO, env=environment(PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=600
    )
    assert last.returncode == 0, last.stderr[-3000:]
    steps = {**_steps(first), **_steps(second), **_steps(last.stdout)}
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert sorted(_steps(second)) == list(range(first_stop + 1, second_stop + 1))
    assert steps == reference  # loss, learning rate and gradient norm of every step


# A rank that takes 2 s to "save" after SIGTERM, then writes a file and exits like the trainer.
SLOW_SAVER = """
import os, signal, sys, time
from pathlib import Path
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
Path(sys.argv[1], f"ready-{os.environ['RANK']}").touch()
while not got:
    time.sleep(0.05)
time.sleep(2)
Path(sys.argv[1], f"saved-{os.environ['RANK']}").touch()
sys.exit(128 + signal.SIGTERM)
"""


def _launcher(script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_harpe.torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()),
            str(script), *args]  # fmt: skip


def test_the_launchers_torchrun_lets_ranks_save_through_a_repeated_sigterm(tmp_path):
    """Stock torchrun exits on the third SIGTERM before its ranks have saved (and prints a
    traceback); megatron_harpe.torchrun waits for them and exits 143 with one line."""
    script = tmp_path / "rank.py"
    script.write_text(SLOW_SAVER)
    with open(tmp_path / "launcher.log", "w") as log:
        run = subprocess.Popen(_launcher(script, str(tmp_path)), cwd=tmp_path, env=environment(), stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(3):
        run.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    code = run.wait(timeout=120)
    saved = sorted(p.name for p in tmp_path.glob("saved-*"))  # when the launcher exits, not later
    stderr = (tmp_path / "launcher.log").read_text()
    assert saved == ["saved-0", "saved-1"], stderr
    assert code == 143, stderr
    assert "[launch] SIGTERM: the ranks were asked to save after their current step and exit" in stderr
    assert "Traceback" not in stderr


def test_the_launchers_torchrun_names_the_failed_rank_in_one_line(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\nif os.environ['RANK'] == '1':\n    print('error: bad config', file=sys.stderr)\n"
                      "    sys.exit(2)\n")  # fmt: skip
    result = subprocess.run(_launcher(script), cwd=tmp_path, env=environment(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr  # the rank's code: a user error stays exit code 2
    assert "[launch] " in result.stderr and "rank 1 exited with code 2 first" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


def test_a_rank_saving_after_sigterm_outlives_its_launcher(tmp_path):
    """A rank's watchdog ends it when its launcher dies (test_rank_failures.py), except after a
    stop signal: it is saving, and a stock torchrun may be gone before the save ends."""
    worker = textwrap.dedent("""
        import os, signal, sys, time
        os.environ["TORCHELASTIC_RUN_ID"] = "test"
        from megatron_harpe.rank_health import exit_when_launcher_dies
        from megatron_harpe.training import preemption
        assert exit_when_launcher_dies(poll_seconds=0.2)
        with preemption.stop_signals() as signals:
            print(os.getpid(), flush=True)
            while not signals.received:
                time.sleep(0.05)
            time.sleep(2)  # the save, during which the launcher dies
            open(sys.argv[1], "w").close()
    """)
    launcher = (
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {worker!r}, sys.argv[1]])\n"
        "time.sleep(120)"
    )
    log, saved = tmp_path / "worker.log", tmp_path / "saved"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", launcher, str(saved)], stdout=out, stderr=subprocess.STDOUT,
                                   env=environment())  # fmt: skip
    deadline = time.monotonic() + 120
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(int(log.read_text().split()[0]), signal.SIGTERM)
    time.sleep(0.3)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert saved.exists(), log.read_text()
    assert "is gone; exiting" not in log.read_text()
