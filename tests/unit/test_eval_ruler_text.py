"""Our RULER prompts equal the text RULER's generators write for the same draw.

Run: pytest tests/unit/test_eval_ruler_text.py

For every one of the 13 tasks a sample is built with a real (trained BPE) tokenizer; the test then
rebuilds, from the sample's draw (keys, values, depths or slots, haystack units, documents,
word lists), the text RULER's code at commit 4f6507e (April 2024) assembles from the same
random choices, written here from RULER's own rules (`scripts/data/synthetic/*.py`,
`constants.py`, `template.py`, `prepare.py`), and compares the two strings. It also checks that
the draw itself follows RULER's fixed-seed shuffles (needles, documents, word lists): a gold
document placed by another rule, or a multivalue question "for , and KEY", fails here.
"""

from __future__ import annotations

import os
import random

import pytest

from megatron_harpe.eval.cells import sample_factory
from megatron_harpe.eval.tasks.chat import PLAIN, ruler_prompt_format
from megatron_harpe.eval.tasks.haystack import load_prose_sentences
from megatron_harpe.eval.tasks.niah import NIAH_TASKS
from megatron_harpe.eval.tasks.qa import load_qa_dataset

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
QA_FILES = {"qa_1": os.path.join(DATA, "qa_squad_tiny.json"), "qa_2": os.path.join(DATA, "qa_hotpot_tiny.json")}
SEED = 42

# RULER's constants.py at 4f6507e (the prompt texts, verbatim)
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
    "{type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_PREFIX = " Answer:"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
MODEL_TEMPLATES = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: ",
}


def ruler_template(task_template: str, answer_prefix: str, model_template: str) -> str:
    """prepare.py: model_template.format(task_template=...) + answer_prefix."""
    return model_template.format(task_template=task_template) + answer_prefix


def shuffled(items: list, seed: int = SEED) -> list:
    """RULER's `random.Random(args.random_seed).shuffle(items)`."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def unshuffled(items: list, seed: int = SEED) -> list:
    """The list RULER's fixed-seed shuffle turned into `items`."""
    order = shuffled(list(range(len(items))), seed)
    original = [None] * len(items)
    for position, source in enumerate(order):
        original[source] = items[position]
    return original


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_harpe.eval.backends.hf import HFTokenizer
    from megatron_harpe.eval.testing import save_tiny_tokenizer

    directory = str(tmp_path_factory.mktemp("bpe"))
    save_tiny_tokenizer(directory, vocab_size=2048)
    return HFTokenizer.from_pretrained(directory)


def build(task, tokenizer, length=2048, index=0, template="base", fill="tight"):
    chat = PLAIN if template == "base" else ruler_prompt_format(template)
    return sample_factory(task, tokenizer, SEED, None, load_prose_sentences(), chat, QA_FILES, fill)(length, index)


