"""Two model-free backends that bracket what the harness can report: 100 and about 0.

OracleBackend reads the answer out of the prompt text (the needles, the pass key) and returns
exactly the tokens the harness expects, so any score below 100 is a harness bug. RandomBackend
answers with random tokens, so any score far above 0 means the scoring leaks the answer.

    python tools/evaluate.py --model oracle --tokenizer path/to/hf_dir --task niah --lengths 4096
"""

from __future__ import annotations

import math
import re

import torch

from megatron_harpe.eval.backends import Tokenizer, encode_continuation
from megatron_harpe.eval.samples import answer_continuation

_NIAH_QUESTION = re.compile(r"special magic \w+ for (.+?) mentioned in the provided text\?")
_PASSKEY = re.compile(r"The pass key is (\d+)\. Remember it\.")


def read_answers_from_prompt(prompt: str) -> list[str]:
    """The values a perfect reader would give: the pass key, or for each queried key (in
    question order) the values of its needles in document order. Empty if none is found."""
    if "What is the pass key?" in prompt:
        return _PASSKEY.findall(prompt)[:1]
    questions = _NIAH_QUESTION.findall(prompt)
    if not questions:
        return []
    keys = [key for key in re.split(r",\s+and\s+|,\s+|\s+and\s+", questions[-1]) if key]
    values: list[str] = []
    for key in keys:
        values += re.findall(rf"One of the special magic \w+ for {re.escape(key)} is: (\S+?)\.(?=\s|$)", prompt)
    return values


class OracleBackend:
    """Answers every retrieval prompt perfectly by reading it (no model involved)."""

    supports_generation = True

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.name = "oracle"

    def _ideal_answer_ids(self, prompt_ids: list[int]) -> list[int]:
        prompt = self.tokenizer.decode(prompt_ids)
        values = read_answers_from_prompt(prompt)
        if not values:
            return [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        return encode_continuation(self.tokenizer, prompt, answer_continuation(values))

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = self._ideal_answer_ids(prompt_ids)
        return [token for token in ids if token != self.tokenizer.eos_id][:max_new_tokens]

    def teacher_forced_match(self, prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
        ideal = self._ideal_answer_ids(prompt_ids)
        filler = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        return [ideal[i] if i < len(ideal) else filler for i in range(len(answer_ids))]

    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """A uniform distribution over the vocabulary: perplexity equals the vocabulary size."""
        return torch.full((len(ids) - 1,), -math.log(self.tokenizer.vocab_size))


class RandomBackend:
    """Answers with uniformly random tokens; reproducible for a given seed."""

    supports_generation = True

    def __init__(self, tokenizer: Tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.name = "random"
        self.generator = torch.Generator().manual_seed(seed)

    def _random_ids(self, count: int) -> list[int]:
        return torch.randint(0, self.tokenizer.vocab_size, (count,), generator=self.generator).tolist()

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        return [token for token in self._random_ids(max_new_tokens) if token != self.tokenizer.eos_id]

    def teacher_forced_match(self, prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
        return self._random_ids(len(answer_ids))

    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log probabilities under a fresh random distribution at every position."""
        targets = torch.tensor(ids[1:], dtype=torch.long)
        pieces = []
        for start in range(0, len(targets), 1024):
            chunk = targets[start : start + 1024]
            logits = torch.randn(len(chunk), self.tokenizer.vocab_size, generator=self.generator)
            pieces.append(torch.log_softmax(logits, dim=-1).gather(1, chunk[:, None])[:, 0])
        return torch.cat(pieces) if pieces else torch.zeros(0)
