"""Hugging Face modeling code for HARPE Llama models (per-head RoPE bases).

The two modules in this package import only torch, transformers and packaging: exported model
directories carry copies of them and load them with `trust_remote_code=True`.
"""

from megatron_harpe.convert.hf_harpe.configuration_harpe_llama import HarpeLlamaConfig
from megatron_harpe.convert.hf_harpe.modeling_harpe_llama import HarpeLlamaForCausalLM, HarpeLlamaModel

__all__ = ["HarpeLlamaConfig", "HarpeLlamaForCausalLM", "HarpeLlamaModel"]
