"""Document boundaries, restarted positions, the sdpa run plan and THD packing (no process group).

    pytest tests/unit/test_documents.py

The run plan is checked against the definition of document masking: rebuilt into a dense
[S, S] mask, the runs of every CP rank must allow exactly "same document and not later".
"""

from __future__ import annotations

import random

import pytest
import torch
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

from megatron_harpe.documents import DocumentMask, document_ids, document_positions, document_spans
from megatron_harpe.parallel import context_parallel_indices
from megatron_harpe.thd import pack_thd, padded_lengths, padding_tokens, partition_indices

EOD = 0


def stream(lengths: list[int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.cat([torch.randint(1, 50, (n - 1,), generator=generator), torch.tensor([EOD])])
                      for n in lengths])  # fmt: skip


def test_ids_and_positions_restart_after_each_eod():
    tokens = torch.tensor([[7, 3, EOD, 5, EOD, EOD, 9, 9]])
    assert document_ids(tokens, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert document_positions(document_ids(tokens, EOD)).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert document_spans(document_ids(tokens, EOD)[0]) == [(0, 3), (3, 5), (5, 6), (6, 8)]


def test_positions_agree_with_megatrons_reset_position_ids():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        tokens = torch.randint(0, 6, (64,), generator=generator)  # EOD (0) about every 6 tokens
        _, _, megatron_positions = _get_ltor_masks_and_position_ids(tokens, EOD, True, False, False, False)
        assert document_positions(document_ids(tokens[None], EOD))[0].tolist() == megatron_positions.tolist()


def dense_from_runs(mask: DocumentMask, cp_size: int) -> torch.Tensor:
    """[b, S, S]: which global key each global query attends to, from every rank's runs."""
    batch, seq = mask.ids.shape
    allowed = torch.zeros(batch, seq, seq, dtype=torch.int)
    for rank in range(cp_size):
        to_global = context_parallel_indices(seq, rank, cp_size)
        for sample, runs in enumerate(mask.runs(rank, cp_size)):
            covered = []
            for run in runs:
                queries = to_global[run.q_start : run.q_end]
                q_len, k_len = run.q_end - run.q_start, run.k_end - run.k_start
                if run.kind == "block":
                    pattern = mask.block_mask(sample, run).int()
                elif run.kind == "causal":
                    assert q_len == k_len
                    pattern = torch.tril(torch.ones(q_len, k_len, dtype=torch.int))
                else:  # lower right: query i sees keys up to k_len - q_len + i
                    pattern = torch.tril(torch.ones(q_len, k_len, dtype=torch.int), diagonal=k_len - q_len)
                allowed[sample, queries, run.k_start : run.k_end] += pattern
                covered += list(range(run.q_start, run.q_end))
            assert covered == list(range(seq // cp_size)), "runs must cover the local queries once, in order"
    return allowed


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("tile", [1, 5, 1024])
def test_runs_allow_exactly_earlier_tokens_of_the_same_document(cp_size, tile):
    rng = random.Random(cp_size * 100 + tile)
    rows = []
    for _ in range(4):
        lengths, left = [], 48
        while left:
            lengths.append(min(left, rng.choice([1, 2, 3, 7, 13, 30])))
            left -= lengths[-1]
        rows.append(stream(lengths, seed=rng.randrange(1000)))
    rows.append(stream([48]))  # one document
    ids = document_ids(torch.stack(rows), EOD)
    allowed = dense_from_runs(DocumentMask(ids, tile=tile), cp_size)
    expected = (ids[:, :, None] == ids[:, None, :]) & torch.ones(48, 48, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected.int())  # every allowed pair once, nothing else


def test_short_documents_merge_into_block_runs_up_to_the_tile():
    ids = document_ids(stream([2] * 16)[None], EOD)
    runs = DocumentMask(ids, tile=8).runs()[0]
    assert [run.kind for run in runs] == ["block"] * 4
    assert all(run.q_end - run.q_start == 8 for run in runs)


def test_mask_refuses_a_flat_id_vector():
    with pytest.raises(ValueError, match="batch, sequence"):
        DocumentMask(torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("cp_size,tp_split", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_padding_makes_every_document_split_and_the_stream_divide(cp_size, tp_split):
    lengths = [3, 9, 1, 12, 7, 32]
    padded = padded_lengths(lengths, cp_size, tp_split)
    multiple = 2 * cp_size if cp_size > 1 else 1
    assert all(p % multiple == 0 and p >= n for p, n in zip(padded, lengths))
    assert all(p - n < multiple for p, n in zip(padded[:-1], lengths[:-1]))
    assert (sum(padded) // cp_size) % tp_split == 0
    assert padding_tokens(lengths, cp_size, tp_split) == sum(padded) - sum(lengths)


def test_partition_indices_take_chunks_r_and_mirror_of_every_document():
    cu = torch.tensor([0, 8, 24], dtype=torch.int32)
    for rank in range(2):
        expected = torch.cat([context_parallel_indices(8, rank, 2), 8 + context_parallel_indices(16, rank, 2)])
        assert partition_indices(cu, 2, rank).tolist() == expected.tolist()
    assert sorted(torch.cat([partition_indices(cu, 2, r) for r in range(2)]).tolist()) == list(range(24))


@pytest.mark.parametrize("cp_size,tp_split", [(1, 1), (2, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("reset", [True, False])
def test_thd_stream_holds_every_token_once_with_its_document_positions(cp_size, tp_split, reset):
    rows = [stream([3, 9, 1, 12, 7]), stream([1, 30, 1], seed=1)]
    tokens = torch.stack(rows)
    ids = document_ids(tokens, EOD)
    batch = {
        "tokens": tokens,
        "labels": tokens + 100,
        "loss_mask": torch.ones(tokens.shape),
        "position_ids": torch.arange(32).expand(2, 32),
    }
    parts = [pack_thd(batch, ids, cp_rank=rank, cp_size=cp_size, tp_split=tp_split, reset_positions=reset)
             for rank in range(cp_size)]  # fmt: skip
    lengths = [3, 9, 1, 12, 7, 1, 30, 1]
    cu = parts[0]["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    padded = parts[0]["cu_seqlens_padded"]
    assert int(parts[0]["max_seqlen"]) == int((padded[1:] - padded[:-1]).max())
    for part in parts:
        assert part["tokens"].shape == (1, int(padded[-1]) // cp_size)
        assert part["tokens"].size(1) % tp_split == 0
        assert torch.equal(part["cu_seqlens_padded"], padded)
    real = torch.cat([p["loss_mask"][0] for p in parts]).bool()
    labels = torch.cat([p["labels"][0] for p in parts])
    assert sorted(labels[real].tolist()) == sorted((tokens + 100).flatten().tolist())  # every token once
    assert (labels[~real] == 0).all()
    # rebuild the stream in order and check positions inside each document
    order = torch.cat([partition_indices(padded, cp_size, rank) for rank in range(cp_size)])
    positions = torch.empty(int(padded[-1]), dtype=torch.long)
    positions[order] = torch.cat([p["position_ids"][0] for p in parts])
    start = 0
    for row, (doc_start, doc_end) in [(r, span) for r in range(2) for span in document_spans(ids[r])]:
        length = doc_end - doc_start
        want = torch.arange(length) if reset else torch.arange(doc_start, doc_end)
        assert positions[start : start + length].tolist() == want.tolist()
        start = int(padded[padded > start][0])  # next padded document
