"""RULER's aggregation tasks: common words extraction (cwe) and frequent words extraction (fwe).

    from megatron_harpe.eval.tasks.word_extraction import build_cwe_sample, build_fwe_sample
    sample = build_cwe_sample(tokenizer, length=4096, index=0, seed=42)

Both as RULER's code at ruler_rules.RULER_VERSION (April 2024), text for text given the same draw.

cwe, as RULER's `common_words_extraction.py` with its default configuration: a numbered list of
distinct words from the wonderwords nouns, adjectives and verbs, ten of which repeat 30 times
and the others 3 times (6 and 1 below 4096 tokens), permuted by RULER's fixed-seed shuffle; the
ten common words are expected. An in-context example goes first (40 words at 10/3 repeats, 20
at 3/1 below 4096), written as RULER writes it: the whole prompt with its answer right after
the answer prefix, then a newline. Answer budget 120.

fwe, as RULER's `freq_words_extraction.py` (alpha 2): a vocabulary of length // 50 random
6-letter words, sorted and permuted by the fixed-seed shuffle, the first replaced by "..."
(noise); word k of the vocabulary occurs int(N k^-2 / zeta(2)) times among N draws, the text
permuted by the fixed-seed shuffle; the three most frequent real words (vocabulary 2-4) are
expected. Answer budget 50, kept free of the prompt as RULER's 2025 code does (its April 2024
code filled the prompt to the whole length). Both use string_match_all.
"""

from __future__ import annotations

import functools
import math
import random
import string

from megatron_harpe.eval.backends.base import Tokenizer, encode_prompt
from megatron_harpe.eval.tasks.chat import PLAIN, PromptFormat
from megatron_harpe.eval.tasks.haystack import wonderwords_lists
from megatron_harpe.eval.tasks.ruler_rules import fixed_shuffle, ruler_increment
from megatron_harpe.eval.tasks.samples import (
    TIGHT,
    EvalSample,
    Fill,
    RulerStep,
    SampleBuilder,
    TaskSetting,
    format_answer,
    sample_rng,
    sized_prompt,
)

CWE_ANSWER_BUDGET = 120
CWE_COMMON_WORDS = 10
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_ANSWER_BUDGET = 50
FWE_ALPHA = 2.0
FWE_WORD_LENGTH = 6
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@functools.lru_cache(maxsize=1)
def cwe_words() -> tuple[str, ...]:
    """RULER's cwe vocabulary: the sorted set of wonderwords nouns, adjectives and verbs."""
    lists = wonderwords_lists()
    return tuple(sorted(set(lists["noun"]) | set(lists["adjective"]) | set(lists["verb"])))


def _numbered(words: list[str]) -> str:
    return " ".join(f"{number}. {word}" for number, word in enumerate(words, start=1))


def _word_list(
    rng: random.Random, count: int, common_repeats: int, rare_repeats: int, seed: int
) -> tuple[list[str], list[str]]:
    """(the listed words in order, the common words) of `count` distinct words: RULER's draw and
    its fixed-seed shuffle of the list."""
    chosen = rng.sample(cwe_words(), count)
    common, rare = chosen[:CWE_COMMON_WORDS], chosen[CWE_COMMON_WORDS:]
    return fixed_shuffle(common * common_repeats + rare * rare_repeats, seed), common


def build_cwe_sample(
    tokenizer: Tokenizer,
    length: int,
    index: int,
    seed: int,
    answer_budget: int = CWE_ANSWER_BUDGET,
    chat: PromptFormat = PLAIN,
    haystack_units: int | None = None,
    fill: Fill = TIGHT,
) -> EvalSample:
    """One cwe prompt that leaves room for `answer_budget` tokens in `length`."""
    rng = sample_rng(seed, "cwe", length, index)
    short = length < 4096  # RULER's lighter setting for short contexts
    example_size, example_repeats = (20, (3, 1)) if short else (40, (10, 3))
    repeats = (6, 1) if short else (30, 3)
    example_list, example_answer = _word_list(rng, example_size, *example_repeats, seed)
    example = chat(CWE_TEMPLATE.format(context=_numbered(example_list)), CWE_ANSWER_PREFIX) + _numbered(example_answer)
    list_seed = rng.getrandbits(64)

    def words_for(n: int) -> tuple[list[str], list[str]]:
        # at least the ten common words, at most the whole vocabulary (RULER's cap)
        count = min(max(n, CWE_COMMON_WORDS), len(cwe_words()))
        return _word_list(random.Random(f"{list_seed}/{count}"), count, *repeats, seed)

    def prompt_for(n: int) -> str:
        return example + "\n" + chat(CWE_TEMPLATE.format(context=_numbered(words_for(n)[0])), CWE_ANSWER_PREFIX)

    step = RulerStep(
        length,
        index,
        ruler_increment("cwe", length),
        lambda n: len(tokenizer.encode(prompt_for(n) + " " + _numbered(words_for(n)[1]))),
    )
    units, prompt, prompt_ids = sized_prompt(
        prompt_for,
        functools.partial(encode_prompt, tokenizer),
        length - answer_budget,
        haystack_units,
        fill=fill,
        step=step,
    )
    listed, common = words_for(units)
    units = min(max(units, CWE_COMMON_WORDS), len(cwe_words()))
    return EvalSample(
        task="cwe",
        length=length,
        index=index,
        prompt=prompt,
        prompt_ids=prompt_ids,
        answers=common,
        continuation=format_answer("numbered", common),
        depths=[],
        haystack_units=units,
        answer_budget=answer_budget,
        answer_style="numbered",
        draw={"listed": listed, "example_listed": example_list, "example_answer": example_answer},
    )


