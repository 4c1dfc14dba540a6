"""Hugging Face configuration of a Llama model whose attention heads each carry their own RoPE base.

HARPE (Head-Adaptive Rotary Position Encoding) changes nothing in Llama but the rotary
frequencies: query head h rotates with `theta_{h,i} = rope_bases[h] ** (-2i/d)`. The bases live
here, in `config.json`, because they are not part of the weights.

This file is self-contained (it imports only transformers) because exported model directories
carry a copy of it and load it through `auto_map` with `trust_remote_code=True`:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported_dir", trust_remote_code=True)
    model.config.rope_bases   # one base per query head

Under grouped-query attention the query heads of a k/v group normally share one base (the key
of the group rotates with it). If a group's query heads have different bases, the model rotates
a separate copy of the shared key per query head (keys and values are expanded to one head per
query head, as with `position.gqa_bases: per_query_head` in megatron_harpe).

Legacy configs are accepted: a top-level `rope_theta` (and `rope_scaling`) is read by
`LlamaConfig` and moved under `rope_parameters`; without `rope_bases` every head gets `rope_theta`.
"""

import math

from transformers import LlamaConfig


class HarpeLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus `rope_bases`: one RoPE base per query head."""

    model_type = "harpe_llama"

    rope_bases: list[float] | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(
                f"HarpeLlamaConfig supports only plain per-head RoPE, got rope_parameters.rope_type="
                f"{rope_type!r}: drop rope_scaling/rope_type or use a stock LlamaConfig for {rope_type}"
            )
        if self.rope_bases is None:
            self.rope_bases = [float(self.rope_parameters["rope_theta"])] * self.num_attention_heads
        self.rope_bases = [float(base) for base in self.rope_bases]
        if len(self.rope_bases) != self.num_attention_heads:
            raise ValueError(
                f"rope_bases has {len(self.rope_bases)} values but the model has "
                f"{self.num_attention_heads} query heads: give one base per query head (under GQA, "
                "repeat a k/v group's base for each of its query heads)"
            )
        bad = [base for base in self.rope_bases if not (math.isfinite(base) and base > 1.0)]
        if bad:
            raise ValueError(f"rope_bases must be finite numbers > 1, got {bad}")

    @property
    def keys_rotate_per_query_head(self) -> bool:
        """True when some k/v group's query heads have different bases, so a shared key must be
        rotated once per query head."""
        group_size = self.num_attention_heads // self.num_key_value_heads
        groups = [self.rope_bases[g * group_size : (g + 1) * group_size] for g in range(self.num_key_value_heads)]
        return any(len(set(group)) > 1 for group in groups)


__all__ = ["HarpeLlamaConfig"]
