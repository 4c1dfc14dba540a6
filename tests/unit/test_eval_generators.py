"""Retrieval prompt generators: sizing, needle depths, key uniqueness, reproducibility.

Run: pytest tests/unit/test_eval_generators.py
"""

from __future__ import annotations

import random
import re

import pytest

from megatron_harpe.eval.backends.hf import HFTokenizer
from megatron_harpe.eval.tasks.haystack import (
    NOISE_PARAGRAPH,
    cycled,
    load_prose_sentences,
    split_sentences,
    wonderwords_lists,
)
from megatron_harpe.eval.tasks.niah import NIAH_TASKS, build_niah_sample
from megatron_harpe.eval.tasks.passkey import build_passkey_sample
from megatron_harpe.eval.tasks.samples import DEPTHS, fit_units
from megatron_harpe.eval.testing import save_tiny_tokenizer

LENGTHS = (1024, 3000)
NEEDLE = re.compile(r"One of the special magic \w+ for (.+?) is: (\S+?)\.(?=\s|$)")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> HFTokenizer:
    directory = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    save_tiny_tokenizer(directory)
    return HFTokenizer.from_pretrained(directory)


def _context(prompt: str) -> str:
    """The haystack part of a prompt: between the instruction line and the question line."""
    return prompt[prompt.index("\n") + 1 : prompt.rindex("\n")]


def test_depth_grid_has_40_even_points_from_0_to_100():
    assert len(DEPTHS) == 40 and DEPTHS[0] == 0 and DEPTHS[-1] == 100
    steps = [b - a for a, b in zip(DEPTHS, DEPTHS[1:])]
    assert set(steps) <= {2, 3}


@pytest.mark.parametrize("task_name", list(NIAH_TASKS))
@pytest.mark.parametrize("length", LENGTHS)
def test_niah_prompt_fits_length_and_is_maximal(tokenizer, task_name, length):
    task = NIAH_TASKS[task_name]
    sample = build_niah_sample(task, tokenizer, length, index=0, seed=7)
    assert sample.prompt_ids[0] == tokenizer.bos_id
    assert sample.prompt_tokens + sample.answer_budget <= length
    one_more = build_niah_sample(task, tokenizer, length, index=0, seed=7, haystack_units=sample.haystack_units + 1)
    assert one_more.prompt_tokens + one_more.answer_budget > length
    # the forced-size rebuild is the same sample: same needles and question
    assert one_more.answers == sample.answers
    assert sample.haystack_units > 0


@pytest.mark.parametrize("task_name", list(NIAH_TASKS))
def test_niah_needles_keys_and_answers(tokenizer, task_name):
    task = NIAH_TASKS[task_name]
    sample = build_niah_sample(task, tokenizer, 3000, index=1, seed=11)
    needles = NEEDLE.findall(sample.prompt)
    keys = [key for key, _ in needles]
    values = [value for _, value in needles]
    real_needles = task.num_keys * task.num_values
    distractors = sample.haystack_units if task.haystack == "needles" else 0
    assert len(needles) == real_needles + distractors
    assert len(set(values)) == len(values), "a value repeats inside one sample"
    assert len(set(keys)) == len(keys) or task.num_values > 1
    assert len(set(keys)) == task.num_keys + distractors, "a key repeats inside one sample"
    assert len(sample.answers) == task.num_queries * task.num_values
    assert all(answer in values for answer in sample.answers)
    question = sample.prompt[sample.prompt.rindex("\n") :]
    asked = [key for key in set(keys) if key in question]
    assert len(asked) == task.num_queries
    for answer in sample.answers:
        assert sample.prompt.count(f" is: {answer}.") == 1
    if task.value_kind == "numbers":
        assert all(re.fullmatch(r"\d{7}", answer) for answer in sample.answers)
    else:
        assert all(
            re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a)
            for a in sample.answers
        )
    if task.key_kind == "uuids":
        assert all(len(key) == 36 for key in keys)
    else:  # RULER's wonderwords "adjective-noun" keys (the words may hold hyphens or spaces)
        lists = wonderwords_lists()
        assert all(
            any(
                key[:i] in lists["adjective"] and key[i + 1 :] in lists["noun"]
                for i, char in enumerate(key)
                if char == "-"
            )
            for key in keys
        )
    singular = task.num_queries * task.num_values == 1
    assert sample.prompt.startswith("A special magic" if singular else "Some special magic")
    assert sample.prompt.endswith("in the provided text is" if singular else "in the provided text are")


@pytest.mark.parametrize("task_name", list(NIAH_TASKS))
@pytest.mark.parametrize("index", [0, 1, 2])
def test_niah_needles_land_at_requested_depths(tokenizer, task_name, index):
    task = NIAH_TASKS[task_name]
    sample = build_niah_sample(task, tokenizer, 3000, index=index, seed=5)
    context = _context(sample.prompt)
    if task.haystack != "prose":  # RULER's rule here: uniformly random slots, not the depth grid
        assert sample.slots == sorted(sample.slots) and len(set(sample.slots)) == len(sample.slots)
        assert all(0 <= slot < sample.haystack_units for slot in sample.slots)
        lines = context.split("\n")
        if task.haystack == "needles":
            positions = [i for i, line in enumerate(lines) if NEEDLE.fullmatch(line).group(2) in sample.answers]
        else:
            positions = [i for i, line in enumerate(lines) if line != NOISE_PARAGRAPH]
        assert [positions[i] - i for i in range(len(positions))] == sample.slots
        return
    assert sample.depths == sorted(sample.depths) and set(sample.depths) <= set(DEPTHS)
    assert len(set(sample.depths)) == len(sample.depths) and sample.slots is None
    real_texts = [m.group(0) for m in NEEDLE.finditer(context)]
    # prose: the text before needle i, needles removed, is the first int(n*d/100) sentences
    units = cycled(load_prose_sentences(), sample.haystack_units)
    for needle_text, depth in zip(real_texts, sample.depths):
        before = context[: context.index(needle_text)]
        for other in real_texts:
            before = before.replace(other + " ", "")
        expected = " ".join(units[: int(sample.haystack_units * depth / 100)])
        assert before.strip() == expected
    assert len(real_texts) == task.num_keys * task.num_values


