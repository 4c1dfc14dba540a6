"""Per-head rotary tables: exactness against megatron's stock RoPE and independent references."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.config import ModelConfig
from megatron_harpe.position.config import PositionConfig
from megatron_harpe.position.rotary import (
    HeadwiseRotaryEmbedding,
    context_parallel_positions,
    head_inverse_frequencies,
)

HEAD_DIM = 16
ROPE_CONFIG = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, apply_rope_fusion=False)


def rotary_for(bases: list[float], position: PositionConfig | None = None, **kwargs) -> HeadwiseRotaryEmbedding:
    position = position or PositionConfig(type="harpe", bases=bases)
    return HeadwiseRotaryEmbedding(position, bases, bases, HEAD_DIM, **kwargs)


def rotate(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # cp_group is only read for packed (thd) sequences; any non-None value skips its lookup
    return apply_rotary_pos_emb(t, table, config=ROPE_CONFIG, cp_group=object())


def reference_rotation(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Single-head RoPE written from the formula: pair (i, i + d/2) rotated by m * base^(-2i/d)."""
    half = x.size(-1) // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(half):
        angle = positions.double() * base ** (-2 * i / x.size(-1))
        a, b = x[..., i].double(), x[..., i + half].double()
        out[..., i] = a * torch.cos(angle) - b * torch.sin(angle)
        out[..., i + half] = a * torch.sin(angle) + b * torch.cos(angle)
    return out


def test_equal_bases_match_megatron_stock_rope():
    seq, base = 64, 10000.0
    stock = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)
    freqs = stock.get_freqs_non_repeated(seq)  # what stock get_emb builds before moving to CUDA
    stock_table = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    query_table, key_table = rotary_for([base] * 4)(seq)
    assert query_table.shape == stock_table.shape == (seq, 1, 1, HEAD_DIM)  # one base: one shared row
    x = torch.randn(seq, 2, 4, HEAD_DIM)
    torch.testing.assert_close(rotate(x, query_table), rotate(x, stock_table), atol=1e-5, rtol=1e-5)


def test_each_head_rotates_with_its_own_base():
    bases = [10.0, 1000.0, 1e5, 5e6]
    seq = 48
    query_table, _ = rotary_for(bases)(seq)
    x = torch.randn(seq, 1, 4, HEAD_DIM)
    rotated = rotate(x, query_table)
    for head, base in enumerate(bases):
        expected = reference_rotation(x[:, :, head], torch.arange(seq)[:, None], base)
        torch.testing.assert_close(rotated[:, :, head].double(), expected, atol=1e-5, rtol=1e-5)


def test_scores_depend_only_on_relative_distance():
    bases = [10.0, 300.0, 7e3, 2e5]
    query_table, key_table = rotary_for(bases)(40)
    q = torch.randn(1, 1, 4, HEAD_DIM).expand(40, 1, 4, HEAD_DIM)  # same vector at every position
    k = torch.randn(1, 1, 4, HEAD_DIM).expand(40, 1, 4, HEAD_DIM)
    rq, rk = rotate(q, query_table), rotate(k, key_table)
    for head in range(4):
        scores = rq[:, 0, head] @ rk[:, 0, head].T  # [m, n]
        for distance in (0, 3, 17):
            diagonal = torch.diagonal(scores, offset=-distance)
            torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, -5)[0])


def test_tensor_parallel_rank_gets_its_own_heads():
    bases = [1.0e4, 2.0e4, 3.0e4, 4.0e4]
    full_table, _ = rotary_for(bases)(32)
    for rank in range(2):
        local_table, _ = rotary_for(bases, tp_rank=rank, tp_size=2)(32)
        torch.testing.assert_close(local_table, full_table[:, :, 2 * rank : 2 * rank + 2])


@pytest.mark.parametrize("cp_size", [2, 4])
def test_context_parallel_rank_gets_its_two_chunks(cp_size):
    seq, bases = 64, [500.0, 5e4]
    full_table, _ = rotary_for(bases)(seq)
    chunk = seq // (2 * cp_size)
    for rank in range(cp_size):
        local_table, _ = rotary_for(bases, cp_rank=rank, cp_size=cp_size)(seq)
        second = 2 * cp_size - 1 - rank
        expected = torch.cat(
            [full_table[rank * chunk : (rank + 1) * chunk], full_table[second * chunk : (second + 1) * chunk]]
        )
        torch.testing.assert_close(local_table, expected)
    ranks = [context_parallel_positions(seq, r, cp_size) for r in range(cp_size)]
    assert sorted(torch.cat(ranks).long().tolist()) == list(range(seq))


def test_tables_are_local_and_cached():
    llama = ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008)
    position = PositionConfig(type="harpe", bases=[1e6 + 1e5 * h for h in range(32)]).resolve(llama)
    seq = 131072
    rotary = HeadwiseRotaryEmbedding(
        position,
        position.query_head_bases(llama),
        position.key_head_bases(llama),
        128,
        tp_rank=3,
        tp_size=8,
        cp_rank=1,
        cp_size=4,
    )
    naive_bytes = seq * 32 * 128 * 4  # full fp32 table, 2 GiB
    assert naive_bytes == 2 * 1024**3
    assert rotary.table_bytes(seq) == naive_bytes // 32
    query_table, key_table = rotary(seq)
    assert query_table.numel() * query_table.element_size() == naive_bytes // 32
    assert key_table is query_table  # MHA: one table serves queries and keys
    assert rotary(seq)[0] is query_table  # cached across layers and steps


def test_position_interpolation_divides_positions():
    pi = PositionConfig(type="pi", base=10000.0, scaling_factor=4.0)
    table, _ = HeadwiseRotaryEmbedding(pi, [1e4] * 2, [1e4] * 2, HEAD_DIM)(128)
    plain, _ = rotary_for([1e4] * 2)(32)
    torch.testing.assert_close(table[0:128:4], plain, atol=1e-5, rtol=1e-5)  # position 4m acts as m


def test_yarn_matches_transformers_reference():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=4096 * 8,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 4096,
        },
    )
    hf_inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    yarn = PositionConfig(type="yarn", base=10000.0, scaling_factor=8.0, original_max_position=4096)
    ours = head_inverse_frequencies(yarn, [10000.0], HEAD_DIM)[0]
    torch.testing.assert_close(ours.float(), hf_inv_freq.float(), atol=1e-6, rtol=1e-5)
    assert attention_factor == pytest.approx(0.1 * math.log(8.0) + 1.0)


def test_cache_keeps_the_lengths_used_last():
    """Evaluation at many lengths must not keep a table per length for the whole run (~0.3 GiB
    each at 128k for the 7B preset): the least recently used length goes first."""
    from megatron_harpe.position.rotary import CACHED_LENGTHS

    rotary = rotary_for([10.0, 1e3, 1e5, 5e6])
    training = rotary(64)[0]
    lengths = [8 * (i + 1) for i in range(CACHED_LENGTHS + 3)]
    for length in lengths:
        rotary(length)
        assert rotary(64)[0] is training  # the training length, used every step, stays cached
    assert len(rotary.cached_lengths()) == CACHED_LENGTHS
    assert rotary.cached_lengths()[-1] == (64, 0)
    assert (lengths[0], 0) not in rotary.cached_lengths()
    rebuilt = rotary(lengths[0])[0]  # an evicted length is rebuilt with the same values
    torch.testing.assert_close(rebuilt, rotary_for([10.0, 1e3, 1e5, 5e6])(lengths[0])[0], rtol=0, atol=0)
    assert len(rotary.cached_lengths()) == CACHED_LENGTHS
