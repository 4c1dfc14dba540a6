"""Scoring on hand-written outputs, and the harness bracketed by the oracle (100) and random (~0)
backends over every retrieval task, with generation and with teacher forcing.

Run: pytest tests/unit/test_eval_scoring.py
"""

from __future__ import annotations

import os

import pytest

from megatron_harpe.eval.backends.base import encode_continuation
from megatron_harpe.eval.backends.hf import HFTokenizer
from megatron_harpe.eval.backends.synthetic import OracleBackend, RandomBackend, read_answers_from_prompt
from megatron_harpe.eval.scoring import string_match_all, teacher_forced_score, value_token_spans
from megatron_harpe.eval.suite import run_eval_suite
from megatron_harpe.eval.tasks.haystack import load_prose_sentences
from megatron_harpe.eval.tasks.registry import RULER_TASKS
from megatron_harpe.eval.tasks.samples import answer_continuation, join_values
from megatron_harpe.eval.testing import save_tiny_tokenizer

TOKENIZER_FIXTURES = {"byte_level_bpe": "tokenizer", "sentencepiece": "sentencepiece_tokenizer"}
DATA = os.path.join(os.path.dirname(__file__), "..", "data")
QA_FILES = {"qa_1": os.path.join(DATA, "qa_squad_tiny.json"), "qa_2": os.path.join(DATA, "qa_hotpot_tiny.json")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> HFTokenizer:
    directory = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    save_tiny_tokenizer(directory)
    return HFTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """The project's own tokenizer type (Llama-style sentencepiece, as in the CPU demo)."""
    from megatron_harpe.data.tokenizer import load_tokenizer, train_sentencepiece

    directory = tmp_path_factory.mktemp("sentencepiece")
    return load_tokenizer(train_sentencepiece(load_prose_sentences(), directory / "sp", vocab_size=1000))


@pytest.mark.parametrize(
    "output, answers, expected",
    [
        ("The special magic number is 1234567.", ["1234567"], 100.0),
        (" 1234567, 7654321, and 1111111.", ["1234567", "7654321", "2222222", "1111111"], 75.0),
        ("I do not know.", ["1234567"], 0.0),
        ("A1B2C3D4-0000-4AAA-8BBB-FFFFFFFFFFFF", ["a1b2c3d4-0000-4aaa-8bbb-ffffffffffff"], 100.0),
        ("123456", ["1234567"], 0.0),
        ("one of them is 7654321", ["1234567", "7654321"], 50.0),
    ],
)
def test_string_match_all_on_hand_written_outputs(output, answers, expected):
    assert string_match_all(output, answers) == expected


def test_string_match_all_needs_answers():
    with pytest.raises(ValueError):
        string_match_all("anything", [])


def test_answer_formatting():
    assert join_values(["a"]) == "a"
    assert join_values(["a", "b"]) == "a and b"
    assert join_values(["a", "b", "c", "d"]) == "a, b, c, and d"
    assert answer_continuation(["1234567"]) == " 1234567."


@pytest.mark.parametrize("tokenizer_kind", ["byte_level_bpe", "sentencepiece"])
def test_teacher_forced_score_counts_values_whose_tokens_are_all_right(request, tokenizer_kind):
    tokenizer = request.getfixturevalue(TOKENIZER_FIXTURES[tokenizer_kind])
    values = ["1234567", "7654321", "5550123"]
    prompt = "What are the numbers? The numbers are"
    answer_ids = encode_continuation(tokenizer, prompt, answer_continuation(values))
    spans = value_token_spans(tokenizer, answer_ids, values)
    assert all(spans) and len(spans) == 3
    for value, span in zip(values, spans):
        assert value in tokenizer.decode([answer_ids[k] for k in span])
    assert teacher_forced_score(tokenizer, answer_ids, list(answer_ids), values) == 100.0
    wrong_second = list(answer_ids)
    wrong_second[spans[1][-1]] = tokenizer.eos_id
    assert teacher_forced_score(tokenizer, answer_ids, wrong_second, values) == pytest.approx(100 / 3 * 2)
    all_wrong = [tokenizer.eos_id] * len(answer_ids)
    assert teacher_forced_score(tokenizer, answer_ids, all_wrong, values) == 0.0
    with pytest.raises(ValueError, match="one prediction per answer token"):
        teacher_forced_score(tokenizer, answer_ids, answer_ids[:-1], values)


def test_oracle_reads_answers_from_hand_written_prompts():
    prompt = (
        "Some special magic numbers are hidden within the following text.\n"
        "One of the special magic numbers for quiet-harbor is: 1111111. Filler text. "
        "One of the special magic numbers for bold-lemon is: 2222222. More filler. "
        "One of the special magic numbers for quiet-harbor is: 3333333.\n"
        "What are all the special magic numbers for quiet-harbor mentioned in the provided text? "
        "The special magic numbers for quiet-harbor mentioned in the provided text are"
    )
    assert read_answers_from_prompt(prompt) == ["1111111", "3333333"]
    multi = prompt.replace("for quiet-harbor mentioned", "for bold-lemon and quiet-harbor mentioned")
    assert read_answers_from_prompt(multi) == ["2222222", "1111111", "3333333"]
    passkey = (
        "Find it.\nThe pass key is 48213. Remember it. 48213 is the pass key.\nWhat is the pass key? The pass key is"
    )
    assert read_answers_from_prompt(passkey) == ["48213"]
    assert read_answers_from_prompt("no question here") == []


@pytest.mark.parametrize("tokenizer_kind", ["byte_level_bpe", "sentencepiece"])
@pytest.mark.parametrize("scoring", ["generate", "teacher_forcing"])
def test_oracle_scores_100_on_every_retrieval_task(request, tokenizer_kind, scoring):
    tokenizer = request.getfixturevalue(TOKENIZER_FIXTURES[tokenizer_kind])
    results = run_eval_suite(
        OracleBackend(tokenizer),
        ["ruler", "passkey"],
        [2048, 3000],
        samples=2,
        seed=3,
        scoring=scoring,
        progress=False,
        qa_files=QA_FILES,
    )
    assert set(results["tasks"]) == {*RULER_TASKS, "passkey"}
    for task, by_length in results["tasks"].items():
        for length, cell in by_length.items():
            assert cell["score"] == 100.0, (task, length, cell)
            assert cell["method"] == scoring
    assert results["per_length"] == {"2048": 100.0, "3000": 100.0} and results["mean_label"] == "RULER-13 mean"
    assert results["overall"] == 100.0


@pytest.mark.parametrize("scoring", ["generate", "teacher_forcing"])
def test_random_backend_scores_near_zero(tokenizer, scoring):
    results = run_eval_suite(
        RandomBackend(tokenizer, seed=1),
        ["ruler", "passkey"],
        [2048],
        samples=3,
        seed=3,
        scoring=scoring,
        progress=False,
        qa_files=QA_FILES,
    )
    assert results["overall"] <= 5.0
    assert all(cell["score"] <= 10.0 for by_length in results["tasks"].values() for cell in by_length.values())


def test_oracle_with_a_truncated_answer_loses_points(tokenizer):
    """A backend that stops early must not get credit for values it never produced."""

    class FirstTokensOracle(OracleBackend):
        def generate(self, prompt_ids, max_new_tokens):
            return super().generate(prompt_ids, max_new_tokens)[:4]

    results = run_eval_suite(
        FirstTokensOracle(tokenizer), ["niah_multivalue"], [1024], samples=2, seed=0, progress=False
    )
    assert results["overall"] < 50.0


def test_output_ids_beyond_the_tokenizer_are_dropped(tokenizer):
    """Megatron pads its vocabulary for TP; an untrained padded id must not crash decoding."""

    class PaddedVocabularyOracle(OracleBackend):
        def generate(self, prompt_ids, max_new_tokens):
            return [self.tokenizer.vocab_size + 5] + super().generate(prompt_ids, max_new_tokens)

    results = run_eval_suite(PaddedVocabularyOracle(tokenizer), ["passkey"], [512], samples=1, progress=False)
    assert results["overall"] == 100.0
