"""What document masking costs a run, for the dry run (`pretrain_harpe.py --dry-run`) and the
memory planner (planner/memory.py): the padding Transformer Engine's THD layout needs under
context parallelism, the attention work the mask saves, and the sdpa path's buffers.

    cost = document_cost(cfg, cp=4, tp=8)       # None when data.reset_attention_mask is off
    lines = document_masking_lines(cfg, cp=4, tp=8)

Document statistics come from the data itself when its .idx files exist (`data.prefixes`, or
the prepared demo corpus); a packed sequence of S tokens then holds about
1 + S x documents / tokens pieces of documents (every document start inside it adds one).
- TE (THD): each piece is padded to a multiple of 2*CP: (2*CP - 1) / 2 tokens on average,
  2*CP - 1 at most, and under sequence parallelism the stream by up to 2*CP*(TP - 1) more so each
  rank's tokens divide by TP (thd.py). The planner sizes activations for the padded length.
- sdpa: no [S, S] mask. Documents shorter than TILE are merged into block-diagonal calls whose
  TILE x TILE mask the CPU kernels save for backward as floats: at most TILE x 4 bytes per token
  of such documents and layer (all tokens when the data is not there yet); the document ids of
  the micro-batch (8 bytes a token) live through the step.
- Attention work with the mask, relative to causal attention over the whole sequence: a token in
  a document of L tokens sees about min(L, S) / 2 keys instead of S / 2 (token-weighted).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

from megatron_harpe.config import Config, StageConfig


def _tile() -> int:
    from megatron_harpe.documents import TILE  # documents.py imports torch: not for `plan_memory --help`

    return TILE


@dataclasses.dataclass(frozen=True)
class DocumentCost:
    seq_length: int
    pieces_per_sequence: float | None
    """Documents (or parts of documents) per packed sequence; None: the data is not there yet."""
    attention_fraction: float | None
    """Attention work with the mask / causal attention over the whole sequence."""
    short_token_fraction: float | None
    """Share of tokens in documents shorter than documents.TILE (merged, with a block mask)."""
    padding_expected: float
    """THD padding tokens per sequence (te with CP > 1, or SP), on average; 0 for sdpa."""
    padding_worst: int
    """At most, for `pieces_per_sequence` pieces (what the memory plan adds)."""


def dataset_prefixes(cfg: Config) -> list[str]:
    """The prefixes training will read: data.prefixes, or the demo corpus once prepared."""
    if cfg.data.prefixes:
        return list(cfg.data.prefixes)
    if cfg.data.demo_workdir:
        return [str(Path(cfg.data.demo_workdir) / "demo_text_document")]
    return []


@functools.lru_cache(maxsize=16)
def _document_lengths(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # must outlive the read: its __del__ unmaps the index
    return dataset.sequence_lengths.astype("int64").copy()


@functools.lru_cache(maxsize=64)
def _length_statistics(prefixes: tuple[str, ...], seq_length: int) -> tuple[float, float, float] | None:
    """(document starts per token, token-weighted mean of min(length, S) / S, share of tokens in
    documents shorter than documents.TILE), or None when a dataset is missing."""
    if not prefixes or not all(Path(f"{p}.idx").is_file() and Path(f"{p}.bin").is_file() for p in prefixes):
        return None
    documents = tokens = clipped = short = 0.0
    for prefix in prefixes:
        lengths = _document_lengths(prefix)
        documents += len(lengths)
        tokens += float(lengths.sum())
        clipped += float((lengths * lengths.clip(max=seq_length)).sum())
        short += float(lengths[lengths < _tile()].sum())
    return documents / tokens, clipped / tokens / seq_length, short / tokens


def document_cost(
    cfg: Config, cp: int, tp: int, stage: StageConfig | None = None, backend: str | None = None
) -> DocumentCost | None:
    """The cost of document masking for the longest stage (or `stage`) on the config's attention
    backend (or `backend`); None when it is off."""
    if not cfg.data.reset_attention_mask:
        return None
    stage = stage or max(cfg.resolved_stages(), key=lambda s: s.seq_length)
    seq = stage.seq_length
    statistics = _length_statistics(tuple(dataset_prefixes(cfg)), seq)
    pieces = None if statistics is None else 1 + seq * statistics[0]
    fraction = None if statistics is None else statistics[1]
    expected, worst = 0.0, 0
    if (backend or cfg.model.attention_backend) == "te":
        multiple = 2 * cp if cp > 1 else 1
        tp_split = tp if cfg.parallel.sequence_parallel else 1
        sp_extra = multiple * (tp_split - 1)
        if pieces is not None:
            expected = pieces * (multiple - 1) / 2 + sp_extra / 2
            worst = math.ceil(pieces) * (multiple - 1) + sp_extra
        else:
            worst = sp_extra
    short = None if statistics is None else statistics[2]
    return DocumentCost(seq, pieces, fraction, short, expected, worst)


def planned_sequence_length(cfg: Config, stage: StageConfig, cp: int, tp: int, backend: str | None = None) -> int:
    """The tokens per sequence the memory plan sizes activations for: the stage's length, plus
    the THD padding (worst case for the measured documents) when TE packs documents."""
    if not cfg.data.reset_attention_mask or (backend or cfg.model.attention_backend) != "te":
        return stage.seq_length
    cost = document_cost(cfg, cp, tp, stage, backend)
    multiple = 2 * cp if cp > 1 else 1
    return stage.seq_length + -(-cost.padding_worst // multiple) * multiple


def sdpa_mask_bytes(cfg: Config, micro_batch: int, seq_length: int, backend: str | None = None) -> dict[str, int]:
    """The sdpa path's short-lived buffers for document masking: the micro-batch's document ids."""
    if not cfg.data.reset_attention_mask or (backend or cfg.model.attention_backend) != "sdpa":
        return {}
    return {"document ids": 8 * micro_batch * seq_length}


def sdpa_document_activations(cfg: Config, layout, tokens_per_rank: int, element_bytes: int,
                              backend: str | None = None) -> dict[str, int]:  # fmt: skip
    """What one layer's sdpa document runs save for backward beyond plain causal attention, by
    kind: the block masks of merged short documents (fp32 on the CPU kernels, TILE x 4 bytes per
    token of such documents) and, without CP, the concatenation of the runs' outputs (one
    attention output). Core-attention activations: memory.py drops them with core attention
    under recompute (`layout`: a memory.Layout)."""
    if not cfg.data.reset_attention_mask or (backend or cfg.model.attention_backend) != "sdpa":
        return {}
    cost = document_cost(cfg, layout.context, layout.tensor)
    short = 1.0 if cost.short_token_fraction is None else cost.short_token_fraction
    tokens = layout.micro_batch * tokens_per_rank
    terms = {"document block masks": int(tokens * short * _tile() * 4)}
    if layout.context == 1:  # under CP the per-chunk outputs are concatenated anyway
        heads = cfg.model.num_attention_heads // layout.tensor
        terms["document runs' outputs"] = tokens * heads * cfg.model.head_dim * element_bytes
    return terms


def document_masking_lines(cfg: Config, cp: int, tp: int) -> list[str]:
    """The dry run's account of document masking: on or off, how, and what it costs."""
    data = cfg.data
    if not data.reset_attention_mask:
        positions = "restart at every document" if data.reset_position_ids else "run on across documents"
        return [f"documents: packed across their boundaries, attention crosses them, positions {positions} "
                "(data.reset_attention_mask: true masks them, see docs/document-masking.md)"]  # fmt: skip
    cost = document_cost(cfg, cp, tp)
    te = cfg.model.attention_backend == "te"
    how = ("Transformer Engine THD (cu_seqlens per document"
           + (f", each padded to a multiple of {2 * cp})" if cp > 1 else ")")
           if te else f"sdpa block-diagonal causal runs (no padding, no [S, S] mask; documents under {_tile()} "
           f"tokens merged into calls with at most a {_tile()} x {_tile()} block mask)")  # fmt: skip
    positions = "restart per document" if data.reset_position_ids else "run on (attention is masked: the same logits)"
    lines = [f"document masking: on, {how}; positions {positions}; "
             f"loss on end-of-document tokens {'off' if data.eod_mask_loss else 'on'}"]  # fmt: skip
    if cost.pieces_per_sequence is None:
        lines.append(
            "documents: data not prepared yet, so documents per sequence unknown"
            + (f"; THD padding up to {2 * cp - 1} tokens per document, not in the memory plan" if te and cp > 1 else "")
        )
        return lines
    line = (
        f"documents: about {cost.pieces_per_sequence:.1f} per {cost.seq_length}-token sequence (measured on the "
        f"data); masked attention does about {cost.attention_fraction:.0%} of the causal attention work"
    )
    if not te:
        line += f"; {cost.short_token_fraction:.0%} of the tokens in documents under {_tile()} tokens"
    if te and cost.padding_worst:
        line += (
            f"; THD padding about {cost.padding_expected:.0f} tokens per sequence "
            f"({cost.padding_expected / cost.seq_length:.1%}), planned for {cost.padding_worst}"
        )
    lines.append(line)
    return lines


def rotary_table_copies(cfg: Config, micro_batch: int) -> int:
    """Packed documents rotate with per-token tables, one per sequence of the micro-batch
    (position/rotary.py), where the cached tables are shared by the batch."""
    return micro_batch if cfg.data.reset_position_ids or cfg.data.reset_attention_mask else 1
