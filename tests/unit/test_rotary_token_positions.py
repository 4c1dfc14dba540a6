"""Per-token rotary tables (packed documents): the tables of `at_token_positions` are the cached
tables indexed by each token's own position, for every base layout, and rotate THD tensors
token by token whatever cu_seqlens megatron passes.

    pytest tests/unit/test_rotary_token_positions.py
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.position import rotary
from megatron_harpe.position.config import PositionConfig
from megatron_harpe.position.rotary import HeadwiseRotaryEmbedding

HEAD_DIM = 16
CONFIG = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, apply_rope_fusion=False)
LAYOUTS = {  # position block, query bases, key bases (per head, before TP)
    "harpe_mha": (
        PositionConfig(type="harpe", bases=[10.0, 1e3, 1e5, 5e6]),
        [10.0, 1e3, 1e5, 5e6],
        [10.0, 1e3, 1e5, 5e6],
    ),
    "harpe_gqa_per_group": (PositionConfig(type="harpe", bases=[30.0, 3e4]), [30.0, 30.0, 3e4, 3e4], [30.0, 3e4]),
    "abf": (PositionConfig(type="abf", base=5e5), [5e5] * 4, [5e5] * 2),
    "pi": (PositionConfig(type="pi", base=1e4, scaling_factor=8.0), [1e4] * 4, [1e4] * 4),
    "yarn": (PositionConfig(type="yarn", base=1e4, scaling_factor=8.0, original_max_position=64), [1e4] * 4, [1e4] * 2),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tp_rank", [0, 1])
def test_token_tables_are_the_cached_tables_at_each_tokens_position(layout, tp_rank):
    position, query_bases, key_bases = LAYOUTS[layout]
    embedding = HeadwiseRotaryEmbedding(position, query_bases, key_bases, HEAD_DIM, tp_rank=tp_rank, tp_size=2)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 0, 1, 0, 1, 2]])
    with embedding.at_token_positions(positions):
        query, key = embedding(positions.size(1))
    cached_query, cached_key = embedding(16)  # positions 0..15, [16, 1, rows, d]
    assert query.shape == (10, 2, cached_query.size(2), HEAD_DIM) and query.per_token
    for table, cached in ((query, cached_query), (key, cached_key)):
        for row in range(2):
            assert torch.equal(table[:, row], cached[positions[row], 0])  # bit for bit
    assert embedding._token_positions is None  # the block ends: back to the cached tables
    assert not embedding(16)[0].__dict__.get("per_token", False)


@pytest.mark.parametrize("layout", ["harpe_mha", "harpe_gqa_per_group", "yarn"])
def test_thd_tensors_rotate_token_by_token_ignoring_cu_seqlens(layout):
    position, query_bases, key_bases = LAYOUTS[layout]
    embedding = HeadwiseRotaryEmbedding(position, query_bases, key_bases, HEAD_DIM)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]])
    query_table, _ = embedding.token_tables(positions)
    thd = torch.randn(8, len(query_bases), HEAD_DIM)  # [tokens, heads, d]
    cu_seqlens = torch.tensor([0, 4, 7, 8], dtype=torch.int32)
    rotated = rotary.apply_rotary_pos_emb(thd, query_table, CONFIG, cu_seqlens=cu_seqlens, mscale=1.3)
    as_bshd = rotary.apply_rotary_pos_emb(thd[:, None], query_table, CONFIG, mscale=1.3)[:, 0]
    assert torch.equal(rotated, as_bshd)
    cached_query, _ = embedding(8)  # megatron's own rotation of each token at its position
    one_by_one = torch.stack([rope_utils._apply_rotary_pos_emb_bshd(thd[i : i + 1, None], cached_query[p : p + 1],
                                                                   mscale=1.3)[0, 0]
                              for i, p in enumerate(positions[0].tolist())])  # fmt: skip
    torch.testing.assert_close(rotated, one_by_one)


@pytest.mark.parametrize("layout", ["harpe_mha", "harpe_gqa_per_group"])
def test_a_detached_alias_of_the_table_still_rotates_token_by_token(layout):
    """megatron's recompute (train.recompute) reruns a layer on `table.detach()`, which drops the
    table's attributes: the THD rotation must still follow each token's own position (here
    positions that do not restart where cu_seqlens cuts, as a CP rank's chunks of documents)."""
    position, query_bases, key_bases = LAYOUTS[layout]
    embedding = HeadwiseRotaryEmbedding(position, query_bases, key_bases, HEAD_DIM)
    positions = torch.tensor([[4, 5, 6, 7, 0, 1, 2, 9]])
    table, _ = embedding.token_tables(positions)
    cu_seqlens = torch.tensor([0, 4, 7, 8], dtype=torch.int32)
    for heads in sorted({len(query_bases), len(key_bases)}):  # queries, and the keys of their k/v groups
        thd = torch.randn(8, heads, HEAD_DIM)
        want = rotary.apply_rotary_pos_emb(thd, table, CONFIG, cu_seqlens=cu_seqlens)
        assert torch.equal(rotary.apply_rotary_pos_emb(thd, table.detach(), CONFIG, cu_seqlens=cu_seqlens), want)
    own_bases, _ = HeadwiseRotaryEmbedding(position, key_bases, key_bases, HEAD_DIM).token_tables(positions)
    keys = torch.randn(8, len(key_bases), HEAD_DIM)
    torch.testing.assert_close(
        rotary.apply_rotary_pos_emb(keys, table.detach(), CONFIG, cu_seqlens=cu_seqlens),
        rotary.apply_rotary_pos_emb(keys, own_bases, CONFIG, cu_seqlens=cu_seqlens),
        rtol=0,
        atol=0,
    )


def test_per_token_positions_must_be_batch_by_sequence():
    embedding = HeadwiseRotaryEmbedding(PositionConfig(type="abf", base=1e4), [1e4] * 4, [1e4] * 4, HEAD_DIM)
    with pytest.raises(ValueError, match="batch, sequence"):
        embedding.token_tables(torch.arange(8))
