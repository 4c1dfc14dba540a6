"""Writing, merging and reading back Megatron indexed datasets (`prefix.bin` + `prefix.idx`).

Files are produced by megatron-core's own `IndexedDatasetBuilder`, so `IndexedDataset` and
`GPTDataset` read them unchanged. Each document is one sequence and one document entry, which
keeps document boundaries for the loader (EOD resets, per-document statistics).

    with DatasetWriter("out/corpus", vocab_size=32000) as writer:   # writes out/corpus.tmp-<pid>.*
        writer.add_documents(flat_ids, lengths)                      # many documents at once
    # now out/corpus.bin and out/corpus.idx exist; on an exception neither does

    merge_datasets(["shards/a", "shards/b"], "out/all")                 # (documents, tokens, largest id)
    docs = read_documents("out/all")                                 # list of numpy arrays
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_harpe import files
from megatron_harpe.data.identity import scan_largest_token_id
from megatron_harpe.data.index_cache import remove_cached_indices
from megatron_harpe.data.integrity import validate_indexed_dataset
from megatron_harpe.leftovers import remove_dead_temporaries


def token_dtype(vocab_size: int) -> type[np.number]:
    """The on-disk token dtype megatron-core picks for a vocabulary (uint16 below 65500)."""
    return DType.optimal_dtype(vocab_size)


def dataset_exists(prefix: str | Path) -> bool:
    prefix = str(prefix)
    return os.path.exists(get_bin_path(prefix)) or os.path.exists(get_idx_path(prefix))


def mask_prefix_problem(prefix: str, dataset: IndexedDataset, mask_prefix: str, mask: IndexedDataset) -> str | None:
    """Why `mask_prefix` cannot be the loss mask of `prefix` (None if it can): both must hold
    the same documents with the same lengths."""
    if len(mask.sequence_lengths) != len(dataset.sequence_lengths):
        return (
            f"loss-mask dataset {mask_prefix} has {len(mask.sequence_lengths)} documents but {prefix} has "
            f"{len(dataset.sequence_lengths)}: write the mask from the same tokenized dataset"
        )
    if not np.array_equal(mask.sequence_lengths, dataset.sequence_lengths):
        first = int(np.flatnonzero(mask.sequence_lengths != dataset.sequence_lengths)[0])
        return (
            f"loss-mask dataset {mask_prefix} does not match {prefix}: document {first} has "
            f"{mask.sequence_lengths[first]} mask values for {dataset.sequence_lengths[first]} tokens; "
            "write the mask from the same tokenized dataset"
        )
    return None


def check_output_prefix(prefix: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing dataset unless asked to."""
    if dataset_exists(prefix) and not overwrite:
        raise ValueError(
            f"output {prefix}.bin/.idx already holds a dataset: pass --overwrite to replace it or choose another prefix"
        )


class _BatchedBuilder(IndexedDatasetBuilder):
    """`IndexedDatasetBuilder` plus one call that adds many single-sequence documents.

    `add_document` per document costs a numpy conversion and a write each; here a batch of
    documents is one write and two list extends, with the same index layout as a loop of
    `add_document(ids, [len(ids)])` calls.
    """

    def add_documents(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        assert flat_ids.dtype == self.dtype and flat_ids.ndim == 1
        assert int(lengths.sum()) == flat_ids.size
        self.data_file.write(memoryview(np.ascontiguousarray(flat_ids)).cast("B"))
        first = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths.tolist())
        self.document_indices.extend(range(first + 1, first + 1 + len(lengths)))