def ruler_niah_text(task, draw, model_template):
    """niah.py generate_input_output for the sample's keys, values, depths/slots and haystack."""
    spec = NIAH_TASKS[task]
    needles = [
        f"One of the special magic {spec.value_kind} for {key} is: {value}."
        for key, key_values in zip(draw["keys"], draw["values"])
        for value in key_values
    ]
    needles = shuffled(needles)
    assert draw["needles"] == needles  # RULER's fixed-seed shuffle of the needles
    if draw["haystack"] == "prose":
        sentences = draw["units"]
        positions = [0] + sorted(int(len(sentences) * (depth / 100)) for depth in draw["depths"]) + [len(sentences)]
        pieces = []
        for i in range(1, len(positions)):
            pieces.append(" ".join(sentences[positions[i - 1] : positions[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        context = " ".join(pieces)
    else:
        sentences = list(draw["units"])
        for index, element in zip(sorted(draw["slots"], reverse=True), needles):
            sentences.insert(index, element)
        context = "\n".join(sentences)
    queries = draw["queries"]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template = ruler_template(NIAH_TEMPLATE, NIAH_PREFIX, model_template)
    kind = spec.value_kind
    if spec.num_queries * spec.num_values == 1:
        template = (
            template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        )
        kind = kind[:-1]
    answers = [value for key in queries for value in draw["values"][draw["keys"].index(key)]]
    return template.format(type_needle_v=kind, context=context, query=query), answers


@pytest.mark.parametrize("template", ["base", "lwm-chat"])
@pytest.mark.parametrize("task", list(NIAH_TASKS))
def test_niah_prompts_equal_rulers(tokenizer, task, template):
    for index in range(2):
        sample = build(task, tokenizer, index=index, template=template)
        expected, answers = ruler_niah_text(task, sample.draw, MODEL_TEMPLATES[template])
        assert sample.prompt == expected
        assert sample.answers == answers
        assert sample.prompt_tokens + sample.answer_budget <= 2048


def test_multivalue_asks_for_its_one_key(tokenizer):
    sample = build("niah_multivalue", tokenizer)
    key = sample.draw["keys"][0]
    assert f"What are all the special magic numbers for {key} mentioned in the provided text?" in sample.prompt
    assert sample.prompt.endswith(f"The special magic numbers for {key} mentioned in the provided text are")
    assert ", and" not in sample.prompt.rsplit("\n", 1)[-1]


def test_a_needle_at_depth_zero_keeps_rulers_empty_piece(tokenizer):
    """RULER joins an empty piece before a needle at depth 0: the context starts with a space."""
    from megatron_harpe.eval.tasks.niah import build_niah_sample

    sample = build_niah_sample(NIAH_TASKS["niah_single_2"], tokenizer, 1024, 0, SEED, fixed_depth=0)
    assert "afterwards.\n One of the special magic numbers for " in sample.prompt
    top = build_niah_sample(NIAH_TASKS["niah_single_2"], tokenizer, 1024, 0, SEED, fixed_depth=100)
    assert top.prompt.split("\nWhat is the special")[0].endswith(". ")  # needle, then an empty last piece


def ruler_vt_context(statements, noises, positions):
    """variable_tracking.py generate_input_output's haystack (April 2024)."""
    sentences = [NOISE + "\n"] * noises
    if len(sentences) <= len(statements):
        sentences = [n + "." if len(n.strip()) > 0 else n for n in [x for noise in sentences for x in noise.split(".")]]
    for insert_pi, j in zip(sorted(positions), range(len(statements))):
        sentences.insert(insert_pi + j, statements[j])
    return " ".join(sentences).replace(". \n", ".\n")


@pytest.mark.parametrize("template", ["base", "meta-chat"])
def test_vt_prompt_equals_rulers(tokenizer, template):
    sample = build("vt", tokenizer, template=template)
    draw = sample.draw
    full = ruler_template(VT_TEMPLATE, VT_PREFIX, MODEL_TEMPLATES[template])
    # the in-context example's template: RULER cuts the model template away and drops the last word
    cutoff, cutoff_answer = full.index(VT_TEMPLATE[:20]), full.index(VT_PREFIX[:10])
    icl_template = " ".join(full[cutoff:cutoff_answer].split()[:-1]) + full[cutoff_answer:]
    icl_input = icl_template.format(
        context=ruler_vt_context(draw["example_statements"], draw["example_noises"], draw["example_positions"]),
        query=draw["example_value"],
        num_v=5,
    )
    icl_example = icl_input + " " + " ".join(draw["example_names"]) + "\n\n"
    main = full.format(
        context=ruler_vt_context(draw["statements"], draw["noises"], draw["positions"]), query=draw["value"], num_v=5
    )
    assert sample.prompt == main[:cutoff] + " " + icl_example + "\n\n" + main[cutoff:]
    assert sample.answers == [statement.split()[1] for statement in draw["statements"]]

    # RULER sizes the example in steps of 5 paragraphs: prompt + its answer list + 30 tokens within 500
    def probe(n: int) -> int:
        example = icl_template.format(
            context=ruler_vt_context(draw["example_statements"], n, [0] * 5), query=draw["example_value"], num_v=5
        )
        return len(tokenizer.encode(example + f" {draw['example_names']}")) + 30

    assert draw["example_noises"] % 5 == 0 and probe(draw["example_noises"]) <= 500 < probe(draw["example_noises"] + 5)
    if template == "base":
        assert " in the text Answer: According to" in sample.prompt  # RULER's example lost its "above."


@pytest.mark.parametrize("length", [2048, 4096])
def test_cwe_prompt_equals_rulers(tokenizer, length):
    sample = build("cwe", tokenizer, length=length)
    draw = sample.draw
    common, uncommon = (3, 1) if length < 4096 else (10, 3)
    repeats = (6, 1) if length < 4096 else (30, 3)
    for listed, answer, (many, few) in (
        (draw["example_listed"], draw["example_answer"], (common, uncommon)),
        (draw["listed"], sample.answers, repeats),
    ):
        original = unshuffled(listed)  # RULER: common * many + uncommon * few, then its fixed-seed shuffle
        assert original[: 10 * many] == answer * many
        rare = original[10 * many : 10 * many + (len(original) - 10 * many) // few]
        assert original[10 * many :] == rare * few and not set(rare) & set(answer)

    def numbered(words):
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))

    template = ruler_template(CWE_TEMPLATE, CWE_PREFIX, MODEL_TEMPLATES["base"])
    example = template.format(context=numbered(draw["example_listed"]), query="") + numbered(draw["example_answer"])
    assert sample.prompt == example + "\n" + template.format(context=numbered(draw["listed"]), query="")


def test_fwe_prompt_equals_rulers(tokenizer):
    sample = build("fwe", tokenizer)
    words = sample.draw["words"]
    original = unshuffled(words)  # RULER: each vocabulary word repeated by its zeta count, in vocabulary order
    runs = []
    for word in original:
        if runs and runs[-1][0] == word:
            runs[-1][1] += 1
        else:
            runs.append([word, 1])
    assert runs[0][0] == "..." and [word for word, _ in runs[1:4]] == sample.answers
    counts = [count for _, count in runs]
    assert counts == sorted(counts, reverse=True) and counts[0] > 1.5 * counts[1]
    assert sample.prompt == ruler_template(FWE_TEMPLATE, FWE_PREFIX, "{task_template}").format(
        context=" ".join(words), query=""
    )


@pytest.mark.parametrize("task,length", [("qa_1", 500), ("qa_1", 1500), ("qa_2", 900), ("qa_2", 4000)])
def test_qa_prompt_equals_rulers(tokenizer, task, length):
    dataset = load_qa_dataset(task, QA_FILES[task])
    counts = set()
    for index in range(3):
        sample = build(task, tokenizer, length=length, index=index)
        draw = sample.draw
        item = dataset.questions[index]
        chosen = unshuffled(draw["documents"])  # RULER: gold, related, others, then its fixed-seed shuffle
        counts.add(len(chosen) == len(dataset.documents))
        if len(chosen) == len(dataset.documents):
            assert chosen == list(range(len(chosen)))  # RULER takes the whole (sorted) corpus
        else:
            gold = len(item.gold)
            assert chosen[:gold] == list(item.gold)
            rest = chosen[gold:]
            if len(rest) > len(item.related):
                assert rest[: len(item.related)] == list(item.related)  # all of them, in article order
                assert not set(rest[len(item.related) :]) & (set(item.gold) | set(item.related))
            else:
                assert set(rest) <= set(item.related)
        context = "\n\n".join(f"Document {i + 1}:\n{dataset.documents[d]}" for i, d in enumerate(draw["documents"]))
        assert sample.prompt == ruler_template(QA_TEMPLATE, QA_PREFIX, "{task_template}").format(
            context=context, query=item.question
        )
    assert length > 1000 or counts == {False}  # the short lengths exercise RULER's choice of documents


def test_qa_gold_document_sits_where_rulers_fixed_shuffle_puts_it():
    """seed 42: at a given document count the gold paragraph has one place in every sample."""
    depth = {
        count: round(100 * shuffled(list(range(count))).index(0) / (count - 1)) for count in (20, 25, 50, 100, 200)
    }
    assert depth == {20: 95, 25: 92, 50: 39, 100: 71, 200: 28}
    from megatron_harpe.eval.tasks.qa import QaQuestion, ruler_documents

    item = QaQuestion("q", ("a",), gold=(7,), related=(3, 9))
    for sample in range(5):
        documents = ruler_documents(item, 400, 50, random.Random(sample), SEED)
        assert documents.index(7) == shuffled(list(range(50))).index(0) == 19


@pytest.mark.parametrize(
    "task,step",
    [("niah_single_2", 500), ("niah_single_1", 5), ("niah_multikey_2", 5), ("vt", 10), ("cwe", 10), ("qa_1", 10)],
)
def test_ruler_fill_sizes_in_whole_steps_from_one_probe(tokenizer, task, step):
    samples = [build(task, tokenizer, length=2048, index=index, fill="ruler") for index in range(3)]
    tight = build(task, tokenizer, length=2048, index=0)
    for sample in samples:
        assert sample.prompt_tokens + sample.answer_budget <= 2048
    if task == "niah_single_2":  # the essay is counted in words, as RULER counts it
        words = [len(" ".join(sample.draw["units"]).split()) for sample in samples]
        assert all(count % step == 0 for count in words) and max(words) == words[0]
    elif task == "qa_1":  # steps of 10 documents, or the whole (tiny) corpus
        assert all(sample.haystack_units % step == 0 or sample.haystack_units == 8 for sample in samples)
    else:
        units = [sample.haystack_units for sample in samples]
        assert all(count % step == 0 for count in units) and units[0] >= max(units[1:])
    assert samples[0].prompt_tokens <= tight.prompt_tokens  # RULER's prompts are at most as long as ours
