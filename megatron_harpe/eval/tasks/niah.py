"""RULER's eight needle-in-a-haystack tasks (arXiv 2404.06654; the HARPE paper's headline metric),
generated for any tokenizer.

    from megatron_harpe.eval.tasks.niah import NIAH_TASKS, build_niah_sample
    sample = build_niah_sample(NIAH_TASKS["niah_multikey_2"], tokenizer, length=8192, index=0, seed=42)

| task            | haystack          | key / value     | needles                         |
|-----------------|-------------------|-----------------|---------------------------------|
| niah_single_1   | noise             | word / number   | 1                               |
| niah_single_2   | prose             | word / number   | 1                               |
| niah_single_3   | prose             | word / uuid     | 1                               |
| niah_multikey_1 | prose             | word / number   | 4 keys, 1 asked                 |
| niah_multikey_2 | distractor needles| word / number   | 1 (every haystack unit a needle)|
| niah_multikey_3 | distractor needles| uuid / uuid     | 1 (every haystack unit a needle)|
| niah_multivalue | prose             | word / number   | 4 values of one key, all asked  |
| niah_multiquery | prose             | word / number   | 4 keys, all asked               |

Prompts are RULER's (ruler_rules.RULER_VERSION) for the same draw: its task template and answer
prefix, reworded to the singular (model template included) when exactly one value is expected,
the queried keys joined as "a, b, and c" (one key alone); a chat template (`chat.PromptFormat`)
wraps the question and the answer prefix follows it. The needles are generated key by key and
permuted by RULER's fixed-seed shuffle; in the prose haystack they go at depths drawn from the 40
even points, the pieces joined by spaces exactly as RULER joins them (`essay_context`); in the
noise and needle haystacks into uniformly random slots (`random_slots`), lines joined by
newlines. Where we differ (docs/evaluation.md lists every difference):
- Distractor needles never reuse a key or value of the sample (RULER does not check).
- The prose is ours (or RULER's essays with --haystack-file) and split into sentences by our
  splitter, not NLTK's punkt; it starts at its first sentence for every sample (as RULER's).
- The answer budget (tokens reserved after the prompt) is the generation limit, 128.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

from megatron_harpe.eval.backends.base import Tokenizer, encode_prompt
from megatron_harpe.eval.tasks.chat import PLAIN, PromptFormat
from megatron_harpe.eval.tasks.haystack import (
    NOISE_PARAGRAPH,
    NeedleVocabulary,
    cycled,
    load_prose_sentences,
    split_sentences,
)
from megatron_harpe.eval.tasks.ruler_rules import fixed_shuffle, ruler_increment
from megatron_harpe.eval.tasks.samples import (
    DEPTHS,
    TIGHT,
    EvalSample,
    Fill,
    RulerStep,
    SampleBuilder,
    TaskSetting,
    answer_continuation,
    essay_context,
    insert_at_slots,
    random_slots,
    sample_rng,
    sized_prompt,
)

NIAH_ANSWER_BUDGET = 128

PLURAL_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What are all the special magic {kind} for {query} mentioned in the provided text?"
)
PLURAL_ANSWER_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"
SINGULAR_TEMPLATE = (
    "A special magic {kind} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What is the special magic {kind} for {query} mentioned in the provided text?"
)
SINGULAR_ANSWER_PREFIX = " The special magic {kind} for {query} mentioned in the provided text is"
NEEDLE_TEMPLATE = "One of the special magic {kind} for {key} is: {value}."


@dataclasses.dataclass(frozen=True)
class NiahTask:
    name: str
    haystack: str  # "noise" | "prose" | "needles"
    key_kind: str  # "words" | "uuids"
    value_kind: str  # "numbers" | "uuids"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    @property
    def expected_values(self) -> int:
        return self.num_queries * self.num_values


NIAH_TASKS: dict[str, NiahTask] = {
    task.name: task
    for task in (
        NiahTask("niah_single_1", "noise", "words", "numbers"),
        NiahTask("niah_single_2", "prose", "words", "numbers"),
        NiahTask("niah_single_3", "prose", "words", "uuids"),
        NiahTask("niah_multikey_1", "prose", "words", "numbers", num_keys=4),
        NiahTask("niah_multikey_2", "needles", "words", "numbers"),
        NiahTask("niah_multikey_3", "needles", "uuids", "uuids"),
        NiahTask("niah_multivalue", "prose", "words", "numbers", num_values=4),
        NiahTask("niah_multiquery", "prose", "words", "numbers", num_keys=4, num_queries=4),
    )
}


@functools.lru_cache(maxsize=8)
def _sentence_token_prefix(tokenizer: Tokenizer, sentences: tuple[str, ...]) -> tuple[int, ...]:
    """prefix[i] = tokens of the first i sentences, each tokenized alone (a cheap size model)."""
    counts = [len(tokenizer.encode(sentence)) for sentence in sentences]
    return tuple(itertools.accumulate(counts, initial=0))


def prose_cost_model(tokenizer: Tokenizer, sentences: tuple[str, ...]) -> Callable[[int], float]:
    """Approximate tokens of the first n sentences of the cycled prose, for `fit_units`."""
    prefix = _sentence_token_prefix(tokenizer, sentences)

    def cost(n: int) -> float:
        cycles, remainder = divmod(n, len(sentences))
        return float(cycles * prefix[-1] + prefix[remainder])

    return cost


def query_text(queries: list[str]) -> str:
    """RULER's question subject: the key alone, or "a, b, and c" for several keys."""
    return ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]


