"""Fault: temporary files of a killed run. On main, after a SIGKILL the hidden
`.X.incomplete-PID` dirs (conversion) and `x.tmp-PID.bin` files (datasets) stayed forever.
Now the next writer of the same output removes those of dead processes, in one line.
(`iter_N.tmp` checkpoint dirs: see test_checkpoint_lock.py.)

    python -m pytest tests/faults/test_leftovers.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from megatron_harpe.convert.hf_files import staging_directory
from megatron_harpe.data.indexed import DatasetWriter, read_documents
from megatron_harpe.data.jsonl import atomic_output


def _killed_writer(code: str) -> int:
    """Run `code` in a process that SIGKILLs itself at the end, as a killed run; returns its pid."""
    process = subprocess.run(
        [sys.executable, "-c", code + "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)"],
        capture_output=True,
        text=True,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    return int(process.stdout.split()[0])


def test_dataset_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "corpus"
    dead = _killed_writer(
        textwrap.dedent(f"""
        import os, numpy as np
        from megatron_harpe.data.indexed import DatasetWriter
        writer = DatasetWriter({str(prefix)!r}, vocab_size=100).__enter__()
        writer.add_documents(np.arange(50, dtype=np.uint16), np.array([20, 30]))
        writer._builder.data_file.flush()
        print(os.getpid(), flush=True)
    """)
    )
    assert (tmp_path / f"corpus.tmp-{dead}.bin").is_file()
    live = tmp_path / f"corpus.tmp-{os.getppid()}.bin"  # a live writer's file is left alone
    live.write_bytes(b"")
    with DatasetWriter(prefix, vocab_size=100) as writer:
        writer.add_documents(np.arange(10, dtype=np.uint16), np.array([10]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin", "corpus.idx", live.name]
    assert [len(doc) for doc in read_documents(prefix)] == [10]
    assert (
        f"removed 1 leftover temporary file(s) of a killed run in {tmp_path}: corpus.tmp-{dead}.bin"
        in capsys.readouterr().err
    )


def test_jsonl_and_conversion_staging_leftovers_are_removed(tmp_path: Path, capsys) -> None:
    dead = _killed_writer("import os; print(os.getpid())")
    (tmp_path / f"up.jsonl.zst.tmp-{dead}").write_bytes(b"partial")
    staging = tmp_path / f".hf_model.incomplete-{dead}"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "model-00001.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / f".other_model.incomplete-{dead}").mkdir()  # another output's: not ours to judge

    with atomic_output(tmp_path / "up.jsonl.zst") as temporary:
        temporary.write_bytes(b"done")
    with staging_directory(tmp_path / "hf_model") as directory:
        (directory / "config.json").write_text("{}")

    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other_model.incomplete-{dead}", "hf_model", "up.jsonl.zst"]
    err = capsys.readouterr().err
    assert f"up.jsonl.zst.tmp-{dead}" in err and f".hf_model.incomplete-{dead}" in err