class DatasetWriter:
    """Context manager writing `prefix.bin/.idx` under temporary names, renamed on success.

    `vocab_size` fixes the token dtype (as megatron-core expects for it) and is the bound
    every written id is checked against; `dtype` alone (for merging) bounds ids by the dtype.
    """

    def __init__(
        self,
        prefix: str | Path,
        vocab_size: int | None = None,
        overwrite: bool = False,
        dtype: type[np.number] | None = None,
    ) -> None:
        if (vocab_size is None) == (dtype is None):
            raise ValueError("DatasetWriter needs exactly one of vocab_size and dtype")
        self.prefix = str(prefix)
        self.dtype = token_dtype(vocab_size) if vocab_size is not None else dtype
        self.vocab_size = vocab_size if vocab_size is not None else int(np.iinfo(self.dtype).max) + 1
        self.overwrite = overwrite
        self.temporary_prefix = f"{self.prefix}.tmp-{os.getpid()}"
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1
        """The largest id written (-1: none): recorded in the summary, checked by training."""
        self._builder: _BatchedBuilder | None = None

    def __enter__(self) -> "DatasetWriter":
        check_output_prefix(self.prefix, self.overwrite)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        name = re.escape(Path(self.prefix).name)
        remove_dead_temporaries(Path(self.prefix).parent, rf"{name}\.tmp-(?P<pid>\d+)\.(bin|idx)")
        self._builder = _BatchedBuilder(get_bin_path(self.temporary_prefix), dtype=self.dtype)
        return self

    def add_documents(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids and per-document lengths."""
        assert self._builder is not None, "use DatasetWriter as a context manager"
        largest = int(flat_ids.max()) if flat_ids.size else -1
        if flat_ids.size and (largest >= self.vocab_size or int(flat_ids.min()) < 0):
            raise ValueError(f"token id outside [0, {self.vocab_size}) written to {self.prefix}")
        self.max_token_id = max(self.max_token_id, largest)
        self._builder.add_documents(flat_ids.astype(self.dtype, copy=False), np.asarray(lengths, dtype=np.int64))
        self.documents += len(lengths)
        self.tokens += int(flat_ids.size)

    def add_document(self, ids: Sequence[int]) -> None:
        array = np.asarray(ids, dtype=np.int64)
        self.add_documents(array, np.array([array.size]))

    def add_dataset(self, prefix: str | Path) -> None:
        """Append a whole existing dataset (a shard) with megatron-core's `add_index`."""
        assert self._builder is not None, "use DatasetWriter as a context manager"
        shard = IndexedDataset(str(prefix), mmap=True)
        if shard.index.dtype != self.dtype:
            raise ValueError(
                f"shard {prefix} stores {np.dtype(shard.index.dtype).name} tokens but this dataset uses "
                f"{np.dtype(self.dtype).name}: shards must be written with the same vocabulary size"
            )
        self.documents += len(shard.document_indices) - 1
        self.tokens += int(shard.sequence_lengths.sum())
        del shard
        self.max_token_id = max(self.max_token_id, scan_largest_token_id(prefix))
        self._builder.add_index(str(prefix))

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        assert self._builder is not None
        temporary_bin = get_bin_path(self.temporary_prefix)
        temporary_idx = get_idx_path(self.temporary_prefix)
        try:
            if exc_type is None:
                self._builder.finalize(temporary_idx)
                if not self.overwrite and dataset_exists(self.prefix):
                    raise ValueError(
                        f"output {self.prefix}.bin/.idx was written by another run while this one worked: nothing of "
                        "this run was kept; pass --overwrite to replace that dataset, or choose another prefix"
                    )
                if self.overwrite:  # a stale .idx must never pair with the new .bin, nor its summary or indices
                    for stale in (get_idx_path(self.prefix), get_bin_path(self.prefix), f"{self.prefix}.summary.json"):
                        if os.path.exists(stale):
                            os.remove(stale)
                    remove_cached_indices(self.prefix)
                files.publish(temporary_bin, get_bin_path(self.prefix))
                files.publish(temporary_idx, get_idx_path(self.prefix))
            else:
                self._builder.data_file.close()
        finally:
            for leftover in (temporary_bin, temporary_idx):
                if os.path.exists(leftover):
                    os.remove(leftover)


def merge_datasets(
    shard_prefixes: Sequence[str | Path], output_prefix: str | Path, overwrite: bool = False
) -> tuple[int, int, int]:
    """Concatenate shard datasets in the given order into one (all must share a token dtype);
    returns (documents, tokens, largest token id)."""
    if not shard_prefixes:
        raise ValueError("no datasets to merge")
    for shard in shard_prefixes:
        if not (os.path.exists(get_bin_path(str(shard))) and os.path.exists(get_idx_path(str(shard)))):
            raise ValueError(f"dataset {shard}.bin/.idx not found")
        validate_indexed_dataset(str(shard))
    first = IndexedDataset(str(shard_prefixes[0]), mmap=True)
    dtype = first.index.dtype
    del first
    with DatasetWriter(output_prefix, overwrite=overwrite, dtype=dtype) as writer:
        for shard in shard_prefixes:
            writer.add_dataset(shard)
    return writer.documents, writer.tokens, writer.max_token_id


def read_documents(prefix: str | Path) -> list[np.ndarray]:
    """Every document of a dataset as an array of token ids, read with megatron-core.
    (Copies: megatron's arrays view a memory map that closes with the dataset.)"""
    dataset = IndexedDataset(str(prefix), mmap=True)
    documents = []
    for start, end in zip(dataset.document_indices[:-1].tolist(), dataset.document_indices[1:].tolist()):
        parts = [np.array(dataset[i], dtype=np.int64) for i in range(start, end)]
        documents.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return documents
