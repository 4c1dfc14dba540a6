"""The HF HARPE model: per-head rotary, parity with stock Llama, GQA key handling, KV cache.

python -m pytest tests/unit/test_convert_hf_harpe.py -q
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from megatron_harpe.convert.hf_harpe import HarpeLlamaConfig, HarpeLlamaForCausalLM
from megatron_harpe.convert.hf_harpe.modeling_harpe_llama import HarpeLlamaRotaryEmbedding

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _stock(num_key_value_heads: int, theta: float = 50000.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=num_key_value_heads, rope_theta=theta)).eval()


def _harpe(num_key_value_heads: int, bases: list[float], state: dict) -> HarpeLlamaForCausalLM:
    model = HarpeLlamaForCausalLM(HarpeLlamaConfig(**TINY, num_key_value_heads=num_key_value_heads, rope_bases=bases))
    model.load_state_dict(state)
    return model.eval()


def _tokens(batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_equal_bases_match_stock_llama_bitwise(kv_heads: int) -> None:
    stock = _stock(kv_heads)
    harpe = _harpe(kv_heads, [50000.0] * 4, stock.state_dict())
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(stock(tokens).logits, harpe(tokens).logits)
    stock_out = stock.generate(tokens[:1], max_new_tokens=6, do_sample=False)
    harpe_out = harpe.generate(tokens[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(stock_out, harpe_out)


def test_rotary_rows_equal_stock_rotary_of_each_base() -> None:
    bases = [10000.0, 123456.0, 1.0e6, 5.0e6]
    config = HarpeLlamaConfig(**TINY, rope_bases=bases)
    positions = torch.arange(40)[None].expand(2, -1)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = HarpeLlamaRotaryEmbedding(config)(x, positions)
    assert cos.shape == (2, 4, 40, config.head_dim)
    for head, base in enumerate(bases):
        stock_cos, stock_sin = LlamaRotaryEmbedding(LlamaConfig(**TINY, rope_theta=base))(x, positions)
        assert torch.equal(cos[:, head], stock_cos)
        assert torch.equal(sin[:, head], stock_sin)


def test_distinct_bases_change_logits() -> None:
    stock = _stock(4)
    harpe = _harpe(4, [50000.0, 50000.0, 50000.0, 5.0e6], stock.state_dict())
    with torch.no_grad():
        difference = (stock(_tokens()).logits - harpe(_tokens()).logits).abs().max()
    assert difference > 1e-4


def _expand_kv_to_mha(state: dict, group_size: int, head_dim: int) -> dict:
    """Weights of the MHA model equivalent to a GQA model (each k/v head copied per query head)."""
    expanded = dict(state)
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = value.view(-1, head_dim, value.shape[-1])
            expanded[key] = heads.repeat_interleave(group_size, dim=0).reshape(-1, value.shape[-1])
    return expanded


@pytest.mark.parametrize("bases", [[1.0e4, 1.0e4, 3.0e5, 3.0e5], [1.0e4, 2.0e4, 3.0e5, 4.0e6]])
def test_gqa_equals_mha_with_copied_keys(bases: list[float]) -> None:
    """Per-group bases (shared keys) and per-query-head bases (expanded keys) both equal an MHA
    model whose k/v heads are copies of the group's."""
    gqa = _harpe(2, bases, _stock(2).state_dict())
    assert gqa.model.layers[0].self_attn.keys_per_query_head == (len(set(bases[:2])) > 1)
    mha = _harpe(4, bases, _expand_kv_to_mha(gqa.state_dict(), group_size=2, head_dim=16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(_tokens()).logits, mha(_tokens()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cache_decoding_matches_full_forward(kv_heads: int) -> None:
    harpe = _harpe(kv_heads, [1.0e4, 2.0e4, 3.0e5, 4.0e6], _stock(kv_heads).state_dict())
    tokens = _tokens(length=16)
    with torch.no_grad():
        full = harpe(tokens).logits
        prefix = harpe(tokens[:, :10], use_cache=True)
        logits = [prefix.logits]
        cache = prefix.past_key_values
        for step in range(10, 16):
            out = harpe(tokens[:, step : step + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=0, atol=1e-5)
    generated = harpe.generate(tokens[:1, :5], max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        recomputed = harpe(generated[:, :-1]).logits.argmax(-1)[:, 4:]
    assert torch.equal(recomputed, generated[:, 5:])


def test_a_transformers_that_bypasses_the_projections_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation lives in q_proj/k_proj: if stock attention stopped calling them, say so, not garbage."""
    harpe = _harpe(2, [1.0e4, 1.0e4, 3.0e5, 3.0e5], _stock(2).state_dict())
    monkeypatch.setattr(LlamaAttention, "forward", lambda self, hidden_states, *args, **kwargs: (hidden_states, None))
    with pytest.raises(RuntimeError, match="no longer computes queries and keys through q_proj/k_proj"):
        harpe(_tokens())


def test_config_defaults_and_legacy_fields() -> None:
    legacy = HarpeLlamaConfig.from_dict({**TINY, "model_type": "harpe_llama", "rope_theta": 500000.0})
    assert legacy.rope_bases == [500000.0] * 4
    assert legacy.rope_parameters["rope_theta"] == 500000.0
    roundtrip = HarpeLlamaConfig.from_dict(HarpeLlamaConfig(**TINY, rope_bases=[2e4, 3e4, 4e4, 5e4]).to_dict())
    assert roundtrip.rope_bases == [2e4, 3e4, 4e4, 5e4]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"rope_bases": [1e4, 1e4, 1e4]}, "one base per query head"),
        ({"rope_bases": [1e4, 1e4, 1e4, -3.0]}, "finite numbers > 1"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "plain per-head RoPE"),
    ],
)
def test_config_rejects_bad_values(extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HarpeLlamaConfig(**TINY, **extra)
