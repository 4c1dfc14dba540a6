"""Fault: two data-preparation runs writing one output (issue 27 case 5).

    python -m pytest tests/faults/test_output_lock.py -q

Before: two `tokenize` runs into one output prefix, started 0.5 s apart with different inputs,
both exited 0 and the later one replaced the other's finished dataset without --overwrite (the
check ran only at start). Now the second refuses while the first holds the prefix's lock, and a
writer that finds a finished dataset at rename time keeps it and fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_support import REPO, environment, error_lines
from data_support import sample_corpus

from megatron_harpe.data.indexed import DatasetWriter, read_documents
from megatron_harpe.data.jsonl import atomic_output

_HOLD = """
import sys
from megatron_harpe.data.output_lock import output_lock
with output_lock(sys.argv[1], "dataset"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _tokenize(corpus: Path, prefix: Path, tokenizer: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "tools/prepare_data.py",
            "tokenize",
            "--inputs",
            str(corpus),
            "--tokenizer",
            tokenizer,
            "--output",
            str(prefix),
            "--workers",
            "0",
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_second_tokenize_into_the_same_prefix_is_refused_while_the_first_runs(demo_data, tmp_path: Path) -> None:
    """The first run is a process holding the prefix as tokenize does (deterministic: a real
    tokenize may finish before a second one has started)."""
    corpus = sample_corpus(demo_data, tmp_path / "corpus.jsonl", 30)
    prefix = tmp_path / "out" / "train"
    first = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(prefix)],
        cwd=REPO,
        env=environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline() == "held\n"
        second = _tokenize(corpus, prefix, str(demo_data.tokenizer))
    finally:
        first.communicate("", timeout=60)
    assert second.returncode == 2, second.stderr
    (line,) = error_lines(second.stderr)
    assert f"dataset {prefix} is being written by another run (host " in line and f"pid {first.pid}" in line
    assert "Traceback" not in second.stderr
    assert not Path(f"{prefix}.bin").exists() and not Path(f"{prefix}.lock").exists()
    again = _tokenize(corpus, prefix, str(demo_data.tokenizer))  # the first run is over: the lock is free
    assert again.returncode == 0, again.stderr
    assert len(read_documents(prefix)) == 30


def test_a_finished_dataset_found_at_rename_time_is_kept(tmp_path: Path) -> None:
    """A writer that did not see the lock (another version, another tool) finished first."""
    prefix = tmp_path / "train"
    with pytest.raises(
        ValueError, match="was written by another run while this one worked: nothing of this run was kept"
    ):
        with DatasetWriter(prefix, vocab_size=100) as late:
            late.add_document([1, 2, 3])
            early = DatasetWriter(prefix, vocab_size=100)
            early.temporary_prefix += "-other"  # as another process's would be
            with early:
                early.add_document([7, 8])
    (kept,) = read_documents(prefix)
    assert kept.tolist() == [7, 8]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train.bin", "train.idx"]


def test_a_finished_jsonl_output_found_at_rename_time_is_kept(tmp_path: Path) -> None:
    output = tmp_path / "up.jsonl"
    with pytest.raises(ValueError, match="was written by another run while this one worked"):
        with atomic_output(output) as temporary:
            temporary.write_text("late\n")
            output.write_text("early\n")
    assert output.read_text() == "early\n" and os.listdir(tmp_path) == ["up.jsonl"]


def test_overwrite_still_replaces_a_finished_dataset(tmp_path: Path) -> None:
    prefix = tmp_path / "train"
    for ids, overwrite in (([1, 2], False), ([3, 4, 5], True)):
        with DatasetWriter(prefix, vocab_size=100, overwrite=overwrite) as writer:
            writer.add_documents(np.array(ids), np.array([len(ids)]))
    assert [doc.tolist() for doc in read_documents(prefix)] == [[3, 4, 5]]
