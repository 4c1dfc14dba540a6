"""The model-backend protocol every evaluation task talks to, and how prompts become token ids.

A backend is anything that can (a) greedily continue a prompt, (b) report its greedy
predictions at given answer positions under teacher forcing, and (c) return per-token log
probabilities. The tasks only ever use these three calls plus the backend's tokenizer, so a
Hugging Face model (hf.py), a megatron_harpe checkpoint sharded over TP x CP ranks (megatron.py),
and the synthetic oracle/random backends used by the tests (synthetic.py) are interchangeable.
This module imports no backend: tasks, scoring and the backends themselves import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

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
