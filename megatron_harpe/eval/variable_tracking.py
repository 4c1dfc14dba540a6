"""RULER's variable tracking task (vt): follow a chain of assignments hidden in noise.

    from megatron_harpe.eval.variable_tracking import build_vt_sample
    sample = build_vt_sample(tokenizer, length=4096, index=0, seed=42)

As RULER's `variable_tracking.py` with its default configuration (one chain, four hops): five
distinct variables of five capital letters, "VAR A = 12345" then "VAR B = VAR A " ... placed in
order at uniformly random slots of the repeated noise paragraph; the question asks for every
variable that holds the value, and all five are expected (string_match_all). One in-context
example precedes the question, as RULER's default: a chain of 3-letter variables in noise sized
to 500 tokens, written with its answer. The answer budget is RULER's 30 tokens.
"""

from __future__ import annotations

import functools
import random
import string

from megatron_harpe.eval.backends import Tokenizer, encode_prompt
from megatron_harpe.eval.chat import PLAIN, PromptFormat
from megatron_harpe.eval.haystack import NOISE_PARAGRAPH
from megatron_harpe.eval.samples import EvalSample, format_answer, insert_at_slots, random_slots, sample_rng, sized_prompt

VT_ANSWER_BUDGET = 30
VT_HOPS = 4
VT_EXAMPLE_TOKENS = 500  # RULER sizes its in-context example to 500 tokens (answer budget included)
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are: "
)


def _chain(rng: random.Random, letters: int, hops: int, avoid_value: int | None = None) -> tuple[list[str], list[str], int]:
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


def _question(statements: list[str], slot_seed: int, noises: int, value: int, hops: int) -> tuple[str, str]:
    """(question, answer prefix) with the chain at RULER's random slots of `noises` paragraphs."""
    units = [NOISE_PARAGRAPH + "\n"] * noises
    placed = insert_at_slots(units, statements, random_slots(slot_seed, noises, len(statements)))
    context = " ".join(placed).replace(". \n", ".\n")
    fields = {"query": value, "num_v": hops + 1}
    return VT_TEMPLATE.format(context=context, **fields), VT_ANSWER_PREFIX.format(**fields)


def build_vt_sample(
    tokenizer: Tokenizer,
    length: int,
    index: int,
    seed: int,
    answer_budget: int = VT_ANSWER_BUDGET,
    chat: PromptFormat = PLAIN,
    haystack_units: int | None = None,
) -> EvalSample:
    """One vt prompt that leaves room for `answer_budget` tokens in `length`."""
    rng = sample_rng(seed, "vt", length, index)
    encode = functools.partial(encode_prompt, tokenizer)
    example_names, example_statements, example_value = _chain(rng, letters=3, hops=VT_HOPS)
    example_seed = rng.getrandbits(64)

    def example_for(n: int) -> str:
        question, prefix = _question(example_statements, example_seed, n, example_value, VT_HOPS)
        return question + prefix + format_answer("spaced", example_names)

    _, example, _ = sized_prompt(example_for, encode, VT_EXAMPLE_TOKENS - answer_budget)
    names, statements, value = _chain(rng, letters=5, hops=VT_HOPS, avoid_value=example_value)
    slot_seed = rng.getrandbits(64)

    def prompt_for(n: int) -> str:
        question, prefix = _question(statements, slot_seed, n, value, VT_HOPS)
        return chat(example + "\n\n" + question, prefix)

    units, prompt, prompt_ids = sized_prompt(prompt_for, encode, length - answer_budget, haystack_units)
    slots = random_slots(slot_seed, units, len(statements))
    return EvalSample(
        task="vt", length=length, index=index, prompt=prompt, prompt_ids=prompt_ids, answers=names,
        continuation=format_answer("spaced", names), depths=[round(100 * s / max(units, 1)) for s in slots],
        haystack_units=units, answer_budget=answer_budget, slots=slots, answer_style="spaced",
    )