def test_niah_depth_as_token_fraction(tokenizer):
    """Depth d puts the needle at about d% of the context's tokens (within one sentence)."""
    task = NIAH_TASKS["niah_single_2"]
    for depth in (0, 25, 50, 75, 100):
        sample = build_niah_sample(task, tokenizer, 3000, index=0, seed=1, fixed_depth=depth)
        context = _context(sample.prompt)
        needle_at = NEEDLE.search(context).start()
        fraction = len(tokenizer.encode(context[:needle_at])) / len(tokenizer.encode(context))
        assert abs(fraction - depth / 100) < 0.06, (depth, fraction)


def test_samples_reproduce_from_seed_and_differ_across_seeds(tokenizer):
    task = NIAH_TASKS["niah_multikey_1"]
    first = build_niah_sample(task, tokenizer, 1024, index=3, seed=42)
    again = build_niah_sample(task, tokenizer, 1024, index=3, seed=42)
    assert first.prompt == again.prompt and first.answers == again.answers and first.depths == again.depths
    other_seed = build_niah_sample(task, tokenizer, 1024, index=3, seed=43)
    other_index = build_niah_sample(task, tokenizer, 1024, index=4, seed=42)
    assert other_seed.answers != first.answers and other_index.answers != first.answers
    passkey = build_passkey_sample(tokenizer, 1024, index=0, seed=42)
    assert passkey.prompt == build_passkey_sample(tokenizer, 1024, index=0, seed=42).prompt
    assert passkey.answers != build_passkey_sample(tokenizer, 1024, index=0, seed=9).answers


@pytest.mark.parametrize("length", LENGTHS)
def test_passkey_fits_and_places_key_at_depth(tokenizer, length):
    sample = build_passkey_sample(tokenizer, length, index=2, seed=3)
    assert sample.prompt_tokens + sample.answer_budget <= length
    bigger = build_passkey_sample(tokenizer, length, index=2, seed=3, haystack_units=sample.haystack_units + 1)
    assert bigger.prompt_tokens + bigger.answer_budget > length
    (key,) = sample.answers
    assert re.fullmatch(r"\d{5}", key)
    context = _context(sample.prompt)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    fillers_before = context[: context.index(needle)].count(NOISE_PARAGRAPH)
    assert fillers_before == int(sample.haystack_units * sample.depths[0] / 100)
    assert sample.prompt.endswith("The pass key is")


def test_prompt_too_long_for_length_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="longer length"):
        build_niah_sample(NIAH_TASKS["niah_multiquery"], tokenizer, 200, index=0, seed=0)


@pytest.mark.parametrize("with_cost_model", [False, True])
def test_fit_units_finds_the_exact_maximum_with_few_measurements(with_cost_model):
    rng = random.Random(0)
    most_calls = 0
    for _ in range(300):
        costs = [rng.choice([0, 1, 2, 3, 40]) for _ in range(rng.randint(0, 2000))]
        totals = [10]
        for cost in costs:
            totals.append(totals[-1] + cost)
        # a cost model that is right up to a few percent of noise per unit
        approximate = [0.0]
        for cost in costs:
            approximate.append(approximate[-1] + cost * rng.uniform(0.95, 1.05))
        budget = rng.randint(10, totals[-1] + 5)
        calls: list[int] = []
        found = fit_units(
            lambda n: calls.append(n) or totals[n],
            budget,
            max_units=len(costs),
            cumulative_cost=approximate.__getitem__ if with_cost_model else None,
        )
        assert found == max(n for n, total in enumerate(totals) if total <= budget)
        most_calls = max(most_calls, len(set(calls)))
    assert most_calls <= (12 if with_cost_model else 30)


def test_sentence_splitting_keeps_abbreviations():
    text = "Use a list, e.g. Foo or Bar. Then stop!  Next one? Yes.\nLast (maybe) here."
    assert split_sentences(text) == [
        "Use a list, e.g. Foo or Bar.",
        "Then stop!",
        "Next one?",
        "Yes.",
        "Last (maybe) here.",
    ]


def test_default_prose_is_real_text_and_custom_file_works(tmp_path):
    sentences = load_prose_sentences()
    words = sum(len(sentence.split()) for sentence in sentences)
    assert words > 20000 and len(sentences) > 1000
    assert all(sentence[-1] in ".!?\"')" for sentence in sentences[:200])
    custom = tmp_path / "prose.txt"
    custom.write_text(" ".join(f"Sentence number {i} is here." for i in range(50)), encoding="utf-8")
    assert load_prose_sentences(str(custom))[3] == "Sentence number 3 is here."
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    with pytest.raises(ValueError, match="longer text"):
        load_prose_sentences(str(short))
