"""Fault: damaged inputs. A truncated .zst is refused like a truncated .gz (file and line named);
a damaged or truncated .idx / .bin is refused before training, naming the file and the fix.

    python -m pytest tests/faults/test_input_integrity.py -q
"""

from __future__ import annotations

import gzip
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from megatron_harpe.data.indexed import DatasetWriter, merge_datasets
from megatron_harpe.data.integrity import validate_indexed_dataset
from megatron_harpe.data.jsonl import read_line_chunks
from megatron_harpe.data.loader import build_gpt_dataset

HEADER_BYTES = 9 + 8 + 1 + 8 + 8


def _jsonl(documents: int) -> bytes:
    return b"".join(
        json.dumps({"text": f"document {i} " + "word " * (i % 50 + 20), "source": "web"}).encode() + b"\n"
        for i in range(documents)
    )


def _count_lines(path: Path) -> int:
    return sum(len(chunk.lines) for chunk in read_line_chunks([path]))


@pytest.mark.parametrize(
    "suffix, compress", [(".zst", lambda d: zstandard.ZstdCompressor(level=3).compress(d)), (".gz", gzip.compress)]
)
def test_truncated_compressed_jsonl_is_refused_with_file_and_line(tmp_path: Path, suffix, compress) -> None:
    data = _jsonl(4000)
    whole = compress(data)
    intact = tmp_path / f"intact.jsonl{suffix}"
    intact.write_bytes(whole)
    assert _count_lines(intact) == 4000
    truncated = tmp_path / f"cut.jsonl{suffix}"
    truncated.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(ValueError, match=rf"cannot read {truncated} after line \d+ \(corrupt or truncated"):
        _count_lines(truncated)


def test_multi_frame_zst_reads_every_frame(tmp_path: Path) -> None:
    data = _jsonl(300)
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(data) + zstandard.ZstdCompressor().compress(data))
    assert _count_lines(path) == 600


@pytest.fixture()
def dataset(tmp_path: Path) -> str:
    prefix = str(tmp_path / "corpus")
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=200)
    with DatasetWriter(prefix, vocab_size=1000) as writer:
        writer.add_documents(rng.integers(0, 1000, size=int(lengths.sum())).astype(np.uint16), lengths)
    assert validate_indexed_dataset(prefix) == (200, int(lengths.sum()))
    return prefix


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def test_ff_bytes_in_the_lengths_table_are_refused(dataset: str) -> None:
    _patch(dataset + ".idx", HEADER_BYTES + 40, b"\xff" * 64)  # as tried on main: it trained on -1 lengths
    with pytest.raises(
        ValueError, match=rf"dataset index {dataset}.idx gives sequence 10 a negative length -1.*prepare_data"
    ):
        validate_indexed_dataset(dataset)


def test_a_length_that_disagrees_with_the_pointers_is_refused(dataset: str) -> None:
    _patch(dataset + ".idx", HEADER_BYTES + 4 * 7, np.int32(10_000).tobytes())
    with pytest.raises(
        ValueError, match=r"corpus.idx has a sequence pointer that does not follow the lengths \(sequence 8"
    ):
        validate_indexed_dataset(dataset)


def test_truncated_idx_and_bin_are_refused_naming_the_file(dataset: str) -> None:
    bin_path, idx_path = Path(dataset + ".bin"), Path(dataset + ".idx")
    bin_path.write_bytes(bin_path.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=rf"dataset file {bin_path} is truncated: .*re-create it with tools/prepare_data.py"
    ):
        validate_indexed_dataset(dataset)
    idx_path.write_bytes(idx_path.read_bytes()[:-16])
    with pytest.raises(ValueError, match=rf"dataset index {idx_path} is truncated"):
        validate_indexed_dataset(dataset)
    idx_path.write_bytes(idx_path.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"dataset index {idx_path} is truncated \(20 bytes"):
        validate_indexed_dataset(dataset)


def test_training_and_merging_refuse_a_damaged_dataset(dataset: str, tmp_path: Path) -> None:
    _patch(dataset + ".idx", HEADER_BYTES, b"\xff" * 64)
    with pytest.raises(ValueError, match=rf"{dataset}.idx gives sequence 0 a negative length"):
        build_gpt_dataset([dataset], None, seq_length=16, num_samples=4, seed=1, tokenizer=0)
    with pytest.raises(ValueError, match=rf"{dataset}.idx gives sequence 0 a negative length"):
        merge_datasets([dataset], tmp_path / "merged")


def test_validating_a_large_index_is_fast(tmp_path: Path) -> None:
    """5M documents (written directly in megatron's layout: its builder takes a while)."""
    prefix, documents = str(tmp_path / "large"), 5_000_000
    lengths = np.full(documents, 3, dtype=np.int32)
    pointers = np.arange(documents, dtype=np.int64) * 6
    with open(prefix + ".idx", "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, documents, documents + 1))  # code 8: uint16
        for array in (lengths, pointers, np.arange(documents + 1, dtype=np.int64)):
            handle.write(array.tobytes())
    with open(prefix + ".bin", "wb") as handle:
        handle.truncate(documents * 6)
    start = time.perf_counter()
    assert validate_indexed_dataset(prefix) == (documents, 3 * documents)
    assert time.perf_counter() - start < 3.0
