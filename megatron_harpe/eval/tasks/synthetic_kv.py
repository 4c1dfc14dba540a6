"""Synthetic key/value retrieval in a tiny word-level vocabulary: the task of the CPU replication.

One grammar serves training documents and evaluation prompts (experiments/replicate builds
its corpus from `training_document`, `tools/evaluate.py --task synthetic_kv` scores
`build_synthetic_kv_sample`):

    <s> lorem ipsum dolor ... set key17 4 0 9 . sit amet ... get key17 4 0 9 . ...

- filler: a fixed cycle of eight words whose phase continues across needles, so a model
  predicts it perfectly and its loss vanishes (the training loss covers every token);
- needle: `set KEY D D D .` with one of 64 keys and a value of 3 digits (1000 values);
- query: `get KEY` followed by that key's value. The value is predictable only by finding the
  needle (an induction pattern: KEY ... KEY -> copy what followed); when a key was set more
  than once the latest value counts.

An evaluation prompt of length L holds `needles` needles with distinct keys (one queried, the
others distractors) at random word positions and ends with `get KEY`; the prompt plus the
4-token answer budget fills L exactly (BOS included). The queried needle's depth is drawn
from RULER's 40 evenly spaced points (`samples.DEPTHS`) and reported as the sample's only
depth, so accuracy can be broken down by depth. Scoring is the suite's: exact match of the
three value digits (teacher-forced or generated).

The tokenizer is a Hugging Face word-level `tokenizer.json` (`write_tokenizer`), exact for
this vocabulary: one token per word, decode joins words with spaces.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from megatron_harpe import files
from megatron_harpe.eval.backends.base import Tokenizer, encode_prompt
from megatron_harpe.eval.tasks.samples import DEPTHS, EvalSample, SampleBuilder, TaskSetting, sample_rng

TASK_NAME = "synthetic_kv"
FILLER_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
KEYS = tuple(f"key{index:02d}" for index in range(64))
DIGITS = tuple(str(digit) for digit in range(10))
MARKERS = ("set", "get", ".")
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")
VALUE_DIGITS = 3
NEEDLE_TOKENS = 3 + VALUE_DIGITS  # set KEY D D D .
QUERY_TOKENS = 2  # get KEY
ANSWER_BUDGET = VALUE_DIGITS + 1  # D D D .
DEFAULT_NEEDLES = 6


def vocabulary() -> list[str]:
    """Every token, specials first (ids 0..3)."""
    return [*SPECIAL_TOKENS, *FILLER_WORDS, *KEYS, *DIGITS, *MARKERS]


def write_tokenizer(path: str | Path) -> Path:
    """Write the exact word-level tokenizer.json (and a tokenizer_config.json naming BOS/EOS/PAD
    next to it); written under a temporary name and renamed."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer(WordLevel({word: i for i, word in enumerate(vocabulary())}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    with files.atomic_path(path) as temporary:
        tokenizer.save(str(temporary))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    files.write_json(path.parent / "tokenizer_config.json", config)
    return path


_GET_ID = vocabulary().index("get")
_DIGIT_IDS = [vocabulary().index(digit) for digit in DIGITS]


def answer_mask(ids: np.ndarray) -> np.ndarray:
    """1 at the value digits that answer a query (`get KEY D D D`), 0 elsewhere: the loss mask
    that trains retrieval only (ids in the `vocabulary()` order)."""
    ids = np.asarray(ids)
    mask = np.zeros(ids.shape, dtype=np.int64)
    digits = np.isin(ids, _DIGIT_IDS)
    for query in np.flatnonzero(ids == _GET_ID):
        answer = np.arange(query + QUERY_TOKENS, min(query + QUERY_TOKENS + VALUE_DIGITS, ids.size))
        mask[answer[digits[answer]]] = 1
    return mask


def random_value(rng: random.Random) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(VALUE_DIGITS)]


def needle_words(key: str, value: list[str]) -> list[str]:
    return ["set", key, *value, "."]


def query_words(key: str) -> list[str]:
    return ["get", key]


class FillerCycle:
    """The filler cycle; its phase continues across needles and queries."""

    def __init__(self, phase: int = 0) -> None:
        self.phase = phase

    def take(self, count: int) -> list[str]:
        words = [FILLER_WORDS[(self.phase + i) % len(FILLER_WORDS)] for i in range(count)]
        self.phase = (self.phase + count) % len(FILLER_WORDS)
        return words


