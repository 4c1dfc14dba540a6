"""KV-cached greedy generation for the megatron backend, TP and CP included.

    from megatron_harpe.eval.backends.kv_cache import generate_cached
    new_ids = generate_cached(backend, prompt_ids, max_new_tokens=32)   # backend: MegatronBackend

Full recomputation costs one forward of the whole sequence per new token; with the cache the
prompt is run once (prefill) and each new token costs one forward of one token whose attention
reads the cached keys and values. The result equals full recomputation token for token (tested
in tests/distributed/test_kv_cache.py for MHA, GQA, per-query-head bases, TP=2 and CP=2).

Why not megatron-core's own inference machinery (`StaticInferenceContext` passed to
`GPTModel.forward`): its static KV buffers are allocated with `torch.cuda.current_device()`,
its attention re-slices the rotary table as if it covered the whole unsharded sequence (ours
holds only this CP rank's positions), and it has no context-parallel decode. So two modules of
the model are swapped for the duration of one generation (`cached_model`):

- every layer's core attention is wrapped by `CachedCoreAttention`. Prefill calls the wrapped
  attention unchanged (so CP prefill is the usual sharded attention) and records this rank's
  rotated keys/values; decode attends the new token's query to the cache;
- the rotary module is wrapped by `_AbsolutePositionRotary`: during decode it returns per-head
  angle tables for the new tokens' absolute positions (`HeadwiseRotaryEmbedding.tables_at`),
  so keys are cached already rotated and never rotated again.

Context parallelism: the prefill's keys/values stay sharded as the prefill left them (rank r
keeps chunks r and 2*CP-1-r, padding dropped), so the cache costs each rank 1/CP of the
prompt's K/V, like training. Decode tokens are computed on every CP rank (the same input, no
CP communication in the layers); their keys/values are kept by CP rank 0 only. Each rank then
attends the query to its own keys and returns an unnormalised partial result with its softmax
statistics (row maximum, sum of exponentials); one all-reduce MAX and one all-reduce SUM over
the CP group combine them into exact softmax attention (the log-sum-exp merge of blockwise
attention). Every CP rank ends with the same logits.

Sequence parallelism: the prefill is padded like any forward of the layout
(`megatron_backend.sequence_multiple`), and each decode step feeds TP tokens, the new one first
and padding after it, because megatron splits the norms' tokens over the TP ranks (one token
cannot be split; tensor_parallel/mappings.py asserts it). Only the first token's keys/values
are cached and only its query attends; the padding rows get zeros from attention and are dropped
at the output, so the new token's logits are those of a one-token step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from megatron.core import parallel_state

from megatron_harpe import collectives
from megatron_harpe.position.rotary import context_parallel_positions


@dataclass
class KVCache:
    """Keys/values of one sequence, per layer, as [batch, kv heads, tokens, head dim] tensors."""

    cp_rank: int = 0
    cp_size: int = 1
    cp_group: object = None
    tokens_per_step: int = 1  # decode tokens per forward: TP under sequence parallelism (one real, then padding)
    decoding: bool = False
    length: int = 0  # tokens already cached (the next token's absolute position)
    prefix_keep: torch.Tensor | None = None  # local prefill positions that are real tokens
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    tail: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def keeps_tail(self) -> bool:
        """Decode tokens' keys/values live on CP rank 0 only (every rank computes them)."""
        return self.cp_rank == 0

    def start_prefill(self, length: int, padded: int) -> None:
        self.decoding, self.length = False, length
        positions = context_parallel_positions(padded, self.cp_rank, self.cp_size).long()
        self.prefix_keep = torch.nonzero(positions < length)[:, 0]
        self.prefix.clear()
        self.tail.clear()


