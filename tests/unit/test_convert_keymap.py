"""HF <-> megatron weight names and the QKV / gate-up layouts, on plain tensors.

python -m pytest tests/unit/test_convert_keymap.py -q
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_harpe.config import ModelConfig
from megatron_harpe.convert.keymap import (
    expected_hf_shapes,
    fuse_gate_up,
    fuse_qkv,
    hf_sources,
    hf_to_megatron_tensor,
    megatron_names,
    megatron_to_hf_tensors,
    split_gate_up,
    split_qkv,
    template_of,
)

GQA = ModelConfig(
    num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=40, vocab_size=50
)
MHA = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=24, vocab_size=30)


def _labelled_projection(heads: int, head_dim: int, hidden: int, tag: float) -> torch.Tensor:
    """Row r of head h holds tag + h + r/100 in every column, so rows can be traced."""
    rows = torch.arange(heads * head_dim, dtype=torch.float64)
    values = tag + (rows // head_dim) + (rows % head_dim) / 100
    return values[:, None].expand(-1, hidden).clone()


def test_fused_qkv_rows_are_grouped_per_kv_group() -> None:
    d = GQA.head_dim
    q = _labelled_projection(6, d, 48, tag=100)
    k = _labelled_projection(2, d, 48, tag=200)
    v = _labelled_projection(2, d, 48, tag=300)
    fused = fuse_qkv(q, k, v, GQA)
    assert fused.shape == ((6 + 2 * 2) * d, 48)
    expected_order = []
    for group in range(2):  # [q heads of the group (3 of them), k_g, v_g]
        expected_order += [100 + 3 * group + i for i in range(3)] + [200 + group, 300 + group]
    head_labels = fused[::d, 0].floor().tolist()
    assert head_labels == expected_order
    assert torch.equal(fused[:d], q[:d])  # rows inside a head keep their order (rotate-half layout)
    assert torch.equal(fused[3 * d : 4 * d], k[:d])


@pytest.mark.parametrize("model", [GQA, MHA], ids=["gqa", "mha"])
def test_qkv_and_gate_up_round_trip(model: ModelConfig) -> None:
    d, h = model.head_dim, model.hidden_size
    q = torch.randn(model.num_attention_heads * d, h)
    k, v = torch.randn(model.kv_groups * d, h), torch.randn(model.kv_groups * d, h)
    for original, restored in zip((q, k, v), split_qkv(fuse_qkv(q, k, v, model), model)):
        assert torch.equal(original, restored)
    gate, up = torch.randn(model.ffn_hidden_size, h), torch.randn(model.ffn_hidden_size, h)
    fc1 = fuse_gate_up(gate, up)
    assert torch.equal(fc1[: model.ffn_hidden_size], gate)
    assert all(torch.equal(a, b) for a, b in zip(split_gate_up(fc1), (gate, up)))


@pytest.mark.parametrize("model", [GQA, MHA], ids=["gqa", "mha"])
def test_names_and_shapes_match_transformers_llama(model: ModelConfig) -> None:
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=model.ffn_hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.kv_groups,
        )
    )
    real = {name: tuple(tensor.shape) for name, tensor in hf.state_dict().items()}
    assert expected_hf_shapes(model) == real
    produced = [source for name in megatron_names(model) for source in hf_sources(name)]
    assert sorted(produced) == sorted(real)  # every HF weight comes from exactly one megatron weight


def test_every_megatron_weight_round_trips_through_hf_names() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = expected_hf_shapes(GQA)
    hf = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    rebuilt = {}
    for name in megatron_names(GQA):
        tensor = hf_to_megatron_tensor(name, [hf[source] for source in hf_sources(name)], GQA)
        rebuilt.update(megatron_to_hf_tensors(name, tensor, GQA))
    assert rebuilt.keys() == hf.keys()
    assert all(torch.equal(rebuilt[name], hf[name]) for name in hf)


def test_tied_embeddings_have_no_output_layer() -> None:
    tied = ModelConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=8, vocab_size=10, tie_word_embeddings=True
    )
    assert "output_layer.weight" not in megatron_names(tied)
    assert "lm_head.weight" not in expected_hf_shapes(tied)


def test_templates() -> None:
    assert template_of("decoder.layers.12.mlp.linear_fc2.weight") == ("decoder.layers.{}.mlp.linear_fc2.weight", 12)
    assert template_of("decoder.final_layernorm.weight") == ("decoder.final_layernorm.weight", None)
    assert hf_sources("decoder.layers.4.mlp.linear_fc1.weight") == (
        "model.layers.4.mlp.gate_proj.weight",
        "model.layers.4.mlp.up_proj.weight",
    )
    with pytest.raises(KeyError):
        hf_sources("decoder.layers.0.self_attention.core_attention.weird")
