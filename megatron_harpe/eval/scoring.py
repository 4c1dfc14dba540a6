"""Scoring of retrieval answers: RULER's string-match metrics, their teacher-forced
counterpart, and the Wilson interval of a cell's mean.

string_match_all (RULER, arXiv 2404.06654): the share of expected values that occur as
case-insensitive substrings of the model's output, times 100 (NIAH, vt, cwe, fwe).
string_match_part (RULER's qa metric): 100 when any one of the reference answers occurs.

Teacher forcing (used where generating from a very long prompt is impractical): the expected
continuation is fed after the prompt and the model's greedy prediction is read at every answer
token. A value counts as found when every token overlapping that value is predicted correctly,
which is what greedy decoding would need to reproduce it given the text before it. It is an
optimistic proxy of generation (earlier mistakes cannot derail later values), so results say
which method produced them.
"""

from __future__ import annotations

from megatron_harpe.eval.backends.base import Tokenizer


def string_match_all(prediction: str, answers: list[str]) -> float:
    """100 x (expected values found, case-insensitively, in `prediction`) / (expected values)."""
    if not answers:
        raise ValueError("string_match_all needs at least one expected answer")
    lowered = prediction.lower()
    found = sum(answer.lower() in lowered for answer in answers)
    return 100.0 * found / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """100 if any reference answer occurs (case-insensitively) in `prediction`, else 0."""
    if not answers:
        raise ValueError("string_match_part needs at least one reference answer")
    lowered = prediction.lower()
    return 100.0 if any(answer.lower() in lowered for answer in answers) else 0.0


METRICS = {"all": string_match_all, "part": string_match_part}

WILSON_Z = 1.959963984540054  # two-sided 95%


def wilson_interval(scores: list[float], z: float = WILSON_Z) -> tuple[float, float]:
    """95% Wilson score interval of a cell's mean score (0..100), treating the cell as
    len(scores) trials with sum(scores)/100 successes: exact for 0/100 scores, the usual
    approximation for partial credit (multi-value tasks)."""
    n = len(scores)
    if n == 0:
        raise ValueError("no scores for an interval")
    p = sum(scores) / 100.0 / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, 100.0 * (centre - half)), min(100.0, 100.0 * (centre + half))


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
        raise ValueError(
            f"{len(predictions)} predictions for {len(answer_ids)} answer tokens: a backend's "
            "teacher_forced_match must return one prediction per answer token"
        )
    correct = [predicted == target for predicted, target in zip(predictions, answer_ids)]
    spans = value_token_spans(tokenizer, answer_ids, answers)
    found = sum(bool(span) and all(correct[k] for k in span) for span in spans)
    return 100.0 * found / len(answers)


def mean(values: list[float]) -> float:
    if not values:
        raise ValueError("cannot average an empty list of scores")
    return sum(values) / len(values)
