"""The Transformer Engine attention backend (GPU only; not exercised by this project's CI).

`model.attention_backend: te` builds layers from megatron-core's Transformer Engine spec:
TE's fused attention with its own context parallelism (`cp_comm_type` p2p by default) and TE's
norms, which also allow sequence parallelism. Rotary stays ours (per-head tables) with RoPE
fusion off, because TE's fused RoPE kernel accepts a single frequency row for all heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # megatron-core's import prints notes about TE/apex; planning needs none of it
    from megatron.core.transformer.spec_utils import ModuleSpec


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def require_transformer_engine() -> None:
    if not transformer_engine_available():
        raise ValueError(
            "model.attention_backend=te needs NVIDIA Transformer Engine, which is not installed "
            "here (it needs CUDA). Use model.attention_backend: sdpa, or run inside the GPU image "
            "(see Dockerfile), which ships Transformer Engine."
        )


def te_layer_spec() -> ModuleSpec:
    require_transformer_engine()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()
