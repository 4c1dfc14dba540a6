"""What every retrieval task produces (an `EvalSample`) and the tokenizer-exact sizing they share.

A retrieval prompt is a template around a haystack of `n` units (sentences, noise paragraphs or
distractor needles) with needles inserted at depths. `fit_units` finds the largest `n` whose
prompt, in tokens of the model's own tokenizer (BOS included), leaves room for the answer
budget inside the target length: `prompt_tokens(n) + answer_budget <= length` and
`prompt_tokens(n + 1) + answer_budget > length`.

Depths follow RULER: needles are placed at depths drawn without replacement from 40 evenly
spaced points between 0 and 100 percent (`DEPTHS`); depth d puts the needle before haystack unit
`int(n * d / 100)`, i.e. at a unit (sentence) boundary.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import numpy as np

DEPTHS: tuple[int, ...] = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40)).astype(int))


@dataclasses.dataclass
class EvalSample:
    """One prompt with its expected answers.

    prompt_ids start with BOS when the model expects it. `continuation` is the expected answer
    text as it follows the prompt (used for teacher forcing); `answers` are the strings that
    must all appear in the model's output. `depths` are the needle depths in percent, in the
    order the needles appear in the prompt.
    """

    task: str
    length: int
    index: int
    prompt: str
    prompt_ids: list[int]
    answers: list[str]
    continuation: str
    depths: list[int]
    haystack_units: int
    answer_budget: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """Independent, reproducible randomness per (seed, task, length, sample index): asking for
    more samples or other lengths never changes the samples already drawn."""
    return random.Random(f"{seed}/{task}/{length}/{index}")


def insert_at_depths(units: list[str], needles: list[str], depths: list[int]) -> list[str]:
    """Insert needle i before unit `int(len(units) * depths[i] / 100)`; depths must be sorted."""
    assert list(depths) == sorted(depths) and len(depths) == len(needles)
    result: list[str] = []
    start = 0
    for needle, depth in zip(needles, depths):
        position = int(len(units) * depth / 100)
        result.extend(units[start:position])
        result.append(needle)
        start = position
    result.extend(units[start:])
    return result


def join_values(values: list[str]) -> str:
    """'a', 'a and b', 'a, b, and c': how the expected answer reads after the prompt."""
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return f"{values[0]} and {values[1]}"
    return ", ".join(values[:-1]) + ", and " + values[-1]


def answer_continuation(values: list[str]) -> str:
    """The expected continuation of a prompt ending in '... is' / '... are' / '... is'."""
    return f" {join_values(values)}."


def fit_units(prompt_tokens: Callable[[int], int], budget: int, max_units: int) -> int:
    """Largest n in [0, max_units] with prompt_tokens(n) <= budget, for a non-decreasing
    prompt_tokens. Interpolates from the measured token counts (a handful of full
    tokenizations even at 128k), then bisects the remaining bracket exactly."""
    memo: dict[int, int] = {}

    def measure(n: int) -> int:
        if n not in memo:
            memo[n] = prompt_tokens(n)
        return memo[n]

    if measure(0) > budget:
        raise ValueError(
            f"the prompt without any haystack already needs {measure(0)} tokens, more than the "
            f"{budget} available: evaluate at a longer length or reduce the answer budget"
        )
    low, high = 0, None  # measure(low) <= budget; measure(high) > budget (None: not found yet)
    probe = min(max_units, 16)
    while high is None:
        if probe <= low:
            break
        if measure(probe) <= budget:
            low = probe
            if probe == max_units:
                return max_units
            per_unit = max((measure(probe) - measure(0)) / probe, 1e-9)
            estimate = int((budget - measure(0)) / per_unit)
            probe = min(max_units, max(estimate + max(2, estimate // 200), low * 2, low + 1))
        else:
            high = probe
    if high is None:
        return low
    while high - low > 1:
        width = high - low
        span_tokens = max(measure(high) - measure(low), 1)
        guess = low + int((budget - measure(low)) * width / span_tokens)
        guess = min(max(guess, low + 1), high - 1)
        # probe the interpolated guess and its neighbour: the bracket usually closes here
        neighbour = guess + 1 if measure(guess) <= budget else guess - 1
        for candidate in (guess, neighbour):
            if low < candidate < high:
                if measure(candidate) <= budget:
                    low = candidate
                else:
                    high = candidate
        if high - low > max(width // 2, 1):  # interpolation did not halve the bracket: bisect
            middle = (low + high) // 2
            if measure(middle) <= budget:
                low = middle
            else:
                high = middle
    return low
