"""Tiny Hugging Face artefacts for tests and smoke runs of the evaluation harness (seconds on CPU).

    from megatron_harpe.eval.testing import save_tiny_tokenizer, save_tiny_llama
    save_tiny_tokenizer("/tmp/tiny")          # byte-level BPE trained on the haystack prose
    save_tiny_llama("/tmp/tiny", seed=0)      # random 2-layer Llama using that tokenizer
    python tools/evaluate.py --model /tmp/tiny --task passkey --lengths 512

The tokenizer is byte-level, so decode(encode(text)) == text for any text (the oracle backend
relies on reading prompts back), and prepends <s> like Llama tokenizers do.
"""

from __future__ import annotations

import torch

from megatron_harpe.eval.haystack import load_prose_sentences

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


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