class CachedCoreAttention(torch.nn.Module):
    """Wraps a layer's core attention (inputs [s, b, heads, d], output [s, b, heads*d])."""

    def __init__(self, inner: torch.nn.Module, cache: KVCache, layer: int) -> None:
        super().__init__()
        self.inner = inner
        self.cache = cache
        self.layer = layer
        # ours (SdpaCoreAttention) states it; otherwise (Transformer Engine) 1/sqrt(head dim)
        self.softmax_scale = getattr(inner, "softmax_scale", None)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        cache = self.cache
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if not cache.decoding:
            keep = cache.prefix_keep.to(k.device)
            cache.prefix[self.layer] = (k.index_select(2, keep), v.index_select(2, keep))
            return self.inner(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
            )
        padded = q.size(2)
        if cache.tokens_per_step > 1:  # sequence-parallel padding after the new token: not cached, not attending
            q, k, v = q[:, :, :1], k[:, :, :1], v[:, :, :1]
        if cache.keeps_tail:
            if self.layer in cache.tail:
                old_k, old_v = cache.tail[self.layer]
                k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
            cache.tail[self.layer] = (k, v)
        out = self._attend(q)
        out = torch.nn.functional.pad(out, (0, 0, 0, padded - out.size(2)))
        batch, heads, seq, dim = out.shape
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim).to(query.dtype)

    def _attend(self, q: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the new queries over every cached key, in fp32."""
        cache = self.cache
        batch, heads, new, dim = q.shape
        prefix_k, prefix_v = cache.prefix[self.layer]
        groups = prefix_k.size(1)
        # GQA: query heads of group g are g*r .. g*r+r-1 (megatron's layout): attend per group.
        scale = self.softmax_scale or dim**-0.5
        q = q.float().reshape(batch, groups, heads // groups * new, dim) * scale
        blocks = [(prefix_k, prefix_v, None)]
        if cache.keeps_tail:
            tail_k, tail_v = cache.tail[self.layer]
            # new query i (of `new`) sees the tail up to its own token: causal within the new tokens
            tail_length = tail_k.size(2)
            visible = torch.arange(tail_length) <= torch.arange(tail_length - new, tail_length)[:, None]
            blocks.append((tail_k, tail_v, visible.repeat(heads // groups, 1).to(q.device)))
        scores = []
        for keys, _, visible in blocks:
            block = q @ keys.float().transpose(-1, -2)
            scores.append(block if visible is None else block.masked_fill(~visible, float("-inf")))
        scores = torch.cat(scores, dim=-1)  # [b, groups, r*new, keys]
        row_max = scores.amax(dim=-1, keepdim=True) if scores.size(-1) else torch.full_like(q[..., :1], float("-inf"))
        if cache.cp_size > 1:
            collectives.all_reduce(row_max, op=collectives.ReduceOp.MAX, group=cache.cp_group)
        weights = torch.exp(scores - row_max)
        out = torch.zeros_like(q)
        start = 0
        for _, values, _ in blocks:
            out += weights[..., start : start + values.size(2)] @ values.float()
            start += values.size(2)
        total = torch.cat([out, weights.sum(dim=-1, keepdim=True)], dim=-1)
        if cache.cp_size > 1:
            collectives.all_reduce(total, group=cache.cp_group)
        out = total[..., :dim] / total[..., dim:]
        return out.reshape(batch, heads, new, dim)


class _RowsOnly(torch.nn.Module):
    """An output layer that projects one sequence row of its [s, b, h] input."""

    def __init__(self, inner: torch.nn.Module, row: int) -> None:
        super().__init__()
        self.inner = inner
        self.row = row

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        return self.inner(hidden[self.row : self.row + 1], *args, **kwargs)


class _AbsolutePositionRotary(torch.nn.Module):
    """During decode, the rotary tables of the new tokens' absolute positions (no CP split)."""

    def __init__(self, inner: torch.nn.Module, cache: KVCache) -> None:
        super().__init__()
        self.inner = inner
        self.cache = cache

    def forward(self, max_seq_len: int, *args, **kwargs):
        if not self.cache.decoding:
            return self.inner(max_seq_len, *args, **kwargs)
        start = self.cache.length
        return self.inner.tables_at(torch.arange(start, start + max_seq_len, dtype=torch.float64))

    def get_rotary_seq_len(
        self, inference_context, transformer, transformer_input, transformer_config, packed_seq_params=None
    ) -> int:
        if self.cache.decoding:  # this rank's decode tokens: all of them under sequence parallelism
            return transformer_input.size(0) * (
                transformer_config.tensor_model_parallel_size if transformer_config.sequence_parallel else 1
            )
        return self.inner.get_rotary_seq_len(
            inference_context, transformer, transformer_input, transformer_config, packed_seq_params
        )


@contextlib.contextmanager
def cached_model(model) -> Iterator[KVCache]:
    """Swap in the cached core attention and absolute-position rotary for one generation."""
    if not hasattr(model.rotary_pos_emb, "tables_at"):
        raise ValueError("KV-cached generation needs the per-head rotary module (HeadwiseRotaryEmbedding)")
    cache = KVCache(
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        cp_group=parallel_state.get_context_parallel_group(),
        tokens_per_step=parallel_state.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1,
    )
    attentions = [layer.self_attention for layer in model.decoder.layers]
    originals = [attention.core_attention for attention in attentions]
    rotary = model.rotary_pos_emb
    try:
        for index, attention in enumerate(attentions):
            attention.core_attention = CachedCoreAttention(originals[index], cache, index)
        model.rotary_pos_emb = _AbsolutePositionRotary(rotary, cache)
        yield cache
    finally:
        for attention, original in zip(attentions, originals):
            attention.core_attention = original
        model.rotary_pos_emb = rotary


class IncrementalDecoder:
    """Prefill a prompt once, then feed one token at a time; each call returns the fp32 logits
    of the next token ([tokenizer vocab], the same on every rank). A context manager: the
    model's modules are swapped back on exit.

        with IncrementalDecoder(backend) as decoder:
            logits = decoder.prefill(prompt_ids)
            logits = decoder.step(int(logits.argmax()))
    """

    def __init__(self, backend) -> None:
        self.backend = backend
        self._swap = cached_model(backend.model)
        self.cache: KVCache | None = None

    def __enter__(self) -> "IncrementalDecoder":
        self.cache = self._swap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._swap.__exit__(*exc)

    @torch.no_grad()
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt (sharded over CP like any forward) and fill the cache. Only the last
        position goes through the output layer: [prompt, vocab] logits would cost more than the
        rest of a small model's forward."""
        cache, backend = self.cache, self.backend
        length = len(prompt_ids)
        padded = length + (-length) % backend.multiple
        cache.start_prefill(length, padded)
        positions = context_parallel_positions(padded, cache.cp_rank, cache.cp_size).long().to(backend.device)
        tokens = torch.tensor(prompt_ids + [0] * (padded - length), device=backend.device)[None]
        holds_last = bool((positions == length - 1).any())
        # every rank projects one row (the last position where it lives, any row elsewhere) so
        # the TP gather sees equal shapes; the CP sum keeps the holder's row. Under sequence
        # parallelism the output layer's input is split over TP (shards of `shard` rows) and it
        # gathers one row per TP rank: each takes the same offset, the holder's comes back at its rank.
        row = int(torch.nonzero(positions == length - 1)[0, 0]) if holds_last else 0
        shard = positions.numel() // cache.tokens_per_step
        output_layer = backend.model.output_layer
        backend.model.output_layer = _RowsOnly(output_layer, row % shard)
        try:
            local = backend.model(tokens[:, positions], positions[None], None)[0]  # [rows gathered, vocab / tp]
        finally:
            backend.model.output_layer = output_layer
        logits = gather_vocabulary(local[row // shard : row // shard + 1].float())
        if cache.cp_size > 1:
            logits = logits if holds_last else torch.zeros_like(logits)
            collectives.all_reduce(logits, group=cache.cp_group)
        cache.decoding = True
        return logits[-1, : backend.tokenizer.vocab_size]

    @torch.no_grad()
    def step(self, token_id: int) -> torch.Tensor:
        cache, backend = self.cache, self.backend
        if not cache.decoding:
            raise ValueError("IncrementalDecoder.step before prefill")
        padding = cache.tokens_per_step - 1  # sequence parallelism: the new token, then padding
        tokens = torch.tensor([[token_id] + [0] * padding], device=backend.device)
        positions = torch.arange(cache.length, cache.length + 1 + padding, device=backend.device)[None]
        local = backend.model(tokens, positions, None)[0]  # [1 + padding, vocab / tp]
        cache.length += 1
        return gather_vocabulary(local[:1].float())[0, : backend.tokenizer.vocab_size]


def generate_cached(backend, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt_ids` by a `MegatronBackend`; stops after EOS (not returned)."""
    generated: list[int] = []
    if max_new_tokens <= 0:
        return generated
    with IncrementalDecoder(backend) as decoder:
        logits = decoder.prefill(prompt_ids)
        while True:
            next_id = int(logits.argmax())
            if next_id == backend.tokenizer.eos_id:
                break
            generated.append(next_id)
            if len(generated) == max_new_tokens:
                break
            logits = decoder.step(next_id)
    return generated


def gather_vocabulary(local: torch.Tensor) -> torch.Tensor:
    """Concatenate the TP ranks' vocabulary shards (megatron's own gather allocates on CUDA)."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1:
        return local
    return torch.cat(collectives.all_gather(local, group=parallel_state.get_tensor_model_parallel_group()), dim=-1)
