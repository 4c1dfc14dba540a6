"""The cached cos/sin rotary path gives what megatron-core's own unfused apply gives.

    pytest tests/unit/test_rotary_cached_apply.py

`HeadwiseRotaryEmbedding` tables carry their cos/sin and megatron's attention is routed through
`rotary.apply_rotary_pos_emb`; here every layout (distinct bases, heads sharing a row, one
shared row, the query table rotating a k/v group's key, YaRN's attention scale, bf16) is compared
with megatron's `apply_rotary_pos_emb` on the same angle table (one row per head: `fit_rows`),
and a whole model's logits and gradients with the route switched off.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer import attention as megatron_attention
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.position import rotary
from megatron_harpe.position.config import PositionConfig
from megatron_harpe.position.rotary import HeadwiseRotaryEmbedding

HEAD_DIM = 16
CONFIG = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, apply_rope_fusion=False)

LAYOUTS = {  # query bases, key bases, rows of cos/sin the query and key tables need
    "distinct": ([10.0, 1e3, 1e5, 5e6], [10.0, 1e3, 1e5, 5e6], 4, 4),
    "gqa_rows_shared": ([30.0, 30.0, 3e4, 3e4], [30.0, 3e4], 2, 2),  # query heads of a group share a row
    "one_base": ([1e4] * 4, [1e4] * 2, 1, 1),
    "two_per_row_of_eight": ([1.0e2] * 2 + [1.0e3] * 2 + [1.0e4] * 2 + [1.0e5] * 2, [1.0e2, 1.0e3, 1.0e4, 1.0e5], 4, 4),
}


def megatron_rotate(t: torch.Tensor, table: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    return rope_utils.apply_rotary_pos_emb(t, table, config=CONFIG, mscale=mscale, cp_group=object())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype,mscale", [(torch.float32, 1.0), (torch.float32, 1.2), (torch.bfloat16, 1.0)])
def test_cached_apply_equals_megatron_apply(layout, dtype, mscale):
    query_bases, key_bases, query_rows, key_rows = LAYOUTS[layout]
    embedding = HeadwiseRotaryEmbedding(
        PositionConfig(type="harpe", bases=key_bases), query_bases, key_bases, HEAD_DIM, cp_rank=1, cp_size=2
    )
    query_table, key_table = embedding(64)
    assert key_table is query_table  # the query table's distinct rows are the keys' rows
    for table, heads, rows in ((query_table, len(query_bases), query_rows), (key_table, len(key_bases), key_rows)):
        assert table.rotary_cos_sin.cos.shape == (32, 1, rows, 1, HEAD_DIM // 2)  # broadcast rows, half width
        if dtype == torch.float32 and mscale == 1.0:  # no casts: cos + sin hold at most the angle table's bytes
            assert table.rotary_cos_sin.nbytes() == table.numel() * 4 * rows // table.size(2)
        t = torch.randn(32, 2, heads, HEAD_DIM, dtype=dtype, requires_grad=True)
        reference_t = t.detach().clone().requires_grad_(True)
        ours = rotary.apply_rotary_pos_emb(t, table, CONFIG, mscale=mscale)
        reference = megatron_rotate(reference_t, rotary.fit_rows(table, heads), mscale)
        assert ours.shape == reference.shape and ours.dtype == reference.dtype
        assert torch.equal(ours, reference)  # the same cos/sin and products, bit for bit
        grad = torch.randn_like(ours)
        ours.backward(grad)
        reference.backward(grad)
        torch.testing.assert_close(t.grad, reference_t.grad)


def test_strided_query_views_and_fallbacks():
    embedding = HeadwiseRotaryEmbedding(
        PositionConfig(type="harpe", bases=[10.0, 1e4]), [10.0, 1e4], [10.0, 1e4], HEAD_DIM
    )
    table, _ = embedding(24)
    mixed = torch.randn(24, 3, 2, 3 * HEAD_DIM)  # megatron splits q/k/v out of one projection: strided views
    query = mixed[..., :HEAD_DIM]
    assert torch.equal(rotary.apply_rotary_pos_emb(query, table, CONFIG), megatron_rotate(query, table))
    plain = table.clone()  # no cos/sin attached: megatron's own path
    assert not hasattr(plain, "rotary_cos_sin")
    assert torch.equal(
        rotary.apply_rotary_pos_emb(query, plain, CONFIG, cp_group=object()), megatron_rotate(query, plain)
    )
    assert rotary._row_repeat([1.0, 1.0, 2.0, 2.0]) == 2 and rotary._row_repeat([1.0, 2.0, 1.0, 2.0]) == 1
    assert rotary._row_repeat([3.0] * 4) == 4


def test_megatron_attention_is_routed_through_the_cached_apply():
    HeadwiseRotaryEmbedding(PositionConfig(type="harpe", bases=[10.0]), [10.0], [10.0], HEAD_DIM)
    assert megatron_attention.apply_rotary_pos_emb is rotary.apply_rotary_pos_emb


def _model_step(route: bool, gqa_bases: str, position_type: str) -> dict:
    from megatron_harpe import parallel
    from megatron_harpe.config import ModelConfig
    from megatron_harpe.model import build_model

    parallel.seed_everything(0)
    model = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        vocab_size=128,
        max_position_embeddings=64,
    )
    if position_type == "harpe":
        bases = [10.0, 1e4] if gqa_bases == "per_group" else [10.0, 100.0, 1e3, 1e4]
        position = PositionConfig(type="harpe", bases=bases, gqa_bases=gqa_bases)
    else:
        position = PositionConfig(type="yarn", base=1e4, scaling_factor=4.0, original_max_position=16)
    gpt = build_model(model, position.resolve(model))
    if not route:  # megatron's own apply, on the table with one row per head of q or k
        megatron_attention.apply_rotary_pos_emb = lambda t, freqs, **kwargs: rotary._megatron_apply_rotary_pos_emb(
            t, rotary.fit_rows(freqs, t.size(-2)), **kwargs
        )
    calls = []
    original = megatron_attention.apply_rotary_pos_emb
    megatron_attention.apply_rotary_pos_emb = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    logits = gpt(tokens, torch.arange(40)[None].expand(2, -1), None)
    (logits.float().square().mean()).backward()
    grads = {name: param.grad.clone() for name, param in gpt.named_parameters()}
    return {"logits": logits.detach(), "grads": grads, "calls": len(calls)}


def _compare_routes() -> list[tuple[dict, dict]]:
    from megatron_harpe import parallel

    parallel.initialize(1, 1)
    return [
        (_model_step(True, mode, kind), _model_step(False, mode, kind))
        for mode, kind in (("per_group", "harpe"), ("per_query_head", "harpe"), ("per_group", "yarn"))
    ]


def test_model_logits_and_gradients_equal_megatron_path():
    from megatron_harpe import parallel

    for cached, stock in parallel.run_on_ranks(_compare_routes, 1)[0]:  # megatron state is process-global
        assert cached["calls"] == stock["calls"] == 4  # q and k in each of 2 layers
        torch.testing.assert_close(cached["logits"], stock["logits"], atol=1e-6, rtol=1e-6)
        assert cached["grads"].keys() == stock["grads"].keys()
        for name, grad in stock["grads"].items():
            torch.testing.assert_close(cached["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
