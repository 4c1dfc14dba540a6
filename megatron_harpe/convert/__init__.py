"""Hugging Face Llama <-> megatron_harpe checkpoints (CLI: tools/convert_checkpoint.py).

    hf_to_megatron.convert_hf_to_megatron   HF dir -> checkpoint (position encoding from YAML / overrides)
    megatron_to_hf.convert_megatron_to_hf   checkpoint (any TP/CP layout) -> HF dir (HARPE: with modeling code)
    verify.verify_conversion                logits and greedy tokens of both sides
    keymap                                  weight names and the QKV / gate-up layouts (pure functions)
    hf_config, hf_files, megatron_side      config.json, shard I/O, building and running the megatron model
    hf_harpe/                               the HF modeling code for per-head RoPE bases (torch + transformers only)

Submodules are imported explicitly so that `hf_harpe` stays importable without megatron-core.
"""
