"""Fault: a full disk while `train-tokenizer` writes its model (issue 27 case 12).

    python -m pytest tests/faults/test_tokenizer_files.py -q

Before: `tok.model.tmp-PID` stayed behind for good when the write failed. Now the failed run
removes it, and the next run removes what a killed one left.
"""

from __future__ import annotations

import errno
import os
import pathlib
from pathlib import Path

import pytest
from cli_support import error_lines, run

from megatron_harpe.data.tokenizer import train_sentencepiece

TEXTS = [f"document {index}: the quick brown fox jumps over the lazy dog {index * 7}" for index in range(200)]


def test_a_failed_write_leaves_no_temporary_model(tmp_path: Path, monkeypatch) -> None:
    original = pathlib.Path.write_bytes

    def disk_fills_up(path, data):
        original(path, data[: len(data) // 2])  # part of it reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        train_sentencepiece(TEXTS, tmp_path / "tok", vocab_size=300)
    assert list(tmp_path.iterdir()) == []


def test_the_next_run_removes_a_killed_runs_temporary(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "{text}"}}\n' for text in TEXTS))
    leftover = tmp_path / "tok.model.tmp-999999999"  # a pid that cannot be running
    leftover.write_bytes(b"half a model")
    completed = run(
        "tools/prepare_data.py",
        "train-tokenizer",
        "--inputs",
        str(corpus),
        "--output",
        str(tmp_path / "tok"),
        "--vocab-size",
        "300",
    )
    assert completed.returncode == 0, completed.stderr
    assert "removed 1 leftover temporary file(s) of a killed run" in completed.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.jsonl", "tok.model"]
    again = run(
        "tools/prepare_data.py",
        "train-tokenizer",
        "--inputs",
        str(corpus),
        "--output",
        str(tmp_path / "tok"),
        "--vocab-size",
        "300",
    )
    assert again.returncode == 2 and "already exists: pass --overwrite" in error_lines(again.stderr)[0]
