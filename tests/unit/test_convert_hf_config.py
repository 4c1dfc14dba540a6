"""config.json <-> ModelConfig / PositionConfig, both RoPE formats, and the RoPE numerics of
the exported configs (PI and YaRN in transformers vs our megatron tables).

    python -m pytest tests/unit/test_convert_hf_config.py -q
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_harpe.config import ModelConfig
from megatron_harpe.convert.hf_config import hf_config_for, model_config_from_hf, position_from_hf
from megatron_harpe.convert.hf_harpe import HarpeLlamaConfig
from megatron_harpe.position.config import PositionConfig
from megatron_harpe.position.rotary import head_inverse_frequencies

SIZES = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
GQA = ModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96, vocab_size=64,
    max_position_embeddings=128,
)  # fmt: skip


def _legacy(**extra) -> dict:
    """A Llama2-era config.json: top-level rope_theta / rope_scaling."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SIZES, "num_key_value_heads": 2, **extra}


def test_model_config_from_both_formats() -> None:
    new_style = LlamaConfig(**SIZES, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5e5).to_dict()
    assert "rope_parameters" in new_style and "rope_theta" not in new_style
    for hf in (new_style, _legacy(rope_theta=5e5, rms_norm_eps=1e-5)):
        model = model_config_from_hf(hf)
        assert (model.num_layers, model.hidden_size, model.ffn_hidden_size) == (2, 64, 96)
        assert (model.num_attention_heads, model.kv_groups, model.norm_epsilon) == (4, 2, 1e-5)
        assert position_from_hf(hf, model) == PositionConfig(type="abf", base=5e5)


@pytest.mark.parametrize(
    "hf, expected",
    [
        (_legacy(), PositionConfig(type="abf", base=10000.0)),
        (_legacy(rope_scaling={"type": "linear", "factor": 4.0}), PositionConfig(type="pi", scaling_factor=4.0)),
        (
            _legacy(
                rope_theta=5e5,
                rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
            ),
            PositionConfig(type="yarn", base=5e5, scaling_factor=8.0, original_max_position=64),
        ),
        (
            {**_legacy(), "model_type": "harpe_llama", "rope_bases": [1e3, 1e3, 1e5, 1e5]},
            PositionConfig(type="harpe", bases=[1e3, 1e5]),
        ),
        (
            {**_legacy(), "model_type": "harpe_llama", "rope_bases": [1e3, 2e3, 1e5, 2e5]},
            PositionConfig(type="harpe", bases=[1e3, 2e3, 1e5, 2e5], gqa_bases="per_query_head"),
        ),
    ],
    ids=["default", "linear", "yarn", "harpe_per_group", "harpe_per_query_head"],
)
def test_position_from_hf(hf: dict, expected: PositionConfig) -> None:
    assert position_from_hf(hf, model_config_from_hf(hf)) == expected


@pytest.mark.parametrize(
    "hf, message",
    [
        ({**_legacy(), "model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
        ({**_legacy(), "architectures": ["LlamaForSequenceClassification"]}, "unsupported architecture"),
        (_legacy(attention_bias=True), "attention_bias"),
        (_legacy(hidden_act="gelu"), "hidden_act"),
        (_legacy(head_dim=32), "head_dim"),
        ({k: v for k, v in _legacy().items() if k != "intermediate_size"}, "intermediate_size"),
    ],
)
def test_unsupported_configs_are_rejected(hf: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(hf)


def test_unreproducible_rope_type_needs_an_explicit_position() -> None:
    hf = _legacy(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    with pytest.raises(ValueError, match="llama3.*position.type"):
        position_from_hf(hf, model_config_from_hf(hf))


@pytest.mark.parametrize(
    "position",
    [
        PositionConfig(type="abf", base=5e5),
        PositionConfig(type="pi", base=1e4, scaling_factor=4.0),
        PositionConfig(type="yarn", base=1e4, scaling_factor=8.0, original_max_position=64),
        PositionConfig(type="harpe", bases=[1e3, 1e5]),
        PositionConfig(type="harpe", bases=[1e3, 2e3, 1e5, 2e5], gqa_bases="per_query_head"),
    ],
    ids=["abf", "pi", "yarn", "harpe", "harpe_per_query_head"],
)
def test_export_config_round_trips(position: PositionConfig) -> None:
    exported = hf_config_for(GQA, position, max_position_embeddings=1024)
    assert isinstance(exported, HarpeLlamaConfig) == (position.type == "harpe")
    as_json = exported.to_dict()
    if position.type == "harpe":
        assert as_json["rope_bases"] == position.query_head_bases(GQA)
        assert as_json["auto_map"]["AutoModelForCausalLM"] == "modeling_harpe_llama.HarpeLlamaForCausalLM"
    else:
        assert "auto_map" not in as_json and as_json["model_type"] == "llama"
    model = model_config_from_hf(as_json)
    assert (model.num_attention_heads, model.kv_groups, model.max_position_embeddings) == (4, 2, 1024)
    assert position_from_hf(as_json, model) == position


@pytest.mark.parametrize(
    "position",
    [
        PositionConfig(type="pi", base=1e4, scaling_factor=4.0),
        PositionConfig(type="yarn", base=1e4, scaling_factor=8.0, original_max_position=64),
        PositionConfig(type="yarn", base=5e5, scaling_factor=32.0, original_max_position=4096),
    ],
    ids=["pi", "yarn8", "yarn32"],
)
def test_transformers_rope_matches_our_megatron_tables(position: PositionConfig) -> None:
    """Same inverse frequencies (to float32 rounding) and the same attention factor."""
    model = ModelConfig(num_layers=1, hidden_size=512, num_attention_heads=4, ffn_hidden_size=8, vocab_size=8)
    exported = hf_config_for(model, position)
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS[exported.rope_parameters["rope_type"]](exported)
    ours = head_inverse_frequencies(position, [position.base], model.head_dim)[0]
    torch.testing.assert_close(hf_inv_freq.double(), ours, rtol=2e-7, atol=0)
    megatron_factor = 1.0
    if position.type == "yarn":
        megatron_factor = _yarn_get_concentration_factor(position.scaling_factor, None, None)
    assert hf_attention_factor == pytest.approx(megatron_factor, rel=1e-12)