def format_prompt(task: NiahTask, context: str, queries: list[str], chat: PromptFormat = PLAIN) -> str:
    if task.expected_values == 1:  # RULER's singular rewording (its template, the model's included)
        fields = {"kind": task.value_kind[:-1], "query": queries[0]}
        return chat(
            SINGULAR_TEMPLATE.format(context=context, **fields), SINGULAR_ANSWER_PREFIX.format(**fields), singular=True
        )
    fields = {"kind": task.value_kind, "query": query_text(queries)}
    return chat(PLURAL_TEMPLATE.format(context=context, **fields), PLURAL_ANSWER_PREFIX.format(**fields))


@functools.lru_cache(maxsize=4)
def prose_words(sentences: tuple[str, ...]) -> tuple[str, ...]:
    """The prose haystack as RULER counts its essay: words."""
    return tuple(word for sentence in sentences for word in sentence.split(" "))


def build_niah_sample(
    task: NiahTask,
    tokenizer: Tokenizer,
    length: int,
    index: int,
    seed: int,
    answer_budget: int = NIAH_ANSWER_BUDGET,
    prose: tuple[str, ...] | None = None,
    fixed_depth: int | None = None,
    haystack_units: int | None = None,
    chat: PromptFormat = PLAIN,
    fill: Fill = TIGHT,
) -> EvalSample:
    """One sample of `task` whose prompt plus `answer_budget` tokens fits `length` (as tightly as
    the haystack units allow, or by RULER's sizing with `fill`). `fixed_depth` (percent) replaces
    the random depth of a single-needle prose task (the length x depth grid uses it);
    `haystack_units` forces the haystack size instead of fitting it (the same sample otherwise).
    Units are sentences of the prose (words with RULER's fill, as RULER counts its essay), noise
    paragraphs or distractor needles."""
    rng = sample_rng(seed, task.name if fixed_depth is None else f"{task.name}@{fixed_depth}", length, index)
    vocabulary = NeedleVocabulary(rng)
    keys = [vocabulary.draw(task.key_kind) for _ in range(task.num_keys)]
    values = [[vocabulary.draw(task.value_kind) for _ in range(task.num_values)] for _ in keys]
    # RULER: needles in generation order, then its fixed-seed shuffle (the same permutation in every sample)
    needles = fixed_shuffle(
        [
            NEEDLE_TEMPLATE.format(kind=task.value_kind, key=key, value=value)
            for key, key_values in zip(keys, values)
            for value in key_values
        ],
        seed,
    )
    if fixed_depth is not None:
        if len(needles) != 1 or task.haystack != "prose" or not 0 <= fixed_depth <= 100:
            raise ValueError("fixed_depth needs a single-needle prose task and a depth in [0, 100]")
        depths = [fixed_depth]
    else:
        # drawn for every task so the rest of the sample does not depend on the haystack type
        depths = sorted(rng.sample(DEPTHS, len(needles)))
    slot_seed = rng.getrandbits(64)
    query_indices = rng.sample(range(task.num_keys), task.num_queries)
    queries = [keys[i] for i in query_indices]
    answers = [value for i in query_indices for value in values[i]]  # RULER's order of its outputs

    cost_model = None
    step_kind = {"prose": "essay", "noise": "noise", "needles": "needles"}[task.haystack]
    if task.haystack == "prose":
        sentences = prose if prose is not None else load_prose_sentences()
        if fill.mode == "ruler":  # RULER's unit: words of the essay, split into sentences again
            words = prose_words(sentences)
            units_of = lambda n: list(split_sentences(" ".join(cycled(words, n)))) if n else []  # noqa: E731
        else:
            units_of = lambda n: cycled(sentences, n)  # noqa: E731
            cost_model = prose_cost_model(tokenizer, sentences)
    elif task.haystack == "noise":
        units_of = lambda n: [NOISE_PARAGRAPH] * n  # noqa: E731
    elif task.haystack == "needles":
        distractors: list[str] = []  # grows in order, so probing order never changes the sample

        def units_of(n: int) -> list[str]:
            while len(distractors) < n:
                distractors.append(
                    NEEDLE_TEMPLATE.format(
                        kind=task.value_kind,
                        key=vocabulary.draw(task.key_kind),
                        value=vocabulary.draw(task.value_kind),
                    )
                )
            return distractors[:n]
    else:
        raise ValueError(f"unknown haystack type {task.haystack!r}")

    def context_for(n: int) -> str:
        if task.haystack == "prose":
            return essay_context(units_of(n), needles, depths)
        # RULER inserts at descending slots, needle i at the i-th largest: document order is reversed
        return "\n".join(insert_at_slots(units_of(n), needles[::-1], random_slots(slot_seed, n, len(needles))))

    def prompt_for(n: int) -> str:
        return format_prompt(task, context_for(n), queries, chat)

    step = RulerStep(
        length,
        index,
        ruler_increment(step_kind, length),
        lambda n: len(tokenizer.encode(prompt_for(n) + " ".join(answers))),
    )
    units, prompt, prompt_ids = sized_prompt(
        prompt_for,
        functools.partial(encode_prompt, tokenizer),
        length - answer_budget,
        haystack_units,
        cost_model,
        fill,
        step,
    )
    slots = None
    if task.haystack != "prose":
        slots = random_slots(slot_seed, units, len(needles))
        depths = [round(100 * slot / max(units, 1)) for slot in slots]
    return EvalSample(
        task=task.name,
        length=length,
        index=index,
        prompt=prompt,
        prompt_ids=prompt_ids,
        answers=answers,
        continuation=answer_continuation(answers),
        depths=depths,
        haystack_units=units,
        answer_budget=answer_budget,
        slots=slots,
        draw={
            "keys": keys,
            "values": values,
            "needles": needles,
            "depths": depths,
            "slots": slots,
            "units": units_of(units),
            "queries": queries,
            "haystack": task.haystack,
        },
    )


def sample_builder(task_name: str, setting: TaskSetting) -> SampleBuilder:
    """The registry's builder of a NIAH task (and of a needle-grid cell: `setting.fixed_depth`)."""
    task = NIAH_TASKS[task_name]
    return lambda length, index: build_niah_sample(
        task,
        setting.tokenizer,
        length,
        index,
        setting.seed,
        answer_budget=setting.answer_budget,
        prose=setting.prose,
        fixed_depth=setting.fixed_depth,
        chat=setting.chat,
        fill=setting.fill,
    )
