"""What every retrieval task produces (an `EvalSample`), what its sample builder is given (a
`TaskSetting`), and the tokenizer-exact sizing they share.

A retrieval prompt is a template around a haystack of `n` units (sentences, noise paragraphs or
distractor needles) with needles inserted at depths. `fit_units` finds the largest `n` whose
prompt, in tokens of the model's own tokenizer (BOS included), leaves room for the answer
budget inside the target length: `prompt_tokens(n) + answer_budget <= length` and
`prompt_tokens(n + 1) + answer_budget > length`.

Depths follow RULER: in a prose haystack needles are placed at depths drawn without
replacement from 40 evenly spaced points between 0 and 100 percent (`DEPTHS`); depth d puts the
needle before haystack unit `int(n * d / 100)`, i.e. at a unit (sentence) boundary. In a
haystack of repeated units (noise paragraphs, distractor needles, variable-tracking noise)
RULER instead draws distinct slots uniformly from `range(n)`; slot s puts the needle after
the first s units (`random_slots`, `insert_at_slots`).

How large the haystack is: `Fill` "tight" (default) as above, or "ruler": RULER's own sizing
(one probe sample per task and length, whole steps; see ruler_rules.py), via `sized_prompt`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import numpy as np

from megatron_harpe.eval.backends.base import Tokenizer
from megatron_harpe.eval.tasks.chat import PLAIN, PromptFormat

DEPTHS: tuple[int, ...] = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40)).astype(int))


@dataclasses.dataclass
class EvalSample:
    """One prompt with its expected answers.

    prompt_ids start with BOS when the model expects it. `continuation` is the expected answer
    text as it follows the prompt (used for teacher forcing). `answers` are the expected
    strings; `metric` says how they score (RULER's metrics, see eval/scoring.py): "all" = the share
    of them found in the output (string_match_all), "part" = 100 if any one of them is found
    (string_match_part: the alternatives of a QA answer). `answer_style` names how a list of
    values reads after the prompt (`format_answer`). `depths` are the needle depths in
    percent, in the order the needles appear in the prompt; `slots` the unit positions where a
    repeated-unit haystack got its needles (None for prose). `draw` holds the random choices the
    prompt was assembled from (keys, needles in order, haystack units, documents ...), so tests
    can rebuild RULER's text for the same draw; it is not written to results.
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
    slots: list[int] | None = None
    metric: str = "all"
    answer_style: str = "list"
    draw: dict | None = dataclasses.field(default=None, repr=False, compare=False)

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


def random_slots(seed: int, units: int, count: int) -> list[int]:
    """RULER's needle positions in a repeated-unit haystack: `count` distinct slots drawn
    uniformly from range(units), sorted. Seeded per haystack size, so the fitting search can
    ask for any size and the sample stays a function of (seed, size)."""
    rng = random.Random(f"{seed}/slots/{units}")
    return sorted(min(slot, units) for slot in rng.sample(range(max(units, count)), count))


def essay_context(sentences: list[str], needles: list[str], depths: list[int]) -> str:
    """RULER's essay haystack with needles: needle i after the first int(len(sentences) * depths[i]
    / 100) sentences (depths sorted), the pieces joined by spaces as RULER joins them, so a
    needle at depth 0 or 100, or two needles at one boundary, leave an empty piece (an extra space)."""
    assert list(depths) == sorted(depths) and len(depths) == len(needles)
    positions = [0] + [int(len(sentences) * (depth / 100)) for depth in depths] + [len(sentences)]
    pieces: list[str] = []
    for number in range(1, len(positions)):
        pieces.append(" ".join(sentences[positions[number - 1] : positions[number]]))
        if number - 1 < len(needles):
            pieces.append(needles[number - 1])
    return " ".join(pieces)


def insert_at_slots(units: list[str], needles: list[str], slots: list[int]) -> list[str]:
    """Needle i after the first slots[i] units (slots sorted), keeping the needles' order."""
    assert list(slots) == sorted(slots) and len(slots) == len(needles)
    result = list(units)
    for offset, (needle, slot) in enumerate(zip(needles, slots)):
        result.insert(slot + offset, needle)
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


def format_answer(style: str, values: list[str]) -> str:
    """How `values` read after the answer prefix: "list" ' a, b, and c.' (needle tasks),
    "numbered" ' 1. a 2. b' (common words, as RULER's example answer), "spaced" 'a b c' (after
    a prefix that ends in a space: variable tracking), "words" ' a b c' (frequent words),
    "plain" ' a' (one QA answer)."""
    if style == "list":
        return answer_continuation(values)
    if style == "numbered":
        return "".join(f" {number}. {value}" for number, value in enumerate(values, start=1))
    if style == "spaced":
        return " ".join(values)
    if style == "words":
        return "".join(f" {value}" for value in values)
    if style == "plain":
        return f" {values[0]}"
    raise ValueError(f"unknown answer style {style!r}")


FILL_MODES = ("tight", "ruler")


@dataclasses.dataclass(frozen=True)
class RulerStep:
    """What RULER's fill needs from one sample (ruler_rules.py): which sample of which length,
    RULER's step and first size for its haystack, and RULER's probe measure (prompt + answer
    text, tokens without BOS)."""

    length: int
    index: int
    increment: int
    probe_tokens: Callable[[int], int]
    first: int | None = None


@dataclasses.dataclass
class Fill:
    """How a sample's haystack is sized. "tight": each sample alone, as large as fits.
    "ruler": RULER's rule (ruler_rules.py); `starts` keeps each length's probe result, taken on
    sample 0 of that (task, length), so build sample 0 first (the suite does)."""

    mode: str = "tight"
    starts: dict[int, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in FILL_MODES:
            raise ValueError(f"unknown fill {self.mode!r}: choose {' or '.join(FILL_MODES)}")

    def ruler_units(
        self,
        length: int,
        index: int,
        prompt_tokens: Callable[[int], int],
        probe_tokens: Callable[[int], int],
        limit: int,
        increment: int,
        first: int | None = None,
    ) -> int:
        """Units of sample `index` under RULER's rule: the probe (sample 0) takes the largest
        first + k * increment whose probe text (prompt + answer, no BOS, as RULER counts) fits
        `limit`; each sample starts there and drops whole increments until its prompt fits."""
        first = increment if first is None else first
        if length not in self.starts:
            if index != 0:
                raise AssertionError("RULER's fill is sized on sample 0: build it first")
            steps = fit_units(
                lambda k: probe_tokens(first + k * increment),
                limit,
                max_units=2 * limit // max(increment, 1) + 2,
                allow_none=True,
            )
            self.starts[length] = 0 if steps is None else first + steps * increment
        units = self.starts[length]
        while prompt_tokens(units) > limit and units > increment:
            units -= increment
        if prompt_tokens(units) > limit:
            if units > 0 and prompt_tokens(0) <= limit:
                return 0
            raise ValueError(
                f"the prompt without any haystack already needs {prompt_tokens(0)} tokens, more than the "
                f"{limit} available: evaluate at a longer length or reduce the answer budget"
            )
        return units


TIGHT = Fill()


def sized_prompt(
    prompt_for: Callable[[int], str],
    encode: Callable[[str], list[int]],
    budget: int,
    units: int | None = None,
    cumulative_cost: Callable[[int], float] | None = None,
    fill: Fill = TIGHT,
    step: RulerStep | None = None,
) -> tuple[int, str, list[int]]:
    """(n, prompt, prompt ids) of the prompt with `n` haystack units: the given `units`, else the
    largest n whose encoding fits `budget` tokens (`fit_units`, fill "tight") or RULER's size
    (fill "ruler", `step` says how). The encoding measured while searching is reused."""
    encoded: dict[int, list[int]] = {}

    def prompt_tokens(n: int) -> int:
        if n not in encoded:
            encoded[n] = encode(prompt_for(n))
        return len(encoded[n])

    if units is None and fill.mode == "ruler":
        if step is None:
            raise AssertionError("RULER's fill needs the task's RulerStep")
        units = fill.ruler_units(
            step.length, step.index, prompt_tokens, step.probe_tokens, budget, step.increment, step.first
        )
    elif units is None:
        units = fit_units(prompt_tokens, budget, max_units=max(budget, 0), cumulative_cost=cumulative_cost)
    prompt = prompt_for(units)
    return units, prompt, encoded[units] if units in encoded else encode(prompt)


def fit_units(
    prompt_tokens: Callable[[int], int],
    budget: int,
    max_units: int,
    cumulative_cost: Callable[[int], float] | None = None,
    allow_none: bool = False,
) -> int | None:
    """Largest n in [0, max_units] with prompt_tokens(n) <= budget, for a non-decreasing
    prompt_tokens (one full tokenization per call, the expensive part). When even n = 0 does
    not fit: None with `allow_none`, else a ValueError.

    `cumulative_cost(n)` is an optional cheap, non-decreasing model of the tokens of the first n
    units (e.g. prefix sums of per-sentence counts); without it every unit costs the same. The
    search interpolates in that cost space between exact measurements, then closes the bracket
    exactly: about five full tokenizations at 128k tokens.
    """
    cost = cumulative_cost or float
    memo: dict[int, int] = {}

    def measure(n: int) -> int:
        if n not in memo:
            memo[n] = prompt_tokens(n)
        return memo[n]

    def units_within(target_cost: float) -> int:
        """Largest n in [0, max_units] with cost(n) <= target_cost."""
        low_n, high_n = 0, max_units
        while low_n < high_n:
            middle = (low_n + high_n + 1) // 2
            if cost(middle) <= target_cost:
                low_n = middle
            else:
                high_n = middle - 1
        return low_n

    if measure(0) > budget:
        if allow_none:
            return None
        raise ValueError(
            f"the prompt without any haystack already needs {measure(0)} tokens, more than the "
            f"{budget} available: evaluate at a longer length or reduce the answer budget"
        )
    low, high = 0, None  # measure(low) <= budget; measure(high) > budget (None: not found yet)
    probe, overshoot = min(max_units, 16), 0.005
    while probe > low:
        if measure(probe) > budget:
            high = probe
            break
        low = probe
        if probe == max_units:
            return max_units
        # extrapolate the measured tokens per unit of cost, aiming a little past the budget
        tokens_per_cost = max((measure(low) - measure(0)) / max(cost(low) - cost(0), 1e-9), 1e-9)
        target = cost(low) + (budget - measure(low)) / tokens_per_cost
        probe = min(max_units, max(units_within(target * (1 + overshoot)) + 1, low + 1))
        overshoot *= 4
    if high is None:
        return low
    while high - low > 1:
        width = high - low
        tokens_per_cost = max(measure(high) - measure(low), 1) / max(cost(high) - cost(low), 1e-9)
        guess = units_within(cost(low) + (budget - measure(low)) / tokens_per_cost)
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


SampleBuilder = Callable[[int, int], EvalSample]
"""make(length, index) -> sample `index` of the cell at `length`."""


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    """What a task's `sample_builder` is given (registry.py): the run's tokenizer, seed and prompt
    format, the answer budget, the fill rule (one `Fill` per builder: it keeps RULER's probe sizes),
    the prose haystack, the task's data file (qa_1, qa_2) and, for a needle-grid cell, its depth."""

    tokenizer: Tokenizer
    seed: int
    answer_budget: int
    chat: PromptFormat = PLAIN
    fill: Fill = dataclasses.field(default_factory=Fill)
    prose: tuple[str, ...] | None = None
    data_file: str | None = None
    fixed_depth: int | None = None
