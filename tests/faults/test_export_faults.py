"""Faults of `convert_checkpoint.py megatron-to-hf` (issue 27 case 12).

    python -m pytest tests/faults/test_export_faults.py -q        (add -m slow for a real full tmpfs)

Before: exporting a checkpoint whose run was still saving gave an AssertionError in
`stored_dtype` or "no checkpoint in .../iter_0000158" (an iteration deleted by keep_last while
read, or one still being written); a full disk gave a 21-line SafetensorError and exit code 1,
the code documented for "verification failed". Now the newest complete iteration is named or
exported instead, and a full disk is one line with exit code 2.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_support import REPO, environment, error_lines, run, unshare_works

from megatron_harpe import parallel

TINY = dict(
    num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=512, max_position_embeddings=64
)


def _save(save_dir: str, iterations: list[int]) -> None:
    from megatron_harpe.checkpointing.checkpoint import save_checkpoint
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.model import build_model

    config = from_dict(Config, {"model": TINY, "position": {"type": "abf", "base": 10000.0}})
    config.position.resolve(config.model)
    parallel.initialize(1, 1)
    gpt = build_model(config.model, config.position)
    for iteration in iterations:
        save_checkpoint(save_dir, iteration, model=gpt, config=config.to_dict(), train_state={"weights_only": True})


@pytest.fixture(scope="module")
def saving(tmp_path_factory) -> Path:
    """iter_1 and iter_2 complete, iter_3 half written (as a save in progress leaves it)."""
    save_dir = tmp_path_factory.mktemp("saving") / "ckpt"
    parallel.run_on_ranks(_save, 1, str(save_dir), [1, 2])
    shutil.copytree(save_dir / "iter_0000002", save_dir / "iter_0000003.tmp")
    (save_dir / "iter_0000003.tmp" / "train_state.json").unlink()
    return save_dir


@pytest.mark.parametrize("name", ["iter_0000003", "iter_0000003.tmp"])
def test_an_iteration_still_being_written_names_the_newest_complete_one(
    saving: Path, tmp_path: Path, name: str
) -> None:
    completed = run(
        "tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(saving / name), "--output", str(tmp_path / "hf")
    )
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert (
        f"iter_0000003 is still being written by its run; the newest complete iteration in {saving} is iter_0000002"
        in line
    )
    assert "Traceback" not in completed.stderr and not (tmp_path / "hf").exists()


def test_a_save_dir_being_written_exports_its_newest_complete_iteration(saving: Path, tmp_path: Path) -> None:
    completed = run(
        "tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(saving), "--output", str(tmp_path / "hf")
    )
    assert completed.returncode == 0, completed.stderr
    assert f"(from {saving / 'iter_0000002'})" in completed.stdout


def _export_while_the_run_moves_on(save_dir: str, output: str) -> str:
    """The run publishes iter_2 and deletes iter_1 (keep_last 1) just as the export reads iter_1."""
    import megatron_harpe.convert.megatron_to_hf as export

    real = export.load_megatron_model

    def racing(path, dtype):
        root = Path(save_dir)
        shutil.copytree(root / "iter_0000001", root / "iter_0000002")
        (root / "latest_checkpointed_iteration.txt").write_text("2\n")
        os.rename(root / "iter_0000001", root / "iter_0000001.deleting")
        shutil.rmtree(root / "iter_0000001.deleting")
        export.load_megatron_model = real
        return real(path, dtype)

    export.load_megatron_model = racing
    return str(export.convert_megatron_to_hf(save_dir, output))


@pytest.mark.slow  # CI time; the in-progress iteration test stays
@pytest.mark.distributed
def test_an_iteration_deleted_while_read_is_replaced_by_the_newest(tmp_path: Path, capfd) -> None:
    save_dir = tmp_path / "ckpt"
    parallel.run_on_ranks(_save, 1, str(save_dir), [1])
    (exported,) = parallel.run_on_ranks(_export_while_the_run_moves_on, 1, str(save_dir), str(tmp_path / "hf"))
    assert exported == str(save_dir / "iter_0000002")
    assert (tmp_path / "hf" / "config.json").is_file()
    assert "iter_0000001 was deleted while it was read" in capfd.readouterr().err


def _export_onto_a_full_disk(save_dir: str, output: str) -> dict:
    from safetensors import SafetensorError

    import megatron_harpe.convert.hf_files as files
    from megatron_harpe import cli
    from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf

    def full(*args, **kwargs):  # what safetensors raises when the disk fills (its Rust IoError)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    files.save_file = full
    try:
        convert_megatron_to_hf(save_dir, output)
    except Exception as error:  # noqa: BLE001 - what the command line would print
        return {"message": cli.user_error_message(error), "errno": getattr(error, "errno", None)}
    return {"message": "exported"}


@pytest.mark.distributed
def test_a_full_disk_during_the_export_is_one_user_error(saving: Path, tmp_path: Path) -> None:
    (result,) = parallel.run_on_ranks(_export_onto_a_full_disk, 1, str(saving), str(tmp_path / "hf"))
    assert result["errno"] == errno.ENOSPC
    assert "the disk is full: free space or choose another directory" in result["message"]
    assert not any(tmp_path.iterdir())  # the staging directory is gone too


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(), reason="needs user+mount namespaces to mount a small tmpfs")
def test_a_really_full_disk_during_the_export(saving: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    command = textwrap.dedent(f"""
        mount -t tmpfs -o size=64k tmpfs {small} && {sys.executable} tools/convert_checkpoint.py megatron-to-hf \\
            --input {saving} --output {small / "hf"}; echo "exit=$?"
    """)
    completed = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "exit=2" in completed.stdout, completed.stdout + completed.stderr
    (line,) = error_lines(completed.stderr)
    assert "the disk is full" in line and str(small) in line
    assert "Traceback" not in completed.stderr
