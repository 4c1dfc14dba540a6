"""Hugging Face model backend: a causal LM directory (a stock model or our HARPE export).

    backend = HFBackend.from_pretrained("exports/harpe_hf", trust_remote_code=True)
    backend.generate(ids, max_new_tokens=32)

The model runs in fp32 on CPU by default (`device="cuda"`, `dtype="bf16"` are accepted for
GPU hosts). Log probabilities are computed from the final hidden states in chunks through the
output embedding, so scoring a long window never materialises a [length, vocab] logits tensor;
models whose logits are post-processed (soft-capping, logit scaling) use the full forward.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch

from megatron_harpe import cli

LOGPROB_CHUNK = 4096  # positions per lm-head chunk: 4096 x 32k vocab x 4 B = 512 MiB


class HFTokenizer:
    """Wraps a Hugging Face tokenizer into the megatron_harpe `Tokenizer` API."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_id: int | None = hf_tokenizer.bos_token_id
        self.eos_id: int | None = hf_tokenizer.eos_token_id
        self.pad_id: int | None = hf_tokenizer.pad_token_id
        # Follow the tokenizer's own convention: Llama tokenizers prepend BOS, GPT-2 style do not.
        probe = hf_tokenizer("a").input_ids
        self.add_bos: bool = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id

    @classmethod
    def from_pretrained(cls, path: str, trust_remote_code: bool = False) -> "HFTokenizer":
        from transformers import AutoTokenizer

        # the flag matters for the tokenizer too: AutoTokenizer reads config.json, and a config
        # with `auto_map` (our HARPE export) makes transformers ask on the terminal
        return cls(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))

    def encode(self, text: str) -> list[int]:
        return list(self.hf_tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=True)


def needs_remote_code(path: str) -> bool:
    """True when the directory's config.json maps to modeling code shipped with it (`auto_map`)
    for a model type transformers does not know natively."""
    from transformers import CONFIG_MAPPING

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}/config.json: {error}") from error
    return "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING


class HFBackend:
    """`ModelBackend` over `transformers.AutoModelForCausalLM`."""

    supports_generation = True
    self_extend = None  # SelfExtendSettings when installed (eval/self_extend/hf.py)

    def __init__(self, model: Any, tokenizer: HFTokenizer, name: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        config = model.config
        post_processed = any(
            getattr(config, attribute, None) not in (None, 1.0)
            for attribute in ("final_logit_softcapping", "logit_scale")
        )
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._chunked_logprobs = (
            not post_processed and hasattr(model, "get_decoder") and model.get_output_embeddings() is not None
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        trust_remote_code: bool = False,
        device: str = "cpu",
        dtype: str = "fp32",
        tokenizer_path: str | None = None,
        self_extend=None,
    ) -> "HFBackend":
        from transformers import AutoModelForCausalLM

        torch_dtype = cli.torch_dtype(dtype)  # a ValueError naming the choices
        if not trust_remote_code and needs_remote_code(path):
            # checked here: transformers would otherwise ask on an interactive terminal
            raise ValueError(
                f"{path!r} ships its own modeling code (our HARPE export does): rerun with --trust-remote-code"
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        model.to(torch.device(device))
        # --tokenizer takes what the other backends take: a sentencepiece .model or tokenizer.json file
        # (megatron_harpe.data.tokenizer; a missing file is one line naming it) or an HF directory
        if tokenizer_path and not os.path.isdir(tokenizer_path):
            from megatron_harpe.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_path)
        else:
            tokenizer = HFTokenizer.from_pretrained(tokenizer_path or path, trust_remote_code=trust_remote_code)
        backend = cls(model, tokenizer, name=path)
        if self_extend is not None:
            from megatron_harpe.eval.self_extend.hf import install_self_extend

            install_self_extend(model, self_extend)
            backend.self_extend = self_extend
        return backend

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        eos = self.tokenizer.eos_id
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else eos
        output = self.model.generate(
            self._tensor(prompt_ids),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        new_ids = output[0, len(prompt_ids) :].tolist()
        if eos is not None and eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos)]
        return new_ids

    @torch.no_grad()
    def teacher_forced_match(self, prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
        if not answer_ids:
            return []
        ids = prompt_ids + answer_ids
        # logits at positions len(prompt)-1 .. len(ids)-2 predict the answer tokens
        keep = len(answer_ids) + 1
        if self._accepts_logits_to_keep:
            logits = self.model(self._tensor(ids), logits_to_keep=keep).logits
        else:  # older remote code: full logits
            logits = self.model(self._tensor(ids)).logits[:, -keep:]
        return logits[0, :-1].argmax(dim=-1).tolist()

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        if len(ids) < 2:
            raise ValueError("token_logprobs needs at least two tokens")
        inputs = self._tensor(ids)
        targets = inputs[0, 1:]
        if not self._chunked_logprobs:
            logits = self.model(inputs).logits[0, :-1].float()
            return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0].cpu()
        hidden = self.model.get_decoder()(input_ids=inputs).last_hidden_state[0, :-1]  # [s-1, h]
        head = self.model.get_output_embeddings()
        pieces = []
        for start in range(0, hidden.shape[0], LOGPROB_CHUNK):
            logits = head(hidden[start : start + LOGPROB_CHUNK]).float()
            chunk_targets = targets[start : start + LOGPROB_CHUNK, None]
            pieces.append(torch.log_softmax(logits, dim=-1).gather(1, chunk_targets)[:, 0])
        return torch.cat(pieces).cpu()
