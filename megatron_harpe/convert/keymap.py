"""Names and layouts of Llama weights in Hugging Face and in megatron-core, and the pure
tensor functions that move between them.

Most weights are renamed one to one (`DIRECT`, `{}` is the layer index). Two are fused in
megatron and split in HF:

- `linear_qkv` [(nq + 2*ng) * d, h]: rows grouped per k/v group g = 0 .. ng-1 as
  [q heads of group g (nq/ng of them), k_g, v_g]; TP rank r then owns a contiguous block of
  groups. HF keeps q_proj [nq*d, h], k_proj [ng*d, h], v_proj [ng*d, h]. Both sides use the
  rotate-half RoPE layout, so no row permutation inside a head is needed.
- `linear_fc1` [2*ffn, h] = [gate; up] (at TP=1; megatron's sharded checkpoint splits the two
  halves per rank itself). HF keeps gate_proj and up_proj.

    from megatron_harpe.convert.keymap import megatron_to_hf_tensors
    hf = dict(megatron_to_hf_tensors("decoder.layers.3.self_attention.linear_qkv.weight", qkv, model_cfg))
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from megatron_harpe.config import ModelConfig

# megatron name -> HF name
DIRECT: dict[str, str] = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "decoder.layers.{}.pre_mlp_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "decoder.layers.{}.self_attention.linear_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "decoder.layers.{}.mlp.linear_fc2.weight": "model.layers.{}.mlp.down_proj.weight",
}
QKV = "decoder.layers.{}.self_attention.linear_qkv.weight"
QKV_PARTS = (
    "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight",
)
FC1 = "decoder.layers.{}.mlp.linear_fc1.weight"
FC1_PARTS = ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight")
FUSED: dict[str, tuple[str, ...]] = {QKV: QKV_PARTS, FC1: FC1_PARTS}

# HF keys that carry no weights (old checkpoints stored the rotary buffer)
IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"\.(\d+)\.")


def template_of(name: str) -> tuple[str, int | None]:
    """'decoder.layers.3.mlp.linear_fc2.weight' -> ('decoder.layers.{}.mlp.linear_fc2.weight', 3)."""
    match = _LAYER.search(name)
    if match is None:
        return name, None
    return name[: match.start()] + ".{}." + name[match.end() :], int(match.group(1))


def megatron_names(model: ModelConfig) -> list[str]:
    """Every megatron weight of the model, in state-dict order."""
    names = ["embedding.word_embeddings.weight"]
    per_layer = [
        "decoder.layers.{}.input_layernorm.weight",
        "decoder.layers.{}.self_attention.linear_proj.weight",
        QKV,
        "decoder.layers.{}.pre_mlp_layernorm.weight",
        FC1,
        "decoder.layers.{}.mlp.linear_fc2.weight",
    ]
    for layer in range(model.num_layers):
        names += [template.format(layer) for template in per_layer]
    names.append("decoder.final_layernorm.weight")
    if not model.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def hf_sources(megatron_name: str) -> tuple[str, ...]:
    """The HF weights one megatron weight is made of."""
    template, layer = template_of(megatron_name)
    if template in FUSED:
        return tuple(part.format(layer) for part in FUSED[template])
    if template not in DIRECT:
        raise KeyError(f"no HF counterpart for megatron weight {megatron_name!r}")
    return (DIRECT[template].format(layer),)


def expected_hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF weight name -> shape for a Llama model of this configuration."""
    h, d, ffn = model.hidden_size, model.head_dim, model.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (model.vocab_size, h), "model.norm.weight": (h,)}
    if not model.tie_word_embeddings:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    for layer in range(model.num_layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = (h,)
        shapes[prefix + "post_attention_layernorm.weight"] = (h,)
        shapes[prefix + "self_attn.q_proj.weight"] = (model.num_attention_heads * d, h)
        shapes[prefix + "self_attn.k_proj.weight"] = (model.kv_groups * d, h)
        shapes[prefix + "self_attn.v_proj.weight"] = (model.kv_groups * d, h)
        shapes[prefix + "self_attn.o_proj.weight"] = (h, model.num_attention_heads * d)
        shapes[prefix + "mlp.gate_proj.weight"] = (ffn, h)
        shapes[prefix + "mlp.up_proj.weight"] = (ffn, h)
        shapes[prefix + "mlp.down_proj.weight"] = (h, ffn)
    return shapes


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """HF q/k/v projections -> megatron linear_qkv, rows grouped per k/v group."""
    groups, d, hidden = model.kv_groups, model.head_dim, q.shape[-1]
    per_group = model.num_attention_heads // groups
    q = q.reshape(groups, per_group * d, hidden)  # query heads of group g are contiguous in HF
    k = k.reshape(groups, d, hidden)
    v = v.reshape(groups, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron linear_qkv -> HF (q_proj, k_proj, v_proj) weights."""
    groups, d, hidden = model.kv_groups, model.head_dim, qkv.shape[-1]
    per_group = model.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * d, hidden)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def hf_to_megatron_tensor(megatron_name: str, sources: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """Build one megatron weight from its HF sources (in `hf_sources` order)."""
    template, _ = template_of(megatron_name)
    if template == QKV:
        return fuse_qkv(*sources, model)
    if template == FC1:
        return fuse_gate_up(*sources)
    (single,) = sources
    return single


def megatron_to_hf_tensors(
    megatron_name: str, tensor: torch.Tensor, model: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Split/rename one megatron weight into its HF weights (contiguous tensors)."""
    template, _ = template_of(megatron_name)
    names = hf_sources(megatron_name)
    if template == QKV:
        parts: tuple[torch.Tensor, ...] = split_qkv(tensor, model)
    elif template == FC1:
        parts = split_gate_up(tensor)
    else:
        parts = (tensor,)
    for name, part in zip(names, parts, strict=True):
        yield name, part.contiguous()
