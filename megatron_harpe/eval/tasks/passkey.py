"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden in repeated filler text.

    from megatron_harpe.eval.tasks.passkey import build_passkey_sample
    sample = build_passkey_sample(tokenizer, length=16384, index=0, seed=42)

The filler is RULER's noise paragraph repeated; the key sentence goes between two repeats at a
depth drawn from the same 40 even points as the NIAH tasks. The prompt ends with
"The pass key is", so a base model answers by continuing it. 32 tokens are reserved for the
answer (and generated at most): a 5-digit key needs under 10 tokens in any common tokenizer.
"""

from __future__ import annotations

import functools

from megatron_harpe.eval.backends.base import Tokenizer, encode_prompt
from megatron_harpe.eval.tasks.chat import PLAIN, PromptFormat
from megatron_harpe.eval.tasks.haystack import NOISE_PARAGRAPH
from megatron_harpe.eval.tasks.samples import (
    DEPTHS,
    EvalSample,
    SampleBuilder,
    TaskSetting,
    answer_continuation,
    insert_at_depths,
    sample_rng,
    sized_prompt,
)

PASSKEY_ANSWER_BUDGET = 32
PASSKEY_TEMPLATE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n{context}\n"
    "What is the pass key?"
)
PASSKEY_ANSWER_PREFIX = " The pass key is"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."


def build_passkey_sample(
    tokenizer: Tokenizer,
    length: int,
    index: int,
    seed: int,
    answer_budget: int = PASSKEY_ANSWER_BUDGET,
    haystack_units: int | None = None,
    chat: PromptFormat = PLAIN,
) -> EvalSample:
    """One passkey prompt that leaves room for `answer_budget` tokens and no more than one filler
    paragraph besides; `haystack_units` forces the number of filler paragraphs instead."""
    rng = sample_rng(seed, "passkey", length, index)
    key = str(rng.randint(10000, 99999))
    depth = rng.choice(DEPTHS)
    needle = PASSKEY_NEEDLE.format(key=key)

    def prompt_for(n: int) -> str:
        context = " ".join(insert_at_depths([NOISE_PARAGRAPH] * n, [needle], [depth]))
        return chat(PASSKEY_TEMPLATE.format(context=context), PASSKEY_ANSWER_PREFIX)

    units, prompt, prompt_ids = sized_prompt(
        prompt_for, functools.partial(encode_prompt, tokenizer), length - answer_budget, haystack_units
    )
    return EvalSample(
        task="passkey",
        length=length,
        index=index,
        prompt=prompt,
        prompt_ids=prompt_ids,
        answers=[key],
        continuation=answer_continuation([key]),
        depths=[depth],
        haystack_units=units,
        answer_budget=answer_budget,
    )


def sample_builder(setting: TaskSetting) -> SampleBuilder:
    """The registry's builder of passkey samples (its haystack is always sized tight)."""
    return lambda length, index: build_passkey_sample(
        setting.tokenizer, length, index, setting.seed, setting.answer_budget, chat=setting.chat
    )
