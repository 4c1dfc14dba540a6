"""Hugging Face configuration of a Llama model whose attention heads each carry their own RoPE base.

HARPE (Head-Adaptive Rotary Position Encoding) changes nothing in Llama but the rotary
frequencies: query head h rotates with `theta_{h,i} = rope_bases[h] ** (-2i/d)`. The bases live
here, in `config.json`, because they are not part of the weights.

This file is self-contained (it imports only transformers and packaging) because exported model
directories carry a copy of it and load it through `auto_map` with `trust_remote_code=True`:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported_dir", trust_remote_code=True)
    model.config.rope_bases   # one base per query head

Under grouped-query attention the query heads of a k/v group normally share one base (the key
of the group rotates with it). If a group's query heads have different bases, the model rotates
a separate copy of the shared key per query head (keys and values are expanded to one head per
query head, as with `position.gqa_bases: per_query_head` in megatron_harpe).

Legacy configs are accepted: a top-level `rope_theta` (and `rope_scaling`) is read by
`LlamaConfig` and moved under `rope_parameters`; without `rope_bases` every head gets `rope_theta`.

Supported transformers versions: building a config (so loading an export) checks the installed
version against `TRANSFORMERS_MINIMUM` and `TRANSFORMERS_EXCLUDED` (versions the compatibility
matrix, `scripts/compat_matrix.py`, found broken) and raises `UnsupportedTransformersVersion`
naming both; versions newer than `TRANSFORMERS_TESTED_UP_TO` load with a warning. Saved configs record
the range as `harpe_transformers_minimum` / `harpe_transformers_tested_up_to`.
"""

import dataclasses
import math
import warnings

import transformers
from packaging.version import Version
from transformers import LlamaConfig

# Below the minimum, tested: 4.x's LlamaConfig ignores `rope_parameters`; 5.0-5.2 give an export's
# sentencepiece tokenizer.model a generic tokenizer (not LlamaTokenizer: wrong token ids); 5.3.0 keeps
# a remote-code model's tied lm_head on the meta device (NaN logits).
TRANSFORMERS_MINIMUM = "5.4.0"
TRANSFORMERS_TESTED_UP_TO = "5.25.0"
TRANSFORMERS_EXCLUDED: tuple[str, ...] = ()  # versions inside the range found broken


class UnsupportedTransformersVersion(RuntimeError):
    """The installed transformers cannot run this HARPE model correctly."""


def supported_range() -> str:
    excluded = "".join(f", != {version}" for version in TRANSFORMERS_EXCLUDED)
    return f">= {TRANSFORMERS_MINIMUM}{excluded} (tested up to {TRANSFORMERS_TESTED_UP_TO})"


def is_supported(installed: str) -> bool:
    """False for transformers versions this model is known not to run correctly on."""
    version = Version(installed)
    return version >= Version(TRANSFORMERS_MINIMUM) and all(version != Version(v) for v in TRANSFORMERS_EXCLUDED)


def check_transformers_version(installed: str | None = None) -> None:
    """Raise for a transformers this model is known not to run on; warn above the tested range.
    Runs whenever a config or model is built, so loading an export fails before any weight is read."""
    installed = installed or transformers.__version__
    version = Version(installed)
    if not is_supported(installed):
        raise UnsupportedTransformersVersion(
            f"this HARPE model (per-head RoPE bases) does not run correctly on transformers {installed}; supported: "
            f"transformers {supported_range()}. Install one, e.g. "
            f"pip install 'transformers=={TRANSFORMERS_TESTED_UP_TO}'"
        )
    if version.release[:2] > Version(TRANSFORMERS_TESTED_UP_TO).release[:2]:  # a newer minor release
        warnings.warn(
            f"HARPE model code was tested with transformers {supported_range()}, not {installed}; it raises if "
            "this version stops applying its per-head rotation, but check cached generation against use_cache=False",
            stacklevel=2,
        )


# transformers >= 5.(late) builds configs as dataclasses (fields, then __post_init__); before, by __init__
_DATACLASS_CONFIGS = dataclasses.is_dataclass(LlamaConfig)


class HarpeLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus `rope_bases`: one RoPE base per query head."""

    model_type = "harpe_llama"

    rope_bases: list[float] | None = None

    if _DATACLASS_CONFIGS:

        def __post_init__(self, **kwargs) -> None:
            super().__post_init__(**kwargs)
            self._complete_harpe_fields()

    else:

        def __init__(self, rope_bases: list[float] | None = None, **kwargs) -> None:
            super().__init__(**kwargs)
            self.rope_bases = rope_bases
            self._complete_harpe_fields()

    def _complete_harpe_fields(self) -> None:
        check_transformers_version()
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
        # what the code saved alongside needs; informative (the check above runs on import)
        self.harpe_transformers_minimum = TRANSFORMERS_MINIMUM
        self.harpe_transformers_tested_up_to = TRANSFORMERS_TESTED_UP_TO

    @property
    def keys_rotate_per_query_head(self) -> bool:
        """True when some k/v group's query heads have different bases, so a shared key must be
        rotated once per query head."""
        group_size = self.num_attention_heads // self.num_key_value_heads
        groups = [self.rope_bases[g * group_size : (g + 1) * group_size] for g in range(self.num_key_value_heads)]
        return any(len(set(group)) > 1 for group in groups)


__all__ = [
    "HarpeLlamaConfig",
    "UnsupportedTransformersVersion",
    "check_transformers_version",
    "is_supported",
    "supported_range",
]
