"""Self-Extend: training-free grouped attention at evaluation time, for either model backend.

core.py holds the method (settings, position rule, blocked attention kernel); hf.py and
megatron.py adapt the attention layers of a Hugging Face model and of a megatron_harpe GPTModel
shard. The backends install it when `--self-extend window=W,group=G` is given:

    from megatron_harpe.eval.self_extend.core import SelfExtendSettings
    from megatron_harpe.eval.self_extend.hf import install_self_extend
"""
