"""RULER's question answering tasks: qa_1 (SQuAD) and qa_2 (HotpotQA), from files the user supplies.

    python tools/evaluate.py ... --task ruler --qa-squad dev-v2.0.json --qa-hotpot hotpot_dev_distractor_v1.json

Nothing is downloaded: pass SQuAD v2.0 (or v1.1) dev JSON (`{"data": [{"paragraphs": [{"context",
"qas": [{"question", "answers": [{"text"}], "is_impossible"}]}]}]}`) and HotpotQA dev JSON
(`[{"question", "answer", "context": [[title, [sentence, ...]]]}]`), the files RULER's
`download_qa_dataset.sh` fetches. As RULER's `qa.py` (ruler_rules.RULER_VERSION): the documents
are the distinct SQuAD paragraphs (sorted) / HotpotQA "title\\nparagraph" texts; sample i asks
question i of the file (answerable ones only); with n documents the prompt holds its gold
documents, then the other paragraphs of the same SQuAD article (all, in article order, or a
random n - gold of them), then random others, permuted by RULER's fixed-seed shuffle
(`random.Random(seed)`: at a given n the gold document sits at the same depth in every sample;
seed 42 puts SQuAD's gold paragraph at 95% of 20 documents, 39% of 50, 28% of 200), written as
"Document k:\\n...". Any one reference answer in the output scores 100 (string_match_part).
Answer budget 32.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass

from megatron_harpe.eval.backends.base import Tokenizer, encode_prompt
from megatron_harpe.eval.tasks.chat import PLAIN, PromptFormat
from megatron_harpe.eval.tasks.ruler_rules import fixed_shuffle, ruler_increment
from megatron_harpe.eval.tasks.samples import (
    TIGHT,
    EvalSample,
    Fill,
    RulerStep,
    SampleBuilder,
    TaskSetting,
    format_answer,
    sample_rng,
    sized_prompt,
)

QA_ANSWER_BUDGET = 32
QA_TASKS = {"qa_1": "squad", "qa_2": "hotpotqa"}
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
    "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_ANSWER_PREFIX = " Answer:"
DOCUMENT_TEMPLATE = "Document {number}:\n{document}"


@dataclass(frozen=True)
class QaQuestion:
    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # document ids holding the answer
    related: tuple[int, ...] = ()  # other paragraphs of the same SQuAD article


@dataclass(frozen=True)
class QaDataset:
    questions: tuple[QaQuestion, ...]
    documents: tuple[str, ...]


def _read_json(path: str, what: str) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the {what} file {path!r}: {error}") from error


@functools.lru_cache(maxsize=4)
def load_squad(path: str) -> QaDataset:
    data = _read_json(path, "SQuAD")
    try:
        documents = sorted({paragraph["context"] for article in data["data"] for paragraph in article["paragraphs"]})
        ids = {document: number for number, document in enumerate(documents)}
        questions = []
        for article in data["data"]:
            article_ids = [ids[paragraph["context"]] for paragraph in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                own = ids[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if qa.get("is_impossible", False):
                        continue
                    questions.append(
                        QaQuestion(
                            qa["question"],
                            tuple(answer["text"] for answer in qa["answers"]),
                            (own,),
                            tuple(number for number in article_ids if number != own),
                        )
                    )
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"{path!r} is not a SQuAD JSON file (data -> paragraphs -> context, qas): missing {error}"
        ) from error
    return QaDataset(tuple(questions), tuple(documents))


@functools.lru_cache(maxsize=4)
def load_hotpotqa(path: str) -> QaDataset:
    data = _read_json(path, "HotpotQA")
    try:

        def text(title: str, sentences: list[str]) -> str:
            return f"{title}\n{''.join(sentences)}"

        documents = sorted({text(title, sentences) for item in data for title, sentences in item["context"]})
        ids = {document: number for number, document in enumerate(documents)}
        questions = tuple(
            QaQuestion(
                item["question"],
                (item["answer"],),
                tuple(ids[text(title, sentences)] for title, sentences in item["context"]),
            )
            for item in data
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path!r} is not a HotpotQA JSON file (a list of question, answer, context): {error}"
        ) from error
    return QaDataset(questions, tuple(documents))


def load_qa_dataset(task: str, path: str) -> QaDataset:
    dataset = load_squad(path) if QA_TASKS[task] == "squad" else load_hotpotqa(path)
    if not dataset.questions:
        raise ValueError(f"{path!r} holds no answerable question for {task}")
    return dataset


_LOADED: list[QaDataset] = []  # datasets samples were built from, for lookup_answers


def lookup_answers(question: str) -> list[str]:
    """The reference answers of `question` in any QA file loaded so far (the oracle backend's
    answer key: the answer cannot be read off the prompt)."""
    for dataset in _LOADED:
        for item in dataset.questions:
            if item.question == question:
                return list(item.answers)
    return []


def ruler_documents(item: QaQuestion, total: int, count: int, rng: random.Random, seed: int) -> list[int]:
    """Document ids of a prompt with `count` documents, in prompt order, by RULER's rule: the gold
    documents, then the other paragraphs of the same SQuAD article (all of them in article order,
    or a random choice), then random others; all permuted by RULER's fixed-seed shuffle, so at a
    given count the gold document sits at the same place in every sample. The random choices
    are prefixes of orders drawn once from `rng` (the same draw for every count of a sample, so
    more documents never means other ones)."""
    gold, related = list(item.gold), list(item.related)
    excluded = set(gold) | set(related)
    state = rng.getstate()
    related_order = rng.sample(related, len(related))
    others = [number for number in range(total) if number not in excluded]
    others_order = rng.sample(others, len(others))
    rng.setstate(state)
    if count >= total:  # RULER takes the whole corpus, in its sorted order
        chosen = list(range(total))
    elif count - len(gold) > len(related):
        chosen = gold + related + others_order[: count - len(gold) - len(related)]
    else:
        chosen = gold + related_order[: max(0, count - len(gold))]
    return fixed_shuffle(chosen, seed)


def build_qa_sample(
    task: str,
    dataset: QaDataset,
    tokenizer: Tokenizer,
    length: int,
    index: int,
    seed: int,
    answer_budget: int = QA_ANSWER_BUDGET,
    chat: PromptFormat = PLAIN,
    haystack_units: int | None = None,
    fill: Fill = TIGHT,
) -> EvalSample:
    """Sample `index` of qa_1/qa_2: question `index` of the file with as many documents as fit."""
    if index >= len(dataset.questions):
        raise ValueError(
            f"{task} has {len(dataset.questions)} answerable questions; asked for sample {index}: lower --samples"
        )
    if dataset not in _LOADED:
        _LOADED.append(dataset)
    item = dataset.questions[index]
    rng = sample_rng(seed, task, length, index)
    total = len(dataset.documents)

    @functools.lru_cache(maxsize=None)
    def documents_for(n: int) -> tuple[int, ...]:
        return tuple(ruler_documents(item, total, min(max(n, len(item.gold)), total), rng, seed))

    def prompt_for(n: int) -> str:
        context = "\n\n".join(
            DOCUMENT_TEMPLATE.format(number=k + 1, document=dataset.documents[d])
            for k, d in enumerate(documents_for(n))
        )
        return chat(QA_TEMPLATE.format(context=context, query=item.question), QA_ANSWER_PREFIX)

    answers = list(dict.fromkeys(item.answers))
    step = RulerStep(
        length,
        index,
        ruler_increment("qa", length),
        lambda n: len(tokenizer.encode(prompt_for(n) + f" {list(item.answers)}")),
    )
    units, prompt, prompt_ids = sized_prompt(
        prompt_for,
        functools.partial(encode_prompt, tokenizer),
        length - answer_budget,
        haystack_units,
        fill=fill,
        step=step,
    )
    documents = documents_for(units)
    return EvalSample(
        task=task,
        length=length,
        index=index,
        prompt=prompt,
        prompt_ids=prompt_ids,
        answers=answers,
        continuation=format_answer("plain", answers),
        depths=[],
        haystack_units=len(documents),
        answer_budget=answer_budget,
        metric="part",
        answer_style="plain",
        draw={"documents": list(documents), "gold": list(item.gold), "question": item.question},
    )


def sample_builder(task: str, setting: TaskSetting) -> SampleBuilder:
    """The registry's builder of qa_1 / qa_2 samples: the data file is read once, here."""
    if not setting.data_file:
        raise ValueError(f"{task} needs its data file ({QA_TASKS[task]} JSON)")
    dataset = load_qa_dataset(task, setting.data_file)
    return lambda length, index: build_qa_sample(
        task,
        dataset,
        setting.tokenizer,
        length,
        index,
        setting.seed,
        setting.answer_budget,
        chat=setting.chat,
        fill=setting.fill,
    )
