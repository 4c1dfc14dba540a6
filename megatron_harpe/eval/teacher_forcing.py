"""Teacher-forced scoring that does not fix the order of a multi-value answer.

    from megatron_harpe.eval.teacher_forcing import teacher_forced_sample_score
    score, predicted_text = teacher_forced_sample_score(backend, sample)

Teacher forcing feeds the expected answer after the prompt and reads the model's greedy
prediction at every answer token (one forward pass instead of a generation loop: the default
under context parallelism). Forcing one fixed order of the values would score a model that
lists them in another order as wrong where string_match_all gives 100. So a multi-value answer
is scored in the model's own order, one value at a time: at list position k (after the values
accepted so far, in the answer's own format) the next expected value is forced; where the
model's greedy prediction leaves it, the remaining value that agrees with everything forced so
far and continues with the predicted token is forced instead, and so on, so the forced text
follows the model's greedy path through the expected values. A value counts as found when the
model predicts every token overlapping it; when the greedy path leads into none of the
remaining values the position is a miss. Cost: usually one forward pass per value (one more for
each detour).

A QA answer (string_match_part) is scored by forcing each reference answer in turn: 100 when
any one of them is predicted token for token. A single value takes one forward pass, as before.
"""

from __future__ import annotations

from megatron_harpe.eval.backends.base import ModelBackend, encode_continuation
from megatron_harpe.eval.scoring import value_token_spans
from megatron_harpe.eval.tasks.samples import EvalSample, format_answer


def _forced_ids(
    backend: ModelBackend, sample: EvalSample, order: list[str], continuation: str | None = None
) -> tuple[list[int], list[list[int]]]:
    """Answer ids of `order` in the sample's answer format (or of the given `continuation`),
    and each value's token indices."""
    if continuation is None:
        continuation = format_answer(sample.answer_style, order)
    ids = encode_continuation(backend.tokenizer, sample.prompt, continuation)
    if len(ids) > sample.answer_budget:
        raise ValueError(
            f"the expected answer of {sample.task} needs {len(ids)} tokens, more than its "
            f"budget of {sample.answer_budget}: raise --max-new-tokens"
        )
    return ids, value_token_spans(backend.tokenizer, ids, order)


def _all_correct(predictions: list[int], ids: list[int], span: list[int]) -> bool:
    return bool(span) and all(predictions[k] == ids[k] for k in span)


def _first_miss(predictions: list[int], ids: list[int], positions: range | list[int]) -> int | None:
    """The first of `positions` whose token the model does not predict, None if it predicts all."""
    return next((k for k in positions if predictions[k] != ids[k]), None)


def _score_in_model_order(backend: ModelBackend, sample: EvalSample) -> tuple[float, list[int]]:
    remaining, accepted = list(sample.answers), []
    found = 0
    predictions: list[int] = []
    for position in range(len(sample.answers)):
        current = remaining[0]
        ids, spans = _forced_ids(backend, sample, accepted + remaining)
        predictions = backend.teacher_forced_match(sample.prompt_ids, ids)
        tried = {current}
        while spans[position]:
            # from the end of the previous value: the separator and this value
            start = spans[position - 1][-1] + 1 if position and spans[position - 1] else 0
            miss = _first_miss(predictions, ids, range(min(start, spans[position][0]), spans[position][-1] + 1))
            if miss is None:  # the model writes `current` here, token for token
                found += 1
                break
            # the greedy path leaves `current` at token `miss`: follow it into another value
            # that agrees with everything forced so far and continues with the predicted token
            for candidate in remaining:
                if candidate in tried:
                    continue
                order = accepted + [candidate] + [value for value in remaining if value != candidate]
                other_ids, other_spans = _forced_ids(backend, sample, order)
                if (
                    other_spans[position]
                    and other_ids[:miss] == ids[:miss]
                    and other_ids[miss : miss + 1] == [predictions[miss]]
                ):
                    current, ids, spans = candidate, other_ids, other_spans
                    predictions = backend.teacher_forced_match(sample.prompt_ids, ids)
                    tried.add(candidate)
                    break
            else:
                # no expected value explains the divergence: a separator written differently
                # still lets the value count (as in string matching); a value token, not
                found += miss < spans[position][0] and _first_miss(predictions, ids, spans[position]) is None
                break
        accepted.append(current)
        remaining.remove(current)
    return 100.0 * found / len(sample.answers), predictions


def teacher_forced_sample_score(backend: ModelBackend, sample: EvalSample) -> tuple[float, list[int]]:
    """(score 0..100, the greedy predictions of the last forced answer) for one sample."""
    if not sample.answers:
        raise ValueError(f"{sample.task} sample {sample.index} has no expected answer")
    if sample.metric == "part":
        predictions: list[int] = []
        for reference in sample.answers:
            ids, spans = _forced_ids(backend, sample, [reference])
            predictions = backend.teacher_forced_match(sample.prompt_ids, ids)
            if _all_correct(predictions, ids, spans[0]):
                return 100.0, predictions
        return 0.0, predictions
    if len(sample.answers) == 1:
        ids, spans = _forced_ids(backend, sample, sample.answers, sample.continuation)
        predictions = backend.teacher_forced_match(sample.prompt_ids, ids)
        return (100.0 if _all_correct(predictions, ids, spans[0]) else 0.0), predictions
    return _score_in_model_order(backend, sample)
