"""RULER's question answering tasks: qa_1 (SQuAD) and qa_2 (HotpotQA), from files the user supplies.

    python tools/evaluate.py ... --task ruler --qa-squad dev-v2.0.json --qa-hotpot hotpot_dev_distractor_v1.json

Nothing is downloaded: pass SQuAD v2.0 (or v1.1) dev JSON (`{"data": [{"paragraphs": [{"context",
"qas": [{"question", "answers": [{"text"}], "is_impossible"}]}]}]}`) and HotpotQA dev JSON
(`[{"question", "answer", "context": [[title, [sentence, ...]]]}]`), the files RULER's
`download_qa_dataset.sh` fetches. As RULER's `qa.py`: the documents are the distinct SQuAD
paragraphs (sorted) / HotpotQA "title\\nparagraph" texts; sample i asks question i of the file
(answerable ones only); its gold documents come first, then the other paragraphs of the same
SQuAD article, then random others, as many as fit, shuffled and written as "Document k:\\n...".
Any one reference answer in the output scores 100 (string_match_part). Answer budget 32.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass

from megatron_harpe.eval.backends import Tokenizer, encode_prompt
from megatron_harpe.eval.chat import PLAIN, PromptFormat
from megatron_harpe.eval.samples import EvalSample, format_answer, sample_rng, sized_prompt

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
                    questions.append(QaQuestion(
                        qa["question"], tuple(answer["text"] for answer in qa["answers"]), (own,),
                        tuple(number for number in article_ids if number != own),
                    ))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path!r} is not a SQuAD JSON file (data -> paragraphs -> context, qas): "
                         f"missing {error}") from error
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
            QaQuestion(item["question"], (item["answer"],),
                       tuple(ids[text(title, sentences)] for title, sentences in item["context"]))
            for item in data
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path!r} is not a HotpotQA JSON file (a list of question, answer, context): "
                         f"{error}") from error
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
) -> EvalSample:
    """Sample `index` of qa_1/qa_2: question `index` of the file with as many documents as fit."""
    if index >= len(dataset.questions):
        raise ValueError(f"{task} has {len(dataset.questions)} answerable questions; asked for sample {index}: "
                         "lower --samples")
    if dataset not in _LOADED:
        _LOADED.append(dataset)
    item = dataset.questions[index]
    rng = sample_rng(seed, task, length, index)
    related = list(item.related)
    rng.shuffle(related)
    others = [number for number in range(len(dataset.documents)) if number not in set(item.gold) | set(related)]
    rng.shuffle(others)
    candidates = list(item.gold) + related + others
    order_seed = rng.getrandbits(64)

    def prompt_for(n: int) -> str:
        chosen = candidates[: max(n, len(item.gold))]
        random.Random(f"{order_seed}/{len(chosen)}").shuffle(chosen)
        context = "\n\n".join(DOCUMENT_TEMPLATE.format(number=k + 1, document=dataset.documents[d])
                              for k, d in enumerate(chosen))
        return chat(QA_TEMPLATE.format(context=context, query=item.question), QA_ANSWER_PREFIX)

    units, prompt, prompt_ids = sized_prompt(
        prompt_for, functools.partial(encode_prompt, tokenizer), length - answer_budget, haystack_units
    )
    units = min(max(units, len(item.gold)), len(candidates))
    answers = list(dict.fromkeys(item.answers))
    return EvalSample(
        task=task, length=length, index=index, prompt=prompt, prompt_ids=prompt_ids, answers=answers,
        continuation=format_answer("plain", answers), depths=[], haystack_units=units,
        answer_budget=answer_budget, metric="part", answer_style="plain",
    )
