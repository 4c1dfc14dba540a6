"""Training batches from Megatron datasets: megatron-core's GPTDataset / BlendedDataset, a
deterministic and resumable split of samples over data-parallel ranks, and the load-balanced
split of every sequence over context-parallel ranks.

    dataset = build_gpt_dataset(["work/demo/demo_text_document"], None, seq_length=1024,
                                num_samples=8000, seed=1234, tokenizer=load_tokenizer("tokenizer.model"))
    for batch in micro_batches(dataset, micro_batch_size=2, global_batch_size=16,
                               dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, consumed_samples=0):
        batch = slice_for_context_parallel(batch, ctx.cp_rank, ctx.cp_size)   # [b, s / cp]

Documents are concatenated across boundaries (packing); with `reset_position_ids` positions
restart after every end-of-document token, `eod_mask_loss` drops the loss on it. Both need an
EOS per document in the data (`tools/prepare_data.py` adds one by default). No dense
attention mask is built (`create_attention_mask=False`): with `reset_attention_mask` the trainer
masks documents itself from the EOD positions (documents.py, thd.py).

A loss-mask dataset (`loss_mask_prefixes`, one per token dataset) restricts the loss to chosen
tokens, e.g. the answers of a retrieval task: it holds the same documents with the same lengths,
and its value at a token (0 or 1) says whether predicting that token carries loss. Write one
with `megatron_harpe.data.indexed.DatasetWriter(prefix, vocab_size=2)`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Iterator

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_harpe.data.identity import file_sha256
from megatron_harpe.data.index_cache import cache_directory, cache_identifiers
from megatron_harpe.data.indexed import dataset_exists, mask_prefix_problem
from megatron_harpe.data.integrity import validate_indexed_dataset
from megatron_harpe.data.tokenizer import Tokenizer
from megatron_harpe.parallel import context_parallel_indices

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclasses.dataclass
class _SpecialIds:
    """The part of a tokenizer megatron-core's GPTDataset reads: `eod`, `pad`, `vocab_size`,
    and `unique_identifiers` (hashed into its index cache names; with `content`, the data's
    identity, so a cache never outlives the data it was built from: data/index_cache.py)."""

    eod: int
    vocab_size: int | None
    pad: int = -1  # samples are never padded here, so no real token is mistaken for padding
    content: dict = dataclasses.field(default_factory=dict)

    @property
    def unique_identifiers(self) -> dict:
        return {"eod": self.eod, "vocab_size": self.vocab_size, **self.content}


def _special_ids(tokenizer: Tokenizer | int, needs_eod: bool) -> _SpecialIds:
    if isinstance(tokenizer, int):
        return _SpecialIds(eod=tokenizer, vocab_size=None)
    if tokenizer.eos_id is None and needs_eod:
        raise ValueError(
            f"tokenizer {tokenizer.path} has no EOS token, but reset_position_ids / reset_attention_mask / "
            "eod_mask_loss find documents by it: pass the end-of-document id explicitly or turn those off"
        )
    return _SpecialIds(eod=tokenizer.eos_id if tokenizer.eos_id is not None else -1, vocab_size=tokenizer.vocab_size)


@dataclasses.dataclass
class _LossMaskedConfig(GPTDatasetConfig):
    loss_mask_prefixes: dict[str, str] = dataclasses.field(default_factory=dict)
    """Token dataset prefix -> its loss-mask dataset prefix."""


class LossMaskedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset whose loss mask is also multiplied by a loss-mask dataset.

    The mask is read through a shallow copy of this dataset whose low-level dataset is the
    mask's: the copy shares the document, sample and shuffle indices, so every sample reads
    the same documents at the same offsets from both files (megatron has no hook for this).
    """

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        mask_prefix = config.loss_mask_prefixes[dataset_path]
        mask_dataset = IndexedDataset(mask_prefix)
        problem = mask_prefix_problem(dataset_path, indexed_dataset, mask_prefix, mask_dataset)
        if problem:
            raise ValueError(problem)
        self._mask_view = copy.copy(self)
        self._mask_view.dataset = mask_dataset

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        values, _ = self._mask_view._query_document_sample_shuffle_indices(0 if idx is None else idx)
        label_values = values[1:]  # labels are the tokens shifted by one: mask what is predicted
        if not self.config.add_extra_token_to_sequence:
            label_values = numpy.append(label_values, 0)
        sample["loss_mask"] = sample["loss_mask"] * torch.from_numpy(label_values > 0).to(sample["loss_mask"].dtype)
        return sample


