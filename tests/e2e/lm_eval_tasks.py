"""Task YAMLs for lm-evaluation-harness over the small local JSON files in tests/data/lm_eval (our
own items, written for these tests): multiple choice (loglikelihood), generation
(generate_until, exact match) and plain text (loglikelihood_rolling), with few-shot examples
from their own train split. `write_tasks(directory)` writes them with absolute data paths, for
`tools/evaluate.py --lm-eval-include DIRECTORY`. `items` reads a run's short_samples.jsonl and
`assert_same_items` compares two runs item by item.
"""

from __future__ import annotations

import json
import os

import pytest

TOLERANCE = 1e-4  # fp32 logits of two implementations of the same model
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lm_eval")
SHORT_TASKS = "harpe_tiny_mc:2,harpe_tiny_gen:2,harpe_tiny_text:0"

MULTIPLE_CHOICE = """task: harpe_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}/tiny_mc_train.jsonl
    test: {data}/tiny_mc_test.jsonl
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GENERATION = """task: harpe_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}/tiny_gen_train.jsonl
    test: {data}/tiny_gen_test.jsonl
training_split: train
fewshot_split: train
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: [" "]
metadata:
  version: 1.0
"""
TEXT = """task: harpe_tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_text_test.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def write_tasks(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, text in (("tiny_mc", MULTIPLE_CHOICE), ("tiny_gen", GENERATION), ("tiny_text", TEXT)):
        with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as handle:
            handle.write(text.format(data=DATA))
    return directory


def offline_environment(cache: str) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": cache,
        "OMP_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
    }


def items(path: str) -> dict[tuple[str, int, str], dict]:
    """Every logged lm-eval item by (task, document, arguments)."""
    found = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            found[(record["task"], record["doc_id"], json.dumps(record["arguments"]))] = record
    return found


def responses(record: dict) -> list:
    """The model's answers of one item, flat: (log-likelihood, greedy) pairs, texts or sums."""
    return [
        response[0] if isinstance(response, list) and len(response) == 1 else response
        for response in record["responses"]
    ]


def assert_same_items(reference: dict, other: dict, tolerance: float = TOLERANCE) -> None:
    assert reference.keys() == other.keys()  # the same prompts, few-shot examples and continuations
    for key, record in reference.items():
        mine, theirs = responses(record), responses(other[key])
        for expected, got in zip(mine, theirs, strict=True):
            if isinstance(expected, str):
                assert got == expected, key
            elif isinstance(expected, list):  # (log-likelihood, is_greedy)
                assert got[0] == pytest.approx(expected[0], abs=tolerance), key
                assert got[1] == expected[1], key
            else:  # a rolling log-likelihood summed over the text
                assert got == pytest.approx(expected, rel=1e-5, abs=tolerance), key