def _coded_text(rng: random.Random, vocabulary_size: int, draws: int, seed: int) -> tuple[list[str], list[str]]:
    """(the text's words, the three most frequent real words) for `draws` zeta-distributed draws:
    RULER's random vocabulary, sorted then permuted by its fixed-seed shuffle, the first word
    replaced by "..." (noise), word k repeated int(draws k^-2 / zeta(2)) times, the text
    permuted by the fixed-seed shuffle."""
    vocabulary: set[str] = set()
    while len(vocabulary) < vocabulary_size:
        vocabulary.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH)))
    ordered = fixed_shuffle(sorted(vocabulary), seed)
    ordered[0] = "..."  # the most frequent "word" is noise, as in RULER
    zeta = math.pi**2 / 6  # zeta(2), RULER's alpha
    text_words = [
        word for rank, word in enumerate(ordered, start=1) for _ in range(int(draws * rank**-FWE_ALPHA / zeta))
    ]
    return fixed_shuffle(text_words, seed), ordered[1:4]


def build_fwe_sample(
    tokenizer: Tokenizer,
    length: int,
    index: int,
    seed: int,
    answer_budget: int = FWE_ANSWER_BUDGET,
    chat: PromptFormat = PLAIN,
    haystack_units: int | None = None,
    fill: Fill = TIGHT,
) -> EvalSample:
    """One fwe prompt that leaves room for `answer_budget` tokens in `length`."""
    rng = sample_rng(seed, "fwe", length, index)
    vocabulary_size = max(length // 50, 4)  # RULER's (its 2025 code: (length - 50) // 50)
    text_seed = rng.getrandbits(64)

    def text_for(n: int) -> tuple[list[str], list[str]]:
        return _coded_text(random.Random(f"{text_seed}/{n}"), vocabulary_size, n, seed)

    def prompt_for(n: int) -> str:
        return chat(FWE_TEMPLATE.format(context=" ".join(text_for(n)[0])), FWE_ANSWER_PREFIX)

    limit = length - answer_budget
    step = RulerStep(
        length,
        index,
        max(limit // 32, 1),
        lambda n: len(tokenizer.encode(prompt_for(n))),
        first=max(limit // FWE_WORD_LENGTH, 1),
    )
    units, prompt, prompt_ids = sized_prompt(
        prompt_for,
        functools.partial(encode_prompt, tokenizer),
        limit,
        haystack_units,
        fill=fill,
        step=step,
    )
    words, answers = text_for(units)
    return EvalSample(
        task="fwe",
        length=length,
        index=index,
        prompt=prompt,
        prompt_ids=prompt_ids,
        answers=answers,
        continuation=format_answer("words", answers),
        depths=[],
        haystack_units=units,
        answer_budget=answer_budget,
        answer_style="words",
        draw={"words": words},
    )


def cwe_sample_builder(setting: TaskSetting) -> SampleBuilder:
    """The registry's builder of cwe samples."""
    return lambda length, index: build_cwe_sample(
        setting.tokenizer, length, index, setting.seed, setting.answer_budget, chat=setting.chat, fill=setting.fill
    )


def fwe_sample_builder(setting: TaskSetting) -> SampleBuilder:
    """The registry's builder of fwe samples."""
    return lambda length, index: build_fwe_sample(
        setting.tokenizer, length, index, setting.seed, setting.answer_budget, chat=setting.chat, fill=setting.fill
    )