def _token_count(prefix: str) -> float:
    dataset = IndexedDataset(prefix)  # must outlive the read: its __del__ unmaps the index
    return float(dataset.sequence_lengths.sum())


def build_gpt_dataset(
    prefixes: list[str],
    weights: list[float] | None,
    seq_length: int,
    num_samples: int,
    seed: int,
    tokenizer: Tokenizer | int,
    *,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    loss_mask_prefixes: list[str] | None = None,
    cache_dir: str | None = None,
    alone: bool = False,
) -> torch.utils.data.Dataset:
    """megatron-core's GPTDataset (one prefix) or BlendedDataset (several) with at least
    `num_samples` samples of `seq_length` tokens, shuffled by `seed`.

    `tokenizer` gives the end-of-document id (its EOS) and vocabulary size; an int is taken as
    the end-of-document id itself. `weights` are blend weights (None: by token count).
    `loss_mask_prefixes` (one per prefix) restrict the loss to the tokens marked 1 there.
    `cache_dir` keeps megatron's sample indices between runs, keyed by the data's content
    (None: the default place, data/index_cache.py). `alone=True` builds (and caches) as if this
    were the only process, whatever the process group: rank 0's pass before the others read.
    """
    if not prefixes:
        raise ValueError("data.prefixes is empty: give at least one dataset prefix (path without .bin/.idx)")
    for prefix in prefixes:
        if not dataset_exists(prefix):
            raise ValueError(f"dataset {prefix}.bin/.idx not found: prepare it with tools/prepare_data.py")
        validate_indexed_dataset(prefix)
    if loss_mask_prefixes is not None:
        if len(loss_mask_prefixes) != len(prefixes):
            raise ValueError(
                f"data.loss_mask_prefixes has {len(loss_mask_prefixes)} entries for {len(prefixes)} prefixes: "
                "give one loss-mask dataset per prefix"
            )
        for prefix in loss_mask_prefixes:
            if not dataset_exists(prefix):
                raise ValueError(f"loss-mask dataset {prefix}.bin/.idx not found: write it next to its token dataset")
            validate_indexed_dataset(prefix)
    if weights is not None and len(weights) != len(prefixes):
        raise ValueError(
            f"data.weights has {len(weights)} entries for {len(prefixes)} prefixes: give one weight per prefix"
        )
    if weights is not None and (any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"data.weights {weights} must be finite, non-negative numbers with a positive sum")
    if seq_length < 1 or num_samples < 1:
        raise ValueError(f"seq_length={seq_length} and num_samples={num_samples} must be positive")
    special = _special_ids(tokenizer, reset_position_ids or reset_attention_mask or eod_mask_loss)
    tokenizer_sha256 = file_sha256(tokenizer.path) if isinstance(tokenizer, Tokenizer) else None
    special.content = cache_identifiers(list(prefixes) + list(loss_mask_prefixes or []), tokenizer_sha256)
    if cache_dir is None:
        cache_dir = str(cache_directory(None, list(prefixes)))
    if weights is None and len(prefixes) > 1:
        # megatron blends unweighted datasets over a single epoch only; weighting by token count
        # gives the same proportions and lets it repeat data up to num_samples
        weights = [_token_count(prefix) for prefix in prefixes]
    masked = loss_mask_prefixes is not None
    config = (_LossMaskedConfig if masked else GPTDatasetConfig)(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prefixes), list(weights) if weights is not None else None),
        split="1,0,0",
        path_to_cache=cache_dir,
        tokenizer=special,  # type: ignore[arg-type]  # duck-typed: GPTDataset reads eod/pad/vocab_size
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        **({"loss_mask_prefixes": dict(zip(prefixes, loss_mask_prefixes))} if masked else {}),
    )
    dataset_class = LossMaskedGPTDataset if masked else GPTDataset
    builder = BlendedMegatronDatasetBuilder(dataset_class, [num_samples, 0, 0], lambda: True, config)
    with _megatron_sees_one_process(alone):
        train, _, _ = builder.build()
    if train is None or len(train) < num_samples:
        raise ValueError(
            f"could not build {num_samples} samples of {seq_length} tokens from {prefixes}: is the data too small?"
        )
    return train


