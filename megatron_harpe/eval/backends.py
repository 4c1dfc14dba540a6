"""The model-backend protocol every evaluation task talks to, and the factory that picks one.

A backend is anything that can (a) greedily continue a prompt, (b) report its greedy
predictions at given answer positions under teacher forcing, and (c) return per-token log
probabilities. The tasks in this package only ever use these three calls plus the backend's
tokenizer, so a Hugging Face model, a megatron_harpe checkpoint sharded over TP x CP ranks,
and the synthetic oracle/random backends used by the tests are interchangeable.

    from megatron_harpe.eval.backends import load_backend
    backend = load_backend("path/to/hf_dir", trust_remote_code=True)
    backend = load_backend("oracle", tokenizer="path/to/hf_dir")   # reads answers out of prompts

`load_backend` routes a megatron_harpe checkpoint directory (one holding
`latest_checkpointed_iteration.txt` or `config.yaml`) to the megatron backend.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch only for annotations: `evaluate.py --help` must not import it
    import torch


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer API of `megatron_harpe.data.tokenizer` (encode adds no BOS/EOS)."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class ModelBackend(Protocol):
    """What an evaluation task needs from a model.

    `supports_generation` is False for backends where autoregressive decoding is impractical
    (for example a 128k prompt sharded with context parallelism); tasks then score by teacher
    forcing and record that method in their results.
    """

    name: str
    tokenizer: Tokenizer
    supports_generation: bool

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt_ids`; stops after EOS (which is not returned)."""
        ...

    def teacher_forced_match(self, prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
        """Greedy (argmax) prediction at every answer position given the true prefix:
        element i predicts answer_ids[i] from prompt_ids + answer_ids[:i]."""
        ...

    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids)-1, a float tensor of len(ids)-1."""
        ...


def should_add_bos(tokenizer: Tokenizer) -> bool:
    """Whether prompts start with BOS: the tokenizer's own preference when it states one
    (`add_bos` attribute, set by the Hugging Face wrapper), else whenever a BOS id exists."""
    preference = getattr(tokenizer, "add_bos", None)
    if preference is not None:
        return bool(preference)
    return tokenizer.bos_id is not None


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt as the model sees it (BOS first when the model expects one, and
    only once: a chat template may already write it)."""
    ids = tokenizer.encode(text)
    if should_add_bos(tokenizer) and ids[:1] != [tokenizer.bos_id]:
        assert tokenizer.bos_id is not None
        ids = [tokenizer.bos_id] + ids
    return ids


def encode_continuation(tokenizer: Tokenizer, prompt_text: str, continuation: str) -> list[int]:
    """Token ids of `continuation` as they follow `prompt_text` in one tokenization.

    Tokenizing the answer alone can differ from how it is tokenized after the prompt (a
    sentencepiece dummy prefix, merges across the boundary); teacher forcing must feed the
    tokens the model would produce, so the joined text is encoded and the prompt part removed.
    Only the last part of the prompt is re-encoded: a newline-free boundary far from the end
    keeps the cost independent of prompt length.
    """
    tail_start = max(prompt_text.rfind("\n", 0, max(len(prompt_text) - 200, 0)), 0)
    tail = prompt_text[tail_start:]
    tail_ids = tokenizer.encode(tail)
    joined_ids = tokenizer.encode(tail + continuation)
    if joined_ids[: len(tail_ids)] == tail_ids:
        return joined_ids[len(tail_ids) :]
    return tokenizer.encode(continuation)


def is_megatron_checkpoint(path: str) -> bool:
    """A megatron_harpe checkpoint directory (as opposed to a Hugging Face model directory)."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, marker))
        for marker in ("latest_checkpointed_iteration.txt", "config.yaml")
    )


def load_tokenizer_any(path: str, trust_remote_code: bool = False) -> Tokenizer:
    """A tokenizer from a Hugging Face directory, or anything `megatron_harpe.data.tokenizer`
    understands (a sentencepiece model, ...)."""
    from megatron_harpe.eval.hf_backend import HFTokenizer

    if not os.path.exists(path):
        raise ValueError(f"tokenizer path {path!r} does not exist: pass a Hugging Face model "
                         "directory or a tokenizer file")
    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return HFTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        from megatron_harpe.data.tokenizer import load_tokenizer
    except ImportError as error:
        raise ValueError(f"cannot load a tokenizer from {path!r}: it is not a Hugging Face "
                         "tokenizer directory and megatron_harpe.data.tokenizer is unavailable") from error
    return load_tokenizer(path)


def load_backend(path: str, **options: Any) -> ModelBackend:
    """Build the backend for `path`.

    path: a Hugging Face model directory, a megatron_harpe checkpoint directory, or one of the
    synthetic backends "oracle" / "random" (these need `tokenizer=PATH`).
    options: trust_remote_code (bool), device (str, "cpu"), dtype (str, "fp32": megatron_harpe.cli.DTYPES),
    tokenizer (str, overrides the model's own), seed (int, random backend),
    tensor_parallel / context_parallel (int), kv_cache (bool, True): megatron backend;
    self_extend (`self_extend.SelfExtendSettings`): either model backend.
    A megatron checkpoint brings its own tokenizer (the HF source's, kept by hf-to-megatron).
    """
    if path in ("oracle", "random"):
        if options.get("self_extend") is not None:
            raise ValueError(f"--self-extend needs a model; the {path} backend has no attention")
        from megatron_harpe.eval.synthetic_backends import OracleBackend, RandomBackend

        tokenizer_path = options.get("tokenizer")
        if not tokenizer_path:
            raise ValueError(f"the {path} backend needs a tokenizer: pass --tokenizer PATH")
        tokenizer = load_tokenizer_any(tokenizer_path, trust_remote_code=bool(options.get("trust_remote_code", False)))
        if path == "oracle":
            return OracleBackend(tokenizer)
        return RandomBackend(tokenizer, seed=int(options.get("seed", 0)))
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a directory: pass a Hugging Face model "
                         "directory, a megatron_harpe checkpoint directory, 'oracle' or 'random'")
    if is_megatron_checkpoint(path):
        return _load_megatron_backend(path, **options)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} holds neither config.json (Hugging Face model) nor "
                         "latest_checkpointed_iteration.txt / config.yaml (megatron_harpe checkpoint)")
    from megatron_harpe.eval.hf_backend import HFBackend

    return HFBackend.from_pretrained(
        path,
        trust_remote_code=bool(options.get("trust_remote_code", False)),
        device=str(options.get("device", "cpu")),
        dtype=str(options.get("dtype", "fp32")),
        tokenizer_path=options.get("tokenizer"),
        self_extend=options.get("self_extend"),
    )


def _load_megatron_backend(path: str, **options: Any) -> ModelBackend:
    try:
        from megatron_harpe.eval.megatron_backend import MegatronBackend  # type: ignore[import-not-found]
    except ImportError as error:
        raise ValueError(
            f"{path!r} is a megatron_harpe checkpoint, but the megatron backend is not available "
            "in this version: export it with tools/convert_checkpoint.py and evaluate the "
            "Hugging Face directory (--trust-remote-code for HARPE bases)"
        ) from error
    return MegatronBackend.from_checkpoint(path, **options)
