"""Documents inside packed training sequences: where they start, their positions, and the
attention plan that keeps every token inside its own document (document masking).

Megatron's GPTDataset concatenates documents, each ending in the end-of-document token (EOD),
and cuts the stream into sequences. A token right after an EOD starts a new document:

    ids = document_ids(tokens, eod)                 # [b, S]: 0, 0, 0, 1, 1, 2, ... per sequence
    positions = document_positions(ids)             # [b, S]: restart at 0 in every document
    mask = DocumentMask(ids)
    gpt(tokens, positions, mask.as_attention_mask())  # the sdpa attention finds the mask again

`data.reset_position_ids` feeds the restarted positions to the per-head rotary tables,
`data.reset_attention_mask` makes attention causal within a document only (this module for the
sdpa backend, `thd.py` for Transformer Engine), `data.eod_mask_loss` drops the loss where the
input token is the EOD (predicting the next document's first token from the previous one).

How the sdpa backend attends without an [S, S] mask (16 GiB of booleans at 128k tokens): the
queries a rank holds are cut into runs, each one scaled_dot_product_attention call whose keys
are one contiguous span (`DocumentMask.runs`):
- a document starting inside a query chunk is plain causal attention over its own span
  (`is_causal`, no mask); consecutive short ones are merged into one call of at most `TILE`
  tokens with a block-diagonal causal mask built from their document ids (<= TILE^2 booleans);
- the document a chunk starts in may have begun in an earlier chunk (on this rank or another
  under context parallelism): its queries see the keys from the document's start, a causal
  mask aligned to the lower right (the all-gathered keys of attention.py hold it).
Compute is sum(L_i^2)/2 over documents instead of S^2/2, plus the CPU's left padding of the
crossing runs (attention.py) and the wasted scores inside a merged tile.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_harpe.tensor_tags import attribute, remember

TILE = 256
"""Most query tokens merged into one block-diagonal call. Its mask (TILE x TILE; the CPU kernels
save it for backward as floats) is kept by every call: only short documents are merged, so
at most a quarter MiB per call, 1 KiB per token of short documents and layer."""


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, S] int64 document index of every token: the EOD belongs to the document it ends,
    the token after it starts the next one."""
    ends = (tokens == eod).long()
    return torch.cumsum(ends, dim=-1) - ends


def document_positions(ids: torch.Tensor) -> torch.Tensor:
    """[b, S] position of every token inside its document (0 at each document's first token)."""
    index = torch.arange(ids.size(-1), device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - first


def document_spans(ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of every document of one sequence's ids [S], in order."""
    length = ids.size(0)
    cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
    bounds = [0, *cuts, length]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclasses.dataclass(frozen=True)
class Run:
    """One attention call: local queries [q_start, q_end) against global keys [k_start, k_end).

    kind: `causal` (as many keys as queries, one document), `lower_right` (the queries are the
    last q_end - q_start of the document's keys, which began before this chunk) or `block`
    (several whole documents: causal inside each, nothing across them)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    kind: str


def chunk_runs(
    spans: list[tuple[int, int]], chunk_start: int, chunk_end: int, local_offset: int, tile: int = TILE
) -> list[Run]:
    """The runs covering the queries of global positions [chunk_start, chunk_end), which sit at
    `local_offset` in the rank's local sequence; keys are indexed globally."""
    runs: list[Run] = []
    group: list[tuple[int, int]] = []  # whole documents inside the chunk, merged into one call

    def flush() -> None:
        if group:
            start, end = group[0][0], group[-1][1]
            kind = "causal" if len(group) == 1 else "block"
            runs.append(Run(start - chunk_start + local_offset, end - chunk_start + local_offset, start, end, kind))
            group.clear()

    for doc_start, doc_end in spans:
        q_start, q_end = max(doc_start, chunk_start), min(doc_end, chunk_end)
        if q_start >= q_end:
            continue
        if doc_start < chunk_start:  # began in an earlier chunk: its keys reach back to its start
            runs.append(Run(local_offset, q_end - chunk_start + local_offset, doc_start, q_end, "lower_right"))
            continue
        if group and q_end - group[0][0] > tile:
            flush()
        group.append((q_start, q_end))
    flush()
    return runs


def local_chunks(seq_length: int, cp_rank: int, cp_size: int) -> list[tuple[int, int, int]]:
    """(global start, global end, local offset) of the query chunks a CP rank holds: the whole
    sequence without CP, chunks r and 2*CP-1-r of 2*CP with it (`parallel.context_parallel_indices`)."""
    if cp_size == 1:
        return [(0, seq_length, 0)]
    chunk = seq_length // (2 * cp_size)
    return [
        (index * chunk, (index + 1) * chunk, half * chunk)
        for half, index in enumerate((cp_rank, 2 * cp_size - 1 - cp_rank))
    ]


class DocumentMask:
    """Document masking for the sdpa attention, passed through megatron's `attention_mask` as its
    ids tensor (`as_attention_mask`): megatron's activation recomputation saves a layer's
    arguments with `save_for_backward`, which takes tensors only.

    Holds the document ids of the whole (not CP-split) sequences [b, S], and the run plan of
    every CP rank layout it is asked for (computed once per micro-batch, shared by all layers)."""

    def __init__(self, ids: torch.Tensor, tile: int = TILE) -> None:
        if ids.dim() != 2:
            raise ValueError(f"document ids must be [batch, sequence], got shape {tuple(ids.shape)}")
        self.ids = ids
        self.tile = tile
        self._plans: dict[tuple[int, int], list[list[Run]]] = {}
        self._spans = [document_spans(row) for row in ids.cpu()]

    def as_attention_mask(self) -> torch.Tensor:
        """The ids as a tensor of their own that leads back to this mask (`from_attention_mask`),
        also from the detached alias megatron's recompute passes (tensor_tags.py)."""
        tensor = self.ids.view_as(self.ids)
        tensor.document_mask = self
        return remember(tensor)

    @staticmethod
    def from_attention_mask(attention_mask: torch.Tensor | None) -> DocumentMask | None:
        """The mask whose ids `attention_mask` is, or None for no mask or a boolean / float one
        (megatron's own masks). Integer ids not made by `as_attention_mask` get a new plan."""
        if attention_mask is None or attention_mask.dtype == torch.bool or attention_mask.is_floating_point():
            return None
        mask = attribute(attention_mask, "document_mask")
        return mask if mask is not None else DocumentMask(attention_mask)

    @property
    def seq_length(self) -> int:
        return self.ids.size(1)

    def runs(self, cp_rank: int = 0, cp_size: int = 1) -> list[list[Run]]:
        """Per sequence of the batch, the runs covering the rank's local queries in order."""
        key = (cp_rank, cp_size)
        if key not in self._plans:
            chunks = local_chunks(self.seq_length, cp_rank, cp_size)
            self._plans[key] = [
                [run for start, end, offset in chunks for run in chunk_runs(spans, start, end, offset, self.tile)]
                for spans in self._spans
            ]
        return self._plans[key]

    def block_mask(self, sample: int, run: Run) -> torch.Tensor:
        """[q, k] booleans (True: attend) of a `block` run: causal within each document."""
        ids = self.ids[sample]
        queries = ids[run.k_end - (run.q_end - run.q_start) : run.k_end]
        keys = ids[run.k_start : run.k_end]
        same = queries[:, None] == keys[None, :]
        return torch.tril(same)

    def documents_per_sequence(self) -> float:
        return sum(len(spans) for spans in self._spans) / len(self._spans)
