"""Sliding-window perplexity against direct computations, and document loading.

Run: pytest tests/unit/test_eval_perplexity.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron_harpe.eval.backends import load_backend
from megatron_harpe.eval.backends.base import encode_prompt
from megatron_harpe.eval.backends.synthetic import OracleBackend
from megatron_harpe.eval.perplexity import load_documents, perplexity_by_length, sliding_window_nll
from megatron_harpe.eval.tasks.haystack import load_prose_sentences
from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny_llama"))
    save_tiny_tokenizer(directory)
    save_tiny_llama(directory, seed=5)
    return load_backend(directory)


@pytest.fixture(scope="module")
def document(backend) -> list[int]:
    return encode_prompt(backend.tokenizer, " ".join(load_prose_sentences()[:40]))[:300]


def _logprob_of_last(backend, context: list[int]) -> float:
    with torch.no_grad():
        logits = backend.model(torch.tensor([context[:-1]])).logits[0, -1]
    return float(torch.log_softmax(logits, -1)[context[-1]])


def test_window_covering_the_document_is_full_context_perplexity(backend, document):
    nll, count = sliding_window_nll(backend, document, window=len(document) + 10, stride=64)
    with torch.no_grad():
        logits = backend.model(torch.tensor([document])).logits[0, :-1]
    direct = -torch.log_softmax(logits, -1).gather(1, torch.tensor(document[1:])[:, None]).sum()
    assert count == len(document) - 1
    assert nll == pytest.approx(float(direct), rel=1e-5)
    by_length = perplexity_by_length(backend, [document], [len(document)], stride=256, progress=False)
    assert by_length[len(document)]["ppl"] == pytest.approx(math.exp(float(direct) / count), rel=1e-5)


@pytest.mark.parametrize("window, stride", [(64, 16), (50, 49), (100, 30)])
def test_sliding_windows_score_each_token_once_with_its_window_context(backend, document, window, stride):
    ids = document[:180]
    nll, count = sliding_window_nll(backend, ids, window=window, stride=stride)
    # brute force: token t is scored by the first window [b, b + window) that contains it
    expected = 0.0
    for t in range(1, len(ids)):
        begin = next(b for b in range(0, len(ids), stride) if b + window > t)
        expected -= _logprob_of_last(backend, ids[begin : t + 1])
    assert count == len(ids) - 1
    assert nll == pytest.approx(expected, rel=1e-4)


def test_stride_not_below_window_is_rejected(backend, document):
    for stride in (32, 64, 0):
        with pytest.raises(ValueError, match="stride"):
            sliding_window_nll(backend, document, window=32, stride=stride)


def test_oracle_perplexity_is_vocabulary_size(backend, document):
    oracle = OracleBackend(backend.tokenizer)
    result = perplexity_by_length(oracle, [document, document[:100]], [64, 200], stride=16, progress=False)
    assert result[64]["ppl"] == pytest.approx(backend.tokenizer.vocab_size, rel=1e-6)
    assert result[64]["documents"] == 2 and result[200]["documents"] == 1
    assert result[200]["tokens"] == 199
    assert perplexity_by_length(oracle, [document[:10]], [64], progress=False)[64]["ppl"] is None


def test_longer_document_scope_slides_over_more_tokens(backend, document):
    result = perplexity_by_length(backend, [document], [64], stride=32, document_tokens=256, progress=False)
    assert result[64]["tokens"] == 255 and result[64]["document_tokens"] == 256


def test_load_documents_from_jsonl_txt_and_megatron_dataset(backend, tmp_path):
    tokenizer = backend.tokenizer
    texts = ["short text.", " ".join(load_prose_sentences()[:30]), " ".join(load_prose_sentences()[30:60])]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": text}) + "\n" for text in texts), encoding="utf-8")
    documents = load_documents(str(jsonl), tokenizer, text_key="content", min_tokens=50)
    assert documents == [encode_prompt(tokenizer, texts[1]), encode_prompt(tokenizer, texts[2])]
    assert len(load_documents(str(jsonl), tokenizer, text_key="content", max_documents=1)) == 1
    with pytest.raises(ValueError, match="no 'text' field"):
        load_documents(str(jsonl), tokenizer)
    with pytest.raises(ValueError, match="no document with at least"):
        load_documents(str(jsonl), tokenizer, text_key="content", min_tokens=10**6)

    text_file = tmp_path / "doc.txt"
    text_file.write_text(texts[1], encoding="utf-8")
    assert load_documents(str(text_file), tokenizer) == [encode_prompt(tokenizer, texts[1])]

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "megatron_docs")
    token_lists = [encode_prompt(tokenizer, text) for text in texts]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for ids in token_lists:
        builder.add_document(torch.tensor(ids, dtype=torch.int32), [len(ids)])
    builder.finalize(prefix + ".idx")
    assert load_documents(prefix, tokenizer) == token_lists
    assert load_documents(prefix + ".bin", tokenizer, min_tokens=50) == token_lists[1:]
    with pytest.raises(ValueError, match="cannot read documents"):
        load_documents(str(tmp_path / "nothing.csv"), tokenizer)