@contextlib.contextmanager
def _megatron_sees_one_process(alone: bool) -> Iterator[None]:
    """Let megatron-core's dataset builders run as the only process: with `alone` (rank 0
    building and caching the indices before the other ranks read them, so a failure is reported
    by every rank instead of leaving them in megatron's barrier until the timeout), and without
    any process group (its BlendedDataset calls torch.distributed.get_rank() before caching even
    then, where its GPTDataset asks is_initialized() first)."""
    if torch.distributed.is_initialized() and not alone:
        yield
        return
    saved = torch.distributed.is_initialized, torch.distributed.get_rank
    torch.distributed.is_initialized, torch.distributed.get_rank = (lambda: False), (lambda group=None: 0)
    try:
        yield
    finally:
        torch.distributed.is_initialized, torch.distributed.get_rank = saved


@dataclasses.dataclass(frozen=True)
class SampleSchedule:
    """Which sample indices a data-parallel rank reads, micro-batch by micro-batch.

    Megatron's order: global batch g covers samples [g*G, (g+1)*G); inside it micro-step m
    covers [g*G + m*M*D, g*G + (m+1)*M*D) and rank r takes the r-th block of M. Every sample
    is read by exactly one rank, and starting at `consumed_samples` continues exactly where a
    run that consumed them stopped.
    """

    micro_batch_size: int
    global_batch_size: int
    dp_rank: int
    dp_size: int
    consumed_samples: int = 0

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.dp_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} and dp_size={self.dp_size} must be positive")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={self.dp_rank} is outside [0, {self.dp_size})")
        if self.global_batch_size % (self.micro_batch_size * self.dp_size):
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size x "
                f"data-parallel size = {self.micro_batch_size} x {self.dp_size}: change the batch sizes"
            )
        if self.consumed_samples < 0 or self.consumed_samples % (self.micro_batch_size * self.dp_size):
            raise ValueError(
                f"consumed_samples={self.consumed_samples} is not a multiple of micro_batch_size x data-parallel "
                f"size ({self.micro_batch_size * self.dp_size}): resume from a checkpoint of the same batch layout"
            )

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def indices(self, total_samples: int) -> Iterator[list[int]]:
        """Sample indices of each of this rank's micro-batches, up to the last complete
        global batch within `total_samples`."""
        step = self.micro_batch_size * self.dp_size
        last_full = (total_samples // self.global_batch_size) * self.global_batch_size
        for start in range(self.consumed_samples, last_full, step):
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def micro_batches(
    dataset: torch.utils.data.Dataset,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches (`{tokens, labels, loss_mask, position_ids}`, each
    [micro_batch_size, seq]) in training order from `consumed_samples` on; see `SampleSchedule`.
    (Other sample entries, such as a blend's `dataset_id`, are left out.)"""
    schedule = SampleSchedule(micro_batch_size, global_batch_size, dp_rank, dp_size, consumed_samples)
    for indices in schedule.indices(len(dataset)):
        samples = [dataset[index] for index in indices]
        yield {key: torch.stack([sample[key] for sample in samples]) for key in SEQUENCE_KEYS}


def slice_for_context_parallel(
    batch: dict[str, torch.Tensor], cp_rank: int, cp_size: int, seq_dim: int = 1
) -> dict[str, torch.Tensor]:
    """This CP rank's part of every sequence tensor (tokens, labels, loss_mask, position_ids);
    other entries pass through. With cp_size 1 the batch is returned as is."""
    if cp_size == 1:
        return batch
    sliced = dict(batch)
    for key in SEQUENCE_KEYS:
        if key in batch:
            tensor = batch[key]
            positions = context_parallel_indices(tensor.size(seq_dim), cp_rank, cp_size)
            sliced[key] = tensor.index_select(seq_dim, positions.to(tensor.device))
    return sliced
