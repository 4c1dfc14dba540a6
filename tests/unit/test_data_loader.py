"""Training-side data: per-DP-rank sample schedule (disjoint, complete, resumable), context-
parallel slicing, and megatron-core GPTDataset / BlendedDataset built by `build_gpt_dataset`.

    pytest tests/unit/test_data_loader.py
"""

from __future__ import annotations

import json
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from megatron_harpe.data.loader import (
    SampleSchedule,
    build_gpt_dataset,
    context_parallel_indices,
    micro_batches,
    slice_for_context_parallel,
)
from megatron_harpe.data.pipeline import tokenize_corpus
from megatron_harpe.data.tokenizer import load_tokenizer, train_sentencepiece


class IndexDataset(torch.utils.data.Dataset):
    """Sample i is a sequence whose tokens all equal i: batches reveal which samples they hold."""

    def __init__(self, size: int, seq_length: int = 8) -> None:
        self.size, self.seq_length = size, seq_length

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = torch.full((self.seq_length,), index, dtype=torch.long)
        return {
            "tokens": tokens,
            "labels": tokens + 1,
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


def samples_seen(dataset, **kwargs) -> list[list[int]]:
    return [batch["tokens"][:, 0].tolist() for batch in micro_batches(dataset, **kwargs)]


@pytest.mark.parametrize("micro, global_batch, dp", [(1, 8, 2), (2, 8, 2), (2, 12, 3), (1, 4, 4)])
def test_dp_ranks_read_disjoint_samples_whose_union_is_the_single_rank_schedule(micro, global_batch, dp):
    dataset = IndexDataset(50)
    single = samples_seen(dataset, micro_batch_size=micro, global_batch_size=global_batch, dp_rank=0, dp_size=1)
    per_rank = [
        samples_seen(dataset, micro_batch_size=micro, global_batch_size=global_batch, dp_rank=r, dp_size=dp)
        for r in range(dp)
    ]
    flat = [[i for batch in batches for i in batch] for batches in per_rank]
    assert all(not set(a) & set(b) for k, a in enumerate(flat) for b in flat[k + 1 :])
    steps = len(single) * micro // global_batch
    assert steps == 50 // global_batch
    accumulation = global_batch // (micro * dp)
    for step in range(steps):  # each optimizer step sees the same samples as the single rank's step
        single_step = single[step * global_batch // micro : (step + 1) * global_batch // micro]
        ranks_step = [b for batches in per_rank for b in batches[step * accumulation : (step + 1) * accumulation]]
        assert sorted(i for b in ranks_step for i in b) == sorted(i for b in single_step for i in b)


def test_resume_at_consumed_samples_continues_exactly():
    dataset = IndexDataset(64)
    full = samples_seen(dataset, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp_size=2)
    accumulation = 2
    resumed = samples_seen(
        dataset, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp_size=2, consumed_samples=3 * 8
    )
    assert resumed == full[3 * accumulation :]
    schedule = SampleSchedule(2, 8, 1, 2, consumed_samples=3 * 8)
    assert schedule.accumulation_steps == accumulation and list(schedule.indices(64)) == resumed


def test_schedule_rejects_inconsistent_batch_layouts():
    with pytest.raises(ValueError, match="global_batch_size=10 is not a multiple"):
        SampleSchedule(micro_batch_size=2, global_batch_size=10, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="consumed_samples=3"):
        SampleSchedule(micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=2, consumed_samples=3)
    with pytest.raises(ValueError, match="dp_rank=2"):
        SampleSchedule(micro_batch_size=1, global_batch_size=4, dp_rank=2, dp_size=2)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_context_parallel_slices_reassemble_the_sequence(cp):
    seq = 32
    batch = {
        "tokens": torch.arange(2 * seq).view(2, seq),
        "labels": torch.arange(2 * seq).view(2, seq) + 1,
        "loss_mask": torch.rand(2, seq),
        "position_ids": torch.arange(seq).expand(2, seq),
        "other": torch.tensor(7),
    }
    parts = [slice_for_context_parallel(batch, rank, cp) for rank in range(cp)]
    chunk = seq // (2 * cp)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert all(part[key].shape == (2, seq // cp) for part in parts)
        chunks: list = [None] * (2 * cp)
        for rank, part in enumerate(parts):  # rank r holds chunks r and 2cp-1-r, in that order
            chunks[rank], chunks[2 * cp - 1 - rank] = part[key][:, :chunk], part[key][:, chunk:]
        assert torch.equal(torch.cat(chunks, dim=1), batch[key])
    assert all(part["other"] is batch["other"] for part in parts)
    if cp == 2:
        assert context_parallel_indices(8, 0, 2).tolist() == [0, 1, 6, 7]
        assert context_parallel_indices(8, 1, 2).tolist() == [2, 3, 4, 5]


def test_context_parallel_needs_divisible_sequences():
    with pytest.raises(ValueError, match="not divisible by 2 x parallel.context = 4"):
        slice_for_context_parallel({"tokens": torch.zeros(1, 10)}, 0, 2)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("packed")
    texts = [topics[key] for key in sorted(topics)]
    tokenizer = train_sentencepiece(texts, directory / "sp", vocab_size=700)
    for name, part in (("first", texts[:40]), ("second", texts[40:])):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        tokenize_corpus([directory / f"{name}.jsonl"], directory / name, str(tokenizer), workers=0, write_report=False)
    return directory, load_tokenizer(tokenizer)


def test_gpt_dataset_batches_resume_identically(packed):
    directory, tokenizer = packed
    dataset = build_gpt_dataset(
        [str(directory / "first")], None, seq_length=128, num_samples=64, seed=5, tokenizer=tokenizer
    )
    full = list(micro_batches(dataset, micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=2))
    again = build_gpt_dataset(
        [str(directory / "first")], None, seq_length=128, num_samples=64, seed=5, tokenizer=tokenizer
    )
    resumed = list(
        micro_batches(again, micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=2, consumed_samples=16)
    )
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        assert all(torch.equal(a[key], b[key]) for key in ("tokens", "labels", "loss_mask", "position_ids"))
    assert full[0]["tokens"].shape == (2, 128) and "attention_mask" not in full[0]
    other_seed = build_gpt_dataset(
        [str(directory / "first")], None, seq_length=128, num_samples=64, seed=6, tokenizer=tokenizer
    )
    assert not torch.equal(other_seed[0]["tokens"], dataset[0]["tokens"])


def test_blends_follow_weights_and_default_to_token_counts(packed):
    directory, tokenizer = packed
    prefixes = [str(directory / "first"), str(directory / "second")]
    blend = build_gpt_dataset(
        prefixes, [0.25, 0.75], seq_length=64, num_samples=400, seed=1, tokenizer=tokenizer.eos_id
    )
    counts = np.bincount(np.asarray(blend.dataset_index[:400]), minlength=2)
    assert counts[1] / 400 == pytest.approx(0.75, abs=0.02)
    batch = next(micro_batches(blend, micro_batch_size=2, global_batch_size=4, dp_rank=1, dp_size=2))
    assert sorted(batch) == ["labels", "loss_mask", "position_ids", "tokens"] and batch["tokens"].shape == (2, 64)
    by_size = build_gpt_dataset(prefixes, None, seq_length=64, num_samples=5000, seed=1, tokenizer=tokenizer)
    assert len(by_size) >= 5000  # more than one epoch of the data: repeated, not truncated
    sizes = [len(np.fromfile(p + ".bin", dtype=np.uint16)) for p in prefixes]
    share = np.bincount(np.asarray(by_size.dataset_index[:5000]), minlength=2)[0] / 5000
    assert share == pytest.approx(sizes[0] / sum(sizes), abs=0.02)


def test_build_gpt_dataset_errors_name_the_fix(packed, tmp_path):
    directory, tokenizer = packed
    with pytest.raises(ValueError, match="not found: prepare it with tools/prepare_data.py"):
        build_gpt_dataset([str(tmp_path / "missing")], None, 64, 10, 1, tokenizer)
    with pytest.raises(ValueError, match="one weight per prefix"):
        build_gpt_dataset([str(directory / "first")], [0.5, 0.5], 64, 10, 1, tokenizer)


def _write_parity_mask(prefix: str, mask_prefix: str) -> None:
    """A loss-mask dataset marking the odd token ids of `prefix`'s documents."""
    from megatron_harpe.data.indexed import DatasetWriter, read_documents

    documents = read_documents(prefix)
    with DatasetWriter(mask_prefix, vocab_size=2) as writer:
        for document in documents:
            writer.add_document((np.asarray(document) % 2).tolist())


def test_loss_mask_dataset_marks_the_same_tokens_in_every_sample_of_a_blend(packed, tmp_path):
    directory, tokenizer = packed
    prefixes = [str(directory / "first"), str(directory / "second")]
    masks = [str(tmp_path / "first_mask"), str(tmp_path / "second_mask")]
    for prefix, mask in zip(prefixes, masks):
        _write_parity_mask(prefix, mask)
    plain = build_gpt_dataset(prefixes, [0.5, 0.5], seq_length=64, num_samples=200, seed=3, tokenizer=tokenizer)
    masked = build_gpt_dataset(
        prefixes, [0.5, 0.5], seq_length=64, num_samples=200, seed=3, tokenizer=tokenizer, loss_mask_prefixes=masks
    )
    for index in range(200):
        a, b = plain[index], masked[index]
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(b["loss_mask"], a["loss_mask"] * (a["labels"] % 2).float())
    assert 0 < float(masked[0]["loss_mask"].sum()) < 64


def test_loss_mask_dataset_must_match_its_token_dataset(packed, tmp_path):
    directory, tokenizer = packed
    _write_parity_mask(str(directory / "second"), str(tmp_path / "wrong_mask"))
    with pytest.raises(ValueError, match="documents but .*write the mask from the same tokenized dataset"):
        build_gpt_dataset(
            [str(directory / "first")], None, 64, 10, 1, tokenizer, loss_mask_prefixes=[str(tmp_path / "wrong_mask")]
        )
    with pytest.raises(ValueError, match="one loss-mask dataset per prefix"):
        build_gpt_dataset([str(directory / "first")], None, 64, 10, 1, tokenizer, loss_mask_prefixes=[])
    with pytest.raises(ValueError, match="loss-mask dataset .* not found"):
        build_gpt_dataset(
            [str(directory / "first")], None, 64, 10, 1, tokenizer, loss_mask_prefixes=[str(tmp_path / "none")]
        )
