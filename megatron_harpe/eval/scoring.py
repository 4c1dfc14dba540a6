"""Scoring of retrieval answers: RULER's string-match-all, and its teacher-forced counterpart.

string_match_all (RULER, SPEC.md section 4): the share of expected values that occur as
case-insensitive substrings of the model's output, times 100.

Teacher forcing (used where generating from a very long prompt is impractical): the expected
continuation is fed after the prompt and the model's greedy prediction is read at every answer
token. A value counts as found when every token overlapping that value is predicted correctly,
which is what greedy decoding would need to reproduce it given the text before it. It is an
optimistic proxy of generation (earlier mistakes cannot derail later values), so results say
which method produced them.
"""

from __future__ import annotations

from megatron_harpe.eval.backends import Tokenizer


def string_match_all(prediction: str, answers: list[str]) -> float:
    """100 x (expected values found, case-insensitively, in `prediction`) / (expected values)."""
    if not answers:
        raise ValueError("string_match_all needs at least one expected answer")
    lowered = prediction.lower()
    found = sum(answer.lower() in lowered for answer in answers)
    return 100.0 * found / len(answers)


def token_char_offsets(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """offsets[k] = length of decode(ids[:k]); token k covers decoded chars [offsets[k], offsets[k+1])."""
    return [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]


def value_token_spans(tokenizer: Tokenizer, answer_ids: list[int], answers: list[str]) -> list[list[int]]:
    """For each expected value, the indices of the answer tokens that spell it.

    Values are located in the decoded answer in order; a value the decoder does not reproduce
    verbatim falls back to "all answer tokens" so it can only count when everything matches.
    """
    decoded = tokenizer.decode(answer_ids)
    offsets = token_char_offsets(tokenizer, answer_ids)
    spans: list[list[int]] = []
    search_from = 0
    for value in answers:
        start = decoded.find(value, search_from)
        if start < 0:
            spans.append(list(range(len(answer_ids))))
            continue
        end = start + len(value)
        search_from = end
        spans.append([k for k in range(len(answer_ids)) if offsets[k] < end and offsets[k + 1] > start])
    return spans


def teacher_forced_score(
    tokenizer: Tokenizer, answer_ids: list[int], predictions: list[int], answers: list[str]
) -> float:
    """100 x (values whose tokens were all predicted correctly) / (expected values)."""
    if not answers:
        raise ValueError("teacher_forced_score needs at least one expected answer")
    if len(predictions) != len(answer_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(answer_ids)} answer tokens: a backend's "
                         "teacher_forced_match must return one prediction per answer token")
    correct = [predicted == target for predicted, target in zip(predictions, answer_ids)]
    spans = value_token_spans(tokenizer, answer_ids, answers)
    found = sum(bool(span) and all(correct[k] for k in span) for span in spans)
    return 100.0 * found / len(answers)


def mean(values: list[float]) -> float:
    if not values:
        raise ValueError("cannot average an empty list of scores")
    return sum(values) / len(values)