def training_document(
    words: int, rng: random.Random, mean_gap: float = 3.0, query_share: float = 0.5, fresh_queries: bool = False
) -> str:
    """A training document of exactly `words` words: filler with needles and queries.

    Between events come on average `mean_gap` filler words (geometric); an event is a query
    (of a key set earlier in the document, chosen uniformly, answered by its latest value)
    with probability `query_share` once a key exists, otherwise a needle for a fresh key (an
    already used key once all 64 are taken, which makes "latest value" matter).

    With `fresh_queries`, a key is queried at most once per value, as in the evaluation
    prompts: the answer is only in its needle, never after an earlier `get KEY`, so copying
    the previous answer to the same query cannot stand in for finding the needle.
    """
    if words < 1:
        raise ValueError(f"a training document needs at least one word, got {words}")
    filler = FillerCycle(rng.randrange(len(FILLER_WORDS)))
    values: dict[str, list[str]] = {}
    unqueried: set[str] = set()
    out: list[str] = []
    while len(out) < words:
        gap = min(_geometric(rng, mean_gap), words - len(out))
        out.extend(filler.take(gap))
        room = words - len(out)
        if room <= 0:
            break
        askable = sorted(unqueried if fresh_queries else values)
        if askable and rng.random() < query_share and room >= QUERY_TOKENS + ANSWER_BUDGET:
            key = rng.choice(askable)
            unqueried.discard(key)
            out.extend([*query_words(key), *values[key], "."])
        elif room >= NEEDLE_TOKENS:
            unused = [key for key in KEYS if key not in values]
            key = rng.choice(unused or list(KEYS))
            values[key] = random_value(rng)
            unqueried.add(key)
            out.extend(needle_words(key, values[key]))
        else:
            out.extend(filler.take(room))
    return " ".join(out[:words])


def _geometric(rng: random.Random, mean: float) -> int:
    """Filler words before the next event: geometric on {0, 1, ...} with the given mean."""
    stop = 1.0 / (mean + 1.0)
    count = 0
    while rng.random() >= stop:
        count += 1
    return count


def build_synthetic_kv_sample(
    tokenizer: Tokenizer,
    length: int,
    index: int,
    seed: int,
    needles: int = DEFAULT_NEEDLES,
    answer_budget: int = ANSWER_BUDGET,
    fixed_depth: int | None = None,
) -> EvalSample:
    """One prompt of exactly `length - answer_budget` tokens (BOS included) ending in `get KEY`."""
    if not 1 <= needles <= len(KEYS):
        raise ValueError(f"needles={needles} must be between 1 and {len(KEYS)}")
    if answer_budget < ANSWER_BUDGET:
        raise ValueError(f"synthetic_kv answers take {ANSWER_BUDGET} tokens: raise --max-new-tokens to at least that")
    rng = sample_rng(seed, TASK_NAME, length, index)
    bos = 1 if encode_prompt(tokenizer, "") else 0
    filler_count = length - answer_budget - bos - needles * NEEDLE_TOKENS - QUERY_TOKENS
    if filler_count < 0:
        raise ValueError(
            f"synthetic_kv at length {length} cannot hold {needles} needles, the query and a "
            f"{answer_budget}-token answer: evaluate at length >= {length - filler_count}"
        )
    keys = rng.sample(KEYS, needles)
    values = {key: random_value(rng) for key in keys}
    asked = keys[0]
    depth = fixed_depth if fixed_depth is not None else rng.choice(DEPTHS)
    # filler positions (word counts before each needle): the asked needle at its depth
    positions = [int(filler_count * depth / 100)] + [rng.randint(0, filler_count) for _ in keys[1:]]
    order = sorted(range(needles), key=lambda i: (positions[i], rng.random()))
    filler = FillerCycle(rng.randrange(len(FILLER_WORDS)))
    words: list[str] = []
    placed = 0
    for i in order:
        words.extend(filler.take(positions[i] - placed))
        placed = positions[i]
        words.extend(needle_words(keys[i], values[keys[i]]))
    words.extend(filler.take(filler_count - placed))
    words.extend(query_words(asked))
    prompt = " ".join(words)
    prompt_ids = encode_prompt(tokenizer, prompt)
    if len(prompt_ids) != length - answer_budget:
        raise ValueError(
            f"the tokenizer split the synthetic_kv prompt into {len(prompt_ids)} tokens instead of "
            f"{length - answer_budget}: evaluate with the task's word-level tokenizer (write_tokenizer)"
        )
    answer = " ".join(values[asked])
    return EvalSample(
        task=TASK_NAME,
        length=length,
        index=index,
        prompt=prompt,
        prompt_ids=prompt_ids,
        answers=[answer],
        continuation=f" {answer} .",
        depths=[depth],
        haystack_units=filler_count,
        answer_budget=answer_budget,
    )


def sample_builder(setting: TaskSetting) -> SampleBuilder:
    """The registry's builder of synthetic_kv samples (plain prompts in its own word-level vocabulary)."""
    return lambda length, index: build_synthetic_kv_sample(
        setting.tokenizer, length, index, setting.seed, answer_budget=setting.answer_budget
    )
