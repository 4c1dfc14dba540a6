"""Causal core attention on torch `scaled_dot_product_attention`, with context parallelism.

megatron-core's own core attentions are CUDA-only (`DotProductAttention`) or need Transformer
Engine (`TEDotProductAttention`, the only one it allows with context parallelism). This one
runs on CPU and GPU and plugs into megatron's `SelfAttention` through the layer spec.

Context parallelism (all-gather flavour): each CP rank holds chunks r and 2*CP-1-r of the
sequence (load-balanced causal work). Keys and values are all-gathered over the CP group by an
autograd function whose backward reduce-scatters gradients to their owners; each local query
chunk c then attends to the keys of chunks 0..c with a causal mask aligned to the lower right
(the chunk's last query sees every gathered key). On GPU, SDPA's kernels take that mask without
materialising it; on CPU the queries are left-padded instead (see `_lower_right`), trading up to
2x attention compute for memory linear in the sequence.

Document masking (`data.reset_attention_mask`): megatron's `attention_mask` argument carries the
document ids of a `documents.DocumentMask` (a tensor, which megatron's recompute can save), and
each sequence's local queries run in the calls of its plan (`documents.py`: whole documents
causal, merged short ones block-diagonal, the document a chunk starts in lower-right causal
against the keys from its start), with or without context parallelism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention.bias import causal_lower_right

from megatron_harpe import collectives
from megatron_harpe.documents import DocumentMask


class SdpaCoreAttention(MegatronModule):
    """Signature-compatible with megatron's `DotProductAttention`; inputs [s, b, heads, d]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"SdpaCoreAttention supports causal attention only, got {attn_mask_type}")
        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") else None

    def _cp_group(self):
        if self.cp_group is None:
            self.cp_group = parallel_state.get_context_parallel_group()
        return self.cp_group

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias need the 'te' attention backend")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        cp_group = self._cp_group()
        cp_size = cp_group.size()
        documents = DocumentMask.from_attention_mask(attention_mask)
        if documents is not None:
            out = self._document_masked(q, k, v, documents, cp_group, cp_size)
        elif cp_size == 1:
            out = self._sdpa(q, k, v, causal_mask=self.causal)
        else:
            out = self._context_parallel(q, k, v, cp_group, cp_size)
        batch, heads, seq, dim = out.shape
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)  # [s, b, h*d]

    def _sdpa(self, q, k, v, causal_mask) -> torch.Tensor:
        kwargs = {"attn_mask": causal_mask} if not isinstance(causal_mask, bool) else {"is_causal": causal_mask}
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=q.size(1) != k.size(1),
            **kwargs,
        )

    def _context_parallel(self, q, k, v, cp_group, cp_size: int) -> torch.Tensor:
        cp_rank = torch.distributed.get_rank(cp_group)
        chunk = q.size(2) // 2
        global_k = _gather_chunks(k, cp_group, cp_size)  # [b, h, S, d] in sequence order
        global_v = _gather_chunks(v, cp_group, cp_size)
        outputs = []
        for half, chunk_index in enumerate((cp_rank, 2 * cp_size - 1 - cp_rank)):
            q_chunk = q[:, :, half * chunk : (half + 1) * chunk]
            visible = (chunk_index + 1) * chunk
            keys, values = global_k[:, :, :visible], global_v[:, :, :visible]
            if not self.causal:
                outputs.append(self._sdpa(q_chunk, keys, values, False))
            else:
                outputs.append(self._lower_right(q_chunk, keys, values))
        return torch.cat(outputs, dim=2)

    def _lower_right(self, queries, keys, values) -> torch.Tensor:
        """Causal attention of the last `queries` positions of `keys`: the final query sees them all."""
        q_len, k_len = queries.size(2), keys.size(2)
        if queries.device.type == "cuda":
            return self._sdpa(queries, keys, values, causal_lower_right(q_len, k_len))
        # CPU kernels turn a lower-right causal mask into a dense float [q_len, k_len] tensor kept
        # for backward (memory quadratic in the sequence). Left-padding the queries with zeros to
        # the key length makes it plain causal attention, which the CPU flash kernel runs without
        # any mask; the padded rows are dropped.
        padded = F.pad(queries, (0, 0, k_len - q_len, 0))
        return self._sdpa(padded, keys, values, True)[:, :, k_len - q_len :]

    def _document_masked(self, q, k, v, mask: DocumentMask, cp_group, cp_size: int) -> torch.Tensor:
        """Attention within each document; q, k, v are [b, h, s_local, d] (keys gathered under CP)."""
        if not self.causal:
            raise ValueError("document masking is causal attention: this layer was built without a causal mask")
        cp_rank = torch.distributed.get_rank(cp_group) if cp_size > 1 else 0
        if cp_size > 1:
            k, v = _gather_chunks(k, cp_group, cp_size), _gather_chunks(v, cp_group, cp_size)
        if mask.seq_length != k.size(2) or mask.ids.size(0) != q.size(0):
            raise ValueError(
                f"document ids {tuple(mask.ids.shape)} do not match keys of {k.size(2)} tokens "
                f"and a batch of {q.size(0)}: pass the ids of the whole, unsplit sequences"
            )
        outputs = []
        for sample, runs in enumerate(mask.runs(cp_rank, cp_size)):
            q_s, k_s, v_s = q[sample : sample + 1], k[sample : sample + 1], v[sample : sample + 1]
            parts = []
            for run in runs:
                queries = q_s[:, :, run.q_start : run.q_end]
                keys, values = k_s[:, :, run.k_start : run.k_end], v_s[:, :, run.k_start : run.k_end]
                if run.kind == "causal":
                    parts.append(self._sdpa(queries, keys, values, True))
                elif run.kind == "block":
                    parts.append(self._sdpa(queries, keys, values, mask.block_mask(sample, run)))
                else:
                    parts.append(self._lower_right(queries, keys, values))
            outputs.append(torch.cat(parts, dim=2))
        return torch.cat(outputs, dim=0)


def _gather_chunks(local: torch.Tensor, cp_group, cp_size: int) -> torch.Tensor:
    """All-gather [b, h, 2*chunk, d] halves from every CP rank and put the 2*CP chunks in
    sequence order: rank r contributed chunks r and 2*CP-1-r."""
    gathered = _AllGather.apply(local.contiguous(), cp_group)  # [cp, b, h, 2*chunk, d]
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, part in enumerate(gathered.unbind(0)):
        first, second = part.chunk(2, dim=2)
        chunks[rank] = first
        chunks[2 * cp_size - 1 - rank] = second
    return torch.cat(chunks, dim=2)


class _AllGather(torch.autograd.Function):
    """All-gather along a new leading dim; backward sums gradients over the group and returns
    each rank its own part. (torch.distributed.nn's all_gather backward breaks on gloo
    subgroups: its gloo all-to-all passes group ranks where global ranks are expected.)"""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return torch.stack(collectives.all_gather(local, group=group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return collectives.reduce_scatter_sum(grad.contiguous(), group=ctx.group), None
