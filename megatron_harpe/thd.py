"""Packed documents in Transformer Engine's THD layout, for `data.reset_attention_mask` with
`model.attention_backend: te` (GPU only; these functions are pure torch and tested on CPU).

TE attends within each document of a packed batch when given `qkv_format="thd"` and the
cumulative document lengths (TE's `DotProductAttention.forward` documentation, "cu_seqlens
note"): the micro-batch becomes one stream of documents [1, T], every sequence of the batch
cut at its EODs. Under context parallelism (TE's `attn_forward_func_with_cp`, and the usage of
its own tests in tests/pytorch/attention/run_attention_with_cp.py):
- every document is padded to a multiple of 2*CP tokens (`cu_seqlens_padded` holds the padded
  offsets, `cu_seqlens` the real lengths; TE ignores the padding tokens);
- a rank holds, of every padded document, its chunks r and 2*CP-1-r
  (`partition_indices`, what `transformer_engine_torch.thd_get_partitioned_indices` returns);
- cu_seqlens, cu_seqlens_padded and max_seqlen stay those of the whole stream on every rank.
Under sequence parallelism each rank's T/CP tokens are further split over TP: the last
document's padding grows until they divide. Positions are computed here per token (restarting
in every document with `reset_position_ids`) and the rotary tables follow them token by token
(position/rotary.py), so megatron's own THD rotary -- wrong for packed sequences under CP in
megatron-core before 0.18 -- never runs. Padding tokens carry token 0, no loss, and continue
their document's positions.

TE's all_gather context parallelism has no THD path, and its a2a has one only from TE 2.10:
config.py asks for cp_comm_type p2p with document masking on TE.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_harpe.documents import document_positions, document_spans

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def padding_multiple(cp_size: int) -> int:
    """What every document's length is padded to a multiple of: 2*CP under CP, else 1."""
    return 2 * cp_size if cp_size > 1 else 1


def padded_lengths(lengths: list[int], cp_size: int, tp_split: int = 1) -> list[int]:
    """Each length rounded up to `padding_multiple(cp_size)`; the last one grown further so the
    total divides by that multiple x `tp_split` (sequence parallelism splits each rank's
    T / CP tokens over TP)."""
    multiple = padding_multiple(cp_size)
    padded = [-(-length // multiple) * multiple for length in lengths]
    shortfall = -sum(padded) % (multiple * tp_split)  # a multiple of `multiple`: documents stay aligned
    padded[-1] += shortfall
    return padded


def partition_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices of the stream's tokens a CP rank holds: chunks r and 2*CP-1-r of every padded
    document (the same as Transformer Engine's `thd_get_partitioned_indices`)."""
    if cp_size == 1:
        return torch.arange(int(cu_seqlens_padded[-1]))
    pieces = []
    bounds = cu_seqlens_padded.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if (end - start) % (2 * cp_size):
            raise ValueError(f"a padded document of {end - start} tokens does not split into 2 x {cp_size} chunks")
        chunk = (end - start) // (2 * cp_size)
        for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + index * chunk, start + (index + 1) * chunk))
    return torch.cat(pieces)


def pack_thd(
    batch: dict[str, torch.Tensor],
    ids: torch.Tensor,
    *,
    cp_rank: int,
    cp_size: int,
    tp_split: int = 1,
    reset_positions: bool = True,
) -> dict[str, torch.Tensor]:
    """This rank's part of a micro-batch of whole sequences [b, S] as one THD stream [1, T/CP],
    with `cu_seqlens`, `cu_seqlens_padded` (int32, whole stream) and `max_seqlen` added.
    Positions restart in every document with `reset_positions`, else keep the sequence's own."""
    flat_ids = (ids + (torch.arange(ids.size(0))[:, None] * (int(ids.max()) + 1))).flatten()
    spans = document_spans(flat_ids)
    lengths = [end - start for start, end in spans]
    padded = padded_lengths(lengths, cp_size, tp_split)
    source = torch.full((sum(padded),), -1, dtype=torch.long)
    offset = 0
    for (start, end), width in zip(spans, padded):
        source[offset : offset + end - start] = torch.arange(start, end)
        offset += width
    real = source >= 0
    positions = document_positions(ids) if reset_positions else batch["position_ids"]
    stream: dict[str, torch.Tensor] = {}
    for key in SEQUENCE_KEYS:
        values = (positions if key == "position_ids" else batch[key]).flatten()
        filled = torch.zeros(source.size(0), dtype=values.dtype)
        filled[real] = values[source[real]]
        stream[key] = filled
    # padding continues its document's positions (as TE's generate_positional_ids_for_cp does)
    last_real = torch.where(real, torch.arange(source.size(0)), torch.zeros_like(source)).cummax(0).values
    stream["position_ids"] = torch.where(
        real, stream["position_ids"], stream["position_ids"][last_real] + torch.arange(source.size(0)) - last_real
    )
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_seqlens_padded = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    local = partition_indices(cu_seqlens_padded, cp_size, cp_rank)
    packed = {key: value[local][None] for key, value in stream.items()}
    packed.update(
        cu_seqlens=cu_seqlens,
        cu_seqlens_padded=cu_seqlens_padded,
        max_seqlen=torch.tensor(max(padded), dtype=torch.int32),
    )
    return packed


def packed_seq_params(batch: dict[str, torch.Tensor]) -> PackedSeqParams:
    """megatron's description of a `pack_thd` batch for TE's attention (and its rotary, which our
    per-token tables bypass)."""
    cu_seqlens, cu_padded = batch["cu_seqlens"], batch["cu_seqlens_padded"]
    max_seqlen = int(batch["max_seqlen"])
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def padding_tokens(lengths: list[int], cp_size: int, tp_split: int = 1) -> int:
    """Tokens `pack_thd` adds to documents of these lengths (the cost the planner shows)."""
    return sum(padded_lengths(lengths, cp_size, tp_split)) - sum(lengths)
