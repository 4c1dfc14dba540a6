"""Hugging Face `config.json` <-> our ModelConfig / PositionConfig.

Reading accepts both ways RoPE settings appear in the wild: transformers >= 5 writes
`rope_parameters: {rope_theta, rope_type, factor, ...}`; Llama2/Llama3 checkpoints carry a
top-level `rope_theta` and an optional `rope_scaling: {type|rope_type, factor, ...}`.

Writing picks the class users expect: plain RoPE / ABF -> stock `LlamaForCausalLM` with
`rope_theta`; PI -> `rope_type: linear`; YaRN -> `rope_type: yarn` with the original context;
HARPE -> `HarpeLlamaForCausalLM` (our modeling code travels with the export, `auto_map`) with
`rope_bases`, one per query head.

    model_cfg = model_config_from_hf(read_hf_config("llama2-7b"))
    hf_cfg = hf_config_for(model_cfg, position, max_position_embeddings=131072)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import LlamaConfig, PretrainedConfig

from megatron_harpe.config import ModelConfig
from megatron_harpe.convert.hf_files import read_json
from megatron_harpe.convert.hf_harpe import HarpeLlamaConfig
from megatron_harpe.position.config import PositionConfig

SUPPORTED_MODEL_TYPES = ("llama", "harpe_llama")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "HarpeLlamaForCausalLM")
HARPE_AUTO_MAP = {
    "AutoConfig": "configuration_harpe_llama.HarpeLlamaConfig",
    "AutoModelForCausalLM": "modeling_harpe_llama.HarpeLlamaForCausalLM",
}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory: {path} is missing")
    return read_json(path)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a Llama-style HF config; anything else is a ValueError."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES or any(a not in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ValueError(
            f"unsupported architecture (model_type={model_type!r}, architectures={architectures}): the converter "
            f"handles Llama-style models ({', '.join(SUPPORTED_ARCHITECTURES)}) such as Llama2 and Llama3"
        )
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"config.json has {key}={value!r}; megatron_harpe's Llama needs {key}={wanted!r}")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        model = ModelConfig(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            ffn_hidden_size=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as missing:
        raise ValueError(f"config.json lacks {missing}, which a Llama config must have") from missing
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ValueError(
            f"config.json has head_dim={head_dim} != hidden_size / num_attention_heads = {hidden // heads}; "
            "megatron_harpe derives the head dim from the hidden size"
        )
    model.validate()
    return model


def rope_parameters_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """One flat dict {rope_type, rope_theta, factor, ...} from either config.json style."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    return params


def position_from_hf(hf: dict[str, Any], model: ModelConfig) -> PositionConfig:
    """The position encoding an HF model was trained with (the default for continued training)."""
    params = rope_parameters_from_hf(hf)
    rope_type, theta = params["rope_type"], float(params["rope_theta"])
    if hf.get("model_type") == "harpe_llama":
        bases = [float(b) for b in hf.get("rope_bases") or [theta] * model.num_attention_heads]
        per_group = model.num_attention_heads // model.kv_groups
        groups = [bases[g * per_group : (g + 1) * per_group] for g in range(model.kv_groups)]
        if all(len(set(group)) == 1 for group in groups):
            return PositionConfig(type="harpe", bases=[group[0] for group in groups])
        return PositionConfig(type="harpe", bases=bases, gqa_bases="per_query_head")
    if rope_type == "default":
        return PositionConfig(type="abf", base=theta)
    if rope_type == "linear":
        return PositionConfig(type="pi", base=theta, scaling_factor=float(params["factor"]))
    if rope_type == "yarn":
        return PositionConfig(
            type="yarn",
            base=theta,
            scaling_factor=float(params["factor"]),
            original_max_position=int(params.get("original_max_position_embeddings") or model.max_position_embeddings),
            yarn_beta_fast=float(params.get("beta_fast") or 32.0),
            yarn_beta_slow=float(params.get("beta_slow") or 1.0),
        )
    raise ValueError(
        f"config.json uses rope_type={rope_type!r}, which megatron_harpe cannot reproduce: choose the position "
        "encoding to train with explicitly (e.g. --override position.type=abf position.base=500000)"
    )


def hf_config_for(
    model: ModelConfig,
    position: PositionConfig,
    *,
    max_position_embeddings: int | None = None,
    token_ids: dict[str, Any] | None = None,
    dtype: str | None = None,
) -> PretrainedConfig:
    """The transformers config of an export; `position` must be resolved (explicit bases)."""
    common: dict[str, Any] = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.kv_groups,
        head_dim=model.head_dim,
        max_position_embeddings=max_position_embeddings or model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        initializer_range=model.init_method_std,
        tie_word_embeddings=model.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        **{key: value for key, value in (token_ids or {}).items() if key in TOKEN_ID_KEYS},
    )
    if position.type == "harpe":
        bases = position.query_head_bases(model)
        config: PretrainedConfig = HarpeLlamaConfig(
            **common, rope_bases=bases, rope_parameters={"rope_type": "default", "rope_theta": bases[0]}
        )
        config.auto_map = dict(HARPE_AUTO_MAP)
        config.architectures = ["HarpeLlamaForCausalLM"]
    else:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": position.base}
        if position.type == "pi":
            rope.update(rope_type="linear", factor=position.scaling_factor)
        elif position.type == "yarn":
            rope.update(
                rope_type="yarn",
                factor=position.scaling_factor,
                original_max_position_embeddings=position.original_max_position or model.max_position_embeddings,
                beta_fast=position.yarn_beta_fast,
                beta_slow=position.yarn_beta_slow,
            )
        config = LlamaConfig(**common, rope_parameters=rope)
        config.architectures = ["LlamaForCausalLM"]
    if dtype is not None:
        config.dtype = dtype
    return config


def token_ids_from(hf_dir: str | Path | None) -> dict[str, Any]:
    """bos/eos/pad/unk ids from a model dir's config.json / generation_config.json (empty if none)."""
    found: dict[str, Any] = {}
    if hf_dir is None:
        return found
    for name in ("generation_config.json", "config.json"):
        path = Path(hf_dir) / name
        if path.is_file():
            values = read_json(path)
            found.update({k: values[k] for k in TOKEN_ID_KEYS if values.get(k) is not None})
    return found
