"""RULER's variable tracking task (vt): follow a chain of assignments hidden in noise.

    from megatron_harpe.eval.tasks.variable_tracking import build_vt_sample
    sample = build_vt_sample(tokenizer, length=4096, index=0, seed=42)

As RULER's `variable_tracking.py` at ruler_rules.RULER_VERSION (April 2024) with its default
configuration (one chain, four hops), text for text given the same draw:
- five distinct variables of five capital letters, "VAR A = 12345" then "VAR B = VAR A " ...,
  placed in order at uniformly random slots of the repeated noise paragraph (each paragraph
  ending in a newline, everything joined by spaces, ". \\n" closed up to ".\\n"); with five or
  fewer paragraphs RULER splits them into sentences first, and so do we;
- the question asks for every variable that holds the value; all five are expected
  (string_match_all); the answer prefix keeps that version's spelling "assgined";
- one in-context example first: a chain of 3-letter variables in noise sized like RULER's (steps
  of 5 paragraphs, prompt + the answer list's text + 30 tokens within 500), written with its
  answer by RULER's rule: the task text from the question on with its whitespace collapsed and
  its last word before the answer prefix dropped (with the plain format that is "above."; with a
  chat template, the template's closing word), then " " + the five names + two blank lines,
  inserted after the model template's opening with a space before it.
The answer budget is RULER's 30 tokens. RULER's later versions (2025: one statement per line,
a randomised example) differ; docs/evaluation.md says how.
"""

from __future__ import annotations

import functools
import random
import string

from megatron_harpe.eval.backends.base import Tokenizer, encode_prompt
from megatron_harpe.eval.tasks.chat import PLAIN, PromptFormat
from megatron_harpe.eval.tasks.haystack import NOISE_PARAGRAPH
from megatron_harpe.eval.tasks.ruler_rules import ruler_increment
from megatron_harpe.eval.tasks.samples import (
    TIGHT,
    EvalSample,
    Fill,
    RulerStep,
    SampleBuilder,
    TaskSetting,
    fit_units,
    format_answer,
    insert_at_slots,
    random_slots,
    sample_rng,
    sized_prompt,
)

VT_ANSWER_BUDGET = 30
VT_HOPS = 4
VT_EXAMPLE_TOKENS = 500  # RULER sizes its in-context example to 500 tokens (answer budget included)
VT_EXAMPLE_STEP = 5
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (  # "assgined": RULER's spelling until May 2025
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assgined the value {query}, they are: "
)


def _chain(
    rng: random.Random, letters: int, hops: int, avoid_value: int | None = None
) -> tuple[list[str], list[str], int]:
    """(variables, assignment statements, value) of one chain of `hops` hops."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = rng.randint(10000, 99998)
    while value == avoid_value:
        value = rng.randint(10000, 99998)
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, statements, value


def noise_units(noises: int, statements: int) -> list[str]:
    """RULER's vt noise: paragraphs ending in a newline; split into sentences when there are no
    more paragraphs than statements."""
    units = [NOISE_PARAGRAPH + "\n"] * noises
    if len(units) <= statements:
        units = [piece + "." if piece.strip() else piece for unit in units for piece in unit.split(".")]
    return units


def noise_context(statements: list[str], slot_seed: int, noises: int) -> str:
    """RULER's vt haystack: `noises` noise paragraphs with the statements at random slots."""
    units = noise_units(noises, len(statements))
    placed = insert_at_slots(units, statements, random_slots(slot_seed, len(units), len(statements)))
    return " ".join(placed).replace(". \n", ".\n")


def _fill(template: str, context: str, value: int, hops: int) -> str:
    return template.replace("{context}", context).replace("{query}", str(value)).replace("{num_v}", str(hops + 1))


def example_template(chat: PromptFormat) -> tuple[str, str]:
    """(RULER's template of the in-context example, the full template), fields unfilled: the
    April 2024 rule cuts the full template from the task's first words to the answer prefix,
    drops the last word and collapses whitespace there."""
    full = chat(VT_TEMPLATE, VT_ANSWER_PREFIX)
    cut, cut_answer = full.index(VT_TEMPLATE[:20]), full.index(VT_ANSWER_PREFIX[:10])
    return " ".join(full[cut:cut_answer].split()[:-1]) + full[cut_answer:], full


def build_vt_sample(
    tokenizer: Tokenizer,
    length: int,
    index: int,
    seed: int,
    answer_budget: int = VT_ANSWER_BUDGET,
    chat: PromptFormat = PLAIN,
    haystack_units: int | None = None,
    fill: Fill = TIGHT,
) -> EvalSample:
    """One vt prompt that leaves room for `answer_budget` tokens in `length`."""
    rng = sample_rng(seed, "vt", length, index)
    encode = functools.partial(encode_prompt, tokenizer)
    example_names, example_statements, example_value = _chain(rng, letters=3, hops=VT_HOPS)
    example_seed = rng.getrandbits(64)
    icl_template, full = example_template(chat)

    def example_for(noises: int) -> str:
        return _fill(icl_template, noise_context(example_statements, example_seed, noises), example_value, VT_HOPS)

    # RULER's example size: steps of 5 paragraphs while prompt + answer list (as Python writes
    # it) + 30 tokens stay within 500, counted without BOS
    steps = fit_units(
        lambda k: len(tokenizer.encode(example_for(VT_EXAMPLE_STEP * (k + 1)) + f" {example_names}")),
        VT_EXAMPLE_TOKENS - VT_ANSWER_BUDGET,
        max_units=VT_EXAMPLE_TOKENS,
        allow_none=True,
    )
    example_noises = VT_EXAMPLE_STEP * (steps + 1) if steps is not None else VT_EXAMPLE_STEP
    example = example_for(example_noises) + " " + " ".join(example_names) + "\n\n"
    names, statements, value = _chain(rng, letters=5, hops=VT_HOPS, avoid_value=example_value)
    slot_seed = rng.getrandbits(64)
    cut = full.index(VT_TEMPLATE[:20])

    def prompt_for(n: int) -> str:
        main = _fill(full, noise_context(statements, slot_seed, n), value, VT_HOPS)
        return main[:cut] + " " + example + "\n\n" + main[cut:]

    step = RulerStep(
        length, index, ruler_increment("vt", length), lambda n: len(tokenizer.encode(prompt_for(n) + f" {names}"))
    )
    units, prompt, prompt_ids = sized_prompt(
        prompt_for, encode, length - answer_budget, haystack_units, fill=fill, step=step
    )
    unit_count = len(noise_units(units, len(statements)))
    slots = random_slots(slot_seed, unit_count, len(statements))
    return EvalSample(
        task="vt",
        length=length,
        index=index,
        prompt=prompt,
        prompt_ids=prompt_ids,
        answers=names,
        continuation=format_answer("spaced", names),
        depths=[round(100 * s / max(unit_count, 1)) for s in slots],
        haystack_units=units,
        answer_budget=answer_budget,
        slots=slots,
        answer_style="spaced",
        draw={
            "statements": statements,
            "value": value,
            "noises": units,
            "positions": slots,
            "example_statements": example_statements,
            "example_value": example_value,
            "example_names": example_names,
            "example_noises": example_noises,
            "example_positions": random_slots(
                example_seed, len(noise_units(example_noises, len(example_statements))), len(example_statements)
            ),
        },
    )


def sample_builder(setting: TaskSetting) -> SampleBuilder:
    """The registry's builder of vt samples."""
    return lambda length, index: build_vt_sample(
        setting.tokenizer, length, index, setting.seed, setting.answer_budget, chat=setting.chat, fill=setting.fill
    )
