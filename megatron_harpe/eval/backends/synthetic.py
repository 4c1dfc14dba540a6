"""Two model-free backends that bracket what the harness can report: 100 and about 0.

OracleBackend reads the answer out of the prompt text (the needles, the pass key, the variable
chain, the word counts; a QA answer from the loaded QA file, its answer key) and returns
exactly the tokens the harness expects, so any score below 100 is a harness bug. RandomBackend
answers with random tokens, so any score far above 0 means the scoring leaks the answer.

    python tools/evaluate.py --model oracle --tokenizer path/to/hf_dir --task niah --lengths 4096
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from megatron_harpe.eval.backends.base import Tokenizer, encode_continuation
from megatron_harpe.eval.tasks.qa import lookup_answers
from megatron_harpe.eval.tasks.samples import format_answer

_NIAH_QUESTION = re.compile(r"special magic \w+ for (.+?) mentioned in the provided text\?")
_PASSKEY = re.compile(r"The pass key is (\d+)\. Remember it\.")
_VT_QUERY = re.compile(r"assigned the value (\d+) in the text above\.")
_VT_STATEMENT = re.compile(r"VAR ([A-Z]+) = (\d+|VAR [A-Z]+)")
_NUMBERED = re.compile(r"(?:^| )\d+\. ")


def _most_frequent(words: list[str], count: int) -> list[str]:
    """The `count` most frequent words, ties broken by first appearance."""
    first = {word: position for position, word in reversed(list(enumerate(words)))}
    counts = Counter(words)
    return sorted(counts, key=lambda word: (-counts[word], first[word]))[:count]


def _read_vt(prompt: str) -> list[str]:
    segment = prompt[prompt.rindex("Memorize and track the chain") :]
    value = _VT_QUERY.findall(segment)[-1]
    assignments = dict(_VT_STATEMENT.findall(segment))
    chain, holder = [], value
    while True:
        following = [
            name for name, source in assignments.items() if source in (holder, f"VAR {holder}") and name not in chain
        ]
        if not following:
            return chain
        chain.append(following[0])
        holder = following[0]


def _read_cwe(prompt: str) -> list[str]:
    segment = prompt[prompt.rindex("Below is a numbered list of words.") :]
    listing = segment[segment.index("\n") + 1 : segment.index("\nQuestion:")]
    return _most_frequent([word for word in _NUMBERED.split(listing) if word], 10)


def _read_fwe(prompt: str) -> list[str]:
    segment = prompt[prompt.rindex("Find the three most frequently appeared coded words. ") :]
    text = segment[len("Find the three most frequently appeared coded words. ") : segment.index("\nQuestion:")]
    return _most_frequent([word for word in text.split(" ") if word and word != "..."], 3)


def read_ideal_answer(prompt: str) -> tuple[list[str], str]:
    """(values, answer style) a perfect reader would give; no values if none is found."""
    if "What is the pass key?" in prompt:
        return _PASSKEY.findall(prompt)[:1], "list"
    if "Find all variables that are assigned the value" in prompt:
        return _read_vt(prompt), "spaced"
    if "Below is a numbered list of words." in prompt:
        return _read_cwe(prompt), "numbered"
    if "Find the three most frequently appeared coded words." in prompt:
        return _read_fwe(prompt), "words"
    if "Answer the question based on the given documents." in prompt:
        asked = prompt[prompt.rindex("\n\nQuestion: ") + len("\n\nQuestion: ") :]
        question = asked[: asked.rindex("Answer:")].rstrip()
        for candidate in (question, question.split("<|")[0].rstrip()):
            answers = lookup_answers(candidate)
            if answers:
                return answers[:1], "plain"
        return [], "plain"
    return read_answers_from_prompt(prompt), "list"


def read_answers_from_prompt(prompt: str) -> list[str]:
    """The NIAH values a perfect reader would give: for each queried key (in question order)
    the values of its needles in document order (the pass key for passkey). Empty if none."""
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
        values, style = read_ideal_answer(prompt)
        if not values:
            return [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        return encode_continuation(self.tokenizer, prompt, format_answer(style, values))

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
